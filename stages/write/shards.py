"""Shard writers: WebDataset tars, Parquet files and rejects, one bucket at a time, in bounded memory."""

from __future__ import annotations

import collections
import itertools
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from orsgen.schemas.arrow import EXAMPLE_SCHEMA, REJECT_SCHEMA, reject_to_row
from orsgen.schemas.config import WriteConfig
from orsgen.schemas.records import ImageExample, Reject
from orsgen.stages.write.plan import EncodedExample, OutputConflictError, REJECTS_FORMAT, ShardStats, _PARQUET_GROUP_OVERHEAD, _PARQUET_ROW_OVERHEAD, _TAR_BLOCK, _TAR_RECORD, _plan, _sorted_checked, _split_by_size, encode_example, rows_batch, shard_path
from orsgen.stages.write.files import _HashingWriter, _completed, _fs_root, _publish
from orsgen.stages.write.spill import DEFAULT_SPILL_MEMORY_MAX_BYTES, SortedSpill, SpilledGroup, SpillEntry
from orsgen.stages.ingest.dedupe import dedupe_by_key

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------- writers


def _tar_header_slow(name: str, size: int) -> bytes:
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


# The one ustar block ``_tar_header_slow`` gives for a name of at most 100
# ASCII characters and a size below 8 GiB (then no PAX header is needed),
# split around the name, size and checksum fields. Building it from these
# pieces costs about a tenth of ``TarInfo.tobuf``, which is a visible share
# of writing a shard of small members (tests/test_write.py compares the two).
_USTAR_MODE_IDS = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
_USTAR_MTIME = b"00000000000\x00"
_USTAR_TAIL = b"0" + bytes(100) + tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)  # type ... padding
# Checksum of the constant bytes; the checksum field itself counts as 8 spaces.
_USTAR_CONST_SUM = sum(_USTAR_MODE_IDS) + sum(_USTAR_MTIME) + sum(_USTAR_TAIL) + 8 * ord(" ")


def _tar_header(name: str, size: int) -> bytes:
    """The header block(s) ``tarfile`` writes for a regular member in PAX format (see ``_tar_header_slow``)."""
    if len(name) > 100 or not name.isascii() or not 0 <= size < 8**11:
        return _tar_header_slow(name, size)
    raw = name.encode("ascii")
    size_field = b"%011o\x00" % size
    checksum = _USTAR_CONST_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (raw, bytes(100 - len(raw)), _USTAR_MODE_IDS, size_field, _USTAR_MTIME, b"%06o\x00 " % checksum, _USTAR_TAIL)
    )


def _tar_writer(
    records: Callable[[], Iterable[tuple[str, bytes | memoryview, bytes | memoryview]]],
) -> Callable[[_HashingWriter], None]:
    def produce(sink: _HashingWriter) -> None:
        # The same bytes as ``tarfile.open(mode="w", format=PAX_FORMAT)`` with
        # ``addfile`` per member (tests/test_write.py checks it), written
        # straight to the sink: the member data is passed on as is, with no
        # file-object wrapper or chunked copy, and the small pieces between
        # two data members (padding and the next header) go out as one write.
        # Records are pulled one at a time, so memory stays at one record.
        offset = 0
        pending = b""  # padding of the previous member + the next header
        for key, image, data_json in records():
            for ext, data in (("jpg", image), ("json", data_json)):
                header = _tar_header(f"{key}.{ext}", len(data))
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


def _row_group(entries: Sequence[SpillEntry], group: SpilledGroup) -> pa.Table:
    """Builds one row group's table, reading the records back one at a time.

    The image column is filled straight from a generator (``pa.array`` with
    ``size``), so only the Arrow copy of the row group's images is ever held,
    never a Python list of the records as well; the other columns are built
    from the records' JSON members (``rows_batch``), in one chunk per column:
    the Parquet writer cuts pages per chunk, so a table of one-row chunks
    would write other page boundaries (and other bytes).
    """
    members: list[bytes] = []

    def images() -> Iterator[bytes]:
        for entry in entries:
            enc = group.get(entry)
            members.append(enc.json)
            yield enc.image

    image_array = pa.array(images(), type=pa.binary(), size=len(entries))
    return pa.Table.from_batches([rows_batch(members, image_array)], schema=EXAMPLE_SCHEMA)


#: Arrow's write buffer in front of a Parquet shard's sink.
_PARQUET_WRITE_BUFFER_BYTES = 1 << 20


class _CutOffSink:
    """A shard's sink as Arrow's buffered stream sees it; ``cut_off`` makes it take nothing more.

    After a failed write the buffer must not be flushed into the sink (the
    file is discarded; the sink may be what failed), and Arrow flushes a
    stream that is neither closed nor detached when it is destroyed.
    """

    def __init__(self, sink: _HashingWriter) -> None:
        self._sink: _HashingWriter | None = sink

    def cut_off(self) -> None:
        self._sink = None

    def write(self, data: bytes | memoryview) -> int:
        return self._sink.write(data) if self._sink is not None else memoryview(data).nbytes

    def tell(self) -> int:
        return self._sink.tell() if self._sink is not None else 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the sink belongs to the caller

    @property
    def closed(self) -> bool:
        return False


def _parquet_writer(
    part: Sequence[SpillEntry], group: SpilledGroup, cfg: WriteConfig
) -> Callable[[_HashingWriter], None]:
    cap = cfg.parquet_row_group_max_bytes

    def produce(sink: _HashingWriter) -> None:
        # The Parquet writer sends every page header and page as a write of
        # its own (about four per column chunk: ~240 for a row group of this
        # schema), each a call into Python; Arrow's buffer hands the sink the
        # same byte stream in a few large pieces.
        cut = _CutOffSink(sink)
        stream = pa.BufferedOutputStream(pa.PythonFile(cut, mode="w"), buffer_size=_PARQUET_WRITE_BUFFER_BYTES)
        try:
            writer = pq.ParquetWriter(
                stream,
                EXAMPLE_SCHEMA,
                compression=cfg.parquet_compression,
                use_dictionary=_DICTIONARY_COLUMNS,
            )
            try:
                # Row groups are read back and built one at a time, so memory
                # stays at one row group, not one shard (Arrow's Parquet writer
                # holds about four times the row group while it encodes it).
                sizes = [e.n_image + e.n_json + _PARQUET_ROW_OVERHEAD for e in part]
                for a, b in _split_by_size(sizes, len(part), max(1, cap - _PARQUET_GROUP_OVERHEAD)):
                    writer.write_table(_row_group(part[a:b], group), row_group_size=b - a)
            finally:
                writer.close()
            stream.close()  # flushes what is buffered into the sink (which stays open)
        except BaseException:
            # The file is discarded: nothing more reaches the sink, whatever
            # Arrow flushes when the stream and the writer are destroyed.
            cut.cut_off()
            raise

    return produce


def _data_stats(
    fmt: str, split: str, bucket: int, part_no: int, part: Sequence[SpillEntry | EncodedExample], num_buckets: int
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


@dataclass(frozen=True, slots=True)
class GroupWrite:
    """What ``write_group`` did with one ``(split, bucket)`` group.

    Attributes:
        stats: stats of every shard, in ``cfg.formats`` order, then part order.
        written: the entries of the written examples, in key order.
        dropped: each dropped duplicate copy's entry with its
            ``duplicate_image`` reject (see ``stages.ingest.dedupe``).
        spilled: whether the group went to worker-local disk.
    """

    stats: list[ShardStats]
    written: list[SpillEntry]
    dropped: list[tuple[SpillEntry, Reject]]
    spilled: bool


def _resolve_num_buckets(cfg: WriteConfig, num_buckets: int | None) -> int:
    nb = cfg.num_buckets if num_buckets is None else num_buckets
    if not isinstance(nb, int):
        raise ValueError(
            "write.num_buckets is 'auto': pass the split's bucket count as num_buckets= "
            "(the pipeline computes it with plan.auto_num_buckets from the split's size)."
        )
    if nb < 1:
        raise ValueError(f"num_buckets must be at least 1, got {nb}; set write.num_buckets >= 1.")
    return nb


def _spill_group(
    examples: Iterable[EncodedExample | ImageExample], split: str, formats: list[str], cfg: WriteConfig
) -> SpilledGroup:
    group = SpilledGroup(cfg.spill_memory_max_bytes, cfg.spill_dir)
    try:
        for x in examples:
            enc = x if isinstance(x, EncodedExample) else encode_example(x, formats)
            # Checked on arrival, so a bad group fails before any file is written.
            if enc.split != split:
                raise ValueError(
                    f"example {enc.key!r} has split {enc.split!r} but is written to split {split!r}; "
                    "group examples by their own split before writing."
                )
            group.add(enc)
        group.seal()
    except BaseException:
        group.close()
        raise
    return group


def _write_entries(
    out: str,
    split: str,
    bucket: int,
    group: SpilledGroup,
    entries: list[SpillEntry],
    cfg: WriteConfig,
    formats: list[str],
    nb: int,
) -> list[ShardStats]:
    """Writes key-sorted, checked entries of ``group`` as parts in every format."""
    if not entries:
        return []
    fs, root = _fs_root(out)
    parts = [entries[a:b] for a, b in _plan([e.size for e in entries], cfg.shard_max_images, cfg.shard_max_bytes)]
    stats: list[ShardStats] = []
    for fmt in formats:
        for part_no, part in enumerate(parts):
            planned = _data_stats(fmt, split, bucket, part_no, part, nb)
            found = _completed(fs, root, planned.path)
            if found is not None:
                stats.append(_check_skip(found, planned, root))
                continue
            if fmt == "webdataset":
                # Fresh bytes per record let the hashing thread lag behind the writes.
                reuse = not cfg.hash_in_thread
                produce = _tar_writer(lambda part=part, reuse=reuse: group.tar_members(part, reuse_buffer=reuse))
            else:
                produce = _parquet_writer(part, group, cfg)
            stats.append(_publish(fs, root, planned, produce, hash_in_thread=cfg.hash_in_thread))
    return stats


def write_bucket(
    out: str,
    split: str,
    bucket: int,
    examples: Iterable[EncodedExample | ImageExample],
    cfg: WriteConfig,
    *,
    num_buckets: int | None = None,
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

    Memory is bounded whatever the group's size: ``examples`` is consumed
    once, as an iterator; records beyond ``cfg.spill_memory_max_bytes`` go
    to a worker-local spill file (``cfg.spill_dir``) and are read back one
    record (tar) or one row group (Parquet) at a time; see
    ``stages.write.spill``. Spilling never changes the output bytes.

    Args:
        out: the output root, any fsspec URL.
        split: the split all examples belong to.
        bucket: the bucket of the group, ``bucket_of(key, num_buckets)``.
        examples: the group's examples, in any order; none writes nothing.
        cfg: shard sizes, formats, Parquet options and the spill budget.
        num_buckets: the split's bucket count (it is in the shard names);
            None takes ``cfg.num_buckets``, which must then be an integer.

    Returns:
        Stats of every shard, in ``cfg.formats`` order, then part order.

    Raises:
        ValueError: a key is unsafe or repeated, an example's ``split``
            differs from ``split``, or no bucket count is known.
        OutputConflictError: a shard path holds different bytes, or a
            completed shard of a different run.
    """
    formats = list(dict.fromkeys(cfg.formats))  # dedupe, keep order
    nb = _resolve_num_buckets(cfg, num_buckets)
    with _spill_group(examples, split, formats, cfg) as group:
        entries = _sorted_checked(group.entries)
        return _write_entries(out, split, bucket, group, entries, cfg, formats, nb)


def write_group(
    out: str,
    split: str,
    bucket: int,
    examples: Iterable[EncodedExample | ImageExample],
    cfg: WriteConfig,
    *,
    num_buckets: int | None = None,
    reject_after_dedupe: Callable[[SpillEntry], Reject | None] | None = None,
) -> GroupWrite:
    """Like ``write_bucket``, but copies of one key are deduplicated first.

    The pipeline's per-group entry point: copies of one key hash to the same
    bucket, so the group keeps the copy ``dedupe_by_key`` chooses (by
    content, not arrival order) and returns the others with their
    ``duplicate_image`` rejects. Same memory bound and arguments as
    ``write_bucket``.

    ``reject_after_dedupe`` then judges each kept entry (its key, image id
    and counts; e.g. the build's ``no_regions`` rule): an entry it returns a
    reject for is dropped with that reject, so a copy of an image is a
    ``duplicate_image`` whatever else is wrong with it.

    Returns:
        The shard stats, the written and the dropped entries.
    """
    formats = list(dict.fromkeys(cfg.formats))
    nb = _resolve_num_buckets(cfg, num_buckets)
    with _spill_group(examples, split, formats, cfg) as group:
        kept, dropped = dedupe_by_key(group.entries)
        if reject_after_dedupe is not None:
            dropped = list(dropped)
            still: list[SpillEntry] = []
            for entry in kept:
                reject = reject_after_dedupe(entry)
                if reject is None:
                    still.append(entry)
                else:
                    dropped.append((entry, reject))
            kept = still
        entries = _sorted_checked(kept)
        stats = _write_entries(out, split, bucket, group, entries, cfg, formats, nb)
        return GroupWrite(stats=stats, written=entries, dropped=dropped, spilled=group.spilled)


def _reject_sort_key(r: Reject) -> tuple[str, ...]:
    # Every field, image_id last: the order is total and equal keys are equal
    # rejects, so reruns (and spilled or in-memory sorts) match.
    return (str(r.level), r.stage, r.reason, r.source_key, r.message, r.image_id)


def _reject_size(r: Reject) -> int:
    # Python object overhead of the dataclass and its six strings, roughly.
    return 400 + len(r.source_key) + len(r.stage) + len(r.reason) + len(r.message) + len(r.image_id)


#: Rows per Parquet row group of a rejects shard: memory while writing.
REJECTS_ROW_GROUP_ROWS = 65_536


def rejects_path(bucket: int, part: int, num_buckets: int) -> str:
    """A rejects shard's path: ``rejects/rejects-<bucket>-of-<num_buckets>-<part>.parquet``."""
    return f"rejects/rejects-{bucket:05d}-of-{num_buckets:05d}-{part:04d}.parquet"


def write_rejects_bucket(
    out: str,
    bucket: int,
    rejects: Iterable[Reject],
    *,
    compression: str = "zstd",
    num_buckets: int = 1,
    max_rows: int = 1_000_000,
    memory_max_bytes: int = DEFAULT_SPILL_MEMORY_MAX_BYTES,
    spill_dir: str | None = None,
) -> list[ShardStats]:
    """Writes one bucket of rejects as ``rejects/rejects-<bucket>-of-<n>-<part>.parquet``.

    Rows follow ``REJECT_SCHEMA``, sorted by (level, stage, reason,
    source_key, message, image_id); a part rolls over after ``max_rows``
    rows. Memory is bounded whatever the bucket's size: the rejects are
    sorted with an external merge sort (``spill.SortedSpill``, spilling
    past ``memory_max_bytes``) and written one row group at a time. Same
    safety rules as ``write_bucket``.

    Args:
        out: the output root, any fsspec URL.
        bucket: the bucket of the group, ``bucket_of(source_key, num_buckets)``.
        rejects: the group's rejects, in any order (consumed once).
        compression: Parquet codec.
        num_buckets: the rejects' bucket count (it is in the names).
        max_rows: rows per part, at least 1.
        memory_max_bytes: in-memory budget before spilling.
        spill_dir: folder of the spill file (None: ``$TMPDIR``).

    Returns:
        Each part's stats (``rejects_by_reason`` keyed ``"<level>/<reason>"``),
        in part order; ``[]`` when there are no rejects (nothing is written).

    Raises:
        ValueError: ``max_rows`` is below 1.
        OutputConflictError: a shard path holds different bytes, or a
            completed shard of another run.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}; set write.rejects_shard_max_rows >= 1.")
    with SortedSpill(_reject_sort_key, _reject_size, memory_max_bytes, spill_dir) as rows:
        rows.extend(rejects)
        if not rows.n_items:
            return []
        # Pass 1 counts each part's reasons (the planned stats must be known
        # before a part is skipped or written); pass 2 streams the rows.
        reasons: list[Counter[str]] = []
        for i, r in enumerate(rows):
            if i % max_rows == 0:
                reasons.append(Counter())
            reasons[-1][f"{r.level}/{r.reason}"] += 1
        fs, root = _fs_root(out)
        stream = iter(rows)
        stats: list[ShardStats] = []
        start = 0
        for part_no, counts in enumerate(reasons):
            n_rows = sum(counts.values())
            part_rows = itertools.islice(stream, n_rows)
            planned = ShardStats(
                path=rejects_path(bucket, part_no, num_buckets),
                format=REJECTS_FORMAT,
                split="",
                bucket=bucket,
                part=part_no,
                n_images=0,
                n_samples=0,
                n_instances=0,
                samples_by_kind={},
                rejects_by_reason=dict(sorted(counts.items())),
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
                collections.deque(part_rows, maxlen=0)  # skip this part's rows
                stats.append(found)
                start += n_rows
                continue
            stats.append(_publish(fs, root, planned, _rejects_writer(_part_rows(rows, part_rows, start, n_rows), compression)))
            collections.deque(part_rows, maxlen=0)  # a retried write read its rows afresh: catch up
            start += n_rows
        return stats


def _part_rows(
    rows: SortedSpill[Reject], stream_rows: Iterator[Reject], start: int, n_rows: int
) -> Callable[[], Iterator[Reject]]:
    """The rows of one rejects part: from the shared stream the first time, read afresh after a retry.

    ``_write_new`` calls a writer again after a transient store error; the
    shared stream has then moved on, so the part's rows are read again from
    the sorted spill (iterable more than once).
    """
    calls = 0

    def part() -> Iterator[Reject]:
        nonlocal calls
        calls += 1
        return stream_rows if calls == 1 else itertools.islice(iter(rows), start, start + n_rows)

    return part


def _rejects_writer(part_rows: Callable[[], Iterator[Reject]], compression: str) -> Callable[[_HashingWriter], None]:
    def produce(sink: _HashingWriter) -> None:
        rows = part_rows()
        writer = pq.ParquetWriter(sink, REJECT_SCHEMA, compression=compression)
        try:
            while chunk := list(itertools.islice(rows, REJECTS_ROW_GROUP_ROWS)):
                table = pa.Table.from_pylist([reject_to_row(r) for r in chunk], schema=REJECT_SCHEMA)
                writer.write_table(table, row_group_size=len(chunk))
        finally:
            writer.close()

    return produce
