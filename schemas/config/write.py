"""Config of the write stage."""

from __future__ import annotations

from typing import Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field, field_validator


class WriteConfig(ConfigModel):
    """Shard writers.

    Attributes:
        formats: which outputs to write.
        shard_max_images: roll a shard over after this many images.
        shard_max_bytes: roll a shard over before it passes this many bytes.
        num_buckets: images are hashed into this many buckets per split; each
            bucket is written as one or more shards, by one worker. ``auto``
            (the default) sizes every split on its own: the pipeline counts
            each split's images and bytes first (a small side input) and
            gives it ``ceil(max(images / (0.9 * shard_max_images), bytes /
            (0.9 * shard_max_bytes)))`` buckets, so a bucket is about one
            shard, small splits included. An integer fixes the count for
            every split (a 1% split then gets tiny shards).
        rejects_shard_max_rows: roll a rejects shard over after this many
            rows; with ``num_buckets: auto`` the rejects get
            ``ceil(rejects / (0.9 * rejects_shard_max_rows))`` buckets.
        spill_memory_max_bytes: a writer holds at most this many bytes of
            records in memory; past it, the group's records are spilled to
            worker-local disk and streamed back in key order, so a worker
            needs about this plus one Parquet row group of memory, whatever
            the group's size. Does not change the output, the config's
            sha256 or the manifest.
        spill_dir: worker-local folder for spill files (None: the system's
            temporary folder, ``$TMPDIR``). Spill files are unlinked as soon
            as they are created, so a crash leaves none behind. Like
            ``spill_memory_max_bytes``, not part of the config's identity.
        hash_in_thread: hash each shard's bytes (sha256, for the sidecar and
            the manifest) on a helper thread while the writing thread writes
            them. Off by default: it can shorten a write only while a core
            is idle, and costs CPU time (the hand-over, and hashing bytes no
            longer in the writing core's cache); on a Dataflow worker every
            core runs an SDK process. Does not change the output; not part
            of the config's identity.
        parquet_row_group_max_bytes: Parquet row groups stay under this size.
        parquet_compression: Parquet codec.
    """

    formats: list[Literal["webdataset", "parquet"]] = Field(default_factory=lambda: ["webdataset", "parquet"])
    shard_max_images: int = Field(default=1000, ge=1)
    shard_max_bytes: int = Field(default=1_000_000_000, ge=1024)
    num_buckets: int | Literal["auto"] = Field(default="auto")
    rejects_shard_max_rows: int = Field(default=1_000_000, ge=1)
    # Worker resources, not dataset content: excluded from model_dump, so they
    # are neither in the config's sha256 nor in the manifest, and a rerun
    # after an out-of-memory crash may change them and still resume.
    spill_memory_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0, exclude=True)
    spill_dir: str | None = Field(default=None, exclude=True)
    hash_in_thread: bool = Field(default=False, exclude=True)
    parquet_row_group_max_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    parquet_compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"

    @field_validator("num_buckets")
    @classmethod
    def _num_buckets_in_range(cls, v: int | str) -> int | str:
        # Shard names give the bucket five digits.
        if isinstance(v, int) and not 1 <= v <= 99_999:
            raise ValueError(f"write.num_buckets must be 'auto' or an integer in [1, 99999], got {v}.")
        return v
