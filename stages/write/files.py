"""Atomic, never-destructive file writes on any fsspec file system."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import posixpath
import re
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orsgen.stages.common.transient import retry_transient
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


#: ``_HashingWriter`` hands pieces to its helper thread in batches of at
#: least this many bytes (a small piece rides along with the next large one).
THREAD_HASH_MIN_BYTES = 64 * 1024
#: At most this many bytes of immutable pieces wait for the helper thread
#: (the writer keeps them alive until hashed): memory stays bounded.
THREAD_HASH_MAX_PENDING_BYTES = 16 * 1024 * 1024
#: Whether ``_HashingWriter`` hashes on a helper thread when its caller does
#: not say (``write.hash_in_thread`` says for shards); the bytes are the same
#: either way. Off: measured, the thread costs CPU time and wins wall time
#: only with an idle core (benchmarks/bench_write_memory.py --hash-thread).
HASH_IN_THREAD = False


def _immutable(view: memoryview) -> bool:
    # A view of a bytes object cannot change after ``write`` returns, so it
    # may be hashed later; any other buffer may be reused by the caller.
    return isinstance(view.obj, bytes)


class _HashingWriter:
    """Hashes and counts bytes on their way to a file, so no second read is needed.

    With ``in_thread``, sha256 runs on a helper thread (one per writer, so
    pieces are hashed in order) while this thread goes on writing:
    ``hashlib`` and file writes both release the GIL. Pieces that are
    ``bytes`` (or views of ``bytes``) are queued and ``write`` returns at
    once, up to ``THREAD_HASH_MAX_PENDING_BYTES``; a piece of any other
    buffer is hashed while it is written and ``write`` waits for it, since
    the caller may reuse the buffer once ``write`` returns. ``hexdigest``
    waits for everything. With an idle core this takes the hash off the
    writing thread's time; it costs CPU time (see
    benchmarks/bench_write_memory.py's per-CPU-second figures).

    Without ``in_thread``, each piece is written first and hashed after:
    the copy into the file pulls the bytes into the CPU cache, where sha256
    reads them faster than from memory.

    ``tell`` is what pyarrow's Parquet writer needs from a non-seekable sink.
    """

    def __init__(self, f: "BinaryIO | _NullFile", in_thread: bool | None = None) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self._overlap = (HASH_IN_THREAD if in_thread is None else in_thread) and not isinstance(f, _NullFile)
        self._pool: ThreadPoolExecutor | None = None
        self._small: list[memoryview] = []  # immutable pieces not yet handed over, in order
        self._small_bytes = 0
        self._queued: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._queued_bytes = 0
        self.n_bytes = 0

    def _update(self, pieces: list[memoryview]) -> None:
        for p in pieces:
            self._hash.update(p)

    def _submit(self, pieces: list[memoryview]) -> Future[None]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orsgen-sha256")
        return self._pool.submit(self._update, pieces)

    def _wait(self, max_bytes: int = 0) -> None:
        """Waits until at most ``max_bytes`` of queued pieces are not yet hashed."""
        while self._queued and self._queued_bytes > max_bytes:
            done, n = self._queued.popleft()
            done.result()
            self._queued_bytes -= n

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        n = view.nbytes
        if not self._overlap:
            # Written first: the copy into the file pulls the bytes into the
            # CPU cache, where sha256 then reads them faster (measured).
            self._f.write(view)
            self._hash.update(view)
        elif _immutable(view):
            if not (self._queued or self._small) and n < THREAD_HASH_MIN_BYTES:
                self._hash.update(view)  # nothing waits before it: cheaper than a hand-over
            else:
                self._small.append(view)  # in order, after what waits
                self._small_bytes += n
                if self._small_bytes >= THREAD_HASH_MIN_BYTES:
                    self._queued.append((self._submit(self._small), self._small_bytes))
                    self._queued_bytes += self._small_bytes
                    self._small, self._small_bytes = [], 0
            self._f.write(view)
            self._wait(THREAD_HASH_MAX_PENDING_BYTES)
        else:
            # The caller may reuse this buffer once we return: hash it now
            # (after what is queued), alongside the write when it is large.
            self._wait()
            pieces, self._small, self._small_bytes = [*self._small, view], [], 0
            if n >= THREAD_HASH_MIN_BYTES:
                hashed = self._submit(pieces)
                try:
                    self._f.write(view)
                finally:
                    hashed.result()
            else:
                self._update(pieces)
                self._f.write(view)
        self.n_bytes += n
        return n

    def tell(self) -> int:
        return self.n_bytes

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        # pyarrow's PythonFile checks this; closing is the owner's job.
        return False

    def hexdigest(self) -> str:
        self._wait()
        self._update(self._small)
        self._small, self._small_bytes = [], 0
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
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


def _discard_tmp(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Removes a failed write's tmp file, best effort: the error being raised is what matters.

    A tmp file that cannot be removed now (the store is down) is removed by
    the next run's ``sweep_temp_files``; it is never visible under a final name.
    """
    try:
        _remove_quietly(fs, path)
    except Exception:  # noqa: BLE001
        pass


#: Temp files of orsgen's atomic writes: ``.<final name>.tmp-<16 hex>`` (shards,
#: sidecars, markers, manifest) and ``.tmp-<32 hex>`` (VLM cache entries). A
#: run that dies leaves them behind; the next run of the same output removes
#: them (``sweep_temp_files``), recognising them by this pattern only.
TEMP_NAME_RE = re.compile(r"^\.(?:.+\.tmp-[0-9a-f]{16}|tmp-[0-9a-f]{32})$")


def _tmp_path(final: str) -> str:
    folder, name = posixpath.split(final)
    return posixpath.join(folder, f".{name}.tmp-{secrets.token_hex(8)}")


def inside_root(root: str, rel: str) -> str:
    """``root/rel``, refusing any ``rel`` that could leave ``root``.

    Every shard, sidecar and marker path goes through here: whatever a split
    or key from the data says, nothing is written outside ``--out``.

    Raises:
        OutputConflictError: ``rel`` is absolute, has an empty, ``.`` or
            ``..`` segment, a backslash, or a control character.
    """
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in rel
        or any(ord(c) < 32 or ord(c) == 127 for c in rel)
    ):
        raise OutputConflictError(
            f"refusing to write {rel!r}: the path would leave the output folder {root}; "
            "this is a bug, since split names and keys are checked at ingest."
        )
    return posixpath.join(root, rel)


def check_not_in_the_way(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Refuses a folder or a symbolic link where orsgen is to write a file.

    A folder cannot be replaced by a file, and a symlink (dangling or not)
    may point anywhere: orsgen never replaces either.

    Raises:
        OutputConflictError: naming the path and what to do.
    """
    if _is_local(fs) and os.path.islink(path):
        raise OutputConflictError(
            f"{path} is a symbolic link, where orsgen writes a file; orsgen never replaces or writes through links. "
            "Remove the link, or choose a new --out."
        )
    if fs.isdir(path):
        raise OutputConflictError(
            f"{path} is a folder, where orsgen writes a file; orsgen never replaces it. "
            "Move that folder away, or choose a new --out."
        )


def sweep_temp_files(out: str) -> list[str]:
    """Removes the temp files that earlier (killed) runs left in an output.

    Only files whose names match ``TEMP_NAME_RE`` are removed: what orsgen
    writes before renaming. Call it only while holding the output's lease
    (``stages.write.ownership``): a live writer's temp file would go too.

    Returns:
        The removed paths.
    """
    fs, root = _fs_root(out)
    if not fs.exists(root):
        return []
    removed = []
    for path in sorted(fs.find(root)):
        if TEMP_NAME_RE.match(posixpath.basename(path)):
            _remove_quietly(fs, path)
            removed.append(path)
    return removed


def _rename(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    if _is_local(fs):
        os.replace(src, dst)  # atomic on POSIX within one folder
    else:
        # Object stores publish an object only when its copy completes, so
        # readers still never see a partial file under the final name.
        fs.mv(src, dst)


def _commit(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """``_rename`` with transient errors retried (``retry_transient``).

    On an object store the rename is a copy, then a delete: when a retry
    finds the tmp object gone and the final one there, the earlier try did
    both and only its answer was lost.
    """
    tried = False

    def attempt() -> None:
        nonlocal tried
        if tried and not fs.exists(src) and fs.exists(dst):
            return
        tried = True
        _rename(fs, src, dst)

    retry_transient(attempt, what=f"publishing {dst}")


def _conflict(final: str, existing: str, new: str) -> OutputConflictError:
    return OutputConflictError(
        f"{final} already exists and differs from what orsgen would write there "
        f"(existing sha256 {existing[:16]}..., new {new[:16]}...); orsgen never overwrites existing files. "
        "Choose a new --out, or move that file away and run again."
    )


def _write_new(
    fs: fsspec.AbstractFileSystem,
    final: str,
    produce: Callable[[_HashingWriter], None],
    *,
    hash_in_thread: bool | None = None,
) -> tuple[int, str]:
    """Writes a file through a tmp name, never replacing different existing bytes.

    Transient store errors (``stages.common.transient.is_transient``: a
    reset connection, a timeout, a 5xx) while the tmp file is written or
    closed restart the write under a new tmp name, with backoff; the rename
    is retried on its own (``_commit``). When the retries run out,
    ``TransientIOError`` fails the bundle, so the runner retries it. A
    failed try's tmp file is removed (or swept by the next run); nothing
    partial ever appears under ``final``.

    Args:
        fs: the file system.
        final: the file's final path on ``fs``.
        produce: writes the content into the given writer; it may be called
            again after a transient failure, and must then write the same
            bytes from the start.
        hash_in_thread: see ``_HashingWriter`` (None: ``HASH_IN_THREAD``).

    Returns:
        ``(n_bytes, sha256)`` of the content.

    Raises:
        OutputConflictError: ``final`` exists with other bytes (left unchanged).
        TransientIOError: the store kept failing transiently.
    """
    check_not_in_the_way(fs, final)
    if fs.exists(final):
        # Only the digest of the new bytes is needed to compare, so nothing is
        # written: the existing file is either adopted or reported.
        sink = _HashingWriter(_NullFile())
        produce(sink)
        existing = retry_transient(lambda: _sha256_of(fs, final), what=f"reading {final}")
        if existing != sink.hexdigest():
            raise _conflict(final, existing, sink.hexdigest())
        return sink.n_bytes, sink.hexdigest()

    def attempt() -> tuple[str, _HashingWriter]:
        fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = _tmp_path(final)
        try:
            with fs.open(tmp, "wb") as f:
                sink = _HashingWriter(f, hash_in_thread)
                produce(sink)
        except BaseException:
            _discard_tmp(fs, tmp)
            raise
        return tmp, sink

    tmp, sink = retry_transient(attempt, what=f"writing {final}")
    try:
        # A concurrent retry of the same bundle may have renamed its copy into
        # place since the check above; it wrote the same bytes (the writers
        # are deterministic), so replacing it is harmless.
        _commit(fs, tmp, final)
    except BaseException:
        _discard_tmp(fs, tmp)
        raise
    return sink.n_bytes, sink.hexdigest()


def _write_meta(fs: fsspec.AbstractFileSystem, final: str, data: bytes) -> None:
    """Writes a sidecar or marker through a tmp name, never replacing other bytes.

    Sidecars and markers are deterministic (the stats and digest of a data
    file whose bytes were just verified), so a copy left by a run that died
    before its marker holds these same bytes and is adopted; anything else at
    that path (a user's file, a folder, a symlink) is not orsgen's to replace.

    Raises:
        OutputConflictError: ``final`` holds other bytes, a folder or a link.
    """

    def produce(sink: _HashingWriter) -> None:
        sink.write(data)

    _write_new(fs, final, produce)


def _meta_paths(root: str, rel: str) -> tuple[str, str]:
    base = inside_root(root, posixpath.join(META_DIR, rel))
    return base + ".stats.json", base + ".done"


def _completed(fs: fsspec.AbstractFileSystem, root: str, rel: str) -> ShardStats | None:
    """Returns the sidecar stats of a completed shard, or None if it is not complete."""
    sidecar, marker = _meta_paths(root, rel)
    for path in (inside_root(root, rel), sidecar, marker):
        check_not_in_the_way(fs, path)
    if not (fs.exists(posixpath.join(root, rel)) and fs.exists(marker) and fs.exists(sidecar)):
        return None
    try:
        return ShardStats.from_json(fs.cat_file(sidecar), skipped=True)
    except (ValueError, TypeError):
        # An unreadable sidecar means the shard was never fully recorded:
        # redo it, which re-verifies the data file's bytes.
        return None


def _publish(
    fs: fsspec.AbstractFileSystem,
    root: str,
    stats: ShardStats,
    produce: Callable[[_HashingWriter], None],
    *,
    hash_in_thread: bool | None = None,
) -> ShardStats:
    """Writes one shard, then its sidecar, then its marker."""
    n_bytes, digest = _write_new(fs, inside_root(root, stats.path), produce, hash_in_thread=hash_in_thread)
    stats = dataclasses.replace(stats, n_bytes=n_bytes, sha256=digest)
    sidecar, marker = _meta_paths(root, stats.path)
    _write_meta(fs, sidecar, stats.to_json())
    _write_meta(fs, marker, (digest + "\n").encode("ascii"))
    return stats
