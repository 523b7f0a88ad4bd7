"""Atomic, never-destructive file writes on any fsspec file system."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orsgen.stages.write.plan import META_DIR, OutputConflictError, ShardStats, _HASH_CHUNK

if TYPE_CHECKING:
    pass


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
