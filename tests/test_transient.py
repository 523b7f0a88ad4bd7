"""Transient I/O errors are retried and then fail the bundle; bad data stays a reject."""

from __future__ import annotations

import errno
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from orsgen.pipelines.demo_data import write_sa1b
from orsgen.schemas.config import ImageConfig
from orsgen.schemas.records import ImageExample, Reject
from orsgen.stages.common import transient
from orsgen.stages.common.transient import ResilientFile, TransientIOError, is_transient, retry_transient
from orsgen.stages.ingest import sa1b as sa1b_mod
from orsgen.stages.ingest.sa1b import read_sa1b_shard


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(transient, "_sleep", slept.append)
    return slept


class _Status(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize(
    "err",
    [
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        TimeoutError("read timed out"),
        OSError(errno.EBUSY, "SlowDown"),  # s3fs: 503 / throttling
        OSError(errno.ETIMEDOUT, "timed out"),
        BrokenPipeError(),
        _Status(503),
        _Status(429),
    ],
)
def test_network_errors_are_transient(err):
    assert is_transient(err)


@pytest.mark.parametrize(
    "err",
    [
        FileNotFoundError(errno.ENOENT, "no such object"),
        PermissionError(errno.EACCES, "denied"),
        OSError("Forbidden: gs://b/x"),  # gcsfs 403 has no errno
        tarfile.ReadError("bad header"),
        ValueError("bad json"),
        _Status(404),
        TransientIOError("already retried"),
    ],
)
def test_bad_data_and_missing_objects_are_not_transient(err):
    assert not is_transient(err)


def test_wrapped_network_error_is_found_through_the_cause():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise tarfile.ReadError("stream broke") from inner
    except tarfile.ReadError as outer:
        assert is_transient(outer)


def test_retry_transient_retries_then_succeeds(_no_sleep):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert retry_transient(flaky, what="x", attempts=4) == "ok"
    assert len(calls) == 3 and len(_no_sleep) == 2


def test_retry_transient_gives_up_with_a_sentence_and_never_retries_permanent_errors():
    with pytest.raises(TransientIOError, match="failed 3 times.*runner retries it"):
        retry_transient(lambda: (_ for _ in ()).throw(TimeoutError("slow")), what="reading gs://b/x", attempts=3)
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retry_transient(missing, what="x")
    assert len(calls) == 1


# ------------------------------------------------------------------ a flaky object store under the SA-1B reader


class _FlakyFile(io.RawIOBase):
    """A file that raises ConnectionResetError once its reads pass ``fail_at`` bytes."""

    def __init__(self, data: bytes, fail_at: int | None) -> None:
        self._buf = io.BytesIO(data)
        self._fail_at = fail_at

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._buf.seek(pos, whence)

    def read(self, n: int = -1) -> bytes:
        if self._fail_at is not None and self._buf.tell() + max(n, 0) > self._fail_at:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return self._buf.read(n)


def _patch_open(monkeypatch, data: bytes, failures: list[int | None]) -> list[int]:
    """fsspec.open(...).open() in the reader returns flaky files, one per open, from ``failures``."""
    opened: list[int] = []

    class _Opener:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def open(self) -> Any:
            opened.append(1)
            fail = failures[len(opened) - 1] if len(opened) <= len(failures) else None
            return _FlakyFile(data, fail)

    monkeypatch.setattr(sa1b_mod.fsspec, "open", _Opener)
    return opened


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> bytes:
    (path,) = write_sa1b(tmp_path_factory.mktemp("sa1b"), seed=3, n_shards=1, images_per_shard=4)
    return Path(path).read_bytes()


def _read(url: str = "gs://bucket/sa_000000.tar") -> tuple[list[ImageExample], list[Reject]]:
    out = list(read_sa1b_shard(url, "sa1b", ImageConfig()))
    return [o for o in out if isinstance(o, ImageExample)], [o for o in out if isinstance(o, Reject)]


def test_connection_reset_mid_shard_is_retried_not_a_truncated_tar(monkeypatch, shard_bytes):
    clean_opened = _patch_open(monkeypatch, shard_bytes, [None])
    want, want_rejects = _read()
    assert len(clean_opened) == 1 and len(want) == 4 and not want_rejects
    # Reset in the middle of the shard, twice; the reader reopens and seeks back.
    opened = _patch_open(monkeypatch, shard_bytes, [len(shard_bytes) // 2, len(shard_bytes) // 2])
    got, rejects = _read()
    assert len(opened) == 3
    assert not rejects
    assert [e.key for e in got] == [e.key for e in want]
    assert [e.image_bytes for e in got] == [e.image_bytes for e in want]


def test_a_reset_that_persists_fails_the_bundle_instead_of_rejecting(monkeypatch, shard_bytes):
    _patch_open(monkeypatch, shard_bytes, [len(shard_bytes) // 2] * 10)
    with pytest.raises(TransientIOError, match="runner retries it"):
        _read()


def test_a_really_cut_shard_is_still_a_truncated_tar(monkeypatch, shard_bytes):
    # Twin: bad data (the bytes end mid-member) is a reject, not a retry.
    _patch_open(monkeypatch, shard_bytes[: len(shard_bytes) // 2], [None])
    examples, rejects = _read()
    assert "truncated_tar" in {r.reason for r in rejects}
    assert len(examples) < 4


def test_resilient_file_reopens_at_the_failed_position():
    data = bytes(range(256)) * 40
    opens: list[int] = []

    def opener():
        opens.append(1)
        return _FlakyFile(data, 5000 if len(opens) == 1 else None)

    f = ResilientFile(opener, "mem://x")
    got = b"".join(iter(lambda: f.read(1024), b""))
    assert got == data and f.reopened == 1
