"""Read an orsgen output folder: manifest, splits, shards and rows.

The readers behind ``publish``, ``export``, ``eval`` and the PyTorch loaders.
They only rely on the documented output layout (``stages/write/``)::

    DIR/manifest.json                  every shard: path, format, split, sha256, counts
    DIR/parquet/...                    one row per image, EXAMPLE_SCHEMA
    DIR/webdataset/...                 <key>.jpg + <key>.json per image

Shards are found through the manifest, so the readers do not depend on the
folder naming of a given orsgen version.

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
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from orsgen.schemas.arrow import EXAMPLE_SCHEMA

MANIFEST_NAME = "manifest.json"

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
    """The splits of an output folder, sorted: the manifest's ``splits``, plus any split a shard names."""
    manifest = load_manifest(root)
    found = set(manifest.get("splits") or {})
    found |= {s.get("split", "") for s in manifest.get("shards", []) if s.get("format") in ("parquet", "webdataset")}
    return sorted(x for x in found if x)


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


@dataclass(frozen=True, slots=True)
class ShardRef:
    """One data shard of a run.

    Attributes:
        url: where to open it (plain path when local).
        path: its path relative to the output folder (``parquet/data/...``).
        split: its split ("" for rejects).
        format: ``parquet``, ``webdataset`` or ``rejects``.
        sha256: the digest the manifest recorded ("" without a manifest).
        n_bytes: its size per the manifest (-1 without one).
        n_images: images in it per the manifest (-1 without one).
        n_samples: referring samples in it per the manifest (-1 without one).
    """

    url: str
    path: str
    split: str
    format: str
    sha256: str = ""
    n_bytes: int = -1
    n_images: int = -1
    n_samples: int = -1

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def shards(root: str, fmt: str, split: str | None = None) -> list[ShardRef]:
    """The shards of one format (and split), sorted by path.

    The manifest is the source of truth: it names every shard with its
    sha256 and counts, whatever the folder layout of the orsgen version that
    wrote it.

    Args:
        root: the output folder.
        fmt: ``parquet``, ``webdataset`` or ``rejects``.
        split: only this split (None: all; ignored for rejects).

    Raises:
        DatasetReadError: there is no manifest.
    """
    fs, base = _fs_root(root)
    out = [
        ShardRef(
            url=url_of(fs, _join(fs, base, s["path"])),
            path=s["path"],
            split=s.get("split", ""),
            format=s["format"],
            sha256=s.get("sha256", ""),
            n_bytes=int(s.get("n_bytes", -1)),
            n_images=int(s.get("n_images", -1)),
            n_samples=int(s.get("n_samples", -1)),
        )
        for s in load_manifest(root).get("shards", [])
        if s.get("format") == fmt and (split is None or fmt == "rejects" or s.get("split") == split)
    ]
    return sorted(out, key=lambda r: r.path)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path from ``fs.ls`` as a URL any fsspec reader opens (plain path when local)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def parquet_files(root: str, split: str) -> list[str]:
    """Sorted Parquet shard URLs of one split."""
    return [r.url for r in shards(root, "parquet", split)]


def tar_files(root: str, split: str) -> list[str]:
    """Sorted WebDataset tar URLs of one split."""
    return [r.url for r in shards(root, "webdataset", split)]


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
            f"split {split!r} of {root} has no Parquet shards; build with write.formats including parquet."
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
        ``{shard file name: {"n_images": .., "n_samples": ..}}``; shards the
        manifest does not count are left out.
    """
    return {r.name: {"n_images": r.n_images, "n_samples": r.n_samples} for r in shards(root, fmt, split) if r.n_images >= 0}
