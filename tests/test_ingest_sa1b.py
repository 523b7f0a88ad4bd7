"""Tests of stages.ingest.sa1b on tiny SA-1B shards built in tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from orsgen.schemas.config import ImageConfig
from orsgen.schemas.records import ImageExample, Reject, RejectLevel
from orsgen.stages.ingest.images import sha256_hex
from orsgen.stages.ingest.sa1b import expand_shards, read_sa1b_shard

CFG = ImageConfig()


# ---------------------------------------------------------------- tiny data


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _rle(mask: np.ndarray) -> dict[str, Any]:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in enc["size"]], "counts": enc["counts"].decode("ascii")}


def _masks(height: int, width: int, seed: int) -> dict[int, np.ndarray]:
    """Three masks keyed by annotation id: a box, a disc and an L shape."""
    box = np.zeros((height, width), dtype=bool)
    box[2:7, 3 + seed : 11 + seed] = True
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height // 2) ** 2 + (xx - width // 2) ** 2 <= 16
    ell = np.zeros((height, width), dtype=bool)
    ell[height - 6 : height - 1, 1:3] = True
    ell[height - 2 : height - 1, 1:9] = True
    # Ids out of order, so that the sort by source id is visible.
    return {1000 * seed + 30: box, 1000 * seed + 10: disc, 1000 * seed + 20: ell}


def _ann(ann_id: int, mask: np.ndarray) -> dict[str, Any]:
    return {
        "id": ann_id,
        "segmentation": _rle(mask),
        # Deliberately wrong: ingest must compute these from the RLE.
        "bbox": [0, 0, 1, 1],
        "area": 1,
        "predicted_iou": 0.9 + ann_id % 7 / 100,
        "stability_score": 0.95,
        "crop_box": [0, 0, mask.shape[1], mask.shape[0]],
        "point_coords": [[1.5, 2.5]],
    }


def _sa1b_json(image_id: int, width: int, height: int, masks: dict[int, np.ndarray]) -> dict[str, Any]:
    return {
        "image": {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"},
        "annotations": [_ann(i, m) for i, m in masks.items()],
    }


def _dump(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8")


SIZES = {1: (24, 16), 2: (20, 18), 3: (26, 14)}  # image id -> (width, height)


def _pair(image_id: int, prefix: str = "") -> list[tuple[str, bytes]]:
    w, h = SIZES[image_id]
    doc = _sa1b_json(image_id, w, h, _masks(h, w, image_id))
    return [(f"{prefix}sa_{image_id}.jpg", _jpeg(w, h, image_id)), (f"{prefix}sa_{image_id}.json", _dump(doc))]


def _tar_bytes(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                name, data = m
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> str:
    path.write_bytes(_tar_bytes(members))
    return str(path)


def _read(url: str, **kwargs: Any) -> tuple[list[ImageExample], list[Reject]]:
    out = list(read_sa1b_shard(url, "demo", kwargs.pop("cfg", CFG), **kwargs))
    assert all(isinstance(o, (ImageExample, Reject)) for o in out)
    return [o for o in out if isinstance(o, ImageExample)], [o for o in out if isinstance(o, Reject)]


def _reasons(rejects: list[Reject]) -> list[tuple[str, str]]:
    return [(r.reason, str(r.level)) for r in rejects]


@pytest.fixture()
def valid_shard(tmp_path: Path) -> str:
    return _write(tmp_path / "sa_000000.tar", _pair(1) + _pair(2) + _pair(3))


# ---------------------------------------------------------------- happy path


def test_valid_shard_matches_dense_reference(valid_shard: str) -> None:
    examples, rejects = _read(valid_shard)
    assert rejects == []
    assert [e.image.image_id for e in examples] == ["sa1b:1", "sa1b:2", "sa1b:3"]
    for ex in examples:
        image_id = int(ex.image.image_id.split(":")[1])
        w, h = SIZES[image_id]
        jpg = _jpeg(w, h, image_id)
        assert ex.key == f"demo-sa1b_{image_id}"
        assert ex.input_name == "demo"
        assert ex.image_bytes == jpg
        assert ex.image.sha256 == sha256_hex(jpg)
        assert ex.image.source == "sa1b"
        assert ex.image.uri == f"{valid_shard}#sa_{image_id}.jpg"
        assert (ex.image.width, ex.image.height) == (w, h)
        assert ex.image.file_name == f"sa_{image_id}.jpg"

        masks = _masks(h, w, image_id)
        assert [i.source_ann_id for i in ex.instances] == sorted(masks)
        for inst in ex.instances:
            ref = masks[inst.source_ann_id]
            ys, xs = np.nonzero(ref)
            x0, y0 = xs.min(), ys.min()
            bw, bh = xs.max() - x0 + 1, ys.max() - y0 + 1
            assert inst.instance_id == f"sa1b:{image_id}/ann:{inst.source_ann_id}"
            assert inst.image_id == ex.image.image_id
            assert inst.area_px == int(ref.sum())
            assert inst.bbox_xywh == (x0, y0, bw, bh)
            assert inst.bbox_xyxy == (x0, y0, x0 + bw, y0 + bh)
            assert inst.rle.size == (h, w)
            np.testing.assert_array_equal(mask_utils.decode(inst.rle.to_coco()).astype(bool), ref)
            assert inst.predicted_iou == pytest.approx(0.9 + inst.source_ann_id % 7 / 100)
            assert inst.stability_score == pytest.approx(0.95)
            assert inst.point_coords == ((1.5, 2.5),)
            assert inst.crop_box == (0.0, 0.0, float(w), float(h))
            assert inst.mask_origin == "rle"
            assert inst.category_id is None and inst.category_name is None and inst.supercategory is None


def test_leading_dot_names_and_root_dir_entry(tmp_path: Path) -> None:
    root = tarfile.TarInfo(".")
    root.type = tarfile.DIRTYPE
    url = _write(tmp_path / "dot.tar", [root, *_pair(1, "./"), *_pair(2, "./")])
    examples, rejects = _read(url)
    assert rejects == []
    assert [e.key for e in examples] == ["demo-sa1b_1", "demo-sa1b_2"]
    assert examples[0].image.uri == f"{url}#./sa_1.jpg"


def test_gzip_compressed_shard(tmp_path: Path) -> None:
    path = tmp_path / "sa_000000.tar.gz"
    path.write_bytes(gzip.compress(_tar_bytes(_pair(1) + _pair(2))))
    examples, rejects = _read(str(path))
    assert rejects == [] and len(examples) == 2


def test_json_before_jpg_pairs_too(tmp_path: Path) -> None:
    jpg, js = _pair(1)
    url = _write(tmp_path / "x.tar", [js, jpg])
    examples, rejects = _read(url)
    assert rejects == [] and len(examples) == 1


# ---------------------------------------------------------------- broken streams


def _offsets(data: bytes) -> dict[str, tuple[int, int, int]]:
    """Member name -> (header offset, data offset, data size)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tf.getmembers()}


def _cut_tar(kind: str) -> bytes:
    data = _tar_bytes([*_pair(1), ("notes.txt", b"n" * 5000), *_pair(2), *_pair(3)])
    offs = _offsets(data)
    if kind == "mid_jpg":
        _, start, size = offs["sa_2.jpg"]
        return data[: start + size // 2]
    if kind == "mid_json":
        _, start, size = offs["sa_2.json"]
        return data[: start + size // 2]
    if kind == "at_header":  # a cut on a block boundary looks like a clean end to tarfile
        return data[: offs["sa_2.json"][0]]
    if kind == "mid_header":
        return data[: offs["sa_2.json"][0] + 100]
    if kind == "garbage_header":
        head = offs["sa_2.json"][0]
        return data[:head] + b"\xab" * 512 + data[head + 512 :]
    if kind == "mid_skipped_member":  # inside data the reader never reads
        _, start, size = offs["notes.txt"]
        return data[: start + size // 2]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "n_good", "expected_unpaired"),
    [
        ("mid_jpg", 1, []),
        ("mid_json", 1, ["sa1b:2"]),
        ("at_header", 1, ["sa1b:2"]),
        ("mid_header", 1, ["sa1b:2"]),
        ("garbage_header", 1, ["sa1b:2"]),
        ("mid_skipped_member", 1, []),
    ],
)
def test_truncated_tar_keeps_what_was_emitted(
    tmp_path: Path, kind: str, n_good: int, expected_unpaired: list[str]
) -> None:
    path = tmp_path / "cut.tar"
    path.write_bytes(_cut_tar(kind))
    out = list(read_sa1b_shard(str(path), "demo", CFG))
    examples = [o for o in out if isinstance(o, ImageExample)]
    rejects = [o for o in out if isinstance(o, Reject)]
    assert out[0] is examples[0] and examples[0].image.image_id == "sa1b:1"
    assert len(examples) == n_good
    # notes.txt is an unexpected member when the cut comes after its header.
    rejects = [r for r in rejects if r.reason != "unexpected_member"]
    assert (rejects[0].reason, rejects[0].level, rejects[0].source_key) == ("truncated_tar", RejectLevel.SHARD, str(path))
    assert [r.image_id for r in rejects[1:] if r.reason == "unpaired_member"] == expected_unpaired
    assert all(r.level == RejectLevel.IMAGE for r in rejects[1:])


def test_complete_tar_has_no_truncation_reject(tmp_path: Path) -> None:
    # Twin of the cuts above: the end-of-archive check must not misfire on a
    # tar with extra NUL padding (as written with a large blocking factor).
    data = _tar_bytes(_pair(1) + _pair(2)) + b"\0" * (64 * 1024)
    path = tmp_path / "padded.tar"
    path.write_bytes(data)
    examples, rejects = _read(str(path))
    assert len(examples) == 2 and rejects == []


def test_unreadable_shard(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.tar")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    for url in (missing, str(junk)):
        examples, rejects = _read(url)
        assert examples == []
        assert _reasons(rejects) == [("unreadable_shard", "shard")]
        assert rejects[0].source_key == url


# ---------------------------------------------------------------- bad images and JSON


def test_corrupt_jpeg_rejects_only_that_image(tmp_path: Path) -> None:
    jpg, js = _pair(2)
    url = _write(tmp_path / "x.tar", [*_pair(1), (jpg[0], jpg[1][: len(jpg[1]) // 3]), js, *_pair(3)])
    examples, rejects = _read(url)
    assert [e.image.image_id for e in examples] == ["sa1b:1", "sa1b:3"]
    n_anns = len(json.loads(js[1])["annotations"])
    # The image's reject, then each of its annotations counted with it.
    assert _reasons(rejects) == [("corrupt_image", "image")] + [("image_rejected", "instance")] * n_anns
    assert n_anns > 0 and all(r.image_id == "sa1b:2" for r in rejects)
    assert rejects[0].source_key == f"{url}#sa_2.jpg"
    assert rejects[1].source_key.startswith(f"{url}#sa_2.json/ann:")


def test_image_size_disagreeing_with_json(tmp_path: Path) -> None:
    w, h = SIZES[1]
    doc = _sa1b_json(1, w + 1, h, {})
    url = _write(tmp_path / "x.tar", [("sa_1.jpg", _jpeg(w, h, 1)), ("sa_1.json", _dump(doc))])
    examples, rejects = _read(url)
    assert examples == []
    assert _reasons(rejects) == [("image_size_mismatch", "image")]


def test_jpeg_member_above_max_bytes_is_not_read(tmp_path: Path) -> None:
    (jpg1, json1), (jpg2, json2) = _pair(1), _pair(2)
    assert len(jpg1[1]) < len(jpg2[1])
    # The JSON comes first here, so the refused JPEG's partner is pending.
    url = _write(tmp_path / "x.tar", [jpg1, json1, json2, jpg2])
    examples, rejects = _read(url, cfg=ImageConfig(max_bytes=len(jpg1[1])))
    assert [e.image.image_id for e in examples] == ["sa1b:1"]
    # Exactly one image-level outcome per image: the JSON partner of the
    # refused JPEG adds no unpaired reject.
    assert [(r.reason, r.level, r.image_id) for r in rejects] == [("image_too_large", "image", "sa1b:2")]
    assert "was not read" in rejects[0].message


def test_json_member_above_cap_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orsgen.stages.ingest.sa1b as ingest

    (jpg1, json1), pair2 = _pair(1), _pair(2)
    monkeypatch.setattr(ingest, "MAX_JSON_BYTES", len(json1[1]) - 1)
    url = _write(tmp_path / "x.tar", [jpg1, json1, *pair2])
    examples, rejects = _read(url)
    assert len(json1[1]) > len(pair2[1][1])
    assert [e.image.image_id for e in examples] == ["sa1b:2"]
    assert [(r.reason, r.level, r.image_id) for r in rejects] == [("json_too_large", "image", "sa1b:1")]


def _json_variant(kind: str) -> bytes:
    w, h = SIZES[1]
    doc = _sa1b_json(1, w, h, _masks(h, w, 1))
    if kind == "not_json":
        return b"{not json"
    if kind == "not_utf8":
        return b"\xff\xfe{}"
    if kind == "no_image":
        del doc["image"]
    elif kind == "no_width":
        del doc["image"]["width"]
    elif kind == "no_file_name":
        del doc["image"]["file_name"]
    elif kind == "width_str":
        doc["image"]["width"] = "24"
    elif kind == "id_mismatch":
        doc["image"]["image_id"] = 99
    elif kind == "no_annotations":
        del doc["annotations"]
    elif kind == "top_list":
        return _dump([doc])
    return _dump(doc)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("not_json", "not valid JSON"),
        ("not_utf8", "not valid JSON"),
        ("no_image", "'image'"),
        ("no_width", "'image.width'"),
        ("no_file_name", "'image.file_name'"),
        ("width_str", "'image.width'"),
        ("id_mismatch", "member name says 1"),
        ("no_annotations", "'annotations'"),
        ("top_list", "top level"),
    ],
)
def test_bad_json_names_the_problem(tmp_path: Path, kind: str, needle: str) -> None:
    jpg, _ = _pair(1)
    url = _write(tmp_path / "x.tar", [jpg, ("sa_1.json", _json_variant(kind)), *_pair(2)])
    examples, rejects = _read(url)
    assert [e.image.image_id for e in examples] == ["sa1b:2"]
    assert _reasons(rejects) == [("bad_json", "image")]
    assert needle in rejects[0].message
    assert rejects[0].image_id == "sa1b:1"
    assert rejects[0].source_key == f"{url}#sa_1.json"


# ---------------------------------------------------------------- bad annotations


def _one_image_with(tmp_path: Path, extra: list[Any]) -> tuple[str, list[ImageExample], list[Reject]]:
    w, h = SIZES[1]
    doc = _sa1b_json(1, w, h, _masks(h, w, 1))
    doc["annotations"].extend(extra)
    url = _write(tmp_path / "x.tar", [("sa_1.jpg", _jpeg(w, h, 1)), ("sa_1.json", _dump(doc))])
    examples, rejects = _read(url)
    return url, examples, rejects


def test_rle_size_mismatch_rejects_the_instance_only(tmp_path: Path) -> None:
    w, h = SIZES[1]
    wrong = np.zeros((h + 1, w), dtype=bool)
    wrong[1:4, 1:4] = True
    url, examples, rejects = _one_image_with(tmp_path, [_ann(77, wrong)])
    assert len(examples) == 1 and len(examples[0].instances) == 3
    assert _reasons(rejects) == [("rle_size_mismatch", "instance")]
    assert rejects[0].source_key == f"{url}#sa_1.json/ann:77"
    assert rejects[0].image_id == "sa1b:1"


def test_empty_mask_rejects_the_instance_only(tmp_path: Path) -> None:
    w, h = SIZES[1]
    url, examples, rejects = _one_image_with(tmp_path, [_ann(5, np.zeros((h, w), dtype=bool))])
    assert len(examples[0].instances) == 3
    assert _reasons(rejects) == [("empty_mask", "instance")]
    assert rejects[0].source_key == f"{url}#sa_1.json/ann:5"


def test_bad_annotation_fields(tmp_path: Path) -> None:
    w, h = SIZES[1]
    good = np.zeros((h, w), dtype=bool)
    good[0:2, 0:2] = True
    no_seg = _ann(6, good)
    del no_seg["segmentation"]
    no_id = _ann(7, good)
    del no_id["id"]
    bad_score = {**_ann(8, good), "predicted_iou": "high"}
    duplicate = _ann(10 + 1000, good)  # 1010 is an id of _masks(h, w, 1)
    bad_counts = {**_ann(9, good), "segmentation": {"size": [h, w], "counts": "é"}}
    url, examples, rejects = _one_image_with(tmp_path, [no_seg, no_id, bad_score, "junk", duplicate, bad_counts])
    assert len(examples[0].instances) == 3
    assert [(r.reason, r.source_key.rsplit("/", 1)[1]) for r in rejects] == [
        ("bad_annotation", "ann:6"),
        ("bad_annotation", "ann:index4"),
        ("bad_annotation", "ann:8"),
        ("bad_annotation", "ann:index6"),
        ("bad_annotation", "ann:1010"),
        ("bad_rle", "ann:9"),
    ]
    assert "'segmentation'" in rejects[0].message and "'id'" in rejects[1].message
    assert all(r.level == RejectLevel.INSTANCE and r.image_id == "sa1b:1" for r in rejects)


def test_batched_geometry_equals_the_annotation_by_annotation_path(tmp_path: Path) -> None:
    # read_sa1b_shard checks all masks of an image, then takes their boxes and
    # areas in batches of 255: the same instances and rejects, in the same
    # order, as one _to_instance per annotation (the former loop), across a
    # batch boundary, with empty masks, duplicates and bad records interleaved.
    from orsgen.stages.ingest import sa1b as S

    w, h = SIZES[1]
    rng = np.random.default_rng(7)
    anns: list[Any] = []
    for i in range(380):
        m = np.zeros((h, w), dtype=bool)
        if rng.random() < 0.85:
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            m[y : y + int(rng.integers(1, 6)), x : x + int(rng.integers(1, 6))] = True
        ann = _ann(5000 + i, m)
        r = rng.random()
        if r < 0.04:
            ann["id"] = 5000 + int(rng.integers(0, i + 1))  # a duplicate (or itself)
        elif r < 0.07:
            ann = "junk"
        elif r < 0.1:
            ann["segmentation"] = {"size": [h, w + 1], "counts": ann["segmentation"]["counts"]}
        elif r < 0.12:
            ann["predicted_iou"] = float("nan")
        anns.append(ann)
    doc = {"image": {"image_id": 1, "width": w, "height": h, "file_name": "sa_1.jpg"}, "annotations": anns}
    url = _write(tmp_path / "x.tar", [("sa_1.jpg", _jpeg(w, h, 1)), ("sa_1.json", _dump(doc))])
    examples, rejects = _read(url)

    parsed = json.loads(_dump(doc))["annotations"]
    want_instances, want_rejects, seen = [], [], set()
    for index, ann in enumerate(parsed):
        ann_ref = str(ann["id"]) if isinstance(ann, dict) and isinstance(ann.get("id"), int) else f"index{index}"
        try:
            want_instances.append(S._to_instance(ann, "sa1b:1", h, w, seen))
        except S._BadAnnotation as err:
            want_rejects.append((f"{url}#sa_1.json/ann:{ann_ref}", err.reason, f"annotation {ann_ref} of 'sa_1.json': {err}"))
    want_instances.sort(key=lambda i: i.source_ann_id)
    assert list(examples[0].instances) == want_instances
    assert [(r.source_key, r.reason, r.message) for r in rejects] == want_rejects
    reasons = {r.reason for r in rejects}
    assert {"empty_mask", "bad_annotation", "rle_size_mismatch"} <= reasons
    assert len(want_instances) > 255  # more masks than one batch


# ---------------------------------------------------------------- hostile members


def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    absolute = tmp_path / "abs_evil.json"
    evil = b'{"owned": true}'
    sym = tarfile.TarInfo("sa_3.jpg")
    sym.type = tarfile.SYMTYPE
    sym.linkname = "/etc/passwd"
    other_link = tarfile.TarInfo("link")
    other_link.type = tarfile.LNKTYPE
    other_link.linkname = "sa_1.jpg"
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    jpg3, json3 = _pair(3)
    members: list[Any] = [
        ("../evil.json", evil),
        (str(absolute), evil),
        ("a/../../evil2.json", evil),
        *_pair(1),
        sym,
        json3,
        other_link,
        fifo,
        *_pair(2),
    ]
    url = _write(tmp_path / "hostile.tar", members)
    with tarfile.open(url) as tf:  # the fixture really holds the hostile names
        assert tf.getnames()[:2] == ["../evil.json", str(absolute)]

    examples, rejects = _read(url)
    assert [e.image.image_id for e in examples] == ["sa1b:1", "sa1b:2"]
    assert _reasons(rejects) == [
        ("unsafe_member", "shard"),
        ("unsafe_member", "shard"),
        ("unsafe_member", "shard"),
        ("unsafe_member", "image"),
        ("unsafe_member", "shard"),
        ("unsafe_member", "shard"),
    ]
    assert rejects[3].image_id == "sa1b:3"
    assert rejects[0].source_key == f"{url}#../evil.json"
    assert not absolute.exists()
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "evil2.json").exists()
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.tar", "work"]


def test_unexpected_and_duplicate_members(tmp_path: Path) -> None:
    sub = tarfile.TarInfo("sub")
    sub.type = tarfile.DIRTYPE
    url = _write(
        tmp_path / "x.tar",
        [
            ("notes.txt", b"hello"),
            sub,
            ("sub/sa_5.jpg", b"x"),
            ("sa_5.png", b"x"),
            ("bad\nname\udcff", b"x"),
            *_pair(1),
            ("sa_1.jpg", b"second copy"),
            *_pair(2),
        ],
    )
    examples, rejects = _read(url)
    assert [e.image.image_id for e in examples] == ["sa1b:1", "sa1b:2"]
    assert _reasons(rejects) == [("unexpected_member", "shard")] * 5 + [("duplicate_member", "shard")]
    # Hostile names are escaped, so the key survives any UTF-8 writer.
    rejects[4].source_key.encode("utf-8")
    assert "\n" not in rejects[4].source_key


def test_unpaired_members_at_end_of_tar(tmp_path: Path) -> None:
    jpg1, _ = _pair(1)
    _, json3 = _pair(3)
    url = _write(tmp_path / "x.tar", [jpg1, *_pair(2), json3])
    examples, rejects = _read(url)
    assert [e.image.image_id for e in examples] == ["sa1b:2"]
    assert _reasons(rejects) == [("unpaired_member", "image"), ("unpaired_member", "image")]
    assert [(r.image_id, r.source_key) for r in rejects] == [("sa1b:1", f"{url}#sa_1.jpg"), ("sa1b:3", f"{url}#sa_3.json")]


def test_pending_bound_evicts_oldest_half_once(tmp_path: Path) -> None:
    (jpg1, json1), (jpg2, json2) = _pair(1), _pair(2)
    url = _write(tmp_path / "x.tar", [jpg1, jpg2, json1, json2])
    examples, rejects = _read(url, max_pending_stems=1)
    assert [e.image.image_id for e in examples] == ["sa1b:2"]
    # sa_1's late JSON adds no second reject: one outcome per image.
    assert [(r.reason, r.image_id) for r in rejects] == [("unpaired_member", "sa1b:1")]


def test_max_images_stops_early(valid_shard: str) -> None:
    examples, rejects = _read(valid_shard, max_images=2)
    assert [e.image.image_id for e in examples] == ["sa1b:1", "sa1b:2"] and rejects == []


# ---------------------------------------------------------------- URLs


def test_expand_shards_local_glob(tmp_path: Path) -> None:
    for name in ("sa_000001.tar", "sa_000000.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sa_dir.tar").mkdir()  # a directory matching the glob is not a shard
    got = expand_shards([str(tmp_path / "sa_*.tar"), str(tmp_path / "sa_000000.tar")])
    assert got == [str(tmp_path / "sa_000000.tar"), str(tmp_path / "sa_000001.tar")]


def test_expand_shards_pattern_matching_nothing(tmp_path: Path) -> None:
    (tmp_path / "sa_000000.tar").write_bytes(b"x")
    for pattern in (str(tmp_path / "nothing_*.tar"), str(tmp_path / "missing.tar")):
        with pytest.raises(FileNotFoundError, match="matches no file"):
            expand_shards([str(tmp_path / "sa_*.tar"), pattern])


def test_memory_url_shard() -> None:
    root = f"memory://orsgen-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        with fsspec.open(f"{root}/sa_000000.tar", "wb") as f:
            f.write(_tar_bytes(_pair(1) + _pair(2)))
        with fsspec.open(f"{root}/sa_000001.tar", "wb") as f:
            f.write(_tar_bytes(_pair(3)))
        urls = expand_shards([f"{root}/sa_*.tar"])
        assert len(urls) == 2 and all(u.startswith("memory://") for u in urls)
        assert urls[0].endswith("/sa_000000.tar")
        out = [o for u in urls for o in read_sa1b_shard(u, "mem", CFG)]
        assert [o.key for o in out if isinstance(o, ImageExample)] == ["mem-sa1b_1", "mem-sa1b_2", "mem-sa1b_3"]
        assert all(isinstance(o, ImageExample) for o in out)
        assert out[0].image.uri == f"{urls[0]}#sa_1.jpg"
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)
