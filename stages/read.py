"""Read an orsgen output folder: manifest, splits, shards and rows.

The readers behind ``publish``, ``export``, ``eval`` and the PyTorch loaders.
They only rely on the documented output layout (``stages/write.py``)::

    DIR/parquet/<split>/*.parquet      one row per image, EXAMPLE_SCHEMA
    DIR/webdataset/<split>/*.tar       <key>.jpg + <key>.json per image
    DIR/manifest.json

``DIR`` is any fsspec URL. Rows stream one Parquet record batch at a time, and
a reader that does not need the image bytes leaves the ``image`` column out
(``columns=``), so annotations of a large split can be scanned without reading
its images.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from orsgen.schemas.arrow import EXAMPLE_SCHEMA

MANIFEST_NAME = "manifest.json"
PARQUET_DIR = "parquet"
WEBDATASET_DIR = "webdataset"

# Hugging Face ``datasets`` accepts split names matching this (no dashes, so
# ``data/<split>-*`` globs never catch another split's files).
SPLIT_NAME_RE = re.compile(r"^\w+(\.\w+)*$")


class DatasetReadError(ValueError):
    """The folder is not an orsgen output, or lacks what was asked for."""


def _fs_root(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(root))
    return fs, path.rstrip("/") or "/"


def _join(fs: fsspec.AbstractFileSystem, root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def load_manifest(root: str) -> dict[str, Any]:
    """Reads ``DIR/manifest.json``.

    Args:
        root: the output folder (any fsspec URL).

    Returns:
        The parsed manifest.

    Raises:
        DatasetReadError: there is no manifest (not an orsgen output, or a run
            that has not finished).
    """
    fs, base = _fs_root(root)
    path = _join(fs, base, MANIFEST_NAME)
    if not fs.exists(path):
        raise DatasetReadError(
            f"{root} has no {MANIFEST_NAME}; point at the folder `orsgen run --out` wrote "
            "(for the demo: <out>/dataset), and let the run finish first."
        )
    with fs.open(path, "rb") as f:
        return json.load(f)


def list_splits(root: str) -> list[str]:
    """The splits of an output folder, sorted.

    Taken from the manifest's ``splits`` when there is one, else from the
    folders under ``parquet/`` and ``webdataset/``.
    """
    fs, base = _fs_root(root)
    if fs.exists(_join(fs, base, MANIFEST_NAME)):
        splits = load_manifest(root).get("splits") or {}
        if splits:
            return sorted(splits)
    found: set[str] = set()
    for sub in (PARQUET_DIR, WEBDATASET_DIR):
        d = _join(fs, base, sub)
        if fs.exists(d):
            found.update(posixpath.basename(p.rstrip("/")) for p in fs.ls(d, detail=False) if fs.isdir(p))
    return sorted(found)


def check_split_name(split: str) -> None:
    """Refuses split names the Hugging Face Hub cannot hold.

    Raises:
        DatasetReadError: the name does not match ``\\w+(\\.\\w+)*``.
    """
    if not SPLIT_NAME_RE.match(split):
        raise DatasetReadError(
            f"split name {split!r} is not a valid Hugging Face split name (letters, digits, '_' and '.' only); "
            "rename it in the config's splits section and rebuild."
        )


def resolve_splits(root: str, wanted: Sequence[str] | None) -> list[str]:
    """The splits to work on: ``wanted`` checked against the folder, or all.

    Raises:
        DatasetReadError: a wanted split is not in the folder.
    """
    have = list_splits(root)
    if not wanted:
        if not have:
            raise DatasetReadError(f"{root} holds no split (no parquet/<split>/ folder).")
        return have
    missing = [s for s in wanted if s not in have]
    if missing:
        raise DatasetReadError(f"split(s) {missing} are not in {root}; it has {have}.")
    return list(dict.fromkeys(wanted))


def _data_files(root: str, sub: str, split: str, ext: str) -> list[str]:
    fs, base = _fs_root(root)
    d = _join(fs, base, sub, split)
    if not fs.exists(d):
        return []
    names = [p for p in fs.ls(d, detail=False) if p.endswith(ext) and not posixpath.basename(p).startswith(".")]
    return sorted(url_of(fs, p) for p in names)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path from ``fs.ls`` as a URL any fsspec reader opens (plain path when local)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def parquet_files(root: str, split: str) -> list[str]:
    """Sorted Parquet shard paths of one split (hidden temp files excluded)."""
    return _data_files(root, PARQUET_DIR, split, ".parquet")


def tar_files(root: str, split: str) -> list[str]:
    """Sorted WebDataset tar paths of one split (hidden temp files excluded)."""
    return _data_files(root, WEBDATASET_DIR, split, ".tar")


def iter_rows(
    root: str,
    split: str,
    columns: Sequence[str] | None = None,
    *,
    batch_rows: int = 64,
) -> Iterator[dict[str, Any]]:
    """Streams the rows (images) of one split, in shard then key order.

    Args:
        root: the output folder.
        split: the split.
        columns: ``EXAMPLE_SCHEMA`` columns to read (None: all, images
            included); leave ``image`` out to skip the image bytes.
        batch_rows: rows per Parquet record batch held in memory.

    Yields:
        One dict per row, as ``example_to_row`` builds them.

    Raises:
        DatasetReadError: the split has no Parquet shards, or a column is not
            in the schema.
    """
    files = parquet_files(root, split)
    if not files:
        raise DatasetReadError(
            f"split {split!r} of {root} has no Parquet shards under parquet/{split}/; "
            "build with write.formats including parquet."
        )
    if columns is not None:
        unknown = [c for c in columns if c not in EXAMPLE_SCHEMA.names]
        if unknown:
            raise DatasetReadError(f"unknown column(s) {unknown}; the schema has {EXAMPLE_SCHEMA.names}.")
    for path in files:
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
                yield from batch.to_pylist()


def shard_sizes(root: str, split: str, fmt: str) -> dict[str, dict[str, int]]:
    """Images and samples per shard of one split, from the manifest.

    Args:
        root: the output folder.
        split: the split.
        fmt: ``webdataset`` or ``parquet``.

    Returns:
        ``{shard file name: {"n_images": .., "n_samples": ..}}``; empty when
        the manifest lists no shard of that split and format.
    """
    out: dict[str, dict[str, int]] = {}
    for s in load_manifest(root).get("shards", []):
        if s.get("format") == fmt and s.get("split") == split:
            out[posixpath.basename(s["path"])] = {"n_images": int(s["n_images"]), "n_samples": int(s["n_samples"])}
    return out
