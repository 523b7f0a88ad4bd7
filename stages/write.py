"""Shard writers: WebDataset tars, Parquet files, rejects and the manifest.

The pure core of the ``write`` stage. The Beam wrapper encodes every example
with ``encode_example`` (a parallel map on all workers, before the shuffle),
groups the ``EncodedExample`` values by ``(split, bucket_of(key, num_buckets))``
and calls ``write_bucket`` once per group, which then only sorts, plans and
streams bytes; rejects are grouped by bucket and go to
``write_rejects_bucket``; the collected ``ShardStats`` go to
``build_manifest`` and ``write_manifest``.

Layout under an output root ``out`` (any fsspec URL)::

    out/webdataset/data/<split>-<bucket:05d>-of-<num_buckets:05d>-<part:04d>.tar
    out/parquet/data/<split>-<bucket:05d>-of-<num_buckets:05d>-<part:04d>.parquet
    out/rejects/rejects-b<bucket:05d>.parquet
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

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import secrets
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from orsgen.schemas.arrow import EXAMPLE_SCHEMA, REJECT_SCHEMA, example_to_row, reject_to_row
from orsgen.schemas.config import WriteConfig
from orsgen.schemas.records import ImageExample, Reject, safe_key

if TYPE_CHECKING:
    import datasets

REJECTS_FORMAT = "rejects"
META_DIR = "_meta/shards"
MANIFEST_NAME = "manifest.json"

_EXTENSION = {"webdataset": "tar", "parquet": "parquet"}
_TAR_BLOCK = 512
# tarfile pads the archive to a multiple of this record size on close.
_TAR_RECORD = tarfile.RECORDSIZE
_HASH_CHUNK = 4 * 1024 * 1024
# Parquet's own per-value framing (4-byte lengths, levels) on top of the JSON
# estimate of a row, and a per-row-group allowance for page headers: keeps
# the estimate above the size Parquet reports, so row groups stay under the cap.
_PARQUET_ROW_OVERHEAD = 64
_PARQUET_GROUP_OVERHEAD = 16 * 1024


class OutputConflictError(RuntimeError):
    """A file that orsgen would write already exists with different content."""


@dataclass(frozen=True, slots=True)
class ShardStats:
    """What one shard holds; also the content of its JSON sidecar.

    Attributes:
        path: the shard's path relative to the output root, posix style.
        format: ``webdataset``, ``parquet`` or ``rejects``.
        split: the split, or "" for rejects shards.
        bucket: the bucket, in ``[0, num_buckets)``.
        part: the part inside the bucket, from 0 (always 0 for rejects).
        n_images: images (rows / tar samples) in the shard; 0 for rejects.
        n_samples: referring samples on those images.
        n_instances: instances on those images.
        samples_by_kind: referring samples per ``ExpressionKind`` value.
        rejects_by_reason: for rejects shards, rows per ``"<level>/<reason>"``.
        n_bytes: size of the shard file in bytes.
        sha256: hex sha256 of the shard file.
        skipped: True when a completed shard was found and not rewritten; not
            stored in the sidecar (it describes this run, not the file).
    """

    path: str
    format: str
    split: str
    bucket: int
    part: int
    n_images: int
    n_samples: int
    n_instances: int
    samples_by_kind: dict[str, int]
    rejects_by_reason: dict[str, int]
    n_bytes: int
    sha256: str
    skipped: bool = False

    def to_json(self) -> bytes:
        """Returns the sidecar bytes: canonical JSON without ``skipped``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "skipped"}
        return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str, *, skipped: bool = False) -> "ShardStats":
        """Parses sidecar bytes.

        Raises:
            ValueError: the bytes are not a sidecar of this version.
        """
        obj = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"skipped"}
        if not isinstance(obj, dict) or set(obj) != names:
            raise ValueError(f"not a shard stats sidecar: expected keys {sorted(names)}.")
        return cls(**obj, skipped=skipped)


# ------------------------------------------------------------------ planning


def bucket_of(key: str, num_buckets: int) -> int:
    """Assigns a key to a bucket with a hash that is stable across processes.

    Python's ``hash()`` is salted per process, so workers would disagree;
    sha256 gives every worker and every rerun the same bucket.

    Args:
        key: the example key.
        num_buckets: how many buckets, at least 1.

    Returns:
        The bucket, in ``[0, num_buckets)``.

    Raises:
        ValueError: ``num_buckets`` is below 1.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be at least 1, got {num_buckets}; set write.num_buckets >= 1.")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_buckets


def shard_name(split: str, bucket: int, part: int, fmt: str, num_buckets: int) -> str:
    """Returns a data shard's file name, e.g. ``testA-00003-of-00016-0001.tar``.

    The ``<split>-NNNNN-of-NNNNN`` stem is Hugging Face's sharded-file pattern:
    under a ``data/`` folder, ``datasets.load_dataset(..., data_dir=...)``
    infers every split from it, custom names (``testA``, ``ood_area``)
    included. Bucket index and bucket count are both known before writing,
    so the name never depends on how many shards other workers write; the
    rollover part follows as a suffix.
    """
    return f"{split}-{bucket:05d}-of-{num_buckets:05d}-{part:04d}.{_EXTENSION[fmt]}"


def shard_path(split: str, bucket: int, part: int, fmt: str, num_buckets: int) -> str:
    """A data shard's path relative to the output root: ``<format>/data/<name>``."""
    return f"{fmt}/data/{shard_name(split, bucket, part, fmt, num_buckets)}"


def _tar_member_bytes(n: int) -> int:
    # A ustar header block plus the data padded to whole blocks.
    return _TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK


@dataclass(frozen=True, slots=True)
class EncodedExample:
    """An example with its output encodings, ready for the serial shard writer.

    Built by ``encode_example`` on the workers before the shuffle, so the
    per-bucket writer does no per-example Python encoding; it only plans,
    concatenates and streams these bytes.

    Attributes:
        key: the example key (WebDataset-safe, unique in the dataset).
        split: the example's split.
        image: the encoded image bytes (the tar's ``.jpg`` member and the
            Parquet ``image`` column).
        json: the tar's ``.json`` member: canonical JSON of every
            ``EXAMPLE_SCHEMA`` column but ``image``.
        arrow: the example's one-row ``EXAMPLE_SCHEMA`` record batch,
            serialized without its schema (``RecordBatch.serialize()``), with
            the ``image`` column left empty: the writer takes it from
            ``image`` so the shuffle carries the image bytes once, not twice.
            ``record_batch()`` gives the complete row. ``b""`` when Parquet
            is not among the formats.
        n_instances: instances on the image.
        n_refs: RefCOCO-family refs on the image (for the pipeline's counts).
        n_samples: referring samples on the image.
        samples_by_kind: ``(kind, count)`` pairs, sorted by kind.
        size: the bytes the example adds to a tar (both members with their
            headers and padding), used to plan parts.
        image_id: the image's id (for rejects of duplicate copies).
        uri: where the image was read from.
        sha256: the image bytes' sha256 (duplicates are ranked by content).
    """

    key: str
    split: str
    image: bytes
    json: bytes
    arrow: bytes
    n_instances: int
    n_refs: int
    n_samples: int
    samples_by_kind: tuple[tuple[str, int], ...]
    size: int
    image_id: str = ""
    uri: str = ""
    sha256: str = ""

    def record_batch(self) -> pa.RecordBatch:
        """Returns the complete one-row ``EXAMPLE_SCHEMA`` batch, image included.

        Raises:
            ValueError: the example was encoded without Parquet.
        """
        batch = _read_arrow(self)
        images = pa.array([self.image], type=pa.binary())
        return batch.set_column(_IMAGE_INDEX, EXAMPLE_SCHEMA.field(_IMAGE_INDEX), images)


_IMAGE_INDEX = EXAMPLE_SCHEMA.get_field_index("image")


def _json_bytes(row: dict[str, Any]) -> bytes:
    # ``example_to_row`` yields plain JSON values already, so json.dumps with
    # canonical_json's settings gives the same bytes as
    # canonical_json(example_to_json(ex)) without walking the tree again
    # (tests/test_write.py checks the equality).
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_example(ex: ImageExample, formats: Sequence[str]) -> EncodedExample:
    """Encodes one example for the shard writers (pure; runs before the shuffle).

    Args:
        ex: the example.
        formats: the output formats (``WriteConfig.formats``); the Arrow row
            is built only when ``parquet`` is among them.

    Returns:
        The example's tar members, Arrow row and counts.
    """
    row = example_to_row(ex)
    image = row.pop("image")
    data = _json_bytes(row)
    arrow = b""
    if "parquet" in formats:
        # The image travels in ``image`` only; the writer splices it back.
        row["image"] = b""
        arrow = pa.RecordBatch.from_pylist([row], schema=EXAMPLE_SCHEMA).serialize().to_pybytes()
    kinds = Counter(str(s.kind) for s in ex.samples)
    return EncodedExample(
        key=ex.key,
        split=ex.split,
        image=image,
        json=data,
        arrow=arrow,
        n_instances=len(ex.instances),
        n_refs=len(ex.refs),
        n_samples=len(ex.samples),
        samples_by_kind=tuple(sorted(kinds.items())),
        size=_tar_member_bytes(len(image)) + _tar_member_bytes(len(data)),
        image_id=ex.image.image_id,
        uri=ex.image.uri,
        sha256=ex.image.sha256,
    )


def _read_arrow(enc: EncodedExample) -> pa.RecordBatch:
    if not enc.arrow:
        raise ValueError(
            f"example {enc.key!r} was encoded without its Parquet row; "
            "encode with encode_example(ex, formats) using the same formats as the writer."
        )
    # Zero-copy: the batch's buffers point into ``enc.arrow``.
    return pa.ipc.read_record_batch(pa.py_buffer(enc.arrow), EXAMPLE_SCHEMA)


def _split_by_size(sizes: Sequence[int], max_items: int, max_bytes: int) -> list[tuple[int, int]]:
    """Greedy ``[start, stop)`` ranges under both caps; an oversized item gets its own range."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start + 1 > max_items or total + size > max_bytes):
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _plan(sizes: Sequence[int], max_images: int, max_bytes: int) -> list[tuple[int, int]]:
    # The tar end-of-archive padding is paid once per shard; keep room for it.
    return _split_by_size(sizes, max_images, max(1, max_bytes - _TAR_RECORD))


_E = TypeVar("_E", bound="ImageExample | EncodedExample")


def _sorted_checked(examples: Iterable[_E]) -> list[_E]:
    items = sorted(examples, key=lambda ex: ex.key)
    for i, ex in enumerate(items):
        if not ex.key or ex.key != safe_key(ex.key):
            raise ValueError(
                f"example key {ex.key!r} is not WebDataset-safe (only A-Z, a-z, 0-9, '_' and '-' are allowed; "
                "a dot would split the key); build keys with schemas.records.safe_key."
            )
        if i and items[i - 1].key == ex.key:
            raise ValueError(f"example key {ex.key!r} appears more than once in one bucket; keys must be unique.")
    return items


def _size_of(item: ImageExample | EncodedExample) -> int:
    # Only the tar size matters for planning, so no Arrow row is built.
    return item.size if isinstance(item, EncodedExample) else encode_example(item, ()).size


def plan_parts(examples: Sequence[_E], max_images: int, max_bytes: int) -> list[list[_E]]:
    """Splits a bucket's examples into parts (shards), in key order.

    A part rolls over when adding the next example would pass ``max_images``
    or the approximate encoded size ``max_bytes`` (the tar size: image and
    JSON members with their headers, plus the end-of-archive padding; the
    Parquet file of the same part is smaller). An example larger than
    ``max_bytes`` on its own still gets a part of its own.

    Args:
        examples: the bucket's examples (``ImageExample`` or
            ``EncodedExample``), in any order.
        max_images: at most this many examples per part, at least 1.
        max_bytes: approximate size cap of a part in bytes, at least 1.

    Returns:
        The parts, each a non-empty list of the given objects sorted by key;
        ``[]`` for no examples.

    Raises:
        ValueError: a key is not WebDataset-safe or appears twice, or a cap is
            below 1.
    """
    if max_images < 1 or max_bytes < 1:
        raise ValueError(f"max_images ({max_images}) and max_bytes ({max_bytes}) must both be at least 1.")
    items = _sorted_checked(examples)
    return [items[a:b] for a, b in _plan([_size_of(x) for x in items], max_images, max_bytes)]


# --------------------------------------------------------------- file system


def _fs_root(out: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(out)
    return fs, root.rstrip("/") or "/"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


class _NullFile:
    """A sink that drops what it is given (for hashing only)."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)

    def flush(self) -> None:
        pass


class _HashingWriter:
    """Hashes and counts bytes on their way to a file, so no second read is needed.

    ``tell`` is what pyarrow's Parquet writer needs from a non-seekable sink.
    """

    def __init__(self, f: "BinaryIO | _NullFile") -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.n_bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._f.write(view)
        self.n_bytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.n_bytes

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        # pyarrow's PythonFile checks this; closing is the owner's job.
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # Only our own tmp files come here; a missing one is already gone.
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _tmp_path(final: str) -> str:
    folder, name = posixpath.split(final)
    return posixpath.join(folder, f".{name}.tmp-{secrets.token_hex(8)}")


def _rename(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    if _is_local(fs):
        os.replace(src, dst)  # atomic on POSIX within one folder
    else:
        # Object stores publish an object only when its copy completes, so
        # readers still never see a partial file under the final name.
        fs.mv(src, dst)


def _conflict(final: str, existing: str, new: str) -> OutputConflictError:
    return OutputConflictError(
        f"{final} already exists and differs from what orsgen would write there "
        f"(existing sha256 {existing[:16]}..., new {new[:16]}...); orsgen never overwrites existing files. "
        "Choose a new --out, or move that file away and run again."
    )


def _write_new(
    fs: fsspec.AbstractFileSystem, final: str, produce: Callable[[_HashingWriter], None]
) -> tuple[int, str]:
    """Writes a file through a tmp name, never replacing different existing bytes.

    Args:
        fs: the file system.
        final: the file's final path on ``fs``.
        produce: writes the content into the given writer.

    Returns:
        ``(n_bytes, sha256)`` of the content.

    Raises:
        OutputConflictError: ``final`` exists with other bytes (left unchanged).
    """
    if fs.exists(final):
        # Only the digest of the new bytes is needed to compare, so nothing is
        # written: the existing file is either adopted or reported.
        sink = _HashingWriter(_NullFile())
        produce(sink)
        existing = _sha256_of(fs, final)
        if existing != sink.hexdigest():
            raise _conflict(final, existing, sink.hexdigest())
        return sink.n_bytes, sink.hexdigest()
    fs.makedirs(posixpath.dirname(final), exist_ok=True)
    tmp = _tmp_path(final)
    try:
        with fs.open(tmp, "wb") as f:
            sink = _HashingWriter(f)
            produce(sink)
        # A concurrent retry of the same bundle may have renamed its copy into
        # place since the check above; it wrote the same bytes (the writers
        # are deterministic), so replacing it is harmless.
        _rename(fs, tmp, final)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise
    return sink.n_bytes, sink.hexdigest()


def _write_meta(fs: fsspec.AbstractFileSystem, final: str, data: bytes) -> None:
    """Writes a sidecar or marker through a tmp name, replacing an older one.

    These are orsgen's own bookkeeping about a data file whose bytes were just
    verified, so an older copy (e.g. from a run that died before its marker)
    is replaced rather than treated as a conflict.
    """
    fs.makedirs(posixpath.dirname(final), exist_ok=True)
    tmp = _tmp_path(final)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        _rename(fs, tmp, final)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


def _meta_paths(root: str, rel: str) -> tuple[str, str]:
    base = posixpath.join(root, META_DIR, rel)
    return base + ".stats.json", base + ".done"


def _completed(fs: fsspec.AbstractFileSystem, root: str, rel: str) -> ShardStats | None:
    """Returns the sidecar stats of a completed shard, or None if it is not complete."""
    sidecar, marker = _meta_paths(root, rel)
    if not (fs.exists(posixpath.join(root, rel)) and fs.exists(marker) and fs.exists(sidecar)):
        return None
    try:
        return ShardStats.from_json(fs.cat_file(sidecar), skipped=True)
    except (ValueError, TypeError):
        # An unreadable sidecar means the shard was never fully recorded:
        # redo it, which re-verifies the data file's bytes.
        return None


def _publish(
    fs: fsspec.AbstractFileSystem, root: str, stats: ShardStats, produce: Callable[[_HashingWriter], None]
) -> ShardStats:
    """Writes one shard, then its sidecar, then its marker."""
    n_bytes, digest = _write_new(fs, posixpath.join(root, stats.path), produce)
    stats = dataclasses.replace(stats, n_bytes=n_bytes, sha256=digest)
    sidecar, marker = _meta_paths(root, stats.path)
    _write_meta(fs, sidecar, stats.to_json())
    _write_meta(fs, marker, (digest + "\n").encode("ascii"))
    return stats


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


def webdataset_features() -> "datasets.Features":
    """HF ``datasets`` features of the WebDataset shards.

    HF's webdataset loader infers column types from the first 5 samples of a
    split; a field that is null or empty in all of them (SA-1B's
    ``category_id``, ``refs`` of images without refs) then fails to cast the
    first later sample that has a value. Pass these features to
    ``load_dataset("webdataset", data_files=..., features=webdataset_features())``
    to give every column its ``EXAMPLE_SCHEMA`` type instead.

    Returns:
        A ``datasets.Features`` with ``__key__``, ``__url__``, ``jpg`` (an
        ``Image``) and ``json`` (every ``EXAMPLE_SCHEMA`` column but ``image``).
    """
    import datasets  # only readers of the output need it

    json_schema = EXAMPLE_SCHEMA.remove(EXAMPLE_SCHEMA.get_field_index("image"))
    return datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            "jpg": datasets.Image(),
            "json": datasets.Features.from_arrow_schema(json_schema),
        }
    )


# ------------------------------------------------------------------ manifest


def build_manifest(
    *,
    name: str,
    config: dict[str, Any],
    config_sha256: str,
    version: str,
    shard_stats: Sequence[ShardStats],
    counts: dict[str, Any],
) -> dict[str, Any]:
    """Builds the run manifest from the shard stats.

    Split totals are counted once per split: both formats hold the same
    examples, so one format's shards are summed (they must agree).

    Args:
        name: the dataset name.
        config: the resolved config (``model_dump(mode="json")``).
        config_sha256: ``OrsgenConfig.sha256()``.
        version: the orsgen version that wrote the output.
        shard_stats: stats of every data and rejects shard of the run.
        counts: the pipeline's reconciliation counters, embedded as is.

    Returns:
        The manifest, with sorted keys and no timestamps, so that the same
        run gives the same manifest.

    Raises:
        ValueError: two formats of one split disagree on their totals.
    """
    per_format: dict[str, dict[str, dict[str, Any]]] = {}
    rejects: Counter[str] = Counter()
    for s in shard_stats:
        if s.format == REJECTS_FORMAT:
            rejects.update(s.rejects_by_reason)
            continue
        tot = per_format.setdefault(s.split, {}).setdefault(
            s.format, {"images": 0, "samples": 0, "samples_by_kind": Counter()}
        )
        tot["images"] += s.n_images
        tot["samples"] += s.n_samples
        tot["samples_by_kind"].update(s.samples_by_kind)

    splits: dict[str, Any] = {}
    for split, by_format in sorted(per_format.items()):
        views = [
            {"images": t["images"], "samples": t["samples"], "samples_by_kind": dict(sorted(t["samples_by_kind"].items()))}
            for _, t in sorted(by_format.items())
        ]
        if any(v != views[0] for v in views[1:]):
            raise ValueError(
                f"split {split!r}: formats {sorted(by_format)} disagree on their totals ({views}); "
                "pass the stats of every shard of the run, from the same run."
            )
        splits[split] = views[0]

    shards = [
        {
            "path": s.path,
            "format": s.format,
            "split": s.split,
            "sha256": s.sha256,
            "n_bytes": s.n_bytes,
            "n_images": s.n_images,
            "n_samples": s.n_samples,
        }
        for s in sorted(shard_stats, key=lambda s: s.path)
    ]
    manifest = {
        "name": name,
        "orsgen_version": version,
        "config_sha256": config_sha256,
        "config": config,
        "counts": counts,
        "splits": splits,
        "rejects_by_reason": dict(sorted(rejects.items())),
        "shards": shards,
    }
    # A round trip through canonical JSON sorts every nested key and turns
    # tuples into lists, so the dict equals what write_manifest stores.
    return json.loads(_manifest_bytes(manifest))


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(out: str, manifest: dict[str, Any]) -> str:
    """Writes ``out/manifest.json`` (sorted keys, indented, UTF-8).

    An existing manifest with the same bytes is left as is; one with other
    bytes is never overwritten.

    Args:
        out: the output root, any fsspec URL.
        manifest: from ``build_manifest``.

    Returns:
        The manifest's location, ``out`` joined with ``manifest.json``.

    Raises:
        OutputConflictError: a different manifest is already there.
    """
    fs, root = _fs_root(out)
    data = _manifest_bytes(manifest)

    def produce(sink: _HashingWriter) -> None:
        sink.write(data)

    _write_new(fs, posixpath.join(root, MANIFEST_NAME), produce)
    return out.rstrip("/") + "/" + MANIFEST_NAME
