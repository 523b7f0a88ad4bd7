"""Acceptance of the expressions on the demo: the real pipeline through Beam's direct runner.

One module-scoped build in-process, a rerun into a fresh folder, and a build
with two worker processes. Everything is checked against the *source* files
the demo wrote (COCO / RefCOCO JSON), decoded here with pycocotools directly:

* every sample's target masks equal the source annotations;
* every ``category_multi`` targets exactly the non-crowd instances of its category;
* every ``no_target`` category is absent from its image (crowd included);
* every description and phrase passes the independent oracle, with every
  source annotation as context (also those region selection dropped);
* splits are image-disjoint and the same across reruns and worker counts;
* the preview draws the mask overlay where the mask is.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from orsgen.pipelines.run import run_pipeline
from orsgen.pipelines.demo_data import generate_demo_inputs
from orsgen.schemas.config import load_config
from orsgen.schemas.records import Rle
from orsgen.stages.dataset.preview import (
    split_quotas,
    OVERLAY_ALPHA,
    PALETTE,
    PreviewError,
    iter_examples,
    pick_items,
    render_sheet,
    scaled_image,
    target_masks,
    write_preview,
)

from expression_oracle import DenseInstance, OracleParams, bundled_templates, check_expression

pytestmark = pytest.mark.slow

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
# Written forms of the demo's categories, by hand (not through orsgen's noun code).
FORMS = {
    "sports ball": ("ball", "balls"),
    "kite": ("kite", "kites"),
    "cup": ("cup", "cups"),
    "bowl": ("bowl", "bowls"),
    "apple": ("apple", "apples"),
    "orange": ("orange", "oranges"),
    "book": ("book", "books"),
    "clock": ("clock", "clocks"),
}
ALL_KINDS = {"category_single", "category_multi", "phrase", "description", "human", "no_target"}


def _rows(out: Path) -> list[dict[str, Any]]:
    return [r for p in sorted((out / "parquet").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode_source(segm: Any, h: int, w: int) -> np.ndarray:
    """A source segmentation decoded by pycocotools alone."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = {"size": segm["size"], "counts": segm["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def _source(path: Path) -> dict[str, Any]:
    """image id -> {w, h, anns: {ann id: (category name, iscrowd, mask)}}; plus the vocabulary."""
    doc = json.loads(path.read_text())
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    images = {im["id"]: {"w": im["width"], "h": im["height"], "anns": {}} for im in doc["images"]}
    for a in doc["annotations"]:
        im = images[a["image_id"]]
        im["anns"][a["id"]] = (cats[a["category_id"]], bool(a["iscrowd"]), _decode_source(a["segmentation"], im["h"], im["w"]))
    return {"images": images, "vocab": set(cats.values())}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("expr_demo")
    cfg_path = generate_demo_inputs(base / "inputs", seed=0)
    cfg = load_config(cfg_path)
    outs = {"in": base / "inprocess", "rerun": base / "rerun", "multi": base / "multiproc"}
    manifests = {
        "in": run_pipeline(cfg, str(outs["in"]), ["--runner=FnApiRunner"], show_progress=False),
        "rerun": run_pipeline(cfg, str(outs["rerun"]), ["--runner=FnApiRunner"], show_progress=False),
        "multi": run_pipeline(cfg, str(outs["multi"]), ["--runner=FnApiRunner", *MULTI], show_progress=False),
    }
    sources = {
        "coco": _source(base / "inputs" / "coco" / "annotations" / "instances_demo.json"),
        "refcoco": _source(base / "inputs" / "refcoco" / "instances.json"),
        "grefcoco": _source(base / "inputs" / "grefcoco" / "instances.json"),
    }
    return {"cfg": cfg, "outs": outs, "manifests": manifests, "rows": _rows(outs["in"]), "sources": sources, "base": base}


def _src_image(demo: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    src = demo["sources"].get(row["input_name"])
    if src is None:
        return None
    return src["images"][int(row["image_id"].split(":")[1])]


def test_every_kind_is_produced_and_counted(demo):
    m = demo["manifests"]["in"]
    kinds = defaultdict(int)
    for v in m["splits"].values():
        for k, n in v["samples_by_kind"].items():
            kinds[k] += n
    assert set(kinds) == ALL_KINDS, dict(kinds)
    for level, v in m["counts"]["levels"].items():
        assert v["reconciled"], level
    # What the stage left out, and why, is counted too (two demo images hold a crowd).
    left_out = m["counts"]["expressions"]
    assert left_out["images"] == 8 and left_out["category/crowd"] == 2 and left_out["description/near_tie"] > 0
    written = sum(len(r["samples"]) for r in demo["rows"])
    assert written == m["counts"]["levels"]["samples"]["written"] == sum(kinds.values())


def test_target_masks_equal_the_source_annotations(demo):
    n = 0
    for row in demo["rows"]:
        img = _src_image(demo, row)
        if img is None:
            continue
        ann_of = {i["instance_id"]: i["source_ann_id"] for i in row["instances"]}
        for s in row["samples"]:
            union = mask_utils.decode(Rle.from_coco(s["union_rle"]).to_coco()).astype(bool)
            if s["kind"] == "no_target":
                assert not union.any() and s["targets"] == []
                continue
            assert set(s["target_ids"]) <= set(ann_of), "a target is not among the written instances"
            expected = np.zeros_like(union)
            for t in s["target_ids"]:
                src_mask = img["anns"][ann_of[t]][2]
                inst = next(i for i in row["instances"] if i["instance_id"] == t)
                assert np.array_equal(mask_utils.decode(Rle.from_coco(inst["rle"]).to_coco()).astype(bool), src_mask)
                expected |= src_mask
            assert np.array_equal(union, expected), s["expression"]
            assert [t["instance_id"] for t in s["targets"]] == s["target_ids"]
            for t in s["targets"]:
                (p1x, p1y), (p2x, p2y) = t["point_1"], t["point_2"]
                tm = img["anns"][ann_of[t["instance_id"]]][2]
                assert tm[p1y, p1x] and tm[p2y, p2x], "an interior point is outside its target"
            n += 1
    assert n > 100


def test_category_samples_target_exactly_the_non_crowd_instances(demo):
    n = 0
    for row in demo["rows"]:
        if row["input_name"] != "coco":
            continue
        img = _src_image(demo, row)
        ann_of = {i["instance_id"]: i["source_ann_id"] for i in row["instances"]}
        for s in row["samples"]:
            if s["kind"] not in ("category_single", "category_multi"):
                continue
            cat = json.loads(s["metadata"])["category"]
            non_crowd = {a for a, (c, crowd, _) in img["anns"].items() if c == cat and not crowd}
            has_crowd = any(c == cat and crowd for c, crowd, _ in img["anns"].values())
            assert not has_crowd, f"{cat} has a crowd annotation (crowd_policy skip)"
            assert {ann_of[t] for t in s["target_ids"]} == non_crowd
            assert (s["kind"] == "category_multi") == (len(non_crowd) > 1)
            sing, plur = FORMS[cat]
            assert (plur in s["expression"].split() or s["expression"] == f"every {sing}") if len(non_crowd) > 1 else (
                s["expression"] in (sing, f"the {sing}")
            )
            n += 1
    assert n >= 8


def test_no_target_categories_are_absent(demo):
    n = 0
    for row in demo["rows"]:
        if row["input_name"] != "coco":
            continue
        img = _src_image(demo, row)
        present = {c for c, _, _ in img["anns"].values()}
        for s in row["samples"]:
            if s["kind"] != "no_target":
                continue
            meta = json.loads(s["metadata"])
            assert meta["category"] in demo["sources"]["coco"]["vocab"]
            assert meta["category"] not in present
            sing, plur = FORMS[meta["category"]]
            assert s["expression"] in (sing, f"the {sing}", plur, f"all {plur}")
            n += 1
    assert n >= 8


def test_descriptions_pass_the_independent_oracle(demo):
    e = demo["cfg"].expressions
    params = OracleParams(e.margin_px, e.margin_frac, e.size_margin, e.next_to_max_gap_frac, e.relation_max_axis_overlap)
    raw = bundled_templates()
    n = 0
    for row in demo["rows"]:
        if row["input_name"] != "coco":
            continue
        img = _src_image(demo, row)
        image_id = row["image_id"]
        # Every source annotation is context, including those region selection dropped.
        dense = [DenseInstance(f"{image_id}/ann:{a}", c, crowd, m) for a, (c, crowd, m) in img["anns"].items()]
        for s in row["samples"]:
            if s["kind"] not in ("description", "phrase"):
                continue
            why = check_expression(
                s["expression"], s["kind"], s["template"], s["target_ids"], json.loads(s["metadata"]),
                dense, img["w"], img["h"], params, raw, FORMS,
            )
            assert why is None, f"{row['key']}: {s['expression']!r}: {why}"
            n += 1
    assert n > 50


def test_splits_are_image_disjoint_and_stable_across_reruns_and_workers(demo):
    def assignment(rows):
        split_of: dict[str, set[str]] = defaultdict(set)
        samples = {}
        for r in rows:
            split_of[r["image_id"]].add(r["split"])
            samples[r["key"]] = (r["split"], sorted((s["sample_id"], s["expression"], s["split"]) for s in r["samples"]))
            assert all(s["split"] == r["split"] for s in r["samples"])
        return split_of, samples

    split_of, samples = assignment(demo["rows"])
    assert all(len(v) == 1 for v in split_of.values()), {k: v for k, v in split_of.items() if len(v) > 1}
    for other in ("rerun", "multi"):
        assert assignment(_rows(demo["outs"][other]))[1] == samples, other
    assert _digests(demo["outs"]["in"]) == _digests(demo["outs"]["rerun"]) == _digests(demo["outs"]["multi"])


def test_ood_holdout_on_the_demo(demo, tmp_path):
    """Holding out clocks moves every image with a clock, whole, and clocks are never negatives."""
    cfg = load_config(demo["base"] / "inputs" / "demo.yaml", ["splits.ood=[{name: ood_clock, categories: [clock]}]"])
    m = run_pipeline(cfg, str(tmp_path / "out"), ["--runner=FnApiRunner"], show_progress=False)
    assert "ood_clock" in m["splits"]
    for row in _rows(tmp_path / "out"):
        has_clock = any(i["category_name"] == "clock" for i in row["instances"])
        img = _src_image(demo, row)
        if img is not None:
            has_clock = has_clock or any(c == "clock" for c, _, _ in img["anns"].values())
        assert (row["split"] == "ood_clock") == has_clock, row["key"]
        for s in row["samples"]:
            if s["generator"] == "template" and s["kind"] == "no_target":
                assert json.loads(s["metadata"])["category"] != "clock"


# ---------------------------------------------------------------- preview


def test_preview_draws_the_overlay_where_the_mask_is(demo, tmp_path):
    out = demo["outs"]["in"]
    items = pick_items(iter_examples(str(out)), 12)
    assert {it.sample.kind for it in items} == ALL_KINDS
    sheet, _tiles, layouts = render_sheet(items, cols=4)
    arr = np.asarray(sheet, dtype=np.int32)
    checked = 0
    for item, lay in zip(items, layouts):
        base, scale = scaled_image(item, 300, 225)
        assert scale == pytest.approx(lay.scale)
        ih, iw = base.shape[:2]
        y0, x0 = lay.y0 + lay.image_y0, lay.x0 + lay.image_x0
        drawn = arr[y0 : y0 + ih, x0 : x0 + iw]
        # Keep away from the boxes and points drawn on top: their pixels are not the overlay.
        keep_out = np.zeros((ih, iw), dtype=bool)
        for t in item.sample.targets:
            bx0, by0, bx1, by1 = (int(round(v * scale)) for v in t.bbox_xyxy)
            keep_out[max(by0 - 3, 0) : by0 + 4, max(bx0 - 3, 0) : bx1 + 3] = True
            keep_out[max(by1 - 4, 0) : by1 + 3, max(bx0 - 3, 0) : bx1 + 3] = True
            keep_out[max(by0 - 3, 0) : by1 + 3, max(bx0 - 3, 0) : bx0 + 4] = True
            keep_out[max(by0 - 3, 0) : by1 + 3, max(bx1 - 4, 0) : bx1 + 3] = True
            for px, py in (t.point_1, t.point_2):
                cx, cy = int((px + 0.5) * scale), int((py + 0.5) * scale)
                keep_out[max(cy - 7, 0) : cy + 8, max(cx - 7, 0) : cx + 8] = True
        masks = target_masks(item, (iw, ih))
        assert len(masks) == len(item.sample.target_ids)
        any_mask = np.zeros((ih, iw), dtype=bool)
        for k, m in enumerate(masks):
            any_mask |= m
            inside = m & ~keep_out
            if not inside.any():
                continue
            colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float64)
            expected = np.rint(base[inside] * (1 - OVERLAY_ALPHA) + colour * OVERLAY_ALPHA)
            close = np.abs(drawn[inside] - expected).max(axis=1) <= 1
            assert close.mean() > 0.99, f"{item.sample.expression!r}: overlay missing inside the mask"
            checked += int(inside.sum())
        outside = ~any_mask & ~keep_out
        assert (np.abs(drawn[outside] - base[outside]).max(axis=1) <= 1).mean() > 0.99, "overlay outside the mask"
        if not item.sample.target_ids:
            assert np.array_equal(drawn, base), "a no-target tile must show the image untouched"
    assert checked > 1000


def test_preview_command_writes_png_and_html(demo, tmp_path):
    from typer.testing import CliRunner

    from orsgen.pipelines.cli import app

    png = tmp_path / "sheet.png"
    res = CliRunner().invoke(app, ["preview", str(demo["outs"]["in"]), "--split", "train", "--n", "6", "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "sheet.html").read_text()
    assert page.count("<tr>") == 6 and "data:image/jpeg;base64," in page and "sheet.png" in page
    # An existing file is not replaced without --overwrite; an unknown split is a clear error.
    again = CliRunner().invoke(app, ["preview", str(demo["outs"]["in"]), "--n", "6", "--out", str(png)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(app, ["preview", str(demo["outs"]["in"]), "--split", "nope", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "split 'nope'" in bad.output
    with pytest.raises(PreviewError):
        write_preview(str(tmp_path / "empty"), str(tmp_path / "e.png"))


def test_split_quotas_are_proportional_and_keep_small_splits():
    assert split_quotas({"train": 90, "val": 10}, 10) == {"train": 9, "val": 1}
    q = split_quotas({"train": 1000, "ood_a": 3, "ood_b": 1, "empty": 0}, 12)
    assert q["ood_a"] >= 1 and q["ood_b"] >= 1 and "empty" not in q and sum(q.values()) == 12
    assert q["train"] == 10
    assert split_quotas({"a": 5, "b": 5, "c": 5}, 2) == {"a": 1, "b": 1}  # fewer tiles than splits
    assert split_quotas({"a": 0}, 5) == {}


def test_default_preview_draws_every_split_in_proportion(demo, tmp_path):
    root = str(demo["outs"]["in"])
    m = demo["manifests"]["in"]
    with_samples = {k: v["samples"] for k, v in m["splits"].items() if v["samples"]}
    assert len(with_samples) > 1
    res = write_preview(root, str(tmp_path / "all.png"), n=24)
    assert set(res["splits"]) == set(with_samples), res["splits"]  # not just the held-out ones
    assert res["regions"] is False and sum(res["splits"].values()) == res["samples"] == 24
    biggest = max(with_samples, key=with_samples.get)
    assert res["splits"][biggest] == max(res["splits"].values())
    page = (tmp_path / "all.html").read_text()
    assert all(f"{k}={v}" in page for k, v in res["splits"].items())  # the page says what it drew


def test_preview_reads_webdataset_when_there_is_no_parquet(demo, tmp_path):
    cfg = load_config(demo["base"] / "inputs" / "demo.yaml", ["write.formats=[webdataset]"])
    out = tmp_path / "wds"
    run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    a = pick_items(iter_examples(str(out), "train"), 6)
    b = pick_items(iter_examples(str(demo["outs"]["in"]), "train"), 6)
    assert len(a) == 6 and [(i.key, i.sample) for i in a] == [(i.key, i.sample) for i in b]
