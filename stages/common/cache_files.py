"""Publishing one content-addressed cache entry (VLM answers, SAM2 predictions).

Both caches (``stages/caption/cache.py``, ``stages/verify/cache.py``) store
one small file per key under ``ROOT/ab/cdef...``. Concurrent workers may
write the same key; they write the same bytes, so the only requirement is
that a reader never sees half an entry.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import fsspec


def publish_entry(fs: Any, path: str, data: bytes, *, local: bool) -> None:
    """Writes ``data`` to ``path`` so that readers see the old entry or the whole new one.

    Args:
        fs: the fsspec filesystem of ``path`` (unused for local paths).
        path: the entry's path (a local path when ``local``, else the
            filesystem's path without protocol).
        data: the entry's bytes.
        local: whether ``path`` is on the local disk.
    """
    parent = path.rsplit("/", 1)[0]
    if local:
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic on POSIX: readers see old or new, never half
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # Object stores publish an object only when its upload completes.
        with fs.open(path, "wb") as f:
            f.write(data)


_HEX = frozenset("0123456789abcdef")


class KeyedFileCache:
    """The shared shape of both caches: one file per sha256 key under ``ROOT/ab/cdef...``.

    Subclasses set ``SUFFIX`` (the entry file's extension) and ``WHAT`` (how
    error messages name the cache) and add their own ``get`` / ``put``.

    Args:
        root: folder or fsspec URL, e.g. ``OUT/_cache/vlm``.

    Attributes:
        hits, misses, writes, corrupt: counters of this instance.
    """

    SUFFIX = ".json"
    WHAT = "cache"

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._fs, self._root_path = fsspec.core.url_to_fs(self.root)
        protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        self._local = "file" in protocols or "local" in protocols
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.corrupt = 0

    def _count(self, **deltas: int) -> None:
        # Workers' threads share one cache object; counters move together.
        with self._lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)

    def __getstate__(self) -> dict[str, Any]:
        # Only the root travels (Beam pickles DoFns); the filesystem is made again.
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def path_of(self, key: str) -> str:
        """Where ``key`` is stored (in the filesystem's own path syntax)."""
        if len(key) != 64 or not set(key) <= _HEX:
            raise ValueError(f"{self.WHAT} key {key!r} is not a sha256 hex digest.")
        return f"{self._root_path}/{key[:2]}/{key[2:]}{self.SUFFIX}"

    def __len__(self) -> int:
        try:
            return len(self._fs.glob(f"{self._root_path}/*/*{self.SUFFIX}"))
        except FileNotFoundError:
            return 0
