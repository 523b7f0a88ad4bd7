"""Tools that work on a finished orsgen dataset: read, export, publish, load, evaluate, preview, the SAM2 report."""
