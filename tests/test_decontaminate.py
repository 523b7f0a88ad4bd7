"""Benchmark decontamination and near-duplicate groups (stages/decontaminate, pipelines/decontaminate)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from orsgen.pipelines.demo_data import demo_scene, write_coco
from orsgen.schemas.config import ConfigError, DecontaminateConfig, config_from_dict
from orsgen.schemas.records import ImageExample, ImageRecord
from orsgen.stages.decontaminate import BENCHMARK_OVERLAP, overlap_reject, prepare_index
from orsgen.stages.decontaminate.groups import HashedImage, near_duplicate_groups
from orsgen.stages.decontaminate.hashing import crop_boxes, image_hashes
from orsgen.stages.decontaminate.index import BenchmarkMatch, build_index, read_index, write_index
from orsgen.stages.decontaminate.matching import HammingIndex, as_codes, brute_force_pairs


def _jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _texture(seed: int, w: int = 320, h: int = 240) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.normal(128, 50, (12, 16, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(10, 60)), c, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _copies(img: np.ndarray) -> dict[str, bytes]:
    """The acceptance transforms: JPEG q50, 0.5x, 5% crop of each side."""
    h, w = img.shape[:2]
    out = {"jpeg_q50": _jpeg(img, 50)}
    out["resize_0.5"] = _jpeg(np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.Resampling.BILINEAR)))
    for side, (x0, y0, x1, y1) in zip(("left", "right", "top", "bottom"), crop_boxes(w, h, 0.05)):
        out[f"crop_{side}"] = _jpeg(img[y0:y1, x0:x1])
    return out


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory):
    """A benchmark image folder: 3 demo scenes and 3 textures."""
    root = tmp_path_factory.mktemp("bench")
    imgs = [demo_scene(0, "coco", 500 + i)[0] for i in range(3)] + [_texture(i) for i in range(3)]
    for i, img in enumerate(imgs):
        (root / f"b{i}.jpg").write_bytes(_jpeg(img))
    return root, imgs


def test_copies_of_benchmark_images_are_caught_and_unrelated_ones_are_not(bench_folder):
    root, imgs = bench_folder
    cfg = DecontaminateConfig(sources=[{"name": "bench", "type": "images", "path": str(root)}])
    index = build_index(cfg)
    assert index.counts["bench"]["images"] == 6 and len(index.phash_codes) == 6 * 5
    for i, img in enumerate(imgs):
        for name, data in _copies(img).items():
            matches = index.match(image_hashes(data, cfg.crop_frac))
            assert [m.kind for m in matches] == ["phash"], (i, name)
            assert matches[0].ref.endswith(f"b{i}.jpg") and matches[0].distance <= cfg.max_distance, (i, name)
        # Renamed: the same bytes under another name match by sha256 (and pHash).
        renamed = (root / f"b{i}.jpg").read_bytes()
        assert {m.kind for m in index.match(image_hashes(renamed, cfg.crop_frac))} == {"sha256", "phash"}
    # Unrelated images (other scenes, other textures), and a copy of one, are not caught.
    for img in [demo_scene(0, "coco", 900 + i)[0] for i in range(4)] + [_texture(100 + i) for i in range(4)]:
        for data in (_jpeg(img), _copies(img)["crop_left"]):
            assert index.match(image_hashes(data, cfg.crop_frac)) == []


def test_multi_index_search_equals_brute_force():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (3000, 32), dtype=np.uint8)
    bits = np.unpackbits(codes[:300], axis=1)
    for i in range(300):  # near copies at every distance up to 50 bits
        flip = rng.choice(256, size=i % 51, replace=False)
        bits[i, flip] ^= 1
    queries = np.concatenate([np.packbits(bits, axis=1), rng.integers(0, 256, (100, 32), dtype=np.uint8)])
    for k in (0, 9, 15, 16, 31, 47):
        ref = brute_force_pairs(queries, codes, k)
        assert len(ref[0]) >= sum(1 for i in range(300) if i % 51 <= k)
        # Both table layouts: expanded (entries filed under their neighbours)
        # and plain (the query probes the neighbours).
        for budget, expanded in ((1 << 30, True), (0, k < 16)):  # (radius 0: one layout)
            index = HammingIndex(codes, k, table_budget_bytes=budget)
            assert index.expanded == expanded
            got = index.search(queries)
            assert all(np.array_equal(a, b) for a, b in zip(got, ref)), (k, budget)
    with pytest.raises(ValueError, match="max_distance"):
        HammingIndex(codes, 64)
    # Empty index, empty queries.
    assert len(HammingIndex(as_codes([]), 31).search(queries)[0]) == 0
    assert len(HammingIndex(codes, 31).search(as_codes([]))[0]) == 0


@pytest.mark.parametrize("brute_force_pairs_max", [1 << 17, 0])  # small buckets all-pairs / every bucket searched
def test_near_duplicate_groups_join_copies_and_leave_others_alone(monkeypatch, brute_force_pairs_max):
    from orsgen.stages.decontaminate import groups as groups_mod

    monkeypatch.setattr(groups_mod, "BUCKET_BRUTE_FORCE_PAIRS", brute_force_pairs_max)
    a, b = demo_scene(0, "coco", 700)[0], _texture(7)
    h = lambda data: image_hashes(data, 0.04)  # noqa: E731
    items = {
        "coco:a": h(_jpeg(a)),
        "coco:a_q50": h(_jpeg(a, 50)),
        "coco:a_crop": h(_copies(a)["crop_top"]),
        "coco:b": h(_jpeg(b)),
        "coco:b_half": h(_copies(b)["resize_0.5"]),
        "coco:c": h(_jpeg(demo_scene(0, "coco", 701)[0])),
        "coco:d": h(_jpeg(_texture(8))),
    }
    groups = near_duplicate_groups([HashedImage(k, v.phash, v.crops) for k, v in items.items()], 31)
    assert groups == {
        "coco:a": "coco:a", "coco:a_crop": "coco:a", "coco:a_q50": "coco:a",
        "coco:b": "coco:b", "coco:b_half": "coco:b",
    }  # fmt: skip


def _example(split: str) -> ImageExample:
    rec = ImageRecord("coco:1", "coco", "x/1.jpg", 4, 4, "0" * 64, "000000000001.jpg")
    return ImageExample("coco_1", rec, b"", split=split)


def test_overlap_rejects_training_copies_and_keeps_held_out_ones_when_asked():
    m = [BenchmarkMatch("refcoco_unc", "phash", "ab" * 32, 7, "/b/COCO_train2014_000000000001.jpg")]
    cfg = DecontaminateConfig(index="x.parquet")
    r = overlap_reject(_example("train"), m, cfg, ("train",))
    assert r is not None and r.reason == BENCHMARK_OVERLAP and r.level == "image"
    assert "refcoco_unc" in r.message and "phash within 7 bits" in r.message
    assert overlap_reject(_example("val"), m, cfg, ("train",)) is not None  # held-out rejected by default
    keep = DecontaminateConfig(index="x.parquet", keep_in_heldout=True)
    assert overlap_reject(_example("val"), m, keep, ("train",)) is None
    assert overlap_reject(_example("train"), m, keep, ("train",)) is not None
    assert overlap_reject(_example("train"), [], cfg, ("train",)) is None


def _refs_source(tmp_path: Path) -> Path:
    refs = [
        {"ref_id": 1, "image_id": 11, "split": "testA", "ann_id": 1, "category_id": 1, "sentences": []},
        {"ref_id": 2, "image_id": 12, "split": "train", "ann_id": 2, "category_id": 1, "sentences": []},
        {"ref_id": 3, "image_id": 13, "split": "val", "ann_id": 3, "category_id": 1, "sentences": []},
    ]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(refs))
    return path


def test_index_file_is_written_once_and_reused(tmp_path, bench_folder):
    root, _ = bench_folder
    idx = tmp_path / "idx" / "bench.parquet"
    src = [
        {"name": "refcoco", "type": "refs", "path": str(_refs_source(tmp_path))},
        {"name": "folder", "type": "images", "path": str(root)},
    ]
    cfg = DecontaminateConfig(sources=src, index=str(idx))
    built = prepare_index(cfg)
    assert idx.exists() and sorted(k for k in built.exact if k[0] == "coco_id") == [("coco_id", "11"), ("coco_id", "13")]
    stamp = idx.stat().st_mtime_ns
    again = prepare_index(cfg)  # read, not rebuilt: same content, file untouched
    assert idx.stat().st_mtime_ns == stamp
    assert again.exact == built.exact and np.array_equal(again.phash_codes, built.phash_codes)
    alone = prepare_index(DecontaminateConfig(index=str(idx)))  # the file alone, no sources
    assert alone.match(None, 11)[0].benchmark == "refcoco" and alone.match(None, 12) == []
    with pytest.raises(ConfigError, match="decontaminate.index.*other sources"):
        prepare_index(DecontaminateConfig(sources=src[:1], index=str(idx)))
    with pytest.raises(FileExistsError):
        write_index(built, str(idx))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="decontaminate.index"):
        read_index(str(bad), 31)


@pytest.mark.parametrize(
    ("source", "content", "key"),
    [
        ({"type": "refs"}, None, "decontaminate.sources.0.path"),
        ({"type": "refs"}, b"[{\"image_id\": \"x\"}]", "decontaminate.sources.0.path"),
        ({"type": "coco"}, b"{not json", "decontaminate.sources.0.path"),
        ({"type": "coco"}, b"{\"images\": 3}", "decontaminate.sources.0.path"),
        ({"type": "hashes"}, b"sha256:" + b"a" * 64 + b"\nphash:xyz\n", "decontaminate.sources.0.path"),
        ({"type": "images"}, None, "decontaminate.sources.0.path"),
        ({"type": "orsgen"}, None, "decontaminate.sources.0.path"),
    ],
)
def test_missing_or_malformed_benchmark_file_names_the_key(tmp_path, source, content, key):
    path = tmp_path / "bench.file"
    if content is not None:
        path.write_bytes(content)
    cfg = DecontaminateConfig(sources=[{"name": "b", "path": str(path), **source}])
    with pytest.raises(ConfigError) as err:
        prepare_index(cfg)
    msg = str(err.value)
    assert msg.startswith(key) and msg.count(". ") <= 1, msg


def test_well_formed_hash_list_is_read(tmp_path):
    path = tmp_path / "h.txt"
    path.write_text(f"# benchmark hashes\n{'a' * 64}\nsha256:{'b' * 64}\nphash:{'c' * 64}  # one pHash\n")
    index = prepare_index(DecontaminateConfig(sources=[{"name": "h", "type": "hashes", "path": str(path)}]))
    assert {k for k in index.exact} == {("sha256", "a" * 64), ("sha256", "b" * 64)} and len(index.phash_codes) == 1


def test_config_model_refuses_fields_of_another_source_type():
    with pytest.raises(ConfigError, match="decontaminate.sources.0"):
        config_from_dict({"inputs": [{"name": "s", "type": "sa1b", "shards": ["x.tar"]}],
                          "decontaminate": {"sources": [{"name": "b", "type": "images", "path": "x", "splits": ["val"]}]}})
    with pytest.raises(ConfigError, match="unique"):
        config_from_dict({"inputs": [{"name": "s", "type": "sa1b", "shards": ["x.tar"]}],
                          "decontaminate": {"sources": [{"name": "b", "type": "images", "path": "x"}] * 2}})


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A COCO input of 5 demo images plus a q50 copy of image 3 under another id, and a benchmark folder
    holding a JPEG q50 copy of image 1 and a 5%-cropped copy of image 2."""
    from orsgen.pipelines.run import run_pipeline
    from orsgen.schemas.config import load_config
    from orsgen.stages.splits import hash_unit

    root = tmp_path_factory.mktemp("dec")
    ann = write_coco(root / "coco", 0, 5)
    doc = json.loads(ann.read_text())
    ids = [im["id"] for im in doc["images"]]
    src = doc["images"][2]
    dup = dict(src, id=ids[-1] + 50, file_name="dup_q50.jpg")
    (root / "coco" / "images" / "dup_q50.jpg").write_bytes(
        _jpeg(np.asarray(Image.open(root / "coco" / "images" / src["file_name"]).convert("RGB")), 50)
    )
    doc["images"].append(dup)
    n = max(a["id"] for a in doc["annotations"])
    doc["annotations"] += [dict(a, id=n + 1 + i, image_id=dup["id"]) for i, a in enumerate(doc["annotations"]) if a["image_id"] == src["id"]]
    ann.write_text(json.dumps(doc))
    bench = root / "bench"
    bench.mkdir()
    img1 = np.asarray(Image.open(root / "coco" / "images" / doc["images"][0]["file_name"]).convert("RGB"))
    img2 = np.asarray(Image.open(root / "coco" / "images" / doc["images"][1]["file_name"]).convert("RGB"))
    (bench / "x.jpg").write_bytes(_jpeg(img1, 50))
    (bench / "y.png").write_bytes(_copies(img2)["crop_left"])
    # A salt under which the copy and its original would hash into different
    # splits: only the group keeps them together.
    a, b = f"coco:{src['id']}", f"coco:{dup['id']}"
    salt = next(s for s in (f"s{i}" for i in range(200)) if (hash_unit(a, s) < 0.5) != (hash_unit(b, s) < 0.5))
    cfg_doc = {
        "name": "dec-test",
        "inputs": [{"name": "coco", "type": "coco", "annotations": "coco/annotations/instances_demo.json", "images": "coco/images"}],
        "splits": {"ratios": {"train": 0.5, "val": 0.5}, "salt": salt},
        "write": {"num_buckets": 1},
        "decontaminate": {"near_duplicates": True, "index": "index.parquet", "sources": [{"name": "mybench", "type": "images", "path": "bench"}]},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg_doc))
    cfg = load_config(root / "cfg.yaml")
    out = root / "out"
    manifest = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    return {"root": root, "out": out, "manifest": manifest, "ids": ids, "dup": (a, b), "cfg": cfg}


def test_stage_end_to_end_on_the_demo(tiny_build):
    import pyarrow.parquet as pq

    m, out = tiny_build["manifest"], tiny_build["out"]
    counts = m["counts"]
    assert counts["levels"]["images"]["reconciled"] and counts["levels"]["images"]["inputs"] == 6
    dec = counts["decontamination"]
    assert dec["rejected/images"] == 2 and dec["rejected/mybench/phash"] == 2
    assert dec["near_duplicates/groups"] == 1 and dec["near_duplicates/images"] == 2
    # The pair hashes apart under this salt: the grouping moved one of them.
    assert dec["near_duplicates/moved_images"] == 1 and dec["near_duplicates/moved_groups"] == 1
    assert counts["rejected_by_reason"]["image/benchmark_overlap"] == 2
    rejects = [r for f in sorted(out.glob("rejects/*.parquet")) for r in pq.read_table(f).to_pylist()]
    overlap = sorted(r["image_id"] for r in rejects if r["reason"] == BENCHMARK_OVERLAP)
    ids = tiny_build["ids"]
    assert overlap == [f"coco:{ids[0]}", f"coco:{ids[1]}"]
    assert all("mybench (phash within" in r["message"] for r in rejects if r["reason"] == BENCHMARK_OVERLAP)
    # The near-duplicate pair went to one split, though their ids hash apart.
    from orsgen.stages.dataset.read import iter_rows, list_splits

    split_of = {r["image_id"]: s for s in list_splits(str(out)) for r in iter_rows(str(out), s, ["image_id"])}
    a, b = tiny_build["dup"]
    assert a in split_of and split_of[a] == split_of[b]
    assert len(split_of) == 4
    # The matched pairs are listed for preview, and the index file was written for reuse.
    lines = [json.loads(x) for x in (out / "_meta/decontaminate/matches.jsonl").read_text().splitlines()]
    assert sorted(x["image_id"] for x in lines) == overlap and all(x["benchmark_ref"] for x in lines)
    # Benchmark refs are shown as the config wrote the source path (relative
    # to its folder), in the matches file and in the reject messages alike.
    assert sorted(x["benchmark_ref"] for x in lines) == ["bench/x.jpg", "bench/y.png"]
    root = str(tiny_build["root"])
    assert not any(root in r["message"] for r in rejects) and not any(root in json.dumps(x) for x in lines)
    assert (tiny_build["root"] / "index.parquet").exists()


def test_preview_draws_matched_pairs_and_card_reports_overlaps(tiny_build, tmp_path):
    from typer.testing import CliRunner

    from orsgen.pipelines import cli
    from orsgen.stages.dataset.publish import decontamination_lines

    out = str(tiny_build["out"])
    # uris are written as the config wrote them: relative to the config's folder.
    res = CliRunner().invoke(
        cli.app,
        ["preview", out, "--out", str(tmp_path / "m.png"), "--matches", "--inputs-root", str(tiny_build["root"])],
    )
    assert res.exit_code == 0, res.output
    sheet = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"))
    # Two pairs, each the build image beside its benchmark copy: both halves hold pictures.
    assert sheet.shape[1] > 2 * 300 and "2 of 2 matched images" in res.output
    left, right = sheet[6:231, 6:306], sheet[6:231, 312:612]
    assert left.std() > 10 and right.std() > 10
    card = "\n".join(decontamination_lines(tiny_build["manifest"]["counts"]))
    assert "| `mybench` |" in card and "**2**" in card and "**1** group of 2 images" in card and "moved **1** image (1 group)" in card
    assert "in every split" in card
    assert decontamination_lines({"levels": {}}) == []
    # An output built without decontamination has no matches to draw: one clear sentence, rc 2.
    (tmp_path / "plain").mkdir()
    res = CliRunner().invoke(cli.app, ["preview", str(tmp_path / "plain"), "--out", str(tmp_path / "n.png"), "--matches"])
    assert res.exit_code == 2 and "decontaminate.sources" in res.output


def test_cli_stops_before_the_run_on_a_missing_benchmark_file(tiny_build, tmp_path):
    from typer.testing import CliRunner

    from orsgen.pipelines import cli

    doc = yaml.safe_load((tiny_build["root"] / "cfg.yaml").read_text())
    doc["decontaminate"] = {"sources": [{"name": "gone", "type": "refs", "path": "nope/refs(unc).p"}]}
    cfg_path = tiny_build["root"] / "cfg_missing.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    res = CliRunner().invoke(cli.app, ["run", str(cfg_path), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "decontaminate.sources.0.path" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_an_earlier_output_protects_its_held_out_splits(tiny_build):
    from orsgen.stages.dataset.read import iter_rows, list_splits

    out = str(tiny_build["out"])
    held = [s for s in list_splits(out) if s != "train"]
    index = prepare_index(DecontaminateConfig(sources=[{"name": "v1", "type": "orsgen", "path": out}]))
    want = {r["sha256"] for s in held for r in iter_rows(out, s, ["sha256"])}
    assert want and {v for k, v in index.exact if k == "sha256"} == want
    assert index.counts["v1"]["images"] == len(want) and len(index.phash_codes) == 5 * len(want)
    with pytest.raises(ConfigError, match=r"decontaminate.sources.0.splits.*nope"):
        prepare_index(DecontaminateConfig(sources=[{"name": "v1", "type": "orsgen", "path": out, "splits": ["nope"]}]))


def test_missing_imagehash_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imagehash", None)
    with pytest.raises(ImportError, match=r"orsgen\[dedup\]"):
        image_hashes(_jpeg(_texture(1)))


def test_a_group_takes_its_most_protected_split():
    from orsgen.stages.splits import most_protected_split

    assert most_protected_split(["train", "val", "train"], ["train"]) == "val"
    assert most_protected_split(["train", "val", "ood_x"], ["train"]) == "ood_x"
    assert most_protected_split(["train", "train"], ["train"]) == "train"


def test_portable_ref_shows_benchmark_paths_as_the_config_wrote_them():
    from orsgen.stages.decontaminate import portable_ref

    written = {"/data/cfg/bench": "bench", "/data/cfg/out_old": "../old"}
    assert portable_ref("/data/cfg/bench/a.jpg", written) == "bench/a.jpg"
    assert portable_ref("/data/cfg/out_old#val/coco:1", written) == "../old#val/coco:1"
    # Paths the config wrote absolute, URLs and COCO ids are left as they are.
    assert portable_ref("/elsewhere/a.jpg", written) == "/elsewhere/a.jpg"
    assert portable_ref("gs://b/a.jpg", written) == "gs://b/a.jpg"
    assert portable_ref("coco:42", written) == "coco:42" and portable_ref("", written) == ""


def test_group_split_counts_the_images_it_moves():
    from orsgen.stages.decontaminate.groups import group_split

    # b alone is in train, the group (pulled by a's val) puts it in val: b moved.
    assert group_split([("a", "val", "val"), ("b", "train", "train")], ["train"]) == ("val", ["b"])
    # Members that hash apart alone but together by the group id: the one whose own split differs moved.
    assert group_split([("a", "train", "val"), ("b", "val", "val")], ["train"]) == ("val", ["a"])
    # An image read from two inputs counts once, by its copies' most protected split.
    assert group_split([("a", "train", "train"), ("a", "val", "val"), ("b", "val", "val")], ["train"]) == ("val", [])
    # Members that already agree: nothing moved.
    assert group_split([("a", "train", "train"), ("b", "train", "train")], ["train"]) == ("train", [])


def test_config_identity_and_manifest_show_benchmark_paths_as_written(tmp_path):
    """The same config and benchmark files under two folders: one sha256, no absolute path recorded."""
    from orsgen.schemas.config import load_config, redacted_config

    shas, dumps = [], []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "bench").mkdir(parents=True)
        (root / "bench" / "x.jpg").write_bytes(b"not needed to load the config")
        (root / "instances.json").write_text("{}")
        cfg_path = root / "cfg.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "name": "portable",
            "inputs": [{"type": "coco", "name": "c", "annotations": "instances.json", "images": "bench"}],
            "decontaminate": {"index": "bench.parquet", "sources": [{"name": "ev", "type": "images", "path": "bench"}]},
        }))
        cfg = load_config(cfg_path)
        shas.append(cfg.sha256())
        dumps.append(json.dumps(redacted_config(cfg)))
        dec = redacted_config(cfg)["decontaminate"]
        assert dec["index"] == "bench.parquet" and dec["sources"][0]["path"] == "bench", dec
    assert shas[0] == shas[1]
    assert str(tmp_path) not in dumps[0] + dumps[1]


@pytest.fixture
def drafted(monkeypatch) -> list[str]:
    """The formats of the images Pillow's JPEG draft mode was asked for, in order."""
    from PIL import JpegImagePlugin

    calls: list[str] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(self.format)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def test_decode_grey_never_drafts_a_lossless_jpeg_and_names_no_address(drafted):
    # Pillow's draft mode overruns its buffer on a lossless JPEG (a segfault on
    # large ones), so such a file is decoded in full; a JPEG of the usual kind
    # is still drafted. An unreadable file's message holds no memory address.
    import io

    import numpy as np
    from PIL import Image

    from orsgen.stages.decontaminate import hashing
    from tests.test_ingest_fast import _lossless_jpeg

    yy, xx = np.mgrid[0:30, 0:40]
    im = hashing.decode_grey(_lossless_jpeg(((xx * 5 + yy * 3) % 256).astype(np.uint8)))
    assert im.size == (40, 30) and drafted == []
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    assert hashing.decode_grey(buf.getvalue()).size == (40, 30) and drafted == ["JPEG"]
    with pytest.raises(hashing.HashError) as err:
        hashing.decode_grey(b"not an image at all")
    assert "0x" not in str(err.value) and "no image format" in str(err.value)


def test_preview_never_drafts_a_lossless_jpeg(tmp_path, drafted):
    # The matched-pair preview reads benchmark pictures straight from disk:
    # a lossless JPEG is decoded whole (draft mode would overrun Pillow's
    # buffer), an ordinary JPEG is still drafted.
    import io

    import numpy as np
    from PIL import Image

    from orsgen.stages.dataset import preview
    from tests.test_ingest_fast import _lossless_jpeg

    yy, xx = np.mgrid[0:24, 0:40]
    lossless = tmp_path / "lossless.jpg"
    lossless.write_bytes(_lossless_jpeg(((xx * 7 + yy) % 256).astype(np.uint8)))
    im = preview._load_match_image(str(lossless))
    assert im is not None and im.size == (40, 24) and drafted == []
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (10, 200, 10)).save(buf, "JPEG")
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(buf.getvalue())
    assert preview._load_match_image(str(plain)) is not None and drafted == ["JPEG"]
