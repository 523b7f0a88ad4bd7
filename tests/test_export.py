"""orsgen export: every format in its consumer's own conventions, checked on examples worked by hand.

Each consumer's convention is pinned by a hand-worked example from its code (the
repository, file and commit are named in the README's *Exports for trainers*):
Seg-Zero's inclusive box and representative points (border not background),
Qwen's round-half-to-even, LENS' split folders and mask sum, RefCOCO-M's card
features, VisionReasoner's empty answers, Moondream's bbox-relative paths.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from orsgen.pipelines.cli import app
from orsgen.schemas.records import Rle
from orsgen.stages.common.masks import encode_mask, interior_points, rle_iou
from orsgen.stages.dataset.export import (
    SEGZERO_SIZE,
    ExportError,
    _format_unit,
    export_dataset,
    iter_export_records,
    lens_solutions,
    moondream_target,
    parse_segzero_solution,
    qwen3vl_box,
    qwen25vl_box,
    refcocom_hub_features,
    scale_box,
    scale_coord,
    segzero_box,
    smart_resize,
    svg_path_to_rle,
)
from orsgen.stages.dataset.read import iter_rows

SPLITS = ("train", "val", "testA")
# name -> extra CLI arguments; every export reads the three splits unless it says otherwise.
EXPORTS = {
    "segzero": ("segzero", []),
    "segzero-v1": ("segzero", ["--variant", "v1"]),
    "visionreasoner": ("visionreasoner", []),
    "visionreasoner-keep": ("visionreasoner", ["--keep-no-target"]),
    "lens": ("lens", []),
    "qwen": ("qwen", []),
    "qwen2.5vl": ("qwen", ["--variant", "qwen2.5vl"]),
    "moondream": ("moondream", []),
    "refcoco-m": ("refcoco-m", ["--split", "val"]),  # RefCOCO-M has one split
    "refcoco-m-extended": ("refcoco-m", ["--variant", "extended"]),
}


@pytest.fixture(scope="module")
def exports(demo_output, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    out = {}
    for name, (fmt, extra) in EXPORTS.items():
        splits = [] if "--split" in extra else sum((["--split", s] for s in SPLITS), [])
        res = CliRunner().invoke(app, ["export", str(demo_output), "--format", fmt, "--out", str(base / name), *extra, *splits])
        assert res.exit_code == 0, res.output
        out[name] = base / name
    return out


@pytest.fixture(scope="module")
def source(demo_output):
    """sample_id -> (row without image, sample), for the exported splits."""
    out = {}
    for split in SPLITS:
        for row in iter_rows(str(demo_output), split, ["key", "image_id", "width", "height", "split", "instances", "samples"]):
            for s in row["samples"]:
                out[s["sample_id"]] = (row, s)
    return out


def _records(path: Path, splits=SPLITS) -> list[dict]:
    return [r for split in splits for r in iter_export_records(path, split)]


def _union_box(s):
    b = np.asarray([t["bbox_xyxy"] for t in s["targets"]])
    return [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]


def _stats(path: Path) -> dict:
    return json.loads((path / "export_stats.json").read_text())


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


def _instance_mask(row, instance_id) -> np.ndarray:
    inst = next(i for i in row["instances"] if i["instance_id"] == instance_id)
    return _decode(inst["rle"])


# ------------------------------------------------------------------ counts


def test_every_sample_is_exported_or_counted(exports, source):
    kinds = Counter(s["kind"] for _, s in source.values())
    n_multi = sum(1 for _, s in source.values() if len(s["targets"]) > 1)
    nt = kinds["no_target"]
    expected_skips = {
        "segzero": {"no_target": nt},
        "segzero-v1": {"no_target": nt, "multi_target": n_multi},
        "visionreasoner": {"no_target": nt},
        "visionreasoner-keep": {},
        "qwen": {},
        "qwen2.5vl": {},
        "lens": {"no_target": nt},
        "moondream": {"no_target": nt},
    }
    assert n_multi > 0 and nt > 0  # the demo exercises both
    for name, skips in expected_skips.items():
        st = _stats(exports[name])["splits"]
        got = Counter()
        for v in st.values():
            got.update(v["skipped"])
        assert dict(got) == {k: v for k, v in skips.items() if v}, name
        assert sum(v["records"] for v in st.values()) + sum(got.values()) == len(source), name


# ------------------------------------------------------------------ Seg-Zero


def test_segzero_box_is_inclusive_and_scaled_half_up():
    # Seg-Zero's data prep: right = np.where(m)[1].max(), the last mask pixel.
    m = np.zeros((6, 8), np.uint8)
    m[0:3, 0:6] = 1  # rows 0..2, cols 0..5
    assert segzero_box(encode_mask(m)) == [0, 0, 5, 2]  # COCO x + w would say [0, 0, 6, 3]
    assert scale_box([0, 0, 5, 2], 8, 6) == [0, 0, 525, 280]  # 5 * 105 = 525, 2 * 140 = 280
    # The README's ball on a 320 x 240 image: COCO box [209, 11, 289, 91] -> inclusive [209, 11, 288, 90].
    assert scale_box([209, 11, 288, 90], 320, 240) == [549, 39, 756, 315]
    # int(v * 840 / W + 0.5): 11 * 3.5 = 38.5 -> 39, 4 * 2.625 = 10.5 -> 11 (round() would say 38 and 10).
    assert scale_coord(11, 240) == 39 and scale_coord(4, 320) == 11
    assert scale_box([10, 10, 20, 20], 1680, 420) == [5, 20, 10, 40]  # x on 840 / W, y on 840 / H


def test_segzero_points_treat_the_border_as_mask():
    # A: a mask on the image's top-left border, 8 x 6 image. Seg-Zero's
    # distance transform runs on the image as is, so row 0 reads 3 3 3 3 2 1 0 0:
    # p1 = the first maximum (0, 0); the far half's deepest pixel is (3, 0).
    m = np.zeros((6, 8), np.uint8)
    m[0:3, 0:6] = 1
    assert interior_points(encode_mask(m), "segzero") == ((0, 0), (3, 0))
    # orsgen's own rule keeps points off the border (the stored point_1 / point_2).
    assert interior_points(encode_mask(m)) == ((1, 1), (3, 1))
    # B: an interior 5 x 5 square on 9 x 7: both rules agree.
    m = np.zeros((7, 9), np.uint8)
    m[1:6, 2:7] = 1
    assert interior_points(encode_mask(m), "segzero") == interior_points(encode_mask(m)) == ((4, 3), (2, 1))
    # C: one pixel: no far pixel, the centroid window gives the pixel itself.
    m = np.zeros((5, 5), np.uint8)
    m[2, 2] = 1
    assert interior_points(encode_mask(m), "segzero") == ((2, 2), (2, 2))
    # D: an L of 3 pixels in the corner: distances sqrt(2), 1, 1 -> p1 (0, 0);
    # to p1: 0, 1, 1 -> median 1, nothing farther -> window around the
    # centroid (int(1/3), int(1/3)) = (0, 0), whose maximum is (0, 0).
    m = np.zeros((5, 5), np.uint8)
    m[0, 0] = m[0, 1] = m[1, 0] = 1
    assert interior_points(encode_mask(m), "segzero") == ((0, 0), (0, 0))
    # E: three isolated pixels (x, y) = (30, 5), (5, 30), (55, 30) on 60 x 60.
    # All have distance 1; p1 is the first in row-major order, (30, 5). The
    # other two are both 35.36 away = the median, so none is farther: the
    # window rows 11..30, cols 20..39 around the centroid (30, 21) holds no
    # mask pixel, its first cell (20, 11) is snapped to the nearest mask
    # pixel: (30, 5) at squared distance 136 (the others 586 and 1586).
    m = np.zeros((60, 60), np.uint8)
    m[5, 30] = m[30, 5] = m[30, 55] = 1
    assert interior_points(encode_mask(m), "segzero") == ((30, 5), (30, 5))
    with pytest.raises(ValueError, match="point rule"):
        interior_points(encode_mask(m), "lisa")


def test_segzero_current_layout_loads_both_ways(exports):
    import datasets

    path = str(exports["segzero"])
    # Seg-Zero main's rl_dataset.py: load_from_disk(path)["train"]; older copies: load_dataset(path)["train"].
    a = datasets.load_from_disk(path)["train"]
    b = datasets.load_dataset(path, cache_dir=str(exports["segzero"].parent / "hf-cache"))["train"]
    assert len(a) == len(b) == _stats(exports["segzero"])["splits"]["train"]["records"] > 0
    assert list(a.features) == ["id", "problem", "solution", "image", "img_height", "img_width"]
    img = a[0]["image"]
    assert img.size == (SEGZERO_SIZE, SEGZERO_SIZE)  # decoded to PIL by datasets.Image()
    assert sorted(json.loads((exports["segzero"] / "dataset_dict.json").read_text())["splits"]) == sorted(SPLITS)


def test_segzero_current_and_visionreasoner_solutions(exports, source):
    def sz(v: float, n: int) -> int:
        return int(v * (SEGZERO_SIZE / n) + 0.5)

    for name in ("segzero", "visionreasoner"):
        recs = _records(exports[name])
        assert recs
        for r in recs:
            row, s = source[r["id"]]
            w, h = row["width"], row["height"]
            want = []
            for t in s["targets"]:
                m = _instance_mask(row, t["instance_id"])
                ys, xs = np.where(m == 1)  # Seg-Zero's box: first and last mask pixel
                p1, _ = interior_points(encode_mask(m), "segzero")
                want.append({"bbox_2d": [sz(xs.min(), w), sz(ys.min(), h), sz(xs.max(), w), sz(ys.max(), h)], "point_2d": [sz(p1[0], w), sz(p1[1], h)]})
            # json.dumps defaults: ", " and ": " separators.
            assert r["solution"] == json.dumps(want), name
            assert r["problem"] == s["expression"] and (r["img_width"], r["img_height"]) == (w, h)
    ball = next(r for r in _records(exports["segzero"], ["val"]) if r["id"] == "grefcoco-coco_500002-grefcoco_unc-r10-s20")
    assert ball["solution"] == '[{"bbox_2d": [549, 39, 756, 315], "point_2d": [651, 175]}]'


def test_segzero_v1_syntax(exports, source):
    seg_box = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")  # Seg-Zero's reward regexes
    seg_pts = re.compile(r"<points>\((\d+),(\d+)\),\((\d+),(\d+)\)</points>")
    recs = _records(exports["segzero-v1"])
    assert recs
    for r in recs:
        row, s = source[r["id"]]
        assert len(s["targets"]) == 1
        assert seg_box.search(r["solution"]) and seg_pts.search(r["solution"])
        box, p1, p2 = parse_segzero_solution(r["solution"])
        m = _instance_mask(row, s["targets"][0]["instance_id"])
        q1, q2 = interior_points(encode_mask(m), "segzero")
        w, h = row["width"], row["height"]
        assert box == scale_box(segzero_box(encode_mask(m)), w, h)
        assert p1 == [scale_coord(q1[0], w), scale_coord(q1[1], h)] and p2 == [scale_coord(q2[0], w), scale_coord(q2[1], h)]
    # v1 keeps orsgen's first layout: Parquet under data/.
    assert sorted(p.name for p in (exports["segzero-v1"] / "data").glob("train-*.parquet"))


# ------------------------------------------------------------------ VisionReasoner


def test_visionreasoner_skips_empty_answers_unless_asked(exports, source):
    # VisionReasoner's reward: np.split on the boxes of "[]" fails, the error is
    # swallowed, accuracy is 0 whatever the answer: "[]" scores 2.0, an invented box 4.0.
    default = _records(exports["visionreasoner"])
    assert all(json.loads(r["solution"]) for r in default)  # no "[]" row
    nt = sum(s["kind"] == "no_target" for _, s in source.values())
    assert sum(sum(v["skipped"].values()) for v in _stats(exports["visionreasoner"])["splits"].values()) == nt
    kept = _records(exports["visionreasoner-keep"])
    empty = [r for r in kept if r["solution"] == "[]"]
    assert len(empty) == nt and len(kept) == len(source)
    assert _stats(exports["visionreasoner-keep"])["keep_no_target"] is True


def test_keep_no_target_warns_and_is_visionreasoner_only(demo_output, tmp_path):
    res = CliRunner().invoke(
        app, ["export", str(demo_output), "--format", "visionreasoner", "--keep-no-target", "--split", "val", "--out", str(tmp_path / "v")],
        terminal_width=400,
    )
    assert res.exit_code == 0 and "scores 2.0" in res.output and "hallucination" in res.output
    bad = CliRunner().invoke(app, ["export", str(demo_output), "--format", "segzero", "--keep-no-target", "--out", str(tmp_path / "s")])
    assert bad.exit_code != 0 and "only applies to --format visionreasoner" in bad.output


# ------------------------------------------------------------------ LENS


def test_lens_one_folder_per_split_and_union_mask(exports, source):
    out = exports["lens"]
    for split in SPLITS:
        # GSTrainDataset globs anno_path/*.jsonl: the train folder must hold train only.
        assert sorted(os.listdir(out / "annotations" / split)) == [f"{split}.jsonl"]
    files = glob.glob(os.path.join(out / "annotations" / "train", "*.jsonl"))
    lines = [json.loads(x) for f in files for x in open(f, encoding="utf-8") if x.strip()]
    assert {source[r["sample_id"]][0]["split"] for r in lines} == {"train"}
    multi = 0
    for r in _records(out):
        row, s = source[r["sample_id"]]
        # image_dir = OUT: os.path.join(image_dir, image_path) is the image.
        assert os.path.isfile(os.path.join(str(out), r["image_path"]))
        assert r["caption"] == s["expression"] and not r["caption"].startswith('"')
        assert r["box"] == pytest.approx(_union_box(s))
        # LENS decodes the list and sums it without "> 0": one union RLE keeps it 0/1.
        summed = np.sum(mask_utils.decode([{"size": x["size"], "counts": x["counts"].encode()} for x in r["segmentation"]]), axis=2)
        assert summed.max() <= 1 and np.array_equal(summed.astype(bool), _decode(s["union_rle"]).astype(bool))
        assert len(r["target_segmentations"]) == len(s["targets"])
        multi += len(s["targets"]) > 1
        w, h = row["width"], row["height"]
        x0, y0, x1, y1 = r["box"]
        assert r["solution_qwen2vl"] == [round(x0 / w * 1000), round(y0 / h * 1000), round(x1 / w * 1000), round(y1 / h * 1000)]
        rh, rw = smart_resize(h, w)
        assert (r["resized_height"], r["resized_width"]) == (rh, rw) and rh % 28 == 0 and rw % 28 == 0
    assert multi > 0


def test_lens_sum_of_overlapping_targets_is_what_union_avoids():
    # The 1 x 3 example: A = {(0,0), (0,1)}, B = {(0,1), (0,2)}. Summing the two
    # RLEs (LENS' list path) gives [1, 2, 1]; the one union RLE gives [1, 1, 1].
    a = np.array([[1, 1, 0]], np.uint8)
    b = np.array([[0, 1, 1]], np.uint8)
    per_target = [encode_mask(a).to_coco(), encode_mask(b).to_coco()]
    assert np.sum(mask_utils.decode(per_target), axis=2).tolist() == [[1, 2, 1]]
    union = encode_mask(a | b).to_coco()
    assert np.sum(mask_utils.decode([union]), axis=2).tolist() == [[1, 1, 1]]


def test_smart_resize_matches_transformers():
    tf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for h in range(20, 2600, 97):
        for w in range(20, 2600, 113):
            if max(h, w) / min(h, w) <= 200:
                assert smart_resize(h, w) == tuple(tf.smart_resize(h, w, 28, 4 * 28 * 28, 1_000_000)), (h, w)
    assert lens_solutions([10, 20, 110, 220], 200, 400)["qwen2vl"] == [50, 50, 550, 550]


# ------------------------------------------------------------------ Qwen


def test_qwen_grid_rounds_half_to_even_and_clamps():
    # Qwen's convert_to_qwen2vl_format: round(x / w * 1000) with Python's round.
    assert qwen3vl_box([1, 5, 3, 16], 16, 16) == [62, 312, 188, 1000]  # 62.5 -> 62, 312.5 -> 312, 187.5 -> 188
    # The notebook's own example: [146, 137, 615, 415] on h = 428, w = 640.
    assert qwen3vl_box([146, 137, 615, 415], 640, 428) == [228, 320, 961, 970]
    assert qwen3vl_box([-3, 0, 700, 428], 640, 428) == [0, 0, 1000, 1000]
    # convert_to_qwen25vl_format: smart_resize(428, 640) = (420, 644), round(x * 644 / 640), clamped to 643.
    box, size = qwen25vl_box([146, 137, 615, 415], 640, 428)
    assert size == (420, 644) and box == [147, 134, 619, 407]
    assert qwen25vl_box([80, 0, 640, 428], 640, 428)[0] == [80, 0, 643, 419]  # 80.5 -> 80; 644 -> 643; 420 -> 419
    with pytest.raises(ExportError, match="aspect ratio"):
        qwen25vl_box([0, 0, 1, 1], 1000, 2)


def test_qwen_exports(exports, source):
    for name in ("qwen", "qwen2.5vl"):
        recs = _records(exports[name])
        assert len(recs) == len(source)
        for r in recs:
            row, s = source[r["id"]]
            assert (exports[name] / r["image"]).is_file()
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n") and s["expression"] in human["value"]
            answer = json.loads(gpt["value"])
            w, h = row["width"], row["height"]
            if name == "qwen":
                want = [qwen3vl_box(t["bbox_xyxy"], w, h) for t in s["targets"]]
            else:
                want = [qwen25vl_box(t["bbox_xyxy"], w, h)[0] for t in s["targets"]]
                assert (r["resized_height"], r["resized_width"]) == qwen25vl_box([0, 0, 0, 0], w, h)[1]
            assert [o["bbox_2d"] for o in answer] == want and all(o["label"] == s["expression"] for o in answer)
    res = CliRunner().invoke(app, ["export", "--help"], terminal_width=200)
    assert "qwen3vl" in res.output and "round()" in res.output and "qwen2.5vl" in res.output


# ------------------------------------------------------------------ RefCOCO-M


def _card_features():
    """moondream/refcoco-m's dataset_info.features, copied field by field from its card."""
    import datasets
    from datasets import List, Value

    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": Value("int64"),
            "file_name": Value("string"),
            "samples": List(
                {
                    "id": Value("int64"),
                    "image_id": Value("int64"),
                    "category": Value("string"),
                    "supercategory": Value("string"),
                    "label": Value("string"),
                    "sentences": List(Value("string")),
                    "bbox": List(Value("float32")),
                    "mask": {"counts": Value("string"), "size": List(Value("int32"))},
                }
            ),
        }
    )


def test_refcocom_hub_equals_the_card(exports, source, tmp_path):
    import datasets
    from PIL import Image

    card = _card_features()
    assert refcocom_hub_features() == card
    out = exports["refcoco-m"]
    assert [p.name for p in sorted((out / "data").iterdir())] == ["validation-00000-of-00001.parquet"]
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["validation"]
    val = ds["validation"]
    assert val.features == card
    # A row shaped as the Hub's: concatenate_datasets and cast work with it.
    buf = io.BytesIO()
    Image.new("RGB", (4, 3)).save(buf, format="PNG")
    hub_row = {
        "image": [{"bytes": buf.getvalue(), "path": None}],
        "image_id": [1],
        "file_name": ["x.jpg"],
        "samples": [[{"id": 1, "image_id": 1, "category": "cat", "supercategory": "animal", "label": "cat", "sentences": ["a cat"],
                      "bbox": [0.0, 0.0, 1.0, 1.0], "mask": {"counts": "0", "size": [3, 4]}}]],
    }
    hub = datasets.Dataset.from_dict(hub_row, features=card)
    both = datasets.concatenate_datasets([hub, val])
    assert len(both) == len(val) + 1
    assert len(val.cast(card)) == len(val)
    # No no-target entries (RefCOCO-M has none); they are counted instead.
    entries = [e for r in val.cast_column("image", datasets.Image(decode=False)) for e in r["samples"]]
    assert entries and all(_decode(e["mask"]).any() for e in entries)
    val_nt = sum(s["kind"] == "no_target" for row, s in source.values() if row["split"] == "val")
    assert _stats(out)["splits"]["val"]["skipped"] == ({"no_target": val_nt} if val_nt else {})
    assert _stats(out)["hub_split"] == {"validation": "val"}
    assert sum(len(e["sentences"]) for e in entries) == sum(1 for row, s in source.values() if row["split"] == "val" and s["target_ids"])


def test_refcocom_extended_links_back(exports, source):
    seen = set()
    for r in _records(exports["refcoco-m-extended"]):
        for e in r["samples"]:
            members = [source[sid][1] for sid in e["sample_ids"]]
            assert e["sentences"] == [m["expression"] for m in members]
            assert {m["kind"] for m in members} == {e["kind"]} and {tuple(m["target_ids"]) for m in members} == {tuple(e["target_ids"])}
            assert Rle.from_coco(e["mask"]).counts == members[0]["union_rle"]["counts"]
            seen.update(e["sample_ids"])
    assert seen == set(source)


def test_refcocom_hub_takes_one_split(demo_output, tmp_path):
    with pytest.raises(ExportError, match="single split"):
        export_dataset(str(demo_output), "refcoco-m", tmp_path / "x", ["train", "val"])
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ Moondream


def test_moondream_numbers_on_the_960_grid():
    # kestrel's scale_svg_path_tokens: u / 960 with 3 decimals, trailing zeros stripped.
    assert [_format_unit(u) for u in (0, 1, 479, 480, 959, 960)] == ["0", "0.001", "0.499", "0.5", "0.999", "1"]
    assert all(round(float(_format_unit(u)) * 960) == u for u in range(961))  # exact round trip


def test_moondream_path_is_relative_to_its_bbox():
    # 640 x 480 image, bbox {0.25, 0.1, 0.75, 0.5}: the unit square fills the box exactly,
    # x_img = (x_min + p * w) * W: p = 0.5 -> 320 px, y -> (0.1 + 0.5 * 0.4) * 480 = 144 px.
    bbox = {"x_min": 0.25, "y_min": 0.1, "x_max": 0.75, "y_max": 0.5}
    m = _decode(svg_path_to_rle("M 0 0 L 1 0 L 1 1 L 0 1 Z", 480, 640, bbox).to_json())
    assert m.sum() == 320 * 192 and m[48, 160] and m[239, 479] and not m[47, 160] and not m[48, 480]
    # A one-pixel square whose corner is the path point (0.5, 0.5): 1 px is 1/320 of the box's
    # width and 1/192 of its height, so it covers exactly the pixel (320, 144).
    a, b = 0.5 + 1 / 320, 0.5 + 1 / 192
    pt = _decode(svg_path_to_rle(f"M 0.5 0.5 L {a} 0.5 L {a} {b} L 0.5 {b} Z", 480, 640, bbox).to_json())
    assert pt.sum() == 1 and pt[144, 320] == 1


def test_moondream_holes_wind_the_other_way():
    # A ring with a hole: with opposite windings the SVG default (nonzero) fill equals evenodd.
    from shapely.geometry import Polygon

    m = np.zeros((40, 40), np.uint8)
    m[5:35, 5:35] = 1
    m[15:25, 15:25] = 0
    path, bbox, iou = moondream_target(encode_mask(m))
    assert iou >= 0.95 and path.count("M") == 2
    rings = [
        [(float(a), float(b)) for a, b in re.findall(r"(-?[\d.]+) (-?[\d.]+)", ring)] for ring in path.split("Z")[:2]
    ]
    areas = [Polygon(r).exterior.is_ccw for r in rings]
    assert areas[0] != areas[1]
    back = _decode(svg_path_to_rle(path, 40, 40, bbox).to_json())
    assert back[20, 20] == 0 and back[10, 10] == 1
    with pytest.raises(ExportError):
        svg_path_to_rle("M 0 0 C 1 1 2 2 3 3 Z", 4, 4)
    with pytest.raises(ExportError, match="empty"):
        moondream_target(encode_mask(np.zeros((4, 4), np.uint8)))


def _librsvg_mask(path: str, bbox: dict, width: int, height: int) -> np.ndarray:
    """Moondream's rasterisation: a 960 viewBox over the bbox, librsvg, alpha > 0."""
    pyvips = pytest.importorskip("pyvips")
    w, h = bbox["x_max"] - bbox["x_min"], bbox["y_max"] - bbox["y_min"]
    d = " ".join(t if t in "MLZ" else str(int(round(float(t) * 960))) for t in path.split())
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 960 960" preserveAspectRatio="none" width="{width}" height="{height}">'
        f'<path d="{d}" fill="white" transform="translate({bbox["x_min"] * 960},{bbox["y_min"] * 960}) scale({w},{h})"/></svg>'
    )
    try:
        im = pyvips.Image.svgload_buffer(svg.encode())
    except pyvips.Error as err:  # a libvips built without librsvg
        pytest.skip(f"libvips cannot load SVG here: {err}")
    a = np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8, shape=[im.height, im.width, im.bands])
    return a[..., 3] > 0


def test_moondream_rows_render_back_under_librsvg(exports, source):
    import cv2

    recs = _records(exports["moondream"])
    assert recs
    worst = 1.0
    for r in recs:
        row, s = source[r["id"]]
        w, h = row["width"], row["height"]
        union = _decode(s["union_rle"]).astype(bool)
        b = r["bbox"]
        assert [b["x_min"] * w, b["y_min"] * h, b["x_max"] * w, b["y_max"] * h] == pytest.approx(_union_box(s))
        assert r["path_iou"] >= 0.95
        got = _librsvg_mask(r["path"], b, w, h)
        iou = (got & union).sum() / (got | union).sum()
        worst = min(worst, iou)
    assert worst >= 0.9
    # Random blobs from 3 to 200 px across, small objects included.
    rng = np.random.default_rng(3)
    for _ in range(40):
        hh, ww = (int(v) for v in rng.integers(20, 160, 2))
        m = np.zeros((hh, ww), np.uint8)
        ax = (int(rng.integers(1, ww // 3 + 2)), int(rng.integers(1, hh // 3 + 2)))
        cv2.ellipse(m, (int(rng.integers(0, ww)), int(rng.integers(0, hh))), ax, float(rng.integers(0, 180)), 0, 360, 1, -1)
        if m.sum() < 9:
            continue
        path, bbox, own = moondream_target(encode_mask(m))
        got = _librsvg_mask(path, bbox, ww, hh)
        iou = (got & m.astype(bool)).sum() / (got | m.astype(bool)).sum()
        assert iou >= 0.9, (iou, int(m.sum()))
        assert abs(own - iou) < 0.05


# ------------------------------------------------------------------ containers and errors


@pytest.mark.parametrize("name", ["segzero-v1", "moondream", "refcoco-m-extended"])
def test_datasets_loads_parquet_exports(exports, name, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset(str(exports[name]), cache_dir=str(tmp_path))
    st = _stats(exports[name])["splits"]
    assert {k: v.num_rows for k, v in ds.items()} == {k: v["records"] for k, v in st.items() if v["records"]}
    assert hasattr(ds["val"][0]["image"], "size")  # decoded as a PIL image


def test_export_is_atomic_and_never_overwrites(demo_output, exports, tmp_path):
    with pytest.raises(ExportError, match="already exists"):
        export_dataset(str(demo_output), "qwen", exports["qwen"])
    with pytest.raises(ExportError, match="unknown export format"):
        export_dataset(str(demo_output), "coco", tmp_path / "x")
    with pytest.raises(ExportError, match="no variant 'v2'"):
        export_dataset(str(demo_output), "segzero", tmp_path / "x", variant="v2")
    with pytest.raises(ExportError, match="has no variant"):
        export_dataset(str(demo_output), "lens", tmp_path / "x", variant="v1")
    with pytest.raises(ExportError, match="keep-no-target"):
        export_dataset(str(demo_output), "lens", tmp_path / "x", keep_no_target=True)
    res = CliRunner().invoke(app, ["export", str(demo_output), "--format", "qwen", "--out", str(tmp_path / "y"), "--split", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    assert not list(tmp_path.iterdir()), "a failed export left files behind"
    assert not [p for p in exports["qwen"].parent.iterdir() if p.name.startswith(".")]


def test_save_to_disk_export_is_deterministic(demo_output, tmp_path):
    def digest(p: Path) -> dict:
        import hashlib

        return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*")) if f.is_file() and f.name != "export_stats.json"}

    a = export_dataset(str(demo_output), "visionreasoner", tmp_path / "a", ["val"])
    b = export_dataset(str(demo_output), "visionreasoner", tmp_path / "b", ["val"])
    assert a["splits"] == b["splits"] and digest(tmp_path / "a") == digest(tmp_path / "b")


def test_svg_path_parser_handles_holes():
    # Image-normalised rings (the dataset's union_svg), evenodd: a 16 x 16 square with a 4 x 4 hole.
    path = "M 0.1 0.1 L 0.9 0.1 L 0.9 0.9 L 0.1 0.9 Z M 0.4 0.4 L 0.6 0.4 L 0.6 0.6 L 0.4 0.6 Z"
    arr = _decode(svg_path_to_rle(path, 20, 20).to_json())
    assert arr[10, 10] == 0 and arr[5, 5] == 1 and arr.sum() == 16 * 16 - 4 * 4
