"""An output folder belongs to one config and one run at a time.

``claim_output`` runs before the pipeline writes anything:

1. it takes the output's **lease** (``_meta/lock.json``), refusing a second
   concurrent run into the same ``--out``;
2. it checks the **config identity** recorded in ``_meta/run.json`` (and in
   ``manifest.json`` when the output is complete) and refuses a different
   config, so an output is never a mix of two configs, even when the first
   run was killed before its manifest; a new output gets its ``run.json``
   before the first shard;
3. it removes the **temp files** earlier runs of this output left
   (``files.sweep_temp_files``), so a resumed output has exactly the files
   of a clean run;
4. it says whether the output is already **complete** (a manifest of this
   config), in which case the caller returns at once: no pipeline, no model
   request.

The lease works on any fsspec file system:

* local folders use ``fcntl.flock`` on the lock file, held for the whole
  run; the kernel drops it when the process dies (``kill -9`` included), so
  a rerun after a crash takes over at once, and two live runs never both
  hold it;
* object stores (``gs://``, ``s3://``) have no locks: the lease is a small
  JSON object with an owner token and an expiry time that a heartbeat thread
  renews every ``ttl_s / 3`` seconds. A run finding a live lease refuses to
  start; a lease not renewed for ``ttl_s`` (its run crashed) is taken over.
  Taking a lease is write-then-verify after a short settle delay; two runs
  started within that delay on a store without conditional writes could
  both win, which is why the settle delay exists and the lease records
  host and pid for the message.

``run.json`` holds only the config sha256, so a clean run and a resumed one
leave the same bytes; the lock file is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from orsgen.stages.write.files import _fs_root, _is_local, check_not_in_the_way, sweep_temp_files
from orsgen.stages.write.plan import MANIFEST_NAME, META_DIR, OutputConflictError

#: The config identity of an output, written before its first shard.
RUN_FILE = "_meta/run.json"
#: The lease of the run writing the output (removed when it ends).
LOCK_FILE = "_meta/lock.json"
#: Object-store lease lifetime without a heartbeat, in seconds.
DEFAULT_LEASE_TTL_S = 120.0
#: Object-store wait between writing a lease and reading it back, in seconds.
SETTLE_S = 1.0


@dataclass
class OutputClaim:
    """What ``claim_output`` found and holds.

    Attributes:
        out: the output root.
        complete: the output holds a manifest of this config; nothing to do.
        manifest: that manifest (parsed), when complete.
        swept: temp files of earlier runs that were removed.
    """

    out: str
    complete: bool = False
    manifest: dict[str, Any] | None = None
    swept: list[str] = field(default_factory=list)


class _LocalLease:
    """``flock`` on ``_meta/lock.json``; the kernel releases it if the process dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, info: dict[str, Any]) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(20):
            if os.path.islink(self.path) or os.path.isdir(self.path):
                raise OutputConflictError(
                    f"{self.path} is a folder or a link, where orsgen keeps its run lease; move it away, or choose a new --out."
                )
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json_fd(fd)
                os.close(fd)
                raise _busy(self.path, holder) from None
            # The file may have been removed (and re-created) by the run that
            # held it between our open and our lock: then lock the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info, sort_keys=True).encode("utf-8"), 0)
            self._fd = fd
            return
        raise OutputConflictError(f"could not take the lease {self.path}: it keeps being re-created by another run.")

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: no one else holds this inode
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class _ObjectLease:
    """A JSON lease with an expiry, renewed by a heartbeat thread (object stores)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, ttl_s: float) -> None:
        self.fs = fs
        self.path = path
        self.ttl_s = ttl_s
        self._info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _write(self) -> None:
        self._info["expires_unix_s"] = time.time() + self.ttl_s
        self.fs.pipe_file(self.path, json.dumps(self._info, sort_keys=True).encode("utf-8"))

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return {}

    def acquire(self, info: dict[str, Any]) -> None:
        check_not_in_the_way(self.fs, self.path)
        holder = self._read()
        if holder is not None and float(holder.get("expires_unix_s", 0)) > time.time():
            raise _busy(self.path, holder)
        self._info = dict(info)
        self._write()
        time.sleep(SETTLE_S)
        now = self._read() or {}
        if now.get("token") != info["token"]:
            raise _busy(self.path, now)
        self._thread = threading.Thread(target=self._heartbeat, name="orsgen-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            now = self._read() or {}
            if now.get("token") != self._info.get("token"):
                self.lost = True
                return
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        now = self._read() or {}
        if now.get("token") == self._info.get("token"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)


def _read_json_fd(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}


def _busy(path: str, holder: dict[str, Any] | None) -> OutputConflictError:
    who = f" (host {holder.get('host')}, pid {holder.get('pid')})" if holder and holder.get("pid") else ""
    return OutputConflictError(
        f"another orsgen run{who} is writing into this output (its lease is {path}); "
        "wait for it to finish, or choose a new --out. A run that crashed releases the lease by itself."
    )


def _read_json(fs: fsspec.AbstractFileSystem, path: str, what: str) -> dict[str, Any] | None:
    if not fs.exists(path):
        return None
    check_not_in_the_way(fs, path)
    try:
        data = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError):
        raise OutputConflictError(f"{path} exists but is not {what}; move it away, or choose a new --out.") from None
    if not isinstance(data, dict):
        raise OutputConflictError(f"{path} exists but is not {what}; move it away, or choose a new --out.")
    return data


def _run_bytes(config_sha256: str) -> bytes:
    return (json.dumps({"config_sha256": config_sha256}, sort_keys=True, indent=2) + "\n").encode("utf-8")


def _refuse_other_config(out: str, where: str, theirs: Any, ours: str) -> OutputConflictError:
    return OutputConflictError(
        f"{out} already holds output of another config ({where} says config_sha256 {str(theirs)[:12]}..., "
        f"this run {ours[:12]}...); orsgen never mixes two configs in one output. "
        "Choose a new --out, or rerun with the same config to resume."
    )


@contextlib.contextmanager
def claim_output(out: str, config_sha256: str, *, ttl_s: float = DEFAULT_LEASE_TTL_S) -> Iterator[OutputClaim]:
    """Takes an output for one run of one config (see the module docstring).

    Args:
        out: the output root, any fsspec URL.
        config_sha256: ``OrsgenConfig.sha256()`` of this run.
        ttl_s: object-store lease lifetime without a heartbeat.

    Yields:
        The claim; ``complete`` means there is nothing to do.

    Raises:
        OutputConflictError: another run holds the output, it belongs to
            another config, or a folder / link / foreign file is in the way.
    """
    fs, root = _fs_root(out)
    if fs.exists(root) and not fs.isdir(root):
        raise OutputConflictError(f"--out {out} is a file, not a folder; choose a folder for the dataset.")
    fs.makedirs(root, exist_ok=True)
    lock_path = posixpath.join(root, LOCK_FILE)
    info = {"token": secrets.token_hex(16), "host": socket.gethostname(), "pid": os.getpid()}
    lease: _LocalLease | _ObjectLease = _LocalLease(lock_path) if _is_local(fs) else _ObjectLease(fs, lock_path, ttl_s)
    fs.makedirs(posixpath.join(root, META_DIR), exist_ok=True)
    lease.acquire(info)
    try:
        claim = OutputClaim(out=out)
        manifest = _read_json(fs, posixpath.join(root, MANIFEST_NAME), "an orsgen manifest")
        if manifest is not None and manifest.get("config_sha256") != config_sha256:
            raise _refuse_other_config(out, MANIFEST_NAME, manifest.get("config_sha256"), config_sha256)
        run_path = posixpath.join(root, RUN_FILE)
        recorded = _read_json(fs, run_path, "an orsgen run record")
        if recorded is not None and recorded.get("config_sha256") != config_sha256:
            raise _refuse_other_config(out, RUN_FILE, recorded.get("config_sha256"), config_sha256)
        claim.swept = sweep_temp_files(out)
        if recorded is None:
            from orsgen.stages.write.files import _write_meta

            _write_meta(fs, run_path, _run_bytes(config_sha256))
        if manifest is not None:
            claim.complete, claim.manifest = True, manifest
        yield claim
    finally:
        lease.release()
