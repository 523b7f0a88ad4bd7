"""PyTorch loaders: every sample exactly once across workers and ranks, equal counts for DDP, lazy masks."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pycocotools import mask as mask_utils  # noqa: E402

from orsgen.stages.dataset.loader import (  # noqa: E402
    ParquetSamples,
    WebDatasetSamples,
    assign_shards,
    collate_lists,
    cover_plan,
)
from orsgen.stages.dataset.read import iter_rows, tar_files  # noqa: E402


@pytest.fixture(scope="module")
def truth(demo_output):
    """split -> {sample_id: sample} from the Parquet shards."""
    out = {}
    for split in ("train", "testA"):
        out[split] = {s["sample_id"]: s for row in iter_rows(str(demo_output), split, ["samples"]) for s in row["samples"]}
    return out


def test_dataloader_with_two_workers_sees_every_sample_once(demo_output, truth):
    ds = WebDatasetSamples(str(demo_output), "train", mask="rle", decode_images=False)
    assert len(tar_files(str(demo_output), "train")) >= 2
    assert len(ds) == len(truth["train"])
    dl = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_lists)
    seen = Counter(sid for batch in dl for sid in batch["sample_id"])
    assert set(seen) == set(truth["train"]) and max(seen.values()) == 1
    # Per-image items too.
    ds_img = WebDatasetSamples(str(demo_output), "train", unit="image", decode_images=False)
    keys = Counter(b["key"] for b in torch.utils.data.DataLoader(ds_img, batch_size=None, num_workers=2))
    assert max(keys.values()) == 1 and sum(keys.values()) == len(ds_img)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_ranks_split_shards_exactly_or_equalize(demo_output, truth, world_size):
    n_shards = len(tar_files(str(demo_output), "train"))
    exact = [
        [x["sample_id"] for x in WebDatasetSamples(str(demo_output), "train", mask="none", decode_images=False, rank=r, world_size=world_size)]
        for r in range(world_size)
    ]
    flat = [sid for part in exact for sid in part]
    assert sorted(flat) == sorted(truth["train"])  # every sample exactly once over all ranks
    if world_size > n_shards:
        assert any(not part for part in exact)  # some ranks have no shard: DDP would hang...

    # ...so equalize gives every rank the same count and still covers every sample.
    eq = []
    for r in range(world_size):
        ds = WebDatasetSamples(
            str(demo_output), "train", mask="none", decode_images=False, rank=r, world_size=world_size, equalize=True, num_workers=0
        )
        items = [(x["sample_id"], x["padded"]) for x in ds]
        assert len(items) == len(ds)
        eq.append(items)
    _check_cover(eq, truth["train"], demo_output, "train", world_size)


def _check_cover(per_rank, truth_split, demo_output, split, n_slots):
    """Every sample at least once, equal ranks, and padding within the README's bound."""
    from orsgen.stages.dataset.read import shard_sizes

    assert len({len(e) for e in per_rank}) == 1, [len(e) for e in per_rank]
    seen = Counter(sid for e in per_rank for sid, _ in e)
    assert set(seen) == set(truth_split)
    # Unpadded items are exactly the dataset, once each.
    assert sorted(sid for e in per_rank for sid, padded in e if not padded) == sorted(truth_split)
    s_max = max(v["n_samples"] for v in shard_sizes(str(demo_output), split, "webdataset").values())
    padding = sum(len(e) for e in per_rank) - len(truth_split)
    assert padding == sum(padded for e in per_rank for _, padded in e)
    assert padding <= (n_slots - 1) * s_max


@pytest.mark.parametrize("split", ["train", "testA"])
def test_equalize_two_ranks_two_workers_sees_every_sample(demo_output, truth, split):
    # The DDP layout of the README: 2 ranks x 2 DataLoader workers, with odd batches.
    per_rank, batches = [], []
    for r in range(2):
        ds = WebDatasetSamples(
            str(demo_output), split, mask="none", decode_images=False, rank=r, world_size=2, equalize=True, num_workers=2
        )
        dl = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2, collate_fn=collate_lists)
        bs = list(dl)
        batches.append(len(bs))
        items = [(sid, p) for b in bs for sid, p in zip(b["sample_id"], b["padded"])]
        assert len(items) == len(ds)
        per_rank.append(items)
    assert batches[0] == batches[1]  # same number of steps on every rank: no DDP hang
    _check_cover(per_rank, truth[split], demo_output, split, 4)


def test_cover_plan_balances_shards_longest_first():
    # 2 ranks x 2 workers over [100, 100, 100, 100, 40]: loads 140/100/100/100, q = 140.
    sizes = [100, 100, 100, 100, 40]
    plan = cover_plan(sizes, 4)
    assert plan == [[0, 4], [1], [2], [3]]
    assert max(sum(sizes[i] for i in b) for b in plan) == 140
    # [100, 10 x 7] on 2 slots: round robin would give 130 / 40; LPT gives 100 / 70.
    sizes = [100] + [10] * 7
    loads = sorted(sum(sizes[i] for i in b) for b in cover_plan(sizes, 2))
    assert loads == [70, 100]
    # Every shard in exactly one slot, also with more slots than shards.
    plan = cover_plan([5, 3], 4)
    assert sorted(i for b in plan for i in b) == [0, 1] and sum(not b for b in plan) == 2
    with pytest.raises(ValueError):
        cover_plan([1], 0)


def test_equalize_synthetic_shards_cover_and_bound(tmp_path):
    # Uneven shards written here: sizes 9, 1, 4, 4, 0 over 2 ranks x 2 workers.
    import io
    import json
    import tarfile

    sizes = [9, 1, 4, 4, 0]
    urls, items = [], {}
    for i, n in enumerate(sizes):
        path = tmp_path / f"s-{i:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(n):
                key = f"k{i}_{j}"
                for ext, data in (("json", json.dumps({"key": key, "width": 1, "height": 1}).encode()), ("jpg", b"x")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
        items[path.name] = n
    per_rank = []
    for r in range(2):
        ds = WebDatasetSamples(urls=urls, shard_items=items, unit="image", decode_images=False, rank=r, world_size=2, equalize=True, num_workers=2)
        got = [(x["key"], x["padded"]) for x in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
        assert len(got) == len(ds) == 2 * 9  # W * q, q = the largest slot (the 9-item shard)
        per_rank.append(got)
    keys = Counter(k for e in per_rank for k, _ in e)
    assert set(keys) == {f"k{i}_{j}" for i, n in enumerate(sizes) for j in range(n)}
    assert sum(p for e in per_rank for _, p in e) == 4 * 9 - sum(sizes) <= 3 * max(sizes)


def test_equalize_bad_inputs(demo_output, tmp_path):
    ds = WebDatasetSamples(str(demo_output), "testA", mask="none", decode_images=False, rank=0, world_size=2, equalize=True)
    with pytest.raises(TypeError, match="num_workers"):
        len(ds)  # the length depends on the DataLoader's workers
    ds = WebDatasetSamples(str(demo_output), "testA", mask="none", decode_images=False, rank=0, world_size=2, equalize=True, num_workers=3)
    with pytest.raises(ValueError, match="num_workers=3"):
        next(iter(ds))  # declared 3 workers, iterated in-process (1)
    with pytest.raises(ValueError, match="items per shard"):
        WebDatasetSamples(urls=[str(tmp_path / "a.tar")], equalize=True)
    with pytest.raises(ValueError, match="num_workers"):
        WebDatasetSamples(str(demo_output), "testA", num_workers=-1)


def test_rank_travels_to_spawned_workers(demo_output, monkeypatch):
    # Workers started with spawn / forkserver (ranks launched by mp.spawn) do not
    # inherit torch.distributed; the parent's rank must travel with the pickle.
    import pickle

    import torch.distributed as dist

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ds = WebDatasetSamples(str(demo_output), "train", mask="none", decode_images=False)
    with monkeypatch.context() as m:  # the parent: an initialised group, rank 1 of 3
        m.setattr(dist, "is_initialized", lambda: True)
        m.setattr(dist, "get_rank", lambda group=None: 1)
        m.setattr(dist, "get_world_size", lambda group=None: 3)
        blob = pickle.dumps(ds)
    child = pickle.loads(blob)  # the worker: torch.distributed not initialised
    want = [x["sample_id"] for x in WebDatasetSamples(str(demo_output), "train", mask="none", decode_images=False, rank=1, world_size=3)]
    assert [x["sample_id"] for x in child] == want and 0 < len(want) < len(ds)
    assert pickle.loads(pickle.dumps(ds)).rank is None  # without a group, nothing is pinned


def test_shard_assignment_is_a_partition():
    shards = [f"s{i}" for i in range(7)]
    got = [assign_shards(shards, r, 2, w, 3) for r in range(2) for w in range(3)]
    flat = [s for g in got for s in g]
    assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))


def test_masks_are_decoded_lazily_full_or_crop(demo_output, truth):
    full = WebDatasetSamples(str(demo_output), "testA", mask="full")
    crop = WebDatasetSamples(str(demo_output), "testA", mask="crop", decode_images=False)
    for a, b in zip(full, crop):
        s = truth["testA"][a["sample_id"]]
        want = mask_utils.decode({"size": s["union_rle"]["size"], "counts": s["union_rle"]["counts"].encode()}).astype(bool)
        assert a["mask"].shape == (a["height"], a["width"]) and a["mask"].dtype == torch.bool
        assert np.array_equal(a["mask"].numpy(), want)
        assert a["image"].size == (a["width"], a["height"])
        assert b["mask_crop"].sum() == want.sum()
        if want.any():
            x0, y0 = b["mask_origin"]
            h, w = b["mask_crop"].shape
            assert np.array_equal(want[y0 : y0 + h, x0 : x0 + w], b["mask_crop"].numpy())
            assert h * w < want.size  # only the box was decoded
        assert a["boxes"].shape == (len(s["targets"]), 4) and a["points"].shape == (len(s["targets"]), 2, 2)
        assert a["no_target"] == (s["kind"] == "no_target")


def test_parquet_map_style_dataset(demo_output, truth, tmp_path):
    ds = ParquetSamples(str(demo_output), "train", mask="crop", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(truth["train"])
    item = ds[len(ds) - 1]
    assert item["sample_id"] in truth["train"] and item["image"].size == (item["width"], item["height"])
    dl = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2, shuffle=True, collate_fn=collate_lists)
    seen = Counter(sid for b in dl for sid in b["sample_id"])
    assert set(seen) == set(truth["train"]) and max(seen.values()) == 1
    # DistributedSampler splits it across simulated ranks.
    parts = [list(torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_missing_torch_names_the_extra():
    code = "import sys; sys.modules['torch'] = None\nimport orsgen.stages.dataset.loader"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "pip install 'orsgen[train]'" in res.stderr
