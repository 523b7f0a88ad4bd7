"""Records, the Parquet schema and the config models."""
