"""Ingest: SA-1B shards, COCO-family annotations, image checks, the safe unpickler, duplicate detection."""
