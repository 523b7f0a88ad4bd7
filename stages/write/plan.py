"""Shard planning: constants, shard names, buckets, encoding before the shuffle, and part plans."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.json as pa_json

from orsgen.schemas.arrow import EXAMPLE_SCHEMA, example_json_bytes
from orsgen.schemas.records import ImageExample, safe_key

if TYPE_CHECKING:
    pass


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
            ``EXAMPLE_SCHEMA`` column but ``image``. The Parquet writer
            builds its rows from it and ``image`` (``rows_batch``), so the
            shuffle carries each value once; ``record_batch()`` gives the
            complete one-row batch.
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
    n_instances: int
    n_refs: int
    n_samples: int
    samples_by_kind: tuple[tuple[str, int], ...]
    size: int
    image_id: str = ""
    uri: str = ""
    sha256: str = ""

    def record_batch(self) -> pa.RecordBatch:
        """Returns the complete one-row ``EXAMPLE_SCHEMA`` batch, image included."""
        return rows_batch([self.json], [self.image])


_IMAGE_INDEX = EXAMPLE_SCHEMA.get_field_index("image")


#: ``EXAMPLE_SCHEMA``'s fields as one struct: rows convert as one array.
_EXAMPLE_STRUCT = pa.struct(list(EXAMPLE_SCHEMA))

#: Rows converted per ``pa.array`` call on the Python path of ``rows_batch``:
#: enough to pay the conversion's fixed cost once for many rows, few enough
#: that the parsed Python rows (about ten times their JSON) stay a few MB.
_ROWS_PER_CONVERSION = 64

#: Batches of at most this many rows take the Python path: Arrow's JSON
#: reader costs ~0.4 ms a call whatever the size (its converters for the
#: nested schema), so ``json.loads`` + ``pa.array`` is cheaper for a few rows
#: (per batch of bench rows: 1 row 0.60 vs 0.89-1.15 ms, 2 rows 0.97 vs
#: 1.20-1.36, 3 rows 1.40 vs 1.64, 8 rows 3.1 vs 2.6; a 128-bucket run
#: writes many one- and two-image shards). Both paths give the same batch
#: (tests/test_expressions_fast.py compares the IPC bytes).
_FEW_ROWS = 3

#: ``EXAMPLE_SCHEMA`` without ``image`` (the JSON members' columns), and its
#: columns that may not hold nulls.
_JSON_SCHEMA = pa.schema([f for f in EXAMPLE_SCHEMA if f.name != "image"])
_NOT_NULL = [f.name for f in _JSON_SCHEMA if not f.nullable]

#: Python's json writes non-finite floats as the bare words NaN, Infinity and
#: -Infinity, which are not JSON: Arrow's reader takes them otherwise than
#: ``json.loads``. As values they stand after ``:``, ``,`` or ``[`` and before
#: ``,``, ``]`` or ``}``; inside a string (RLE counts often hold "NaN") the
#: pattern is rare, and a false match only sends the rows the Python way.
_NON_JSON_NUMBER = re.compile(rb"[:,\[]-?(?:NaN|Infinity)[,\]}]")


def _non_json_number(member: bytes) -> bool:
    # The substring tests are plain byte searches, several times faster than
    # the pattern; the pattern runs only on the few members holding a word.
    return (b"NaN" in member or b"Infinity" in member) and _NON_JSON_NUMBER.search(member) is not None


def rows_batch(json_members: Sequence[bytes], images: Sequence[bytes] | pa.Array) -> pa.RecordBatch:
    """The ``EXAMPLE_SCHEMA`` batch of examples from their JSON members and images.

    Equals ``RecordBatch.from_pylist`` of the rows ``example_to_row`` made
    (tests check the serialized bytes), in one chunk per column as the
    Parquet writer wants. Building the rows here, a row group at a time,
    costs a fraction of converting each example's row on its own before the
    shuffle, and the shuffle no longer carries a second copy of every value.

    The members are parsed by Arrow's JSON reader against the schema (C++,
    no Python objects: about a quarter of ``json.loads`` plus conversion,
    and no garbage-collector passes over millions of short-lived rows).
    Members that it might read otherwise than Python (non-finite floats,
    which Python writes as non-JSON words; a value Arrow refuses; a null
    where the schema forbids one) take the Python path: ``json.loads`` of
    the canonical JSON gives back the row itself (floats round-trip
    exactly; struct fields match by name), converted by ``pa.array``; so
    do batches of up to ``_FEW_ROWS`` rows, for which it is the cheaper way.

    Args:
        json_members: the examples' ``EncodedExample.json``.
        images: their image bytes, in the same order.

    Returns:
        One record batch with ``len(json_members)`` rows.
    """
    image_array = images if isinstance(images, pa.Array) else pa.array(images, type=pa.binary())
    table = _read_members(json_members) if len(json_members) > _FEW_ROWS else None
    if table is None:
        return _rows_batch_python(json_members, image_array)
    columns = [image_array if f.name == "image" else table.column(f.name).combine_chunks() for f in EXAMPLE_SCHEMA]
    return pa.RecordBatch.from_arrays(columns, schema=EXAMPLE_SCHEMA)


def _read_members(json_members: Sequence[bytes]) -> pa.Table | None:
    """The members as one table by Arrow's JSON reader, or None where the Python path must read them."""
    if not json_members or any(_non_json_number(m) for m in json_members):
        return None
    # Canonical JSON has no raw newline (json.dumps escapes them in strings),
    # so the members are JSON lines; one block holds them all (one chunk).
    data = b"\n".join(json_members)
    try:
        table = pa_json.read_json(
            pa.BufferReader(data),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1),
            parse_options=pa_json.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # the Python path converts it, or raises its own error
    if table.num_rows != len(json_members) or any(table.column(n).null_count for n in _NOT_NULL):
        return None
    return table


def _rows_batch_python(json_members: Sequence[bytes], image_array: pa.Array) -> pa.RecordBatch:
    """``rows_batch`` by ``json.loads`` and ``pa.array`` (the reference path)."""
    chunks = []
    for at in range(0, len(json_members), _ROWS_PER_CONVERSION):
        rows = [json.loads(j) for j in json_members[at : at + _ROWS_PER_CONVERSION]]
        chunks.append(pa.array(rows, type=_EXAMPLE_STRUCT))
    rows_array = pa.concat_arrays(chunks) if chunks else pa.array([], type=_EXAMPLE_STRUCT)
    batch = pa.RecordBatch.from_struct_array(rows_array)
    return batch.set_column(_IMAGE_INDEX, EXAMPLE_SCHEMA.field(_IMAGE_INDEX), image_array)


def encode_example(ex: ImageExample, formats: Sequence[str]) -> EncodedExample:
    """Encodes one example for the shard writers (pure; runs before the shuffle).

    Args:
        ex: the example.
        formats: the output formats (``WriteConfig.formats``). Every format
            is written from the same members (the Parquet row from the JSON
            member), so the encoding no longer depends on them; the argument
            stays for callers.

    Returns:
        The example's tar members and counts.
    """
    image = ex.image_bytes
    data = example_json_bytes(ex)
    kinds = Counter(str(s.kind) for s in ex.samples)
    return EncodedExample(
        key=ex.key,
        split=ex.split,
        image=image,
        json=data,
        n_instances=len(ex.instances),
        n_refs=len(ex.refs),
        n_samples=len(ex.samples),
        samples_by_kind=tuple(sorted(kinds.items())),
        size=_tar_member_bytes(len(image)) + _tar_member_bytes(len(data)),
        image_id=ex.image.image_id,
        uri=ex.image.uri,
        sha256=ex.image.sha256,
    )


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


#: ``num_buckets: auto`` aims every bucket at this fraction of one shard: hash
#: buckets vary by about sqrt(n) images, so a bucket aimed at 90% of
#: ``shard_max_images`` (900 of 1000: 3 standard deviations of room) almost
#: never rolls over into a tiny second part.
AUTO_BUCKET_FILL = 0.9
MAX_BUCKETS = 99_999  # shard names give the bucket five digits


def auto_num_buckets(n_images: int, n_bytes: int, max_images: int, max_bytes: int) -> int:
    """The bucket count ``num_buckets: auto`` gives one split (or the rejects).

    Enough buckets that each holds about ``AUTO_BUCKET_FILL`` of one shard,
    by images and by bytes, so every split's shards are near the caps,
    small splits included (a split under one shard gets one bucket).

    Args:
        n_images: items in the split (images, or rejects rows).
        n_bytes: their encoded tar size (``EncodedExample.size`` summed); 0
            to size by count only.
        max_images: the shard's item cap (``shard_max_images``).
        max_bytes: the shard's byte cap (``shard_max_bytes``).

    Returns:
        The count, in ``[1, 99999]``.
    """
    by_count = -(-n_images // max(1, int(AUTO_BUCKET_FILL * max_images)))
    by_bytes = -(-n_bytes // max(1, int(AUTO_BUCKET_FILL * max(1, max_bytes - _TAR_RECORD))))
    return min(MAX_BUCKETS, max(1, by_count, by_bytes))
