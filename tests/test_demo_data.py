"""Tests of the synthetic demo inputs: real formats, exact masks, byte-identical reruns."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from orsgen.pipelines.demo_data import (
    COLOURS,
    DEMO_CATEGORIES,
    demo_sa1b_image,
    demo_scene,
    generate_demo_inputs,
)
from orsgen.schemas.config import load_config

SEED = 0
CAT_BY_ID = {c.id: c for c in DEMO_CATEGORIES}
NOUNS = {c.noun: c.id for c in DEMO_CATEGORIES}

SA1B_IMAGE_KEYS = {"image_id", "width", "height", "file_name"}
SA1B_ANN_KEYS = {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "crop_box", "point_coords"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    config = generate_demo_inputs(root, seed=SEED)
    assert config == root / "demo.yaml"
    return root


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _decode(segm: object, h: int, w: int) -> np.ndarray:
    """Decodes any COCO segmentation with pycocotools alone."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = {"size": segm["size"], "counts": segm["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def _seg_kind(segm: object) -> str:
    if isinstance(segm, list):
        return "polygon"
    return "uncompressed_rle" if isinstance(segm["counts"], list) else "rle"


def _load_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _check_instances(instances: dict, source: str) -> list[str]:
    """Every annotation decodes to exactly the redrawn mask; returns the segmentation kinds."""
    kinds = []
    for im in instances["images"]:
        image, objects = demo_scene(SEED, source, im["id"])
        assert (im["height"], im["width"]) == image.shape[:2]
        anns = sorted((a for a in instances["annotations"] if a["image_id"] == im["id"]), key=lambda a: a["id"])
        regular = [o for o in objects if not o.crowd]
        crowd = [o for o in objects if o.crowd]
        assert len(anns) == len(regular) + (1 if crowd else 0)
        expected = [(o.category_id, o.mask, 0) for o in regular]
        if crowd:
            expected.append((crowd[0].category_id, np.logical_or.reduce([o.mask for o in crowd]), 1))
        for ann, (cat_id, mask, iscrowd) in zip(anns, expected):
            decoded = _decode(ann["segmentation"], im["height"], im["width"])
            assert decoded.any(), f"annotation {ann['id']} is empty"
            assert np.array_equal(decoded, mask), f"annotation {ann['id']} differs from the drawn mask"
            assert (ann["category_id"], ann["iscrowd"]) == (cat_id, iscrowd)
            assert ann["area"] == float(mask.sum())
            kinds.append(_seg_kind(ann["segmentation"]))
    return kinds


# ---------------------------------------------------------------- files and config


def test_every_file_exists(demo: Path) -> None:
    files = set(_files(demo))
    expected = {
        "demo.yaml",
        "sa1b/sa_000000.tar",
        "sa1b/sa_000001.tar",
        "coco/annotations/instances_demo.json",
        "refcoco/refs(unc).p",
        "refcoco/instances.json",
        "grefcoco/grefs(unc).json",
        "grefcoco/instances.json",
    }
    assert expected <= files
    assert len([f for f in files if f.startswith("coco/images/") and f.endswith(".jpg")]) == 8
    assert len([f for f in files if f.startswith("refcoco/images/") and f.endswith(".jpg")]) == 6
    assert not [f for f in files if f.endswith(".tmp")]
    for name in ("coco/annotations/instances_demo.json", "refcoco/instances.json"):
        inst = _load_json(demo / name)
        folder = demo / Path(name).parts[0] / "images"
        for im in inst["images"]:
            with Image.open(folder / im["file_name"]) as pil:
                assert pil.format == "JPEG" and pil.size == (im["width"], im["height"])


def test_config_validates(demo: Path) -> None:
    cfg = load_config(demo / "demo.yaml")
    assert cfg.name == "orsgen-demo"
    assert [(i.name, i.type) for i in cfg.inputs] == [
        ("sa1b", "sa1b"),
        ("coco", "coco"),
        ("refcoco", "refcoco"),
        ("grefcoco", "grefcoco"),
    ]
    sa1b, coco, refcoco, grefcoco = cfg.inputs
    assert all(Path(s).is_file() for s in sa1b.shards) and len(sa1b.shards) == 2
    assert Path(coco.annotations).is_file() and Path(coco.images).is_dir()
    for inp in (refcoco, grefcoco):
        assert Path(inp.refs).is_file() and Path(inp.instances).is_file() and Path(inp.images).is_dir()
    # Small shards so that the demo exercises rollover.
    assert cfg.write.num_buckets == 2 and cfg.write.shard_max_images == 4


def test_rerun_is_byte_identical(demo: Path, tmp_path: Path) -> None:
    generate_demo_inputs(tmp_path, seed=SEED)
    assert _files(tmp_path) == _files(demo)


def test_other_seed_differs_and_bad_arguments_raise(demo: Path, tmp_path: Path) -> None:
    generate_demo_inputs(tmp_path, seed=1, n_sa1b_shards=1, n_coco_images=2, n_ref_images=2)
    assert _files(tmp_path)["coco/images/000000100001.jpg"] != _files(demo)["coco/images/000000100001.jpg"]
    with pytest.raises(ValueError, match="seed"):
        generate_demo_inputs(tmp_path / "bad", seed=-1)
    with pytest.raises(ValueError, match="n_coco_images"):
        generate_demo_inputs(tmp_path / "bad", n_coco_images=0)


# ---------------------------------------------------------------- SA-1B


def _sa1b_samples(demo: Path) -> list[tuple[str, bytes, dict]]:
    out = []
    for shard in sorted((demo / "sa1b").glob("sa_*.tar")):
        with tarfile.open(shard) as tf:
            members = tf.getmembers()
            assert all(m.mtime == 0 and m.isfile() for m in members)
            data = {m.name: tf.extractfile(m).read() for m in members}
        stems = sorted({n.rsplit(".", 1)[0] for n in data})
        assert set(data) == {f"{s}.{e}" for s in stems for e in ("jpg", "json")}
        out += [(s, data[f"{s}.jpg"], json.loads(data[f"{s}.json"])) for s in stems]
    return out


def test_sa1b_json_has_the_published_fields(demo: Path) -> None:
    samples = _sa1b_samples(demo)
    assert len(samples) == 6
    ids = [meta["image"]["image_id"] for _, _, meta in samples]
    assert len(set(ids)) == len(ids), "image ids must be unique across shards"
    for stem, jpg, meta in samples:
        assert set(meta) == {"image", "annotations"}
        assert set(meta["image"]) == SA1B_IMAGE_KEYS
        assert meta["image"]["file_name"] == f"{stem}.jpg" == f"sa_{meta['image']['image_id']}.jpg"
        with Image.open(io.BytesIO(jpg)) as pil:
            assert pil.size == (meta["image"]["width"], meta["image"]["height"])
        for ann in meta["annotations"]:
            assert set(ann) == SA1B_ANN_KEYS
            assert set(ann["segmentation"]) == {"size", "counts"} and isinstance(ann["segmentation"]["counts"], str)
            assert ann["segmentation"]["size"] == [meta["image"]["height"], meta["image"]["width"]]
            assert len(ann["bbox"]) == 4 and len(ann["crop_box"]) == 4
            assert len(ann["point_coords"]) == 1 and len(ann["point_coords"][0]) == 2


def test_sa1b_masks_are_the_drawn_regions(demo: Path) -> None:
    kinds: list[str] = []
    below_score = tiny = near_duplicates = 0
    for _, _, meta in _sa1b_samples(demo):
        h, w = meta["image"]["height"], meta["image"]["width"]
        image, objects, regions = demo_sa1b_image(SEED, meta["image"]["image_id"])
        assert image.shape[:2] == (h, w)
        assert len(meta["annotations"]) == len(regions)
        decoded = []
        for ann, region in zip(meta["annotations"], regions):
            m = _decode(ann["segmentation"], h, w)
            assert m.any() and np.array_equal(m, region.mask)
            assert ann["area"] == int(m.sum())
            assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))]
            x, y = ann["point_coords"][0]
            assert m[int(y), int(x)], "the prompt point lies outside its mask"
            decoded.append(m)
            kinds.append(region.kind)
            below_score += ann["predicted_iou"] < 0.88 or ann["stability_score"] < 0.92
            tiny += ann["area"] < 16
        # Every whole object is one of the regions, and so is the background.
        for o in objects:
            assert any(np.array_equal(o.mask, m) for m in decoded)
        background = ~np.logical_or.reduce([o.mask for o in objects])
        assert any(np.array_equal(background, m) for m in decoded)
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in decoded]
        iou = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)))
        np.fill_diagonal(iou, 0)
        near_duplicates += int((iou > 0.8).sum()) // 2
    assert {"object", "part", "background", "tiny", "low_score", "duplicate"} <= set(kinds)
    assert below_score >= 3 and tiny >= 3 and near_duplicates >= 2


# ---------------------------------------------------------------- COCO


def test_coco_masks_decode_to_the_drawn_masks(demo: Path) -> None:
    inst = _load_json(demo / "coco/annotations/instances_demo.json")
    assert set(inst) == {"info", "licenses", "images", "annotations", "categories"}
    assert {(c["id"], c["name"], c["supercategory"]) for c in inst["categories"]} == {
        (c.id, c.name, c.supercategory) for c in DEMO_CATEGORIES
    }
    kinds = _check_instances(inst, "coco")
    assert {"polygon", "rle", "uncompressed_rle"} <= set(kinds)
    ann_ids = [a["id"] for a in inst["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)


def test_coco_has_crowds_repeats_and_missing_categories(demo: Path) -> None:
    inst = _load_json(demo / "coco/annotations/instances_demo.json")
    by_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    crowds = [a for a in inst["annotations"] if a["iscrowd"] == 1]
    assert crowds
    for c in crowds:
        assert isinstance(c["segmentation"], dict), "crowd annotations are RLE"
        others = [a for a in by_image[c["image_id"]] if a["category_id"] == c["category_id"] and not a["iscrowd"]]
        assert others, "a crowd's category also has separate instances in its image"
    all_cats = {c.id for c in DEMO_CATEGORIES}
    counts = [[a["category_id"] for a in anns if not a["iscrowd"]] for anns in by_image.values()]
    assert any(len(c) != len(set(c)) for c in counts), "some image has several instances of one category"
    assert all(set(c) < all_cats for c in counts), "every image lacks some category"


def test_object_colours_match_the_image(demo: Path) -> None:
    inst = _load_json(demo / "coco/annotations/instances_demo.json")
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], dtype=np.float64)
    for im in inst["images"]:
        pixels = np.asarray(Image.open(demo / "coco/images" / im["file_name"]).convert("RGB"), dtype=np.float64)
        _, objects = demo_scene(SEED, "coco", im["id"])
        masks = [o.mask for o in objects]
        assert all(m.dtype == bool and m.any() for m in masks)
        # Visible masks never overlap.
        assert int(np.sum(masks, axis=0).max()) == 1
        for o in objects:
            core = cv2.erode(o.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if core.sum() < 10:
                continue
            mean = pixels[core].mean(axis=0)
            assert names[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))] == o.colour


# ---------------------------------------------------------------- RefCOCO / gRefCOCO


def test_refcoco_pickle_loads_and_points_at_real_annotations(demo: Path) -> None:
    refs = pickle.loads((demo / "refcoco/refs(unc).p").read_bytes(), encoding="latin1")
    inst = _load_json(demo / "refcoco/instances.json")
    anns = {a["id"]: a for a in inst["annotations"]}
    images = {im["id"] for im in inst["images"]}
    assert refs and isinstance(refs, list)
    keys = {"ref_id", "ann_id", "category_id", "image_id", "split", "sentences", "sent_ids", "file_name"}
    for ref in refs:
        assert set(ref) == keys
        assert ref["ann_id"] in anns, f"ref {ref['ref_id']} points at a missing annotation"
        ann = anns[ref["ann_id"]]
        assert (ann["image_id"], ann["category_id"]) == (ref["image_id"], ref["category_id"])
        assert ref["image_id"] in images
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        noun = CAT_BY_ID[ref["category_id"]].noun
        for s in ref["sentences"]:
            assert set(s) == {"raw", "sent", "sent_id", "tokens"}
            assert s["tokens"] == s["sent"].split() and noun in s["tokens"]
    assert {"train", "val", "testA", "testB"} <= {r["split"] for r in refs}
    sent_ids = [i for r in refs for i in r["sent_ids"]]
    assert len(set(sent_ids)) == len(sent_ids)
    assert _check_instances(inst, "refcoco")


def test_refcoco_sentences_name_the_drawn_colour(demo: Path) -> None:
    refs = pickle.loads((demo / "refcoco/refs(unc).p").read_bytes(), encoding="latin1")
    inst = _load_json(demo / "refcoco/instances.json")
    for ref in refs:
        _, objects = demo_scene(SEED, "refcoco", ref["image_id"])
        order = sorted(a["id"] for a in inst["annotations"] if a["image_id"] == ref["image_id"])
        obj = [o for o in objects if not o.crowd][order.index(ref["ann_id"])]
        words = {w for s in ref["sentences"] for w in s["tokens"]}
        assert not (words & set(COLOURS)) - {obj.colour}, f"{ref['sentences']} names a colour other than {obj.colour}"


def test_grefcoco_has_multi_and_no_target_refs(demo: Path) -> None:
    grefs = _load_json(demo / "grefcoco/grefs(unc).json")
    inst = _load_json(demo / "grefcoco/instances.json")
    assert (demo / "grefcoco/instances.json").read_bytes() == (demo / "refcoco/instances.json").read_bytes()
    anns = {a["id"]: a for a in inst["annotations"]}
    multi = [r for r in grefs if len(r["ann_id"]) > 1]
    no_target = [r for r in grefs if r["no_target"]]
    assert multi and no_target
    for ref in grefs:
        assert isinstance(ref["ann_id"], list) and isinstance(ref["category_id"], list)
        if ref["no_target"]:
            assert ref["ann_id"] == [-1] and ref["category_id"] == [-1]
            continue
        assert all(a in anns and anns[a]["image_id"] == ref["image_id"] for a in ref["ann_id"])
        assert ref["category_id"] == [anns[a]["category_id"] for a in ref["ann_id"]]
    for ref in no_target:
        present = {a["category_id"] for a in inst["annotations"] if a["image_id"] == ref["image_id"]}
        named = {NOUNS[t] for s in ref["sentences"] for t in s["tokens"] if t in NOUNS}
        assert named and not (named & present), f"no-target ref {ref['ref_id']} names a category in its image"
