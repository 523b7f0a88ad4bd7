"""Shard writers: WebDataset tars, Parquet files, rejects and the manifest.

The pure core of the ``write`` stage, in four modules: ``plan`` (names,
buckets, encoding, part plans), ``files`` (atomic writes), ``shards`` (the
writers) and ``manifest``. The Beam wrapper encodes every example
with ``encode_example`` (a parallel map on all workers, before the shuffle),
groups the ``EncodedExample`` values by ``(split, bucket_of(key, num_buckets))``
and calls ``write_group`` (``write_bucket`` plus dedupe) once per group,
which then only spills, sorts, plans and streams bytes; rejects are grouped
by bucket and go to ``write_rejects_bucket``; the collected ``ShardStats`` go
to ``build_manifest`` and ``write_manifest``. With ``num_buckets: auto`` the
bucket count of each split follows its size (``auto_num_buckets``).

Memory is bounded whatever a group's size (``spill``): records past
``write.spill_memory_max_bytes`` go to worker-local disk in sorted runs,
only small per-record entries stay in memory, and shards are streamed from
there in key order.

Layout under an output root ``out`` (any fsspec URL)::

    out/webdataset/data/<split>-<bucket:05d>-of-<num_buckets:05d>-<part:04d>.tar
    out/parquet/data/<split>-<bucket:05d>-of-<num_buckets:05d>-<part:04d>.parquet
    out/rejects/rejects-<bucket:05d>-of-<num_buckets:05d>-<part:04d>.parquet
    out/_meta/shards/<data file path>.stats.json   # per-shard stats sidecar
    out/_meta/shards/<data file path>.done         # completion marker, written last
    out/manifest.json

Sidecars and markers live under ``_meta`` so that ``datasets.load_dataset``
pointed at ``out/parquet`` or at the tars sees data files only.

Safety rules (why this module does not use Beam's file sinks: they delete
matching files in ``pre_finalize``):

* every file is written to ``.<name>.tmp-<random>`` in its final folder and
  renamed into place, so a reader never sees a partial shard;
* the ``.done`` marker is written last; a shard with its marker is complete
  and is skipped on a rerun;
* a file that already exists is never overwritten: identical bytes are
  adopted, different bytes raise ``OutputConflictError``.

Both formats of a bucket use the same part plan, so ``webdataset`` part ``i``
and ``parquet`` part ``i`` hold the same examples.
"""

from orsgen.stages.write.plan import OutputConflictError
from orsgen.stages.write.manifest import build_manifest, write_manifest
from orsgen.stages.write.plan import (
    MANIFEST_NAME,
    META_DIR,
    REJECTS_FORMAT,
    EncodedExample,
    ShardStats,
    bucket_of,
    auto_num_buckets,
    encode_example,
    plan_parts,
    shard_name,
    shard_path,
)
from orsgen.stages.write.shards import GroupWrite, rejects_path, write_bucket, write_group, write_rejects_bucket

__all__ = [
    "MANIFEST_NAME",
    "META_DIR",
    "REJECTS_FORMAT",
    "EncodedExample",
    "OutputConflictError",
    "ShardStats",
    "bucket_of",
    "build_manifest",
    "GroupWrite",
    "auto_num_buckets",
    "encode_example",
    "rejects_path",
    "write_group",
    "plan_parts",
    "shard_name",
    "shard_path",
    "write_bucket",
    "write_manifest",
    "write_rejects_bucket",
]
