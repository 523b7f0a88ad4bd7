"""Bounded-memory writing (issue 10): spilling, external sort of rejects, auto bucket counts.

Each check forces a tiny in-memory budget so that a handful of records
spill, and compares the bytes with the in-memory path.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
import shutil
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from orsgen.schemas.arrow import REJECT_SCHEMA
from orsgen.schemas.config import WriteConfig
from orsgen.schemas.records import Reject
from orsgen.stages import write as W
from orsgen.stages.write.spill import SortedSpill, SpilledGroup
from tests.test_write import _example, _tmp_files, _tree


def _cfg(**kw) -> WriteConfig:
    return WriteConfig(**{"formats": ["webdataset", "parquet"], "num_buckets": 1, **kw})


@pytest.fixture
def encoded() -> list[W.EncodedExample]:
    # Unsorted on purpose: the writer sorts by key.
    return [W.encode_example(_example(i), ["webdataset", "parquet"]) for i in (7, 3, 0, 5, 1, 6, 4, 2)]


def _spill_files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


# ------------------------------------------------------------------ spilling


def test_spilled_group_gives_the_same_bytes_as_in_memory(tmp_path, encoded):
    kw = {"shard_max_images": 3, "parquet_row_group_max_bytes": 4096}
    mem = W.write_group(str(tmp_path / "mem"), "train", 0, encoded, _cfg(**kw))
    spill_dir = tmp_path / "spill"
    disk = W.write_group(
        str(tmp_path / "disk"), "train", 0, reversed(encoded), _cfg(spill_memory_max_bytes=0, spill_dir=str(spill_dir), **kw)
    )
    # A budget of a few records: part held in memory, then everything spilled.
    some = W.write_group(
        str(tmp_path / "some"), "train", 0, encoded, _cfg(spill_memory_max_bytes=3 * len(encoded[0].image), **kw)
    )
    assert not mem.spilled and disk.spilled and some.spilled
    assert _tree(tmp_path / "mem") == _tree(tmp_path / "disk") == _tree(tmp_path / "some")
    assert [s.path for s in mem.stats] == [s.path for s in disk.stats]
    assert len(mem.stats) == 2 * 3  # 8 examples in parts of 3, two formats
    assert _spill_files(spill_dir) == []  # unlinked at creation: nothing left behind


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_hashing_in_a_thread_gives_the_same_bytes(tmp_path, encoded, budget):
    kw = {"shard_max_images": 3, "parquet_row_group_max_bytes": 4096, "spill_memory_max_bytes": budget}
    W.write_group(str(tmp_path / "plain"), "train", 0, encoded, _cfg(**kw))
    W.write_group(str(tmp_path / "thread"), "train", 0, encoded, _cfg(hash_in_thread=True, **kw))
    assert _tree(tmp_path / "plain") == _tree(tmp_path / "thread")


def test_spilled_write_bucket_matches_image_examples(tmp_path):
    examples = [_example(i) for i in (4, 1, 3, 0, 2)]
    W.write_bucket(str(tmp_path / "a"), "train", 0, examples, _cfg(shard_max_images=2))
    W.write_bucket(str(tmp_path / "b"), "train", 0, iter(examples), _cfg(shard_max_images=2, spill_memory_max_bytes=0))
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_bad_record_in_a_spilled_group_writes_nothing(tmp_path, encoded):
    spill_dir = tmp_path / "spill"
    cfg = _cfg(spill_memory_max_bytes=0, spill_dir=str(spill_dir))
    bad = [*encoded[:5], dataclasses.replace(encoded[5], split="val"), *encoded[6:]]
    with pytest.raises(ValueError, match="split 'val'"):
        W.write_group(str(tmp_path / "out"), "train", 0, bad, cfg)
    dup = [*encoded, encoded[2]]
    with pytest.raises(ValueError, match="more than once"):
        W.write_bucket(str(tmp_path / "out"), "train", 0, dup, cfg)
    assert not (tmp_path / "out").exists() or _tree(tmp_path / "out") == {}
    assert _spill_files(spill_dir) == []


def test_write_group_dedupes_the_same_way_spilled_or_not(tmp_path, encoded):
    copy = dataclasses.replace(encoded[1], uri="zzz://other-copy")
    items = [*encoded, copy]
    a = W.write_group(str(tmp_path / "a"), "train", 0, items, _cfg())
    b = W.write_group(str(tmp_path / "b"), "train", 0, items[::-1], _cfg(spill_memory_max_bytes=0))
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert [r for _, r in a.dropped] == [r for _, r in b.dropped]
    [(dup, reject)] = a.dropped
    assert dup.uri == "zzz://other-copy" and reject.reason == "duplicate_image"
    assert [e.key for e in a.written] == sorted(e.key for e in encoded)


def test_auto_bucket_count_must_be_given(tmp_path, encoded):
    with pytest.raises(ValueError, match="num_buckets="):
        W.write_bucket(str(tmp_path), "train", 0, encoded, WriteConfig())
    stats = W.write_bucket(str(tmp_path), "train", 2, encoded, WriteConfig(), num_buckets=3)
    assert {s.path for s in stats} == {"webdataset/data/train-00002-of-00003-0000.tar", "parquet/data/train-00002-of-00003-0000.parquet"}


def _lazy_records(template: W.EncodedExample, n: int, image_bytes: int):
    # Made on the fly and dropped by the writer: only the writer can hold them.
    for i in range(n):
        yield dataclasses.replace(template, key=f"k{i:06d}", image=random.randbytes(image_bytes))


def _peak_bytes(tmp_path: Path, template: W.EncodedExample, n: int, budget: int) -> int:
    cfg = WriteConfig(formats=["webdataset"], num_buckets=1, shard_max_images=10**6, spill_memory_max_bytes=budget)
    gc.collect()
    tracemalloc.start()
    try:
        W.write_bucket(str(tmp_path / f"n{n}-b{budget}"), "train", 0, _lazy_records(template, n, 64 * 1024), cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_group(tmp_path, encoded, monkeypatch):
    from orsgen.stages.write import files

    # The hashing thread may keep up to this many bytes of records alive (a
    # constant, 16 MiB by default): scaled down to this test's records.
    monkeypatch.setattr(files, "THREAD_HASH_MAX_PENDING_BYTES", 128 * 1024)
    # The in-memory path holds the group (peak ~ n records): the check can fail.
    held_small, held_big = (_peak_bytes(tmp_path, encoded[0], n, 1 << 30) for n in (16, 64))
    assert held_big > 3 * held_small
    small, big = (_peak_bytes(tmp_path, encoded[0], n, 0) for n in (16, 64))
    assert big < 1.3 * small + 64 * 1024, (small, big)
    assert big < held_big / 4


# ------------------------------------------------------------------ rejects


def _rejects(n: int, seed: int = 0) -> list[Reject]:
    rng = random.Random(seed)
    reasons = [("instance", "regions", "dropped_small"), ("image", "ingest", "corrupt_image"), ("sample", "caption", "vlm_refused")]
    out = []
    for i in range(n):
        level, stage, reason = reasons[rng.randrange(3)]
        out.append(Reject(f"src/{rng.randrange(n // 2)}", stage, reason, f"message {i % 7}", level, f"img:{i % 11}"))
    return out


def test_sorted_spill_matches_sorted():
    items = _rejects(2000)
    key = lambda r: (r.level, r.stage, r.reason, r.source_key, r.message, r.image_id)  # noqa: E731
    with SortedSpill(key, lambda r: 100, memory_max_bytes=10_000) as spill:
        spill.extend(items)
        assert spill.spilled and spill.n_items == 2000
        assert list(spill) == sorted(items, key=key)
        assert list(spill) == sorted(items, key=key)  # iterable twice


def test_rejects_spilled_and_in_memory_give_the_same_parts(tmp_path):
    rejects = _rejects(1500)
    mem = W.write_rejects_bucket(str(tmp_path / "mem"), 1, rejects, num_buckets=2, max_rows=400)
    disk = W.write_rejects_bucket(
        str(tmp_path / "disk"), 1, reversed(rejects), num_buckets=2, max_rows=400, memory_max_bytes=20_000,
        spill_dir=str(tmp_path / "spill"),
    )
    assert _tree(tmp_path / "mem") == _tree(tmp_path / "disk")
    assert [s.path for s in mem] == [f"rejects/rejects-00001-of-00002-{p:04d}.parquet" for p in range(4)]
    rows = [pq.read_table(tmp_path / "mem" / s.path) for s in mem]
    assert [t.num_rows for t in rows] == [400, 400, 400, 300]
    assert all(t.schema.equals(REJECT_SCHEMA, check_metadata=True) for t in rows)
    assert sum(sum(s.rejects_by_reason.values()) for s in mem) == 1500
    for s, t in zip(mem, rows):
        assert sum(s.rejects_by_reason.values()) == t.num_rows
    assert _spill_files(tmp_path / "spill") == []
    again = W.write_rejects_bucket(str(tmp_path / "mem"), 1, rejects, num_buckets=2, max_rows=400, memory_max_bytes=0)
    assert all(s.skipped for s in again)


def test_rejects_of_another_run_are_a_conflict(tmp_path):
    W.write_rejects_bucket(str(tmp_path), 0, _rejects(50), max_rows=20)
    before = _tree(tmp_path)
    with pytest.raises(W.OutputConflictError, match="another run"):
        W.write_rejects_bucket(str(tmp_path), 0, _rejects(50, seed=1), max_rows=20)
    with pytest.raises(ValueError, match="max_rows"):
        W.write_rejects_bucket(str(tmp_path), 0, _rejects(5), max_rows=0)
    assert _tree(tmp_path) == before and _tmp_files(tmp_path) == []


# ------------------------------------------------------------ bucket counts


def test_auto_num_buckets_follows_the_split_size():
    assert W.auto_num_buckets(0, 0, 1000, 10**9) == 1
    assert W.auto_num_buckets(20, 10**6, 1000, 10**9) == 1  # a tiny split: one full-as-possible shard
    assert W.auto_num_buckets(900, 0, 1000, 10**9) == 1
    assert W.auto_num_buckets(901, 0, 1000, 10**9) == 2
    assert W.auto_num_buckets(11_000_000, 0, 1000, 10**9) == 12_223
    # Big images: the byte cap decides (4 GB at 0.9 GB per bucket).
    assert W.auto_num_buckets(100, 4 * 10**9, 1000, 10**9) == 5
    assert W.auto_num_buckets(10**12, 0, 1, 10**9) == 99_999


def test_num_buckets_config_is_auto_or_a_valid_integer():
    assert WriteConfig().num_buckets == "auto"
    assert WriteConfig(num_buckets=7).num_buckets == 7
    for bad in (0, 100_000, "many"):
        with pytest.raises(ValidationError, match="num_buckets"):
            WriteConfig(num_buckets=bad)


def test_spill_settings_are_not_part_of_the_config_identity():
    from orsgen.schemas.config import OrsgenConfig

    base = {"inputs": [{"type": "sa1b", "name": "s", "shards": ["/data/sa_000000.tar"]}]}
    a = OrsgenConfig.model_validate(base)
    b = OrsgenConfig.model_validate(
        {**base, "write": {"spill_memory_max_bytes": 0, "spill_dir": "/mnt/ssd", "hash_in_thread": True}}
    )
    assert b.write.spill_memory_max_bytes == 0 and b.write.hash_in_thread and a.sha256() == b.sha256()
    c = OrsgenConfig.model_validate({**base, "write": {"shard_max_images": 10}})
    assert c.sha256() != a.sha256()


def test_spilled_group_reads_back_every_record(tmp_path, encoded):
    with SpilledGroup(memory_max_bytes=2 * len(encoded[0].image), spill_dir=str(tmp_path)) as group:
        for e in encoded:
            group.add(e)
        assert group.spilled and len(group) == len(encoded)
        assert [group.get(x) for x in group.entries] == encoded
    assert _spill_files(tmp_path) == []


def test_spilled_group_holds_nothing_after_its_first_spill(tmp_path, encoded):
    # The budget holds two records: the third spills them, and it and every
    # later one go straight to disk (none is held, memory stays flat).
    budget = 2 * sum(len(e.image) + len(e.json) for e in encoded[:1]) + 1
    with SpilledGroup(memory_max_bytes=budget, spill_dir=str(tmp_path)) as group:
        group.add(encoded[0])
        group.add(encoded[1])
        assert not group.spilled
        for e in encoded[2:]:
            group.add(e)
            assert group.spilled and not group._held
        group.seal()
        members = [(k, bytes(i), bytes(j)) for k, i, j in group.tar_members(sorted(group.entries, key=lambda x: x.key))]
    assert members == [(e.key, e.image, e.json) for e in sorted(encoded, key=lambda x: x.key)]


def test_fast_tar_header_equals_tarfile():
    from orsgen.stages.write.shards import _tar_header, _tar_header_slow

    names = ["a", "x" * 99, "y" * 100, "z" * 101, "\u00e9.jpg", "sa1b-00000001.jpg", "a\x7fb", "d/k.json"]
    sizes = [0, 1, 511, 512, 250_000, 8**11 - 1, 8**11]
    for name in names:
        for size in sizes:
            assert _tar_header(name, size) == _tar_header_slow(name, size), (name, size)


@pytest.mark.parametrize("in_thread", [True, False])
def test_hashing_writer_digest_is_the_same_threaded_or_not(tmp_path, monkeypatch, in_thread):
    import hashlib

    from orsgen.stages.write import files

    # A small pending cap, so that the writer also has to wait for its helper.
    monkeypatch.setattr(files, "THREAD_HASH_MAX_PENDING_BYTES", 300_000)
    rng = random.Random(7)
    buf = bytearray(200_000)
    expected = hashlib.sha256()
    with open(tmp_path / "f", "wb") as f:
        sink = files._HashingWriter(f, in_thread)
        for i in range(40):
            n = rng.choice([0, 5, 512, 70_000, 150_000])
            if rng.random() < 0.5:
                data = rng.randbytes(n)  # bytes: may be hashed after write returns
                sink.write(memoryview(data)[: n // 2 + 1] if n and i % 3 == 0 else data)
                expected.update(memoryview(data)[: n // 2 + 1] if n and i % 3 == 0 else data)
            else:
                buf[:n] = rng.randbytes(n)  # the caller reuses its buffer after each write
                sink.write(memoryview(buf)[:n])
                expected.update(bytes(buf[:n]))
        digest = sink.hexdigest()
    assert digest == expected.hexdigest() == hashlib.sha256((tmp_path / "f").read_bytes()).hexdigest()
    assert sink.tell() == (tmp_path / "f").stat().st_size


# ------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def auto_runs(tmp_path_factory):
    """The demo with ``num_buckets: auto`` and everything spilled, on 1 and 2 workers."""
    from orsgen.pipelines.demo_data import generate_demo_inputs
    from orsgen.pipelines.run import run_pipeline
    from orsgen.schemas.config import load_config

    base = tmp_path_factory.mktemp("auto")
    cfg_path = generate_demo_inputs(base / "inputs", seed=0)
    cfg = load_config(cfg_path, ["write.num_buckets=auto", "write.spill_memory_max_bytes=0"])
    runs = {}
    for name, flags in (("one", []), ("two", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])):
        out = base / name
        runs[name] = (out, run_pipeline(cfg, str(out), ["--runner=FnApiRunner", *flags], show_progress=False))
    return cfg, runs


def _digests(root: Path) -> dict[str, bytes]:
    return _tree(root)


@pytest.mark.slow
def test_auto_buckets_spilled_one_and_two_workers_are_identical(auto_runs):
    cfg, runs = auto_runs
    assert cfg.write.num_buckets == "auto" and cfg.write.spill_memory_max_bytes == 0
    (out1, m1), (out2, m2) = runs["one"], runs["two"]
    assert _digests(out1) == _digests(out2) and m1 == m2
    assert all(lv["reconciled"] for lv in m1["counts"]["levels"].values())


@pytest.mark.slow
def test_auto_buckets_give_small_splits_full_shards(auto_runs):
    cfg, runs = auto_runs
    _, m = runs["one"]
    cap = cfg.write.shard_max_images
    for split, tot in m["splits"].items():
        shards = [s for s in m["shards"] if s["format"] == "webdataset" and s["split"] == split]
        # The split's size sets its bucket count (in every name); shards stay under the cap.
        nb = W.auto_num_buckets(tot["images"], 0, cap, 10**12)
        assert all(f"-of-{nb:05d}-" in s["path"] for s in shards), split
        assert len(shards) <= 2 * nb and all(1 <= s["n_images"] <= cap for s in shards)
        if tot["images"] <= 0.9 * cap:
            assert len(shards) == 1 and shards[0]["path"].endswith("-00000-of-00001-0000.tar")
    assert any(p.name.endswith(".json") for p in (runs["one"][0] / "_meta" / "groups").iterdir())


@pytest.mark.slow
def test_rerun_after_a_crash_skips_completed_groups_before_the_shuffle(auto_runs, tmp_path):
    from orsgen.pipelines.run import run_pipeline

    cfg, runs = auto_runs
    src, m = runs["one"]
    out = tmp_path / "out"
    shutil.copytree(src, out)
    reference = _digests(out)
    groups = sorted((out / "_meta" / "groups").iterdir())
    assert len(groups) >= 3
    # The crash: one group lost its record and a shard's marker, the manifest was never written.
    lost = groups[1]
    split_bucket = lost.name[: -len(".json")]
    lost.unlink()
    for marker in (out / "_meta" / "shards").rglob(f"{split_bucket}-0000.tar.done"):
        marker.unlink()
    (out / "manifest.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in groups if p != lost}
    m2 = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    assert m2 == m and _digests(out) == reference
    # Completed groups never reached the writer (it rewrites the record last).
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert lost.exists()


@pytest.mark.slow
def test_group_record_of_another_config_is_not_trusted(auto_runs, tmp_path):
    from orsgen.stages.write.groups import GroupRecord, read_group_records

    cfg, runs = auto_runs
    src, _ = runs["one"]
    records = read_group_records(str(src), cfg.sha256())
    assert records and all(r.config_sha256 == cfg.sha256() for r in records.values())
    assert read_group_records(str(src), "0" * 64) == {}
    some = next(iter(records.values()))
    assert GroupRecord.from_json(some.to_json()) == some
    with pytest.raises(ValueError, match="not a group record"):
        GroupRecord.from_json(b'{"version": 1}')
    # A record whose shard lost its marker is not trusted either.
    out = tmp_path / "out"
    shutil.copytree(src, out)
    rel = some.stats[0].path
    (out / "_meta" / "shards" / (rel + ".done")).unlink()
    assert some.key not in read_group_records(str(out), cfg.sha256())
