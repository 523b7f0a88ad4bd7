"""Tests of stages.ingest.coco on tiny generated COCO / RefCOCO / gRefCOCO inputs."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from orsgen.schemas.config import CocoInput, GrefcocoInput, ImageConfig, RefcocoInput
from orsgen.schemas.records import Category, ImageExample, Ref, RefSentence, Reject, RejectLevel
from orsgen.stages.ingest import coco as ic
from orsgen.stages.ingest.coco import CocoImageTask, load_task, plan_input, read_input, unsafe_file_name_problem

W, H = 20, 16
IMAGE_CFG = ImageConfig()


# ---------------------------------------------------------------- helpers


def image_bytes(w: int = W, h: int = H, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def dense(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def uncompressed(m: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: column-major run lengths starting with zeros."""
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(r) for r in runs]}


def compressed(m: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def decode(inst: Any) -> np.ndarray:
    return mask_utils.decode(inst.rle.to_coco())


POLY = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]
M11 = dense(10, 14, 3, 8)
M12 = dense(1, 5, 12, 19)
M13 = dense(9, 16, 10, 20)
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "dog", "supercategory": "animal"},
    {"id": 3, "name": "cat"},  # no supercategory: defaults to ""
]


def ann(aid: int, image_id: int, segm: Any, cat: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": segm,
        "area": 1.0,
        "bbox": [0, 0, 1, 1],
        "iscrowd": 0,
        **extra,
    }


def write_coco(tmp_path: Path) -> CocoInput:
    imgs = tmp_path / "images"
    (imgs / "a").mkdir(parents=True)
    (imgs / "a" / "img1.jpg").write_bytes(image_bytes())
    (imgs / "img2.png").write_bytes(image_bytes(fmt="PNG"))
    good = image_bytes()
    (imgs / "img4.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (tmp_path / "secret.jpg").write_bytes(image_bytes())  # what ../ would reach
    (imgs / "img9.jpg").write_bytes(image_bytes(w=W + 1))
    doc = {
        "info": {},
        "images": [
            {"id": 1, "file_name": "a/img1.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "img2.png", "width": W, "height": H},
            {"id": 3, "file_name": "img3.jpg", "width": W, "height": H},
            {"id": 4, "file_name": "img4.jpg", "width": W, "height": H},
            {"id": 5, "file_name": "../secret.jpg", "width": W, "height": H},
            {"id": 6, "file_name": "img6.jpg", "height": H},
            {"id": 7, "file_name": "/etc/passwd", "width": W, "height": H},
            {"id": 8, "file_name": "a\\img1.jpg", "width": W, "height": H},
            {"id": 9, "file_name": "img9.jpg", "width": W, "height": H},
            {"file_name": "noid.jpg", "width": W, "height": H},
        ],
        "annotations": [
            ann(13, 1, uncompressed(M13), cat=2, iscrowd=1),
            ann(10, 1, POLY),
            ann(11, 1, uncompressed(M11), cat=2),
            ann(12, 1, compressed(M12), cat=3),
            {"id": 20, "image_id": 1, "category_id": 1, "iscrowd": 0},
            ann(21, 1, compressed(np.ones((8, 8), dtype=np.uint8))),
            ann(22, 1, uncompressed(np.zeros((H, W), dtype=np.uint8))),
            ann(23, 1, POLY, cat=999),
            ann(24, 777, POLY),
            ann(25, 1, [[1, 2, 3]]),
            {"image_id": 1, "segmentation": POLY},
            ann(30, 3, POLY),  # on a missing image: counted as image_rejected
            ann(60, 6, POLY),  # on a bad_json image: counted as image_rejected
        ],
        "categories": CATEGORIES,
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    return CocoInput(name="cocoin", annotations=str(tmp_path / "instances.json"), images=str(imgs))


def split_items(items: list[Any]) -> tuple[list[ImageExample], list[Reject], list[Category]]:
    ex = [i for i in items if isinstance(i, ImageExample)]
    rej = [i for i in items if isinstance(i, Reject)]
    cats = [i for i in items if isinstance(i, Category)]
    assert len(ex) + len(rej) + len(cats) == len(items)
    return ex, rej, cats


def by_key(rejects: list[Reject]) -> dict[str, Reject]:
    out = {r.source_key: r for r in rejects}
    assert len(out) == len(rejects), "reject source keys must be unique"
    return out


# ---------------------------------------------------------------- COCO


def test_coco_reads_all_segmentation_encodings(tmp_path: Path) -> None:
    cfg = write_coco(tmp_path)
    examples, _, cats = split_items(list(read_input(cfg, IMAGE_CFG)))
    assert cats == [Category(1, "person", "person"), Category(2, "dog", "animal"), Category(3, "cat", "")]
    assert [e.image.image_id for e in examples] == ["coco:1", "coco:2"]
    ex = examples[0]
    assert ex.key == "cocoin-coco_1" and ex.input_name == "cocoin"
    assert ex.image.source == "coco" and ex.image.file_name == "a/img1.jpg"
    assert ex.image.uri == str(tmp_path / "images" / "a" / "img1.jpg")
    assert ex.image_bytes == (tmp_path / "images" / "a" / "img1.jpg").read_bytes()
    assert (ex.image.width, ex.image.height) == (W, H) and len(ex.image.sha256) == 64
    assert [i.source_ann_id for i in ex.instances] == [10, 11, 12, 13]
    assert [i.instance_id for i in ex.instances] == [f"coco:1/ann:{a}" for a in (10, 11, 12, 13)]
    assert [i.mask_origin for i in ex.instances] == ["polygon", "uncompressed_rle", "rle", "uncompressed_rle"]
    assert [i.iscrowd for i in ex.instances] == [False, False, False, True]
    assert [(i.category_id, i.category_name, i.supercategory) for i in ex.instances] == [
        (1, "person", "person"),
        (2, "dog", "animal"),
        (3, "cat", ""),
        (2, "dog", "animal"),
    ]
    poly_ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLY, H, W)))
    for inst, ref in zip(ex.instances, [poly_ref, M11, M12, M13], strict=True):
        got = decode(inst)
        np.testing.assert_array_equal(got, ref)
        assert inst.area_px == int(ref.sum()) > 0
        ys, xs = np.nonzero(ref)
        assert inst.bbox_xywh == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert inst.bbox_xyxy == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert inst.rle.size == (H, W) and inst.image_id == "coco:1"
    # An image with zero annotations is still an image.
    assert examples[1].image.image_id == "coco:2" and examples[1].instances == ()


def test_coco_bad_inputs_become_rejects(tmp_path: Path) -> None:
    cfg = write_coco(tmp_path)
    _, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    url = cfg.annotations
    imgs = cfg.images
    got = {k: (r.reason, r.level, r.image_id) for k, r in by_key(rejects).items()}
    assert got == {
        # instance level
        f"{url}#ann:20": ("bad_annotation", RejectLevel.INSTANCE, "coco:1"),
        f"{url}#ann:21": ("rle_size_mismatch", RejectLevel.INSTANCE, "coco:1"),
        f"{url}#ann:22": ("empty_mask", RejectLevel.INSTANCE, "coco:1"),
        f"{url}#ann:23": ("unknown_category", RejectLevel.INSTANCE, "coco:1"),
        f"{url}#ann:24": ("orphan_annotation", RejectLevel.INSTANCE, "coco:777"),
        f"{url}#ann:25": ("bad_polygon", RejectLevel.INSTANCE, "coco:1"),
        f"{url}#ann_index:10": ("bad_annotation", RejectLevel.INSTANCE, "coco:1"),
        # annotations of rejected images are inputs too
        f"{url}#ann:30": ("image_rejected", RejectLevel.INSTANCE, "coco:3"),
        f"{url}#ann:60": ("image_rejected", RejectLevel.INSTANCE, "coco:6"),
        # image level
        f"{imgs}/img3.jpg": ("missing_image", RejectLevel.IMAGE, "coco:3"),
        f"{imgs}/img4.jpg": ("corrupt_image", RejectLevel.IMAGE, "coco:4"),
        f"{url}#image:5": ("unsafe_path", RejectLevel.IMAGE, "coco:5"),
        f"{url}#image:6": ("bad_json", RejectLevel.IMAGE, "coco:6"),
        f"{url}#image:7": ("unsafe_path", RejectLevel.IMAGE, "coco:7"),
        f"{url}#image:8": ("unsafe_path", RejectLevel.IMAGE, "coco:8"),
        f"{imgs}/img9.jpg": ("image_size_mismatch", RejectLevel.IMAGE, "coco:9"),
        f"{url}#image_index:9": ("bad_json", RejectLevel.IMAGE, ""),
    }
    assert all(r.stage == "ingest_coco" and r.message for r in rejects)


def test_rejected_annotations_stay_present_on_their_image(tmp_path: Path) -> None:
    """A rejected annotation with a known category is kept as presence (not as an instance)."""
    cfg = write_coco(tmp_path)
    examples, _, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    ex = next(e for e in examples if e.image.image_id == "coco:1")
    got = sorted((p.category_name, p.source_key.rsplit("#", 1)[1]) for p in ex.presence)
    # 21 (rle_size_mismatch), 22 (empty_mask) and 25 (bad_polygon) have known categories;
    # 20 has no segmentation but a category, 23 an unknown category (no presence).
    assert got == [("person", "ann:20"), ("person", "ann:21"), ("person", "ann:22"), ("person", "ann:25")]
    assert not any(i.source_ann_id in (20, 21, 22, 25) for i in ex.instances)


@pytest.mark.parametrize(
    ("segm", "reason"),
    [
        ([[0, 0, 1e9, 0, 1e9, 1e9]], "bad_polygon"),  # crashes pycocotools (segfault) if it gets there
        ([[0, 0, 10**30, 0, 5, 5]], "int_out_of_range"),  # caught at planning, before any stage
        ([[float("nan")] * 6], "bad_polygon"),
        ([[0, 0, float("inf"), 0, 5, 5]], "bad_polygon"),
    ],
)
def test_far_or_non_finite_polygons_are_refused_before_pycocotools(tmp_path: Path, segm: Any, reason: str) -> None:
    (tmp_path / "img.jpg").write_bytes(image_bytes())
    ok = [[-1, -1, W + 1, -1, W + 1, H + 1, -1, H + 1]]  # slight overshoot, as in real COCO
    doc = {
        "images": [{"id": 1, "file_name": "img.jpg", "width": W, "height": H}],
        "annotations": [ann(1, 1, segm), ann(2, 1, ok)],
        "categories": CATEGORIES,
    }
    (tmp_path / "i.json").write_text(json.dumps(doc))
    cfg = CocoInput(name="c", annotations=str(tmp_path / "i.json"), images=str(tmp_path))
    examples, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    assert [(r.reason, r.source_key) for r in rejects] == [(reason, f"{cfg.annotations}#ann:1")]
    assert [(i.source_ann_id, i.area_px) for i in examples[0].instances] == [(2, W * H)]


def test_plan_is_deterministic_and_tasks_are_light(tmp_path: Path) -> None:
    cfg = write_coco(tmp_path)
    cats, items = plan_input(cfg)
    assert plan_input(cfg) == (cats, items)
    tasks = [t for t in items if isinstance(t, CocoImageTask)]
    assert [t.coco_image_id for t in tasks] == [1, 2, 3, 4, 9]
    t1 = tasks[0]
    assert hash(t1) == hash(pickle.loads(pickle.dumps(t1)))
    assert pickle.loads(pickle.dumps(t1)) == t1
    assert [a["id"] for a in json.loads(t1.annotations_json)] == [10, 11, 12, 13, 20, 21, 22, 23, 25]
    assert json.loads(t1.categories_json) == {
        "1": {"name": "person", "supercategory": "person"},
        "2": {"name": "dog", "supercategory": "animal"},
        "3": {"name": "cat", "supercategory": ""},
    }
    assert t1.source == "coco" and t1.refs == () and t1.annotations_url == cfg.annotations


def test_max_images_keeps_the_first_ids(tmp_path: Path) -> None:
    cfg = write_coco(tmp_path).model_copy(update={"max_images": 2})
    _, items = plan_input(cfg)
    assert [t.coco_image_id for t in items if isinstance(t, CocoImageTask)] == [1, 2]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", json.dumps({"images": [], "annotations": []}).encode(), b"\xff\xfe\x00", b"[" * 100_000],
)
def test_unreadable_annotations_is_one_shard_reject(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "instances.json").write_bytes(content)
    cfg = CocoInput(name="c", annotations=str(tmp_path / "instances.json"), images=str(tmp_path))
    items = list(read_input(cfg, IMAGE_CFG))
    assert len(items) == 1
    (rej,) = items
    assert isinstance(rej, Reject)
    assert (rej.reason, rej.level, rej.source_key) == ("unreadable_annotations", RejectLevel.SHARD, cfg.annotations)


def test_missing_annotations_file_raises(tmp_path: Path) -> None:
    cfg = CocoInput(name="c", annotations=str(tmp_path / "nope.json"), images=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        plan_input(cfg)


def test_bad_categories_and_duplicates(tmp_path: Path) -> None:
    (tmp_path / "img.jpg").write_bytes(image_bytes())
    doc = {
        "images": [
            {"id": 1, "file_name": "img.jpg", "width": W, "height": H},
            {"id": 1, "file_name": "x.jpg", "width": W, "height": H},
        ],
        "annotations": [ann(1, 1, POLY, cat=5), ann(1, 1, POLY), ann(2, 1, POLY, cat=1), ann(3, 1, POLY, cat=6)],
        "categories": [
            {"id": 1, "name": "a"},
            {"id": 1, "name": "b"},
            {"name": "noid"},
            {"id": 5, "name": 7},
            {"id": 6, "name": " \t\u00a0"},  # blank: no words for an expression
            {"id": 7, "name": ""},
            {"id": 8, "name": "_"},  # no letter or digit: "all _S"
            {"id": 9, "name": "\u200b()"},
            {"id": 10, "name": "t-shirt (2)"},  # kept
        ],
    }
    (tmp_path / "i.json").write_text(json.dumps(doc))
    cfg = CocoInput(name="c", annotations=str(tmp_path / "i.json"), images=str(tmp_path))
    examples, rejects, cats = split_items(list(read_input(cfg, IMAGE_CFG)))
    url = cfg.annotations
    assert cats == [Category(1, "a", ""), Category(10, "t-shirt (2)", "")]
    assert {k: r.reason for k, r in by_key(rejects).items()} == {
        f"{url}#category:1": "bad_category",
        f"{url}#category_index:2": "bad_category",
        f"{url}#category:5": "bad_category",
        f"{url}#image_index:1": "duplicate_image",
        f"{url}#ann_index:1": "duplicate_annotation",
        f"{url}#ann:1": "unknown_category",
        f"{url}#category:6": "bad_category",
        f"{url}#category:7": "bad_category",
        f"{url}#category:8": "bad_category",
        f"{url}#category:9": "bad_category",
        f"{url}#ann:3": "unknown_category",
    }
    assert "no letter or digit" in by_key(rejects)[f"{url}#category:6"].message
    assert [i.source_ann_id for i in examples[0].instances] == [2]


def test_fsspec_urls_work(tmp_path: Path) -> None:
    root = f"memory://orsgen-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    with fsspec.open(f"{root}/imgs/x.jpg", "wb") as f:
        f.write(image_bytes())
    doc = {
        "images": [{"id": 7, "file_name": "x.jpg", "width": W, "height": H}],
        "annotations": [ann(1, 7, POLY)],
        "categories": CATEGORIES,
    }
    with fsspec.open(f"{root}/instances.json", "w") as f:
        f.write(json.dumps(doc))
    try:
        cfg = CocoInput(name="mem", annotations=f"{root}/instances.json", images=f"{root}/imgs/")
        examples, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
        assert rejects == []
        assert examples[0].image.uri == f"{root}/imgs/x.jpg"
        assert examples[0].key == "mem-coco_7" and len(examples[0].instances) == 1
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)


def test_oversized_image_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    cfg = write_coco(tmp_path)
    _, items = plan_input(cfg)
    task = next(t for t in items if isinstance(t, CocoImageTask) and t.coco_image_id == 1)
    rej, *with_image = load_task(task, ImageConfig(max_bytes=100))
    assert isinstance(rej, Reject) and rej.reason == "image_too_large" and rej.level == RejectLevel.IMAGE
    # Every annotation of the image is counted with it.
    assert len(with_image) == len(json.loads(task.annotations_json)) > 0
    assert all(r.reason == "image_rejected" and r.level == RejectLevel.INSTANCE for r in with_image)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("COCO_train2014_000000000009.jpg", True),
        ("train2014/x.jpg", True),
        ("caf\u00e9 1.jpg", True),
        ("../x.jpg", False),
        ("a/../../x.jpg", False),
        ("a/./x.jpg", False),
        ("a//x.jpg", False),
        ("/abs.jpg", False),
        ("a\\b.jpg", False),
        ("gs://bucket/x.jpg", False),
        ("x::http://evil/x.jpg", False),
        ("..%2fx.jpg", False),
        ("x.jpg?y=1", False),
        ("x.jpg#frag", False),
        ("x\n.jpg", False),
        ("", False),
        (None, False),
        (5, False),
    ],
)
def test_unsafe_file_names(name: Any, safe: bool) -> None:
    assert (unsafe_file_name_problem(name) is None) is safe


# ---------------------------------------------------------------- RefCOCO


def sentence(sid: int, text: str) -> dict[str, Any]:
    return {"raw": text.capitalize() + ".", "sent": text, "sent_id": sid, "tokens": text.split()}


def write_refcoco_instances(tmp_path: Path, anns: list[dict[str, Any]] | None = None) -> Path:
    imgs = tmp_path / "train2014"
    imgs.mkdir(exist_ok=True)
    for i in (1, 2, 3):
        (imgs / f"COCO_train2014_{i:012d}.jpg").write_bytes(image_bytes())
    doc = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": W, "height": H} for i in (1, 2, 3)],
        "annotations": anns
        if anns is not None
        else [ann(10, 1, POLY), ann(11, 1, compressed(M12), cat=2), ann(20, 2, uncompressed(M11)), ann(30, 3, POLY)],
        "categories": CATEGORIES,
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    return tmp_path / "instances.json"


REFS = [
    {
        "ref_id": 0,
        "ann_id": 10,
        "category_id": 1,
        "image_id": 1,
        "split": "train",
        "sentences": [sentence(0, "man left"), sentence(1, "guy")],
        "sent_ids": [0, 1],
        "file_name": "COCO_train2014_000000000001_10.jpg",
    },
    {
        "ref_id": 1,
        "ann_id": 11,
        "category_id": 2,
        "image_id": 1,
        "split": "testA",
        "sentences": [sentence(2, "dog")],
        "sent_ids": [2],
        "file_name": "x",
    },
    {
        "ref_id": 2,
        "ann_id": 20,
        "category_id": 1,
        "image_id": 2,
        "split": "val",
        "sentences": [sentence(3, "woman")],
        "sent_ids": [3],
        "file_name": "x",
    },
    {
        "ref_id": 3,
        "ann_id": 999,
        "category_id": 1,
        "image_id": 2,
        "split": "train",
        "sentences": [sentence(4, "ghost")],
        "sent_ids": [4],
        "file_name": "x",
    },
    {
        "ref_id": 4,
        "ann_id": 20,
        "category_id": 1,
        "image_id": 1,
        "split": "train",
        "sentences": [sentence(5, "elsewhere")],
        "sent_ids": [5],
        "file_name": "x",
    },
    {
        "ref_id": 5,
        "ann_id": 10,
        "category_id": 1,
        "image_id": 1,
        "split": "train",
        "sentences": [],
        "sent_ids": [],
        "file_name": "x",
    },
    {
        "ref_id": 6,
        "ann_id": 10,
        "category_id": 1,
        "image_id": 555,
        "split": "train",
        "sentences": [sentence(6, "lost")],
        "sent_ids": [6],
        "file_name": "x",
    },
    {
        "ref_id": 7,
        "ann_id": [10, 11],
        "category_id": 1,
        "image_id": 1,
        "split": "train",
        "sentences": [sentence(7, "both")],
        "sent_ids": [7],
        "file_name": "x",
    },
]


def write_refs(tmp_path: Path, refs: list[Any], fmt: str, name: str = "refs(unc)") -> Path:
    if fmt == "p":
        path = tmp_path / f"{name}.p"
        path.write_bytes(pickle.dumps(refs, protocol=2))
    else:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(refs))
    return path


def refcoco_cfg(tmp_path: Path, refs_path: Path, **kw: Any) -> RefcocoInput:
    return RefcocoInput(
        name="rc",
        refs=str(refs_path),
        instances=str(tmp_path / "instances.json"),
        images=str(tmp_path / "train2014"),
        **kw,
    )


@pytest.mark.parametrize("fmt", ["p", "json"])
def test_refcoco_reads_refs(tmp_path: Path, fmt: str) -> None:
    write_refcoco_instances(tmp_path)
    refs_path = write_refs(tmp_path, REFS, fmt)
    cfg = refcoco_cfg(tmp_path, refs_path)
    examples, rejects, cats = split_items(list(read_input(cfg, IMAGE_CFG)))
    assert len(cats) == 3
    # Image 3 has no refs, so it is not read.
    assert [e.image.image_id for e in examples] == ["coco:1", "coco:2"]
    ex1 = examples[0]
    assert ex1.image.source == "refcoco" and ex1.key == "rc-coco_1"
    # The task carries every annotation of the image, referred or not.
    assert [i.source_ann_id for i in ex1.instances] == [10, 11]
    assert ex1.refs == (
        Ref(
            ref_id=0,
            image_id="coco:1",
            ann_ids=(10,),
            category_ids=(1,),
            split="train",
            sentences=(RefSentence(0, "Man left.", "man left"), RefSentence(1, "Guy.", "guy")),
            dataset="refcoco_unc",
        ),
        Ref(1, "coco:1", (11,), (2,), "testA", (RefSentence(2, "Dog.", "dog"),), "refcoco_unc"),
    )
    assert [r.ref_id for r in examples[1].refs] == [2]
    url = str(refs_path)
    got = {k: (r.reason, r.level, r.image_id) for k, r in by_key(rejects).items()}
    assert got == {
        f"{url}#ref:3": ("missing_annotation", RejectLevel.REF, "coco:2"),
        f"{url}#ref:4": ("missing_annotation", RejectLevel.REF, "coco:1"),
        f"{url}#ref:5": ("bad_ref", RejectLevel.REF, "coco:1"),
        f"{url}#ref:6": ("orphan_ref", RejectLevel.REF, "coco:555"),
        f"{url}#ref:7": ("bad_ref", RejectLevel.REF, "coco:1"),
    }


def test_refcoco_split_filtering(tmp_path: Path) -> None:
    write_refcoco_instances(tmp_path)
    cfg = refcoco_cfg(tmp_path, write_refs(tmp_path, REFS, "p"), splits=["testA"])
    examples, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    assert [(e.image.image_id, [r.ref_id for r in e.refs]) for e in examples] == [("coco:1", [1])]
    assert rejects == []
    cfg = refcoco_cfg(tmp_path, write_refs(tmp_path, REFS, "p"), splits=["train", "testA"])
    examples, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    # Image 2's only train ref targets a missing annotation, so image 2 is not read.
    assert [(e.image.image_id, [r.ref_id for r in e.refs]) for e in examples] == [("coco:1", [0, 1])]
    assert sorted(r.source_key.rsplit(":", 1)[1] for r in rejects) == ["3", "4", "5", "6", "7"]


def test_refcoco_ref_on_rejected_annotation_is_rejected(tmp_path: Path) -> None:
    write_refcoco_instances(tmp_path, anns=[ann(10, 1, POLY), ann(11, 1, [])])
    refs_path = write_refs(tmp_path, REFS[:2], "json")
    cfg = refcoco_cfg(tmp_path, refs_path)
    examples, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    assert [r.ref_id for r in examples[0].refs] == [0]
    assert {k: (r.reason, r.level) for k, r in by_key(rejects).items()} == {
        f"{tmp_path / 'instances.json'}#ann:11": ("empty_mask", RejectLevel.INSTANCE),
        f"{refs_path}#ref:1": ("target_rejected", RejectLevel.REF),
    }


def test_refcoco_py2_style_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reuse the Python 2 pickle writer of test_safe_pickle without relying on sys.path.
    spec = importlib.util.spec_from_file_location("_py2_writer", Path(__file__).with_name("test_safe_pickle.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_py2_writer", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    py2_dumps = module.py2_dumps

    write_refcoco_instances(tmp_path)
    refs = [
        dict(REFS[0], sentences=[{"raw": "Caf\u00e9 man", "sent": "cafe man", "sent_id": 0, "tokens": ["cafe", "man"]}])
    ]
    path = tmp_path / "refs(umd).p"
    path.write_bytes(py2_dumps(refs))
    examples, rejects, _ = split_items(list(read_input(refcoco_cfg(tmp_path, path), IMAGE_CFG)))
    assert rejects == []
    assert examples[0].refs[0].sentences == (RefSentence(0, "Caf\u00e9 man", "cafe man"),)


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.path}",))


def test_refcoco_unsafe_pickle_is_a_shard_reject(tmp_path: Path) -> None:
    write_refcoco_instances(tmp_path)
    pwned = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([REFS[0], {"x": _Evil(pwned)}], protocol=2))
    cats, items = plan_input(refcoco_cfg(tmp_path, path))
    assert len(cats) == 3
    (rej,) = items
    assert isinstance(rej, Reject)
    assert (rej.reason, rej.level, rej.source_key) == ("unsafe_pickle", RejectLevel.SHARD, str(path))
    assert "system" in rej.message
    assert not pwned.exists()


def test_refcoco_deeply_nested_pickle_does_not_crash(tmp_path: Path) -> None:
    write_refcoco_instances(tmp_path)
    depth = 100_000
    nested = b"]" * depth + b"a" * (depth - 1)  # [[[...]]] built by opcodes alone
    path = tmp_path / "refs.p"
    path.write_bytes(b"\x80\x02]" + nested + b"a.")  # a list holding one deep list
    _, items = plan_input(refcoco_cfg(tmp_path, path))
    (rej,) = items
    # The bounded unpickler refuses the nesting itself (max_depth), before any ref is looked at.
    assert isinstance(rej, Reject) and (rej.reason, rej.level) == ("unreadable_refs", RejectLevel.SHARD)
    assert "nests deeper" in rej.message


@pytest.mark.parametrize(
    ("name", "content"), [("refs.p", b"garbage"), ("refs.json", b"{oops"), ("refs.json", b'{"a": 1}')]
)
def test_refcoco_unreadable_refs(tmp_path: Path, name: str, content: bytes) -> None:
    write_refcoco_instances(tmp_path)
    (tmp_path / name).write_bytes(content)
    _, items = plan_input(refcoco_cfg(tmp_path, tmp_path / name))
    (rej,) = items
    assert isinstance(rej, Reject) and (rej.reason, rej.level) == ("unreadable_refs", RejectLevel.SHARD)


def test_refcoco_image_problems_stand_for_their_refs(tmp_path: Path) -> None:
    write_refcoco_instances(tmp_path)
    (tmp_path / "train2014" / "COCO_train2014_000000000001.jpg").unlink()
    cfg = refcoco_cfg(tmp_path, write_refs(tmp_path, REFS[:3], "json"))
    examples, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    assert [e.image.image_id for e in examples] == ["coco:2"]
    got = [(r.reason, r.level, r.image_id) for r in rejects]
    assert got[0] == ("missing_image", RejectLevel.IMAGE, "coco:1")
    # The image's annotations are instance inputs: each is counted with it.
    assert got[1:] and set(got[1:]) == {("image_rejected", RejectLevel.INSTANCE, "coco:1")}


def test_refcoco_image_rejected_at_planning_counts_its_annotations(tmp_path: Path) -> None:
    inst_path = write_refcoco_instances(tmp_path)
    doc = json.loads(inst_path.read_text())
    doc["images"][0]["file_name"] = "../escape.jpg"  # image 1: unsafe_path, refused while planning
    inst_path.write_text(json.dumps(doc))
    cfg = refcoco_cfg(tmp_path, write_refs(tmp_path, REFS[:3], "json"))
    _, items = plan_input(cfg)
    rejects = [i for i in items if isinstance(i, Reject) and i.image_id == "coco:1"]
    assert rejects[0].reason == "unsafe_path" and rejects[0].level == RejectLevel.IMAGE
    assert sorted(r.source_key.rsplit("#", 1)[1] for r in rejects[1:]) == ["ann:10", "ann:11"]
    assert all(r.reason == "image_rejected" and r.level == RejectLevel.INSTANCE for r in rejects[1:])


# ---------------------------------------------------------------- gRefCOCO


GREFS = [
    {
        "ref_id": 0,
        "ann_id": [10, 11],
        "category_id": [1, 2],
        "image_id": 1,
        "split": "train",
        "no_target": False,
        "sentences": [sentence(0, "man and dog")],
        "sent_ids": [0],
        "file_name": "x",
    },
    {
        "ref_id": 1,
        "ann_id": [-1],
        "category_id": [-1],
        "image_id": 1,
        "split": "train",
        "no_target": True,
        "sentences": [sentence(1, "the giraffe")],
        "sent_ids": [1],
        "file_name": "x",
    },
    {
        "ref_id": 2,
        "ann_id": [],
        "category_id": -1,
        "image_id": 2,
        "split": "val",
        "sentences": [sentence(2, "a cat")],
        "sent_ids": [2],
        "file_name": "x",
    },
    {
        "ref_id": 3,
        "ann_id": 10,
        "category_id": 1,
        "image_id": 1,
        "split": "train",
        "no_target": False,
        "sentences": [sentence(3, "man")],
        "sent_ids": [3],
        "file_name": "x",
    },
    {
        "ref_id": 4,
        "ann_id": [10, -1],
        "category_id": [1],
        "image_id": 1,
        "split": "train",
        "sentences": [sentence(4, "bad")],
        "sent_ids": [4],
        "file_name": "x",
    },
    {
        "ref_id": 5,
        "ann_id": [10],
        "category_id": [1],
        "image_id": 1,
        "split": "train",
        "no_target": True,
        "sentences": [sentence(5, "bad")],
        "sent_ids": [5],
        "file_name": "x",
    },
    {
        "ref_id": 6,
        "ann_id": [10, 20],
        "category_id": [1, 1],
        "image_id": 1,
        "split": "train",
        "sentences": [sentence(6, "across")],
        "sent_ids": [6],
        "file_name": "x",
    },
]


@pytest.mark.parametrize("fmt", ["json", "p"])
def test_grefcoco_multi_and_no_target(tmp_path: Path, fmt: str) -> None:
    write_refcoco_instances(tmp_path)
    path = write_refs(tmp_path, GREFS, fmt, name="grefs(unc)")
    cfg = GrefcocoInput(
        name="grc", refs=str(path), instances=str(tmp_path / "instances.json"), images=str(tmp_path / "train2014")
    )
    examples, rejects, _ = split_items(list(read_input(cfg, IMAGE_CFG)))
    assert [e.image.image_id for e in examples] == ["coco:1", "coco:2"]
    assert all(e.image.source == "grefcoco" and e.key.startswith("grc-coco_") for e in examples)
    refs = {r.ref_id: r for e in examples for r in e.refs}
    assert sorted(refs) == [0, 1, 2, 3]
    assert (refs[0].ann_ids, refs[0].category_ids) == ((10, 11), (1, 2))
    assert (refs[1].ann_ids, refs[1].category_ids) == ((), ())
    assert (refs[2].ann_ids, refs[2].category_ids, refs[2].image_id) == ((), (), "coco:2")
    assert (refs[3].ann_ids, refs[3].category_ids) == ((10,), (1,))
    assert all(r.dataset == "grefcoco_unc" for r in refs.values())
    assert {k.rsplit("#", 1)[1]: r.reason for k, r in by_key(rejects).items()} == {
        "ref:4": "bad_ref",
        "ref:5": "bad_ref",
        "ref:6": "missing_annotation",
    }


def test_refcoco_rejects_no_target_refs(tmp_path: Path) -> None:
    write_refcoco_instances(tmp_path)
    cfg = refcoco_cfg(tmp_path, write_refs(tmp_path, GREFS[1:2], "json"))
    _, items = plan_input(cfg)
    assert [(r.reason, r.level) for r in items if isinstance(r, Reject)] == [("bad_ref", RejectLevel.REF)]


def test_other_input_types_are_refused() -> None:
    from orsgen.schemas.config import Sa1bInput

    with pytest.raises(TypeError, match="Sa1bInput"):
        plan_input(Sa1bInput(name="s", shards=["x.tar"]))  # type: ignore[arg-type]


def test_reason_codes_are_documented_constants() -> None:
    for code in (
        "UNREADABLE_ANNOTATIONS",
        "BAD_JSON",
        "UNSAFE_PATH",
        "MISSING_IMAGE",
        "ORPHAN_ANNOTATION",
        "UNKNOWN_CATEGORY",
        "BAD_REF",
        "MISSING_ANNOTATION",
        "UNSAFE_PICKLE",
    ):
        assert getattr(ic, code) == code.lower()
