"""Publishing one content-addressed cache entry (VLM answers, SAM2 predictions).

Both caches (``stages/caption/cache.py``, ``stages/verify/cache.py``) store
one small file per key under ``ROOT/ab/cdef...``. Concurrent workers may
write the same key; they write the same bytes, so the only requirement is
that a reader never sees half an entry.
"""

from __future__ import annotations

import os
import uuid
from typing import Any


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
