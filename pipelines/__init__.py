"""Beam pipelines assembled from stages, and the CLI."""
