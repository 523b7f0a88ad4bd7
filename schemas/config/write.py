"""Config of the write stage."""

from __future__ import annotations

from typing import Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field


class WriteConfig(ConfigModel):
    """Shard writers.

    Attributes:
        formats: which outputs to write.
        shard_max_images: roll a shard over after this many images.
        shard_max_bytes: roll a shard over before it passes this many bytes.
        num_buckets: images are hashed into this many buckets per split; each
            bucket is written as one or more shards. More buckets spread work
            over more workers.
        parquet_row_group_max_bytes: Parquet row groups stay under this size.
        parquet_compression: Parquet codec.
    """

    formats: list[Literal["webdataset", "parquet"]] = Field(default_factory=lambda: ["webdataset", "parquet"])
    shard_max_images: int = Field(default=1000, ge=1)
    shard_max_bytes: int = Field(default=1_000_000_000, ge=1024)
    num_buckets: int = Field(default=4, ge=1, le=99_999)
    parquet_row_group_max_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    parquet_compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
