"""Shard writers: WebDataset tars, Parquet files and rejects, one bucket at a time."""

from __future__ import annotations

import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from orsgen.schemas.arrow import EXAMPLE_SCHEMA, REJECT_SCHEMA, reject_to_row
from orsgen.schemas.config import WriteConfig
from orsgen.schemas.records import ImageExample, Reject
from orsgen.stages.write.plan import EncodedExample, OutputConflictError, REJECTS_FORMAT, ShardStats, _IMAGE_INDEX, _PARQUET_GROUP_OVERHEAD, _PARQUET_ROW_OVERHEAD, _TAR_BLOCK, _TAR_RECORD, _plan, _read_arrow, _sorted_checked, _split_by_size, encode_example, shard_path
from orsgen.stages.write.files import _HashingWriter, _completed, _fs_root, _publish

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------- writers


def _tar_header(name: str, size: int) -> bytes:
    """The header block(s) ``tarfile`` writes for a regular member in PAX format.

    PAX is fixed so that long keys get the same headers on every Python;
    every header field that varies between machines is zeroed.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _tar_writer(part: Sequence[EncodedExample]) -> Callable[[_HashingWriter], None]:
    def produce(sink: _HashingWriter) -> None:
        # The same bytes as ``tarfile.open(mode="w", format=PAX_FORMAT)`` with
        # ``addfile`` per member (tests/test_write.py checks it), written
        # straight to the sink: the member data is passed on as is, with no
        # file-object wrapper or chunked copy, and the small pieces between
        # two data members (padding and the next header) go out as one write.
        offset = 0
        pending = b""  # padding of the previous member + the next header
        for e in part:
            for ext, data in (("jpg", e.image), ("json", e.json)):
                header = _tar_header(f"{e.key}.{ext}", len(data))
                sink.write(pending + header)
                sink.write(data)
                offset += len(pending) + len(header) + len(data)
                pending = _NUL_BLOCK[: -len(data) % _TAR_BLOCK]
        # End of archive: two zero blocks, then zeros up to a whole record.
        end = len(pending) + 2 * _TAR_BLOCK
        sink.write(pending + bytes(2 * _TAR_BLOCK + -(offset + end) % _TAR_RECORD))

    return produce


_NUL_BLOCK = bytes(_TAR_BLOCK)


def _leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet column paths of a schema's leaves, as pyarrow names them."""

    def walk(prefix: str, t: pa.DataType) -> Iterator[str]:
        if pa.types.is_struct(t):
            for i in range(t.num_fields):
                yield from walk(f"{prefix}.{t.field(i).name}", t.field(i).type)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            yield from walk(f"{prefix}.list.element", t.value_type)
        else:
            yield prefix

    return [p for f in schema for p in walk(f.name, f.type)]


# Dictionary-encoding encoded images only burns CPU (every value is unique);
# the text columns, by contrast, repeat a lot.
_DICTIONARY_COLUMNS = [p for p in _leaf_paths(EXAMPLE_SCHEMA) if p != "image"]


def _row_group(part: Sequence[EncodedExample]) -> pa.Table:
    """Concatenates the examples' one-row batches into one row group's table."""
    batches = [_read_arrow(e) for e in part]
    # One chunk per column, as Table.from_pylist gives: the Parquet writer
    # cuts pages per chunk, so a table of one-row chunks would write other
    # page boundaries (and other bytes) than the same rows in one chunk.
    table = pa.Table.from_batches(batches, schema=EXAMPLE_SCHEMA).combine_chunks()
    images = pa.array([e.image for e in part], type=pa.binary())
    return table.set_column(_IMAGE_INDEX, EXAMPLE_SCHEMA.field(_IMAGE_INDEX), images)


def _parquet_writer(part: Sequence[EncodedExample], cfg: WriteConfig) -> Callable[[_HashingWriter], None]:
    cap = cfg.parquet_row_group_max_bytes

    def produce(sink: _HashingWriter) -> None:
        writer = pq.ParquetWriter(
            sink,
            EXAMPLE_SCHEMA,
            compression=cfg.parquet_compression,
            use_dictionary=_DICTIONARY_COLUMNS,
        )
        try:
            # Row groups are built one at a time so memory stays at one group,
            # not one shard.
            sizes = [len(e.image) + len(e.json) + _PARQUET_ROW_OVERHEAD for e in part]
            for a, b in _split_by_size(sizes, len(part), max(1, cap - _PARQUET_GROUP_OVERHEAD)):
                writer.write_table(_row_group(part[a:b]), row_group_size=b - a)
        finally:
            writer.close()

    return produce


def _data_stats(
    fmt: str, split: str, bucket: int, part_no: int, part: Sequence[EncodedExample], num_buckets: int
) -> ShardStats:
    kinds: Counter[str] = Counter()
    for e in part:
        kinds.update(dict(e.samples_by_kind))
    return ShardStats(
        path=shard_path(split, bucket, part_no, fmt, num_buckets),
        format=fmt,
        split=split,
        bucket=bucket,
        part=part_no,
        n_images=len(part),
        n_samples=sum(e.n_samples for e in part),
        n_instances=sum(e.n_instances for e in part),
        samples_by_kind=dict(sorted(kinds.items())),
        rejects_by_reason={},
        n_bytes=0,
        sha256="",
    )


def _check_skip(found: ShardStats, planned: ShardStats, root: str) -> ShardStats:
    # A completed shard from another input set would be kept silently; the
    # counts are a cheap check that it holds what this run would write.
    got = (found.n_images, found.n_samples, found.n_instances, found.samples_by_kind)
    want = (planned.n_images, planned.n_samples, planned.n_instances, planned.samples_by_kind)
    if got != want or found.format != planned.format or found.split != planned.split:
        raise OutputConflictError(
            f"{posixpath.join(root, planned.path)} is a completed shard of another run "
            f"(it holds images/samples/instances/kinds {got}, this run would write {want}); "
            "orsgen never overwrites existing files. Choose a new --out, or move the old output away."
        )
    return found


def write_bucket(
    out: str, split: str, bucket: int, examples: Iterable[EncodedExample | ImageExample], cfg: WriteConfig
) -> list[ShardStats]:
    """Writes one ``(split, bucket)`` group as shards in every configured format.

    The examples are sorted by key and planned into parts with
    ``plan_parts(cfg.shard_max_images, cfg.shard_max_bytes)``; each part is
    written as ``<format>/data/<split>-<bucket>-of-<num_buckets>-<part>.<ext>``, then its
    stats sidecar, then its ``.done`` marker. A shard that already has its
    marker is not rewritten (its stats come back with ``skipped=True``).

    Pass ``EncodedExample`` values (from ``encode_example`` with
    ``cfg.formats``) so that the encoding runs in parallel before the
    shuffle; ``ImageExample`` values are encoded here, serially, and give the
    same bytes.

    The whole group is held in memory (it must be sorted), so choose
    ``num_buckets`` such that a bucket fits in a worker.

    Args:
        out: the output root, any fsspec URL.
        split: the split all examples belong to.
        bucket: the bucket of the group, ``bucket_of(key, cfg.num_buckets)``.
        examples: the group's examples, in any order; none writes nothing.
        cfg: shard sizes, formats and Parquet options.

    Returns:
        Stats of every shard, in ``cfg.formats`` order, then part order.

    Raises:
        ValueError: a key is unsafe or repeated, an example's ``split``
            differs from ``split``, or an ``EncodedExample`` lacks its
            Arrow row while Parquet is written.
        OutputConflictError: a shard path holds different bytes, or a
            completed shard of a different run.
    """
    formats = list(dict.fromkeys(cfg.formats))  # dedupe, keep order
    items = _sorted_checked(examples)
    encoded = [x if isinstance(x, EncodedExample) else encode_example(x, formats) for x in items]
    for e in encoded:
        if e.split != split:
            raise ValueError(
                f"example {e.key!r} has split {e.split!r} but is written to split {split!r}; "
                "group examples by their own split before writing."
            )
        if "parquet" in formats and not e.arrow:
            _read_arrow(e)  # raises, before any file is written
    if not encoded:
        return []
    fs, root = _fs_root(out)
    parts = [encoded[a:b] for a, b in _plan([e.size for e in encoded], cfg.shard_max_images, cfg.shard_max_bytes)]
    stats: list[ShardStats] = []
    for fmt in formats:
        for part_no, part in enumerate(parts):
            planned = _data_stats(fmt, split, bucket, part_no, part, cfg.num_buckets)
            found = _completed(fs, root, planned.path)
            if found is not None:
                stats.append(_check_skip(found, planned, root))
                continue
            produce = _tar_writer(part) if fmt == "webdataset" else _parquet_writer(part, cfg)
            stats.append(_publish(fs, root, planned, produce))
    return stats


def _reject_sort_key(r: Reject) -> tuple[str, ...]:
    # image_id last only breaks ties, so the order is total and reruns match.
    return (str(r.level), r.stage, r.reason, r.source_key, r.message, r.image_id)


def write_rejects_bucket(
    out: str, bucket: int, rejects: Iterable[Reject], *, compression: str = "zstd"
) -> ShardStats | None:
    """Writes one bucket of rejects as ``rejects/rejects-b<bucket>.parquet``.

    Rows follow ``REJECT_SCHEMA``, sorted by (level, stage, reason,
    source_key, message). Same safety rules as ``write_bucket``.

    Args:
        out: the output root, any fsspec URL.
        bucket: the bucket of the group.
        rejects: the group's rejects, in any order.
        compression: Parquet codec.

    Returns:
        The shard's stats (``rejects_by_reason`` keyed ``"<level>/<reason>"``),
        or None when there are no rejects (nothing is written).

    Raises:
        OutputConflictError: the shard path holds different bytes.
    """
    rows = sorted(rejects, key=_reject_sort_key)
    if not rows:
        return None
    fs, root = _fs_root(out)
    reasons = Counter(f"{r.level}/{r.reason}" for r in rows)
    planned = ShardStats(
        path=f"rejects/rejects-b{bucket:05d}.parquet",
        format=REJECTS_FORMAT,
        split="",
        bucket=bucket,
        part=0,
        n_images=0,
        n_samples=0,
        n_instances=0,
        samples_by_kind={},
        rejects_by_reason=dict(sorted(reasons.items())),
        n_bytes=0,
        sha256="",
    )
    found = _completed(fs, root, planned.path)
    if found is not None:
        if found.rejects_by_reason != planned.rejects_by_reason:
            raise OutputConflictError(
                f"{posixpath.join(root, planned.path)} is a completed rejects shard of another run "
                f"(reasons {found.rejects_by_reason}, this run has {planned.rejects_by_reason}); "
                "choose a new --out, or move the old output away."
            )
        return found

    def produce(sink: _HashingWriter) -> None:
        table = pa.Table.from_pylist([reject_to_row(r) for r in rows], schema=REJECT_SCHEMA)
        pq.write_table(table, sink, compression=compression)

    return _publish(fs, root, planned, produce)
