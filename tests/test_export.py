"""orsgen export: every format round-trips to the original boxes/masks and reads in its seed's syntax."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from orsgen.pipelines.cli import app
from orsgen.schemas.records import Rle
from orsgen.stages.dataset.export import (
    FORMATS,
    SEGZERO_SIZE,
    ExportError,
    export_dataset,
    iter_export_records,
    lens_solutions,
    parse_segzero_solution,
    smart_resize,
    svg_path_to_rle,
)
from orsgen.stages.common.masks import rle_iou, rle_union
from orsgen.stages.dataset.read import iter_rows

SPLITS = ("train", "val", "testA")


@pytest.fixture(scope="module")
def exports(demo_output, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in FORMATS:
        res = CliRunner().invoke(app, ["export", str(demo_output), "--format", fmt, "--out", str(base / fmt), *sum((["--split", s] for s in SPLITS), [])])
        assert res.exit_code == 0, res.output
        out[fmt] = base / fmt
    return out


@pytest.fixture(scope="module")
def source(demo_output):
    """sample_id -> (row without image, sample), for the exported splits."""
    out = {}
    for split in SPLITS:
        for row in iter_rows(str(demo_output), split, ["key", "image_id", "width", "height", "instances", "samples"]):
            for s in row["samples"]:
                out[s["sample_id"]] = (row, s)
    return out


def _records(path: Path) -> list[dict]:
    return [r for split in SPLITS for r in iter_export_records(path, split)]


def _union_box(s):
    b = np.asarray([t["bbox_xyxy"] for t in s["targets"]])
    return [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]


def _stats(path: Path) -> dict:
    return json.loads((path / "export_stats.json").read_text())


def test_every_sample_is_exported_or_counted(exports, source):
    kinds = Counter(s["kind"] for _, s in source.values())
    n_multi = sum(1 for _, s in source.values() if len(s["targets"]) > 1)
    expected_skips = {
        "segzero": {"no_target": kinds["no_target"], "multi_target": n_multi},
        "visionreasoner": {},
        "qwen": {},
        "lens": {"no_target": kinds["no_target"]},
        "moondream": {"no_target": kinds["no_target"]},
    }
    assert n_multi > 0 and kinds["no_target"] > 0  # the demo exercises both
    for fmt, skips in expected_skips.items():
        st = _stats(exports[fmt])["splits"]
        got = Counter()
        for v in st.values():
            got.update(v["skipped"])
        assert dict(got) == {k: v for k, v in skips.items() if v}, fmt
        assert sum(v["records"] for v in st.values()) + sum(got.values()) == len(source), fmt


def test_segzero_syntax_and_round_trip(exports, source):
    seg_box = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")  # Seg-Zero's reward regexes
    seg_pts = re.compile(r"<points>\((\d+),(\d+)\),\((\d+),(\d+)\)</points>")
    recs = _records(exports["segzero"])
    assert recs
    from PIL import Image

    for r in recs:
        assert list(r) == ["id", "problem", "solution", "image", "img_height", "img_width"]
        row, s = source[r["id"]]
        assert r["problem"] == s["expression"]
        assert (r["img_width"], r["img_height"]) == (row["width"], row["height"])
        assert seg_box.search(r["solution"]) and seg_pts.search(r["solution"])
        box, p1, p2 = parse_segzero_solution(r["solution"])
        t = s["targets"][0]
        sx, sy = row["width"] / SEGZERO_SIZE, row["height"] / SEGZERO_SIZE
        # int(x * 840 / W + 0.5) is off by at most half a resized pixel.
        for got, want, sc in zip(box, t["bbox_xyxy"], (sx, sy, sx, sy)):
            assert abs(got * sc - want) <= 0.5 * sc + 1e-9
        for got, want in ((p1, t["point_1"]), (p2, t["point_2"])):
            assert abs(got[0] * sx - want[0]) <= 0.5 * sx + 1e-9 and abs(got[1] * sy - want[1]) <= 0.5 * sy + 1e-9
    img = Image.open(io.BytesIO(recs[0]["image"]["bytes"]))
    assert img.size == (SEGZERO_SIZE, SEGZERO_SIZE)


def test_segzero_family_rounds_half_up_on_840_over_w_and_h(exports, source):
    from orsgen.stages.dataset.export import scale_box, scale_coord

    # int(v * 840 / W + 0.5): a half rounds up (Python's round() would give 0 and 2 here).
    assert scale_coord(1, 1680) == 1 and scale_coord(5, 1680) == 3
    # x on 840 / W, y on 840 / H.
    assert scale_box([10, 10, 20, 20], 1680, 420) == [5, 20, 10, 40]

    def sz(v: float, n: int) -> int:
        return int(v * (SEGZERO_SIZE / n) + 0.5)

    # Every exported row, character for character.
    for r in _records(exports["segzero"]):
        row, s = source[r["id"]]
        w, h = row["width"], row["height"]
        t = s["targets"][0]
        (x0, y0, x1, y1), p1, p2 = t["bbox_xyxy"], t["point_1"], t["point_2"]
        assert r["solution"] == (
            f"<box>({sz(x0, w)},{sz(y0, h)}),({sz(x1, w)},{sz(y1, h)})</box>"
            f"<points>({sz(p1[0], w)},{sz(p1[1], h)}),({sz(p2[0], w)},{sz(p2[1], h)})</points>"
        )
    for r in _records(exports["visionreasoner"]):
        row, s = source[r["id"]]
        w, h = row["width"], row["height"]
        want = [
            {"bbox_2d": [sz(b[0], w), sz(b[1], h), sz(b[2], w), sz(b[3], h)], "point_2d": [sz(t["point_1"][0], w), sz(t["point_1"][1], h)]}
            for t in s["targets"]
            for b in [t["bbox_xyxy"]]
        ]
        assert r["solution"] == json.dumps(want)


def test_visionreasoner_syntax_and_round_trip(exports, source):
    recs = _records(exports["visionreasoner"])
    assert len(recs) == len(source)
    multi = 0
    for r in recs:
        row, s = source[r["id"]]
        sol = json.loads(r["solution"])
        assert isinstance(sol, list) and len(sol) == len(s["targets"])
        multi += len(sol) > 1
        sx, sy = row["width"] / SEGZERO_SIZE, row["height"] / SEGZERO_SIZE
        for obj, t in zip(sol, s["targets"]):
            assert set(obj) == {"bbox_2d", "point_2d"}
            for got, want, sc in zip(obj["bbox_2d"], t["bbox_xyxy"], (sx, sy, sx, sy)):
                assert abs(got * sc - want) <= 0.5 * sc + 1e-9
            assert abs(obj["point_2d"][0] * sx - t["point_1"][0]) <= 0.5 * sx + 1e-9
        if s["kind"] == "no_target":
            assert r["solution"] == "[]"
    assert multi > 0


def test_lens_syntax_and_round_trip(exports, source):
    recs = _records(exports["lens"])
    assert recs
    for r in recs:
        # LENS' grounding JSONL fields (GSTrainDataset): image_path, box, segmentation, caption.
        assert {"image_path", "box", "segmentation", "caption"} <= set(r)
        row, s = source[r["sample_id"]]
        assert (exports["lens"] / r["image_path"]).is_file()
        assert r["caption"] == s["expression"]
        assert r["box"] == pytest.approx(_union_box(s))
        size = (row["height"], row["width"])
        # The per-target RLEs add up to the sample's union mask exactly.
        union = rle_union([Rle.from_coco(x) for x in r["segmentation"]], size=size)
        assert rle_iou(union, Rle.from_coco(s["union_rle"])) == 1.0
        w, h = row["width"], row["height"]
        x0, y0, x1, y1 = r["box"]
        assert r["solution_qwen2vl"] == [round(x0 / w * 1000), round(y0 / h * 1000), round(x1 / w * 1000), round(y1 / h * 1000)]
        rh, rw = smart_resize(h, w)
        assert (r["resized_height"], r["resized_width"]) == (rh, rw) and rh % 28 == 0 and rw % 28 == 0
        for got, want, sc in zip(r["solution_qwen2p5vl"], r["box"], (w / rw, h / rh, w / rw, h / rh)):
            assert abs(got * sc - want) <= 0.5 * sc + 1e-9


def test_smart_resize_matches_transformers():
    tf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for h in range(20, 2600, 97):
        for w in range(20, 2600, 113):
            if max(h, w) / min(h, w) <= 200:
                assert smart_resize(h, w) == tuple(tf.smart_resize(h, w, 28, 4 * 28 * 28, 1_000_000)), (h, w)
    assert lens_solutions([10, 20, 110, 220], 200, 400)["qwen2vl"] == [50, 50, 550, 550]


def test_qwen_syntax_and_round_trip(exports, source):
    recs = _records(exports["qwen"])
    assert len(recs) == len(source)
    for r in recs:
        row, s = source[r["id"]]
        assert (exports["qwen"] / r["image"]).is_file()
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and s["expression"] in human["value"]
        assert gpt["from"] == "gpt"
        answer = json.loads(gpt["value"])
        assert len(answer) == len(s["targets"])
        w, h = row["width"], row["height"]
        for obj, t in zip(answer, s["targets"]):
            assert set(obj) == {"bbox_2d", "label"} and obj["label"] == s["expression"]
            assert all(0 <= v <= 1000 for v in obj["bbox_2d"])
            # Back to pixels within the 0-1000 grid's rounding (half a grid step).
            for got, want, size in zip(obj["bbox_2d"], t["bbox_xyxy"], (w, h, w, h)):
                assert abs(got / 1000 * size - want) <= 0.5 * size / 1000 + 1e-9


def test_moondream_syntax_and_round_trip(exports, source):
    path_re = re.compile(r"^M \d\.\d{4} \d\.\d{4}( L \d\.\d{4} \d\.\d{4})* Z( M \d\.\d{4} \d\.\d{4}( L \d\.\d{4} \d\.\d{4})* Z)*$")
    recs = _records(exports["moondream"])
    assert recs
    for r in recs:
        row, s = source[r["id"]]
        assert r["object"] == s["expression"]
        assert path_re.match(r["path"]), r["path"][:80]
        w, h = row["width"], row["height"]
        b = r["bbox"]
        assert [b["x_min"] * w, b["y_min"] * h, b["x_max"] * w, b["y_max"] * h] == pytest.approx(_union_box(s))
        # The path rasterises back to the union mask up to its 1 px simplification.
        m = svg_path_to_rle(r["path"], h, w)
        assert rle_iou(m, Rle.from_coco(s["union_rle"])) >= 0.9


def test_refcocom_schema_and_round_trip(exports, source):
    import datasets

    feats = datasets.load_dataset(str(exports["refcoco-m"]), split="val").features
    # RefCOCO-M's published columns and sample fields, with their types.
    assert feats["image"] == datasets.Image() and feats["image_id"] == datasets.Value("int64")
    assert feats["file_name"] == datasets.Value("string")
    sample = feats["samples"].feature
    want = {
        "id": datasets.Value("int64"),
        "image_id": datasets.Value("int64"),
        "category": datasets.Value("string"),
        "supercategory": datasets.Value("string"),
        "label": datasets.Value("string"),
        "sentences": datasets.List(datasets.Value("string")),
        "bbox": datasets.List(datasets.Value("float32")),
        "mask": {"counts": datasets.Value("string"), "size": datasets.List(datasets.Value("int32"))},
    }
    for k, v in want.items():
        assert sample[k] == v, k
    seen = set()
    for r in _records(exports["refcoco-m"]):
        for e in r["samples"]:
            members = [source[sid][1] for sid in e["sample_ids"]]
            assert e["sentences"] == [m["expression"] for m in members]
            assert {m["kind"] for m in members} == {e["kind"]} and {tuple(m["target_ids"]) for m in members} == {tuple(e["target_ids"])}
            assert rle_iou(Rle.from_coco(e["mask"]), Rle.from_coco(members[0]["union_rle"])) == (1.0 if e["target_ids"] else 0.0)
            assert Rle.from_coco(e["mask"]).counts == members[0]["union_rle"]["counts"]
            seen.update(e["sample_ids"])
    assert seen == set(source)


@pytest.mark.parametrize("fmt", ["segzero", "visionreasoner", "moondream", "refcoco-m"])
def test_datasets_loads_parquet_exports(exports, fmt, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset(str(exports[fmt]), cache_dir=str(tmp_path))
    st = _stats(exports[fmt])["splits"]
    assert {k: v.num_rows for k, v in ds.items()} == {k: v["records"] for k, v in st.items() if v["records"]}
    assert hasattr(ds["val"][0]["image"], "size")  # decoded as a PIL image


def test_export_is_atomic_and_never_overwrites(demo_output, exports, tmp_path):
    with pytest.raises(ExportError, match="already exists"):
        export_dataset(str(demo_output), "qwen", exports["qwen"])
    with pytest.raises(ExportError, match="unknown export format"):
        export_dataset(str(demo_output), "coco", tmp_path / "x")
    res = CliRunner().invoke(app, ["export", str(demo_output), "--format", "qwen", "--out", str(tmp_path / "y"), "--split", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    assert not list(tmp_path.iterdir()), "a failed export left files behind"
    assert not [p for p in exports["qwen"].parent.iterdir() if p.name.startswith(".")]


def test_svg_path_parser_handles_holes():
    # A 10x10 square with a 4x4 hole, as evenodd rings.
    path = "M 0.1 0.1 L 0.9 0.1 L 0.9 0.9 L 0.1 0.9 Z M 0.4 0.4 L 0.6 0.4 L 0.6 0.6 L 0.4 0.6 Z"
    m = svg_path_to_rle(path, 20, 20)
    from pycocotools import mask as mask_utils

    arr = mask_utils.decode(m.to_coco())
    assert arr[10, 10] == 0 and arr[5, 5] == 1 and arr.sum() == 16 * 16 - 4 * 4
    with pytest.raises(ExportError):
        svg_path_to_rle("M 0 0 C 1 1 2 2 3 3 Z", 4, 4)
