"""Writes to an object store retry transient errors (issue 10): shards, sidecars, markers, the commit.

A fake fsspec store (memory-backed) fails the upload of a file (on close, as
a failed multipart commit does) or its rename (copy + delete) as often as a
test plans, with a reset connection or an HTTP 503; the writer must retry,
publish exactly what an untroubled write publishes, and leave no tmp file.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from orsgen.schemas.config import WriteConfig
from orsgen.schemas.records import Reject
from orsgen.stages import write as W
from orsgen.stages.common import transient
from orsgen.stages.common.transient import TransientIOError
from orsgen.stages.write.files import TEMP_NAME_RE
from tests.test_write import _example, _tree


class _Http503(Exception):
    status = 503


class _FlakyStore(MemoryFileSystem):
    """A memory store whose uploads and renames fail as ``plan`` says, in order."""

    protocol = "orsgenflaky"
    store: dict = {}
    pseudo_dirs = [""]
    plan: dict[str, list] = {"upload": [], "mv": []}
    calls: Counter = Counter()

    def _open(self, path, mode="rb", **kw):
        f = super()._open(path, mode, **kw)
        if "w" in mode:
            self.calls["upload"] += 1
            if self.plan["upload"]:
                err = self.plan["upload"].pop(0)

                def close(err=err):
                    raise err  # the upload's commit fails after every byte was sent

                f.close = close
        return f

    def mv(self, path1, path2, **kw):
        self.calls["mv"] += 1
        if self.plan["mv"]:
            err = self.plan["mv"].pop(0)
            if err == "answer lost":  # the copy and the delete went through; the reply did not
                super().mv(path1, path2, **kw)
                raise ConnectionResetError(104, "Connection reset by peer")
            raise err
        return super().mv(path1, path2, **kw)


@pytest.fixture
def store(monkeypatch):
    fsspec.register_implementation(_FlakyStore.protocol, _FlakyStore, clobber=True)
    _FlakyStore.store.clear()
    _FlakyStore.pseudo_dirs[:] = [""]
    _FlakyStore.plan = {"upload": [], "mv": []}
    _FlakyStore.calls = Counter()
    slept: list[float] = []
    monkeypatch.setattr(transient, "_sleep", slept.append)
    yield _FlakyStore, slept
    _FlakyStore.store.clear()


def _published(fs_cls) -> dict[str, bytes]:
    out = {}
    for path, f in fs_cls.store.items():
        assert not TEMP_NAME_RE.match(path.rsplit("/", 1)[-1]), f"tmp file left behind: {path}"
        out[path.split("/out/", 1)[1]] = bytes(f.getbuffer())
    return out


def _cfg() -> WriteConfig:
    return WriteConfig(formats=["webdataset", "parquet"], num_buckets=1, shard_max_images=3)


def test_transient_upload_and_rename_errors_are_retried(tmp_path: Path, store):
    fs_cls, slept = store
    exs = [_example(i) for i in range(7)]
    W.write_bucket(str(tmp_path / "clean"), "train", 0, exs, _cfg())
    fs_cls.plan["upload"] = [ConnectionResetError(104, "Connection reset by peer"), _Http503("SlowDown")]
    fs_cls.plan["mv"] = [_Http503("Service Unavailable"), "answer lost"]
    stats = W.write_bucket(f"{fs_cls.protocol}://bucket/out", "train", 0, exs, _cfg())
    assert len(stats) == 6 and not any(s.skipped for s in stats)
    # Every shard, sidecar and marker is there, byte for byte as on local disk; no tmp file is left.
    assert _published(fs_cls) == _tree(tmp_path / "clean")
    assert fs_cls.calls["upload"] == 6 * 3 + 2 and len(slept) == 4


def test_a_store_that_keeps_failing_fails_the_bundle_and_publishes_nothing(store):
    fs_cls, slept = store
    fs_cls.plan["upload"] = [ConnectionResetError(104, "Connection reset by peer")] * 10
    with pytest.raises(TransientIOError, match="writing .*webdataset/data/train-00000-of-00001-0000.tar"):
        W.write_bucket(f"{fs_cls.protocol}://bucket/out", "train", 0, [_example(i) for i in range(2)], _cfg())
    assert fs_cls.calls["upload"] == 4 and len(slept) == 3
    assert _published(fs_cls) == {}


def test_a_rename_that_keeps_failing_leaves_no_final_file(store):
    fs_cls, _ = store
    fs_cls.plan["mv"] = [_Http503("Service Unavailable")] * 10
    with pytest.raises(TransientIOError, match="publishing "):
        W.write_bucket(f"{fs_cls.protocol}://bucket/out", "train", 0, [_example(0)], _cfg())
    assert fs_cls.calls["mv"] == 4
    assert _published(fs_cls) == {}


def test_permission_denied_is_not_retried(store):
    fs_cls, slept = store
    fs_cls.plan["upload"] = [PermissionError(13, "Forbidden")]
    with pytest.raises(PermissionError):
        W.write_bucket(f"{fs_cls.protocol}://bucket/out", "train", 0, [_example(0)], _cfg())
    assert fs_cls.calls["upload"] == 1 and slept == []
    assert _published(fs_cls) == {}


def test_a_retried_rejects_part_rewrites_its_own_rows(tmp_path: Path, store):
    # Parts stream from one sorted spill: the retried part must read its rows
    # again, and the next part must still start where it should.
    fs_cls, _ = store
    rng = random.Random(3)
    rejects = [Reject(f"src/{rng.randrange(50)}", "ingest", "corrupt_image", f"m{i}", "image", f"i:{i}") for i in range(40)]
    kw = {"max_rows": 15, "memory_max_bytes": 2_000}
    clean = W.write_rejects_bucket(str(tmp_path / "clean"), 0, rejects, **kw)
    calls = {"n": 0}
    orig_open = _FlakyStore._open

    def open_failing_part_1(self, path, mode="rb", **kw):
        if "w" in mode and "rejects-00000-of-00001-0001.parquet.tmp-" in path and calls["n"] == 0:
            calls["n"] += 1
            self.plan["upload"].append(ConnectionResetError(104, "reset"))
        return orig_open(self, path, mode, **kw)

    _FlakyStore._open = open_failing_part_1
    try:
        got = W.write_rejects_bucket(f"{fs_cls.protocol}://bucket/out", 0, rejects, **kw)
    finally:
        _FlakyStore._open = orig_open
    assert calls["n"] == 1 and [s.rejects_by_reason for s in got] == [s.rejects_by_reason for s in clean]
    assert _published(fs_cls) == _tree(tmp_path / "clean")
