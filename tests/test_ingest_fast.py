"""The ingest path's shortcuts give what the direct computation gives.

Each shortcut in ``stages.ingest`` (and the COCO segmentation helpers of
``stages.common.masks``) is checked here against the plain computation it
replaces, on inputs chosen to hit its edges.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from orsgen.schemas.records import Rle
from orsgen.stages.common import masks as M
from orsgen.stages.ingest import coco as ic
from tests.conftest import coco_counts


# ---------------------------------------------------------------- reading image bytes


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 4096])
@pytest.mark.parametrize("cap", [0, 1, 9, 10, 11, 5000])
def test_local_read_equals_fsspec_read(tmp_path: Path, size: int, cap: int) -> None:
    path = tmp_path / "img.bin"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    with fsspec.open(str(path), "rb") as f:
        expected = f.read(cap + 1)
    assert ic._read_image(str(path), cap) == expected


def test_local_read_does_not_trust_the_size_hint() -> None:
    # A pipe reports st_size 0: the read must go on to the cap, not stop at the hint.
    payload = bytes(range(256)) * 40
    r, w = os.pipe()
    os.write(w, payload)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert ic._read_capped(f, 5000) == payload[:5001]


def test_local_read_errors_are_the_ones_load_task_maps(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ic._read_image(str(tmp_path / "missing.jpg"), 10)
    with pytest.raises(IsADirectoryError):
        ic._read_image(str(tmp_path), 10)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        ic._read_image(str(tmp_path / "file" / "x.jpg"), 10)


# ---------------------------------------------------------------- verifying JPEG bytes


def _check_image_reference(data: bytes, cfg) -> tuple:
    """check_image's verdict as it was before the draft decode (a plain full ``load()``)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    from orsgen.stages.ingest.images import UNIDENTIFIED_IMAGE_MESSAGE, ImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0 or width * height > cfg.max_pixels:
                return ("header",)
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        return ("corrupt_image", UNIDENTIFIED_IMAGE_MESSAGE)
    except (OSError, SyntaxError, ValueError) as err:
        return ("corrupt_image", f"the image cannot be decoded: {err}")
    return ("ok", width, height, img.format)


def _check_image_outcome(data: bytes, cfg) -> tuple:
    from orsgen.stages.ingest.images import ImageError, check_image

    try:
        info = check_image(data, cfg)
    except ImageError as err:
        return ("header",) if err.reason != "corrupt_image" else (err.reason, str(err))
    return ("ok", info.width, info.height, info.format)


def _small_jpegs() -> list[bytes]:
    """Small JPEGs of every layout the draft decode must treat like the full one."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:27, 0:38]
    noise = np.random.default_rng(5).integers(0, 256, (27, 38, 3), dtype=np.uint8)
    smooth = np.stack([(xx * 7) % 256, (yy * 9) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    out = []
    layouts = [
        {},
        {"progressive": True},
        {"optimize": True, "subsampling": 0},
        {"restart_marker_blocks": 2},
        {"progressive": True, "restart_marker_rows": 1},
    ]
    for arr in (noise, smooth):
        for kw in layouts:
            for mode in ("RGB", "L", "CMYK"):
                buf = io.BytesIO()
                Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=85, **kw)
                out.append(buf.getvalue())
    out.append(_lossless_jpeg(smooth[:, :, 0]))
    return out


def _lossless_jpeg(gray: np.ndarray) -> bytes:
    """A lossless (SOF3) 8-bit grayscale JPEG, predictor 1 (Pillow cannot write one).

    ITU-T T.81 annex H: each sample minus its left neighbour (the first column:
    minus the sample above; the very first: minus 128), Huffman-coded with the
    standard luminance DC table.
    """
    bits_per_len = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    codes, code, k = {}, 0, 0
    for length, count in enumerate(bits_per_len, 1):
        for _ in range(count):
            codes[k] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    x = gray.astype(int)
    h, w = x.shape
    bits: list[int] = []
    for r in range(h):
        for c in range(w):
            pred = 128 if r == c == 0 else x[r - 1, c] if c == 0 else x[r, c - 1]
            d = int(x[r, c] - pred)
            mag, extra = (-d, d - 1) if d < 0 else (d, d)
            n = mag.bit_length()
            code, length = codes[n]
            bits += [(code >> (length - 1 - i)) & 1 for i in range(length)]
            bits += [(extra >> (n - 1 - i)) & 1 for i in range(n)]
    bits += [1] * (-len(bits) % 8)
    entropy = bytearray()
    for i in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[i : i + 8])), 2)
        entropy += bytes([byte, 0]) if byte == 0xFF else bytes([byte])

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    return (
        b"\xff\xd8"
        + segment(0xC4, bytes([0]) + bytes(bits_per_len) + bytes(range(12)))
        + segment(0xC3, bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0]))
        + segment(0xDA, bytes([1, 1, 0x00, 1, 0, 0]))
        + bytes(entropy)
        + b"\xff\xd9"
    )


def _mutations(data: bytes, rnd, n: int):
    for cut in range(2, len(data), 3):
        yield data[:cut]
    for _ in range(n):
        p = rnd.randrange(2, len(data))
        op = rnd.randrange(5)
        if op == 0:  # one bit flipped
            yield data[:p] + bytes([data[p] ^ (1 << rnd.randrange(8))]) + data[p + 1 :]
        elif op == 1:  # one byte replaced
            yield data[:p] + bytes([rnd.randrange(256)]) + data[p + 1 :]
        elif op == 2:  # garbage inserted
            yield data[:p] + bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9))) + data[p:]
        elif op == 3:  # bytes cut out
            yield data[:p] + data[p + rnd.randrange(1, 9) :]
        else:  # a stray marker
            yield data[:p] + b"\xff" + bytes([rnd.randrange(0xC0, 0x100)]) + data[p:]


def test_draft_decode_refuses_exactly_what_the_full_decode_refuses():
    # check_image decodes a JPEG at 1/8 scale: the same entropy decoding of every
    # byte, a smaller IDCT. Truncated, bit-flipped and spliced files must get the
    # verdict (and message) of the plain full decode; a file the full decode refuses
    # must never be accepted. (A bigger run of this fuzz by hand: see issue 14's notes.)
    import random

    from orsgen.schemas.config import ImageConfig

    cfg = ImageConfig(max_pixels=1 << 16)
    rnd = random.Random(14)
    seen = {"ok": 0, "corrupt_image": 0}
    for data in _small_jpegs():
        for bad in _mutations(data, rnd, 40):
            want = _check_image_reference(bad, cfg)
            got = _check_image_outcome(bad, cfg)
            assert got == want, bad
            if want[0] in seen:
                seen[want[0]] += 1
    # The fuzz must reach both verdicts after a clean header, else it tests nothing.
    assert seen["ok"] > 100 and seen["corrupt_image"] > 1000, seen


def test_only_huffman_dct_frames_are_draft_decoded():
    # Pillow's draft mode sizes its buffers for the scaled image, but libjpeg
    # never scales a lossless frame: a drafted lossless JPEG overruns the heap
    # (a segfault). Only a clean header reaching SOF0/1/2 may be drafted.
    import io

    from PIL import Image

    from orsgen.schemas.config import ImageConfig
    from orsgen.stages.ingest.images import check_image, draft_decodable

    yy, xx = np.mgrid[0:24, 0:40]
    gray = ((xx * 5 + yy * 3) % 256).astype(np.uint8)
    lossless = _lossless_jpeg(gray)
    with Image.open(io.BytesIO(lossless)) as im:
        assert np.array_equal(np.asarray(im), gray)  # a real lossless JPEG, decoded in full
    assert not draft_decodable(lossless)
    info = check_image(lossless, ImageConfig())
    assert (info.width, info.height, info.format) == (40, 24, "JPEG")

    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG")
    baseline = buf.getvalue()
    sof = baseline.index(b"\xff\xc0")
    assert draft_decodable(baseline)
    assert draft_decodable(baseline[: sof + 1] + b"\xc1" + baseline[sof + 2 :])  # extended sequential
    for frame in (0xC3, 0xC5, 0xC9, 0xCA, 0xCB):  # lossless, hierarchical, arithmetic-coded
        assert not draft_decodable(baseline[: sof + 1] + bytes([frame]) + baseline[sof + 2 :])
    assert not draft_decodable(baseline[:2] + b"\x00" + baseline[2:])  # stray byte before a marker
    assert not draft_decodable(baseline[:2] + b"\xff" + baseline[2:])  # a fill byte
    assert not draft_decodable(baseline[:sof])  # header ends before the frame
    assert not draft_decodable(baseline[:2] + b"\xff\xfe\x00\x01" + baseline[2:])  # length < 2
    assert not draft_decodable(b"\x89PNG\r\n\x1a\n" + baseline[2:])


def test_unidentified_image_message_is_the_same_every_time():
    # Pillow names an unidentifiable stream by its repr (a memory address): the
    # reject message must not carry it, or two runs write different rejects.
    from orsgen.schemas.config import ImageConfig
    from orsgen.stages.ingest.images import UNIDENTIFIED_IMAGE_MESSAGE, ImageError, check_image

    for data in (b"not an image", b"\xff\xd8", b"GIF8"):
        with pytest.raises(ImageError) as err:
            check_image(data, ImageConfig())
        assert (err.value.reason, str(err.value)) == ("corrupt_image", UNIDENTIFIED_IMAGE_MESSAGE)
        assert "0x" not in str(err.value)


def test_draft_decode_failure_falls_back_to_the_full_decode(monkeypatch):
    # Whatever makes the draft decode raise, the verdict is the full decode's:
    # a sound file stays accepted.
    from PIL import JpegImagePlugin

    from orsgen.schemas.config import ImageConfig
    from orsgen.stages.ingest.images import check_image

    def broken_draft(self, mode, size):
        self.tile = [("jpeg", (0, 0, 1, 1), 10**6, ("RGB", ""))]

    data = _small_jpegs()[0]
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", broken_draft)
    info = check_image(data, ImageConfig())
    assert (info.width, info.height, info.format) == (38, 27, "JPEG")


# ---------------------------------------------------------------- COCO segmentations



def _polygons_to_rle_reference(polygons, height, width):
    """polygons_to_rle as written before the shortcuts (numpy checks, merge of every list)."""
    polys = [list(map(float, p)) for p in polygons]
    if not polys:
        return M.empty_rle(height, width)
    for p in polys:
        if len(p) < 6 or len(p) % 2:
            raise M.MaskError("bad_polygon", f"a COCO polygon needs >= 3 (x, y) pairs, got {len(p)} numbers.")
        arr = np.asarray(p)
        lim = 2.0 * max(height, width) + 1.0
        if not np.isfinite(arr).all() or (np.abs(arr) > lim).any():
            raise M.MaskError("bad_polygon", f"polygon coordinates must be finite and within {lim:.0f} px of the image.")
    return Rle.from_coco(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))


def _segmentation_checks_reference(segm):
    """The type checks of segmentation_to_rle as written before the shortcuts."""
    if isinstance(segm, list):
        return all(isinstance(p, list) and all(isinstance(v, (int, float)) for v in p) for p in segm)
    return all(isinstance(c, int) and c >= 0 for c in segm["counts"])


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except M.MaskError as err:
        return (err.reason, str(err))


def _random_polygons(rng, h, w):
    cases = []
    for _ in range(150):
        n = int(rng.integers(3, 12))
        k = int(rng.integers(1, 4))
        polys = []
        for _ in range(k):
            cx, cy, r = rng.uniform(-w, 2 * w), rng.uniform(-h, 2 * h), rng.uniform(0.3, max(h, w))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n)) if rng.random() < 0.7 else rng.uniform(0, 2 * np.pi, n)
            pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).ravel()
            polys.append(pts.round().astype(int).tolist() if rng.random() < 0.3 else pts.tolist())
        cases.append(polys)
    return cases


def test_polygons_to_rle_equals_the_reference_on_random_polygons(rng):
    h, w = 37, 53
    cases = _random_polygons(rng, h, w)
    lim = 2.0 * max(h, w) + 1.0
    cases += [
        [[0, 0, 0, 0, 0, 0]],  # a point
        [[0, 0, 10, 10, 20, 20]],  # collinear
        [[0, 0, w, 0, w, h, 0, h]],  # the whole image
        [[-0.0, 0.0, 5.5, 0.0, 5.5, 5.5]],
        [[lim, lim, -lim, lim, 0, -lim]],  # exactly at the limit: accepted
        [[lim + 1e-9, 0, 0, 0, 0, 1]],  # just beyond: refused
        [[0, 0, 1, 1, 2, -lim - 1]],
        [[0, 0, 1, float("nan"), 2, 2]],
        [[0, 0, 1, float("inf"), 2, 2]],
        [[0, 0, 1, float("-inf"), 2, 2]],
        [[1e308, 1e308, 1e308, 0, 0, 0]],  # the sum overflows: refused by the array check
        [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1]],  # a second polygon too short
        [[0, 0, 1, 1, 2, 2, 3]],  # odd
        [[True, False, 5, 0, 5, 5]],  # bools are ints
        [[10**30, 0, 0, 0, 0, 1]],  # a huge int becomes a huge float
        [np.array([1.0, 1.0, 9.0, 1.0, 9.0, 9.0])],
        [[1, 1, 9, 1, 9, 9], [1, 1, 9, 1, 9, 9]],  # the same polygon twice
        [],
    ]
    for polys in cases:
        got = _outcome(M.polygons_to_rle, polys, h, w)
        assert got == _outcome(_polygons_to_rle_reference, polys, h, w), polys
    # The cases cover both outcomes, and a single polygon (the merge-free path).
    outcomes = [_outcome(M.polygons_to_rle, p, h, w)[0] for p in cases]
    assert outcomes.count("ok") > 100 and outcomes.count("bad_polygon") >= 6


class _Number(enum.IntEnum):
    ONE = 1


class _Float(float):
    pass


@pytest.mark.parametrize(
    "segm",
    [
        [[0, 0, 5, 0, 5, 5]],
        [[0.5, 0, 5, 0, 5, 5.5], [1, 1, 2, 1, 2, 2]],
        [[True, 0, 5, 0, 5, 5]],
        [[_Number.ONE, 0, 5, 0, 5, 5]],
        [[_Float(1.5), 0, 5, 0, 5, 5]],
        [[np.float64(1.5), 0, 5, 0, 5, 5]],  # a float subclass: accepted
        [[np.int64(1), 0, 5, 0, 5, 5]],  # not an int subclass: refused
        [[None, 0, 5, 0, 5, 5]],
        [["1", 0, 5, 0, 5, 5]],
        [[[1], 0, 5, 0, 5, 5]],
        [(0, 0, 5, 0, 5, 5)],  # a tuple is not a list
        [[0, 0, 5, 0, 5, 5], "x"],
        [[]],
    ],
)
def test_polygon_type_check_equals_the_reference(segm):
    expected_ok = _segmentation_checks_reference(segm)
    if expected_ok:
        assert _outcome(M.segmentation_to_rle, segm, 8, 8) == _outcome(
            lambda: (_polygons_to_rle_reference(segm, 8, 8), "polygon")
        )
    else:
        assert _outcome(M.segmentation_to_rle, segm, 8, 8) == (
            "bad_polygon",
            "segmentation polygons must be lists of numbers.",
        )


@pytest.mark.parametrize(
    "counts",
    [
        [0, 64],
        [10, 20, 34],
        [True, 63],
        [_Number.ONE, 63],
        [64, 0],
        [-1, 65],
        [np.int64(10), 54],
        [10.0, 54],
        [None, 64],
        ["10", 54],
        [],
        [10**30, -(10**30) + 64],
    ],
)
def test_uncompressed_counts_check_equals_the_reference(counts):
    segm = {"size": [8, 8], "counts": counts}
    got = _outcome(M.segmentation_to_rle, segm, 8, 8)
    if _segmentation_checks_reference(segm) and sum(counts) == 64:
        assert got[0] == "ok"
        assert got[1] == (Rle.from_coco(mask_utils.frPyObjects(segm, 8, 8)), "uncompressed_rle")
    else:
        assert got == ("bad_rle", "uncompressed RLE counts must be non-negative ints summing to h*w.")


def test_instance_geometry_equals_box_and_area(rng):
    for _ in range(40):
        m = np.zeros((23, 31), dtype=np.uint8)
        if rng.random() < 0.9:
            y0, x0 = rng.integers(0, 23), rng.integers(0, 31)
            m[y0 : y0 + rng.integers(1, 9), x0 : x0 + rng.integers(1, 9)] = 1
        rle = M.encode_mask(m)
        box = M.rle_bbox_xywh(rle)
        assert M.instance_geometry(rle) == {
            "bbox_xywh": box,
            "bbox_xyxy": M.xywh_to_xyxy(box),
            "area_px": M.rle_area(rle),
        }
        assert M.instance_geometry(rle)["area_px"] == int(m.sum())


def test_instance_geometries_equal_instance_geometry_one_by_one(rng):
    # More masks than one pycocotools batch holds (255), of two image sizes,
    # empty and full ones among them.
    rles = []
    for i in range(600):
        h, w = (23, 31) if i % 3 else (7, 300)
        m = np.zeros((h, w), dtype=np.uint8)
        r = rng.random()
        if r < 0.8:
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0 : y0 + rng.integers(1, 9), x0 : x0 + rng.integers(1, 40)] = 1
        elif r < 0.9:
            m[:] = 1
        rles.append(M.encode_mask(m))
    expected = [M.instance_geometry(r) for r in rles]
    got = M.instance_geometries(rles)
    assert got == [(g["bbox_xywh"], g["bbox_xyxy"], g["area_px"]) for g in expected]
    assert all(type(v) is float for box, xyxy, _ in got for v in (*box, *xyxy))
    assert all(type(a) is int for _, _, a in got)
    assert {a for _, _, a in got} >= {0, 23 * 31, 7 * 300}
    assert M.instance_geometries([]) == []


def _annotation_reference(ann, task, categories):
    """_annotation_to_instance as written before the clean-polygon path and the batched geometry."""
    from orsgen.schemas.records import Instance

    aid = ann["id"]
    cid = ic._as_int(ann.get("category_id"))
    if cid is None:
        return ic.BAD_ANNOTATION, f"annotation {aid} needs an int category_id, got {ic._short(ann.get('category_id'))}."
    if "segmentation" not in ann:
        return ic.BAD_ANNOTATION, f"annotation {aid} has no segmentation."
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or (not isinstance(iscrowd, (int, bool))):
        return ic.BAD_ANNOTATION, f"annotation {aid} iscrowd must be 0 or 1, got {ic._short(iscrowd)}."
    cat = categories.get(cid)
    if cat is None:
        return ic.UNKNOWN_CATEGORY, f"annotation {aid} has category_id {cid}, which is not in categories."
    segm = ann["segmentation"]
    problem = ic._polygon_range_problem(segm, task.width, task.height)
    if problem is not None:
        return ic.BAD_POLYGON, f"annotation {aid}: {problem}"
    try:
        rle, origin = M.segmentation_to_rle(segm, task.height, task.width)
    except M.MaskError as err:
        return err.reason, f"annotation {aid}: {err}"
    except (ValueError, TypeError, OverflowError) as err:
        return "bad_segmentation", f"annotation {aid} segmentation cannot be converted: {type(err).__name__}: {err}"
    geometry = M.instance_geometry(rle)
    if geometry["area_px"] == 0:
        return ic.EMPTY_MASK, f"annotation {aid} mask has no pixels."
    return Instance(
        instance_id=f"coco:{task.coco_image_id}/ann:{aid}",
        image_id=f"coco:{task.coco_image_id}",
        rle=rle,
        **geometry,
        category_id=cid,
        category_name=cat["name"],
        supercategory=cat["supercategory"],
        iscrowd=bool(iscrowd),
        source_ann_id=aid,
        mask_origin=origin,
    )


def _hostile_polygon(rng, h, w):
    """One polygon list, clean most of the time, with every kind of flaw the checks look for."""
    n = int(rng.integers(3, 9))
    cx, cy, r = rng.uniform(-0.5 * w, 1.5 * w), rng.uniform(-0.5 * h, 1.5 * h), rng.uniform(0.5, max(h, w))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    p = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).ravel()
    p = p.round().astype(int).tolist() if rng.random() < 0.3 else p.tolist()
    flaw = rng.random()
    if flaw < 0.45:
        return p
    i = int(rng.integers(0, len(p)))
    axis = w if i % 2 == 0 else h
    bad = [
        float("nan"), float("inf"), float("-inf"), 10**30, -(10**30), 1e308, True, False, None, "1", [1],
        -axis, 2 * axis, -axis - 1, 2 * axis + 1, 2 * axis + 1e-9, -axis - 1e-9, 2.0 * axis, -float(axis),
        np.float64(2.5), _Float(1.5), _Number.ONE,
    ]
    pick = rng.random()
    if pick < 0.6:
        p[i] = bad[int(rng.integers(0, len(bad)))]
    elif pick < 0.7:
        p = p[: int(rng.integers(0, 6))]  # too short, 4 numbers among them (pycocotools reads 4 as a box)
    elif pick < 0.8:
        p = p + [1.0]  # odd
    elif pick < 0.85:
        p = tuple(p)
    elif pick < 0.9:
        p = [float(-axis - 5)] * len(p)  # outside the image: an empty mask
    else:
        p = [1e308] * len(p)  # a sum that overflows
    return p


def _hostile_segmentation(rng, h, w):
    r = rng.random()
    if r < 0.75:
        return [_hostile_polygon(rng, h, w) for _ in range(1 if rng.random() < 0.7 else int(rng.integers(0, 4)))]
    m = np.zeros((h, w), dtype=np.uint8)
    m[rng.integers(0, h) :, rng.integers(0, w) :] = 1
    rle = M.encode_mask(m) if rng.random() < 0.9 else M.encode_mask(np.zeros((h, w), dtype=np.uint8))
    if r < 0.85:
        return rle.to_json() if rng.random() < 0.8 else {"size": [h, w + 1], "counts": rle.counts}
    runs = M.rle_counts_to_runs(rle.counts).tolist()
    if rng.random() < 0.2:
        runs[-1] += 1
    return {"size": [h, w], "counts": runs} if rng.random() < 0.9 else "nope"


def test_load_task_equals_the_annotation_by_annotation_reference(tmp_path, rng):
    from PIL import Image

    from orsgen.schemas.config import ImageConfig
    from orsgen.schemas.records import ImageExample, Instance

    h, w = 29, 41
    Image.new("RGB", (w, h), (120, 30, 200)).save(tmp_path / "a.png")
    categories = {"1": {"name": "cat", "supercategory": "animal"}, "2": {"name": "cup", "supercategory": ""}}
    seen_clean = seen_rejects = 0
    for round_no in range(6):
        anns = []
        for aid in range(1, 121):
            ann = {"id": aid, "image_id": 7, "category_id": 1 if aid % 2 else 2, "segmentation": _hostile_segmentation(rng, h, w)}
            r = rng.random()
            if r < 0.03:
                ann["category_id"] = [None, True, 3, "1", 1.0][int(rng.integers(0, 5))]
            elif r < 0.05:
                ann["iscrowd"] = [1, True, False, 2, "1", None, 0.0][int(rng.integers(0, 7))]
            elif r < 0.06:
                del ann["segmentation"]
            anns.append(ann)
            if isinstance(ann.get("segmentation"), list) and ic._clean_polygons(ann["segmentation"], w, h):
                seen_clean += 1
        task = ic.CocoImageTask(
            input_name="in", source="coco", coco_image_id=7, file_name="a.png", width=w, height=h,
            image_uri=str(tmp_path / "a.png"), annotations_json=ic._dumps(anns), refs=(),
            categories_json=ic._dumps(categories), annotations_url="ann.json",
        )
        cats = {int(k): v for k, v in categories.items()}
        anns = json.loads(task.annotations_json)  # as load_task reads them (tuples are lists there)
        expected = [_annotation_reference(a, task, cats) for a in sorted(anns, key=lambda a: a["id"])]
        example, *rejects = ic.load_task(task, ImageConfig())
        assert isinstance(example, ImageExample)
        assert list(example.instances) == [e for e in expected if isinstance(e, Instance)]
        assert [(r.reason, r.message) for r in rejects] == [e for e in expected if not isinstance(e, Instance)]
        # The one-annotation form gives the same, too.
        assert [ic._annotation_to_instance(a, task, cats) for a in sorted(anns, key=lambda a: a["id"])] == expected
        seen_rejects += len(rejects)
    assert seen_clean > 150 and seen_rejects > 150


def test_clean_polygons_only_where_every_check_passes(rng):
    h, w = 29, 41
    clean = 0
    for _ in range(1500):
        segm = [_hostile_polygon(rng, h, w) for _ in range(int(rng.integers(1, 3)))]
        if ic._clean_polygons(segm, w, h):
            clean += 1
            assert ic._polygon_range_problem(segm, w, h) is None
            assert M.segmentation_to_rle(segm, h, w) == (M.rasterize_polygons(segm, h, w), "polygon")
    assert clean > 300
    p = [[0, 0, 5, 0, 5, 5]]
    assert ic._clean_polygons(p, 1 << 24, 1 << 24)
    assert not ic._clean_polygons(p, (1 << 24) + 1, 8) and not ic._clean_polygons(p, 8, (1 << 24) + 1)
    assert not ic._clean_polygons(p, 8.0, 8) and not ic._clean_polygons(p, 8, True)
    assert not ic._clean_polygons([], 8, 8) and not ic._clean_polygons([[0, 0, 5, 0]], 8, 8)
    assert not ic._clean_polygons([[0, 0, 5, 0, 5, 5, 1]], 8, 8)
    assert not ic._clean_polygons([[10**400, 0, 5, 0, 5, 5]], 8, 8)  # the sum's OverflowError


# ---------------------------------------------------------------- counts decoded per image


def _random_counts(rng, n_strings: int) -> list[bytes]:
    out = []
    for _ in range(n_strings):
        n = int(rng.choice([1, 2, 3, 4, 5, int(rng.integers(6, 60))]))
        scale = int(rng.choice([2, 40, 5000, 1 << 30]))
        out.append(coco_counts([int(v) for v in rng.integers(0, scale, n)]))
    return out


def test_counts_decoded_together_equal_each_decoded_alone(rng):
    for _ in range(300):
        datas = _random_counts(rng, int(rng.integers(1, 25)))
        got = M._decode_counts_many(datas)
        assert got is not None and len(got) == len(datas)
        for g, d in zip(got, datas):
            want = M._decode_counts(d)
            assert g.dtype == want.dtype == np.int64
            assert g.tolist() == want.tolist()
    # Real masks, strings of one, two and three runs around them (every
    # parity of where a string's runs start in the joined bytes).
    real = [M.encode_mask(rng.random((29, 23)) < p).counts.encode() for p in (0.05, 0.5, 0.95)]
    mixed = [real[0], b"1", real[1], b"12", b"123", real[2], b"0", b"0", real[0]]
    assert [a.tolist() for a in M._decode_counts_many(mixed)] == [M._decode_counts(d).tolist() for d in mixed]


def test_counts_decoded_together_defer_negative_and_long_runs():
    negative = coco_counts([5, 3, 9, -4])
    with pytest.raises(M.MaskError, match="negative run"):
        M._decode_counts(negative)
    assert M._decode_counts_many([coco_counts([1, 2, 3]), negative]) is None
    thirteen_groups = coco_counts([1 << 62])
    assert M._decode_counts_many([coco_counts([1, 2, 3]), thirteen_groups]) is None


def test_warm_runs_cache_fills_the_cache_with_the_same_runs(rng, monkeypatch):
    datas = _random_counts(rng, 20)
    bad = ["0\u00e9", b"0\xff", b"0P", "", None, 7, {"x": 1}]
    calls: list[bytes] = []
    real = M._decode_counts
    monkeypatch.setattr(M, "_decode_counts", lambda d: calls.append(d) or real(d))
    M._cached_runs.cache_clear()
    M.warm_runs_cache([d.decode("ascii") for d in datas] + bad)
    # None of the clean strings is decoded again, and each gives its own runs.
    for d in datas:
        runs = M.rle_counts_to_runs(d.decode("ascii"))
        assert runs.tolist() == real(d).tolist()
        assert not runs.flags.writeable
    assert calls == []
    assert M._WARM_RUNS == {}
    # What was skipped still fails mask by mask with its own message.
    with pytest.raises(M.MaskError, match="invalid byte"):
        M.rle_counts_to_runs(b"0\xff")
    with pytest.raises(M.MaskError, match="middle of a run"):
        M.rle_counts_to_runs(b"0P")
    M._cached_runs.cache_clear()


def test_warm_runs_cache_leaves_a_negative_run_to_the_mask_by_mask_check(rng):
    datas = _random_counts(rng, 5)
    negative = coco_counts([0, 0, 0, -20])
    M._cached_runs.cache_clear()
    M.warm_runs_cache(datas + [negative])
    assert M._WARM_RUNS == {}
    for d in datas:
        assert M.rle_counts_to_runs(d).tolist() == M._decode_counts(d).tolist()
    with pytest.raises(M.MaskError, match="negative run"):
        M.rle_counts_to_runs(negative)
    M._cached_runs.cache_clear()


# ------------------------------------------------------------ value_problem's clean-record shortcut


def _scan_only(monkeypatch: pytest.MonkeyPatch, value, what: str, limits=None):
    """``value_problem`` with its shortcut switched off: the full scan alone (the reference)."""
    from orsgen.stages.ingest import validate as V

    with monkeypatch.context() as m:
        m.setattr(V, "_clean_count", lambda *a: -1)
        return V.value_problem(value, what, limits)


def _visited(v) -> int:
    """Values inside a container, recursively: what the scan visits below it."""
    items = list(v.values()) if isinstance(v, dict) else list(v)
    return len(items) + sum(_visited(x) for x in items if isinstance(x, (dict, list)))


def _hostile_values(rng: np.random.Generator):
    from orsgen.stages.ingest import validate as V

    leaves = [
        0, -1, 1.5, float("nan"), float("-inf"), -0.0, True, False, None, V.INT64_MAX, V.INT64_MIN,
        V.INT64_MAX + 1, V.INT64_MIN - 1, 10**400, "ok", "é ü", "a\x00b", "\x7f", "\x85", "\ud800", "tab\tnl\n",
        "n" * 256, "n" * 257, "x" * 4097, b"bytes", (1, 2), {1, 2}, np.float64(1.0), np.int64(3), enum.Enum,
    ]
    keys = ["id", "name", "supercategory", "file_name", "a.name", "a.b", "k\x00", "\udc00", "é", "n" * 256,
            "n" * 257, "", "sent", "raw", 7, 2**70, True, 1.5, None, (1,)]

    def make(depth: int):
        r = rng.random()
        if depth > 4 or r < 0.35:
            return leaves[rng.integers(len(leaves))]
        if r < 0.55:
            tails = [[], [1], [True], [V.INT64_MAX + 1], [V.INT64_MIN], [float("nan")], ["s"], [[1.0, 2.0]]]
            return [float(x) for x in rng.normal(size=rng.integers(0, 6))] + tails[rng.integers(len(tails))]
        if r < 0.75:
            return [make(depth + 1) for _ in range(rng.integers(0, 4))]
        return {keys[rng.integers(len(keys))]: make(depth + 1) for _ in range(rng.integers(0, 5))}

    for _ in range(3000):
        yield {keys[rng.integers(len(keys))]: make(1) for _ in range(rng.integers(0, 6))}
    for _ in range(300):
        yield [make(1) for _ in range(rng.integers(0, 4))]


def test_value_problem_shortcut_equals_the_full_scan(monkeypatch, rng):
    """Reason and message are the scan's on hostile records; clean records are shown clean by the shortcut."""
    from orsgen.stages.ingest import validate as V

    limit_sets = [None, {"name": V.MAX_NAME_CHARS, "supercategory": V.MAX_NAME_CHARS}, {"name": 3, "k[0]": 2}]
    shown_clean = 0
    for i, value in enumerate(_hostile_values(rng)):
        limits = limit_sets[i % 3]
        got = V.value_problem(value, f"annotations[{i}]", limits)
        assert got == _scan_only(monkeypatch, value, f"annotations[{i}]", limits), value
        n = V._clean_count(value, limits or {}, 0, V.MAX_NODES)
        if n >= 0:
            shown_clean += 1
            assert got is None and n == _visited(value)
    assert shown_clean > 300
    # Deep nesting, the node budget and polygon-like lists of lists at their limits.
    nested = []
    for levels in (V.MAX_DEPTH - 2, V.MAX_DEPTH - 1, V.MAX_DEPTH, V.MAX_DEPTH + 1):
        for inner in ([], [[1.0, 2.0]], {}, {"a": [1.0]}, "s"):
            lst, dct = inner, inner
            for _ in range(levels):
                lst, dct = [lst], {"k": dct}
            nested += [lst, dct, {"d": lst}, [dct]]
    polygons = [[float(x) for x in range(40)], [1, 2, 3.5], []]
    # One list repeated: a billion values by reference; the budget stops the walk at the scan's limit.
    row = [0.5] * 1000
    bomb = [[row] * 1000] * 1000
    cases = [
        bomb, {"b": bomb}, {"b": [row] * 1000}, [row] * 999, [[row] * 999],
        *nested,
        {"many": [0.5] * V.MAX_NODES}, {"many": [0.5] * (V.MAX_NODES - 1)}, [[0.5] * (V.MAX_NODES - 1)],
        {"segmentation": polygons}, {"segmentation": polygons + [[V.INT64_MAX + 1]]},
        {"segmentation": polygons + [[True]]}, {"segmentation": polygons + [["s"]]},
        {"counts": list(range(500)), "size": [10, 20]}, {"counts": list(range(500)) + [V.INT64_MIN - 1]},
        {"name": "x" * 300}, {"file_name": "x" * 5000}, {"k": ["abc"]}, {"k": [1.0, "abc"]}, {"a": "x" * (V.MAX_STRING_CHARS + 1)},
        # A dotted key: the scan's limit key is the text after its last "."
        # ({"name": 3} limits "a.name"), which the shortcut must not skip.
        {"a.name": "abcd"}, {"x": {"a.name": "abcd"}}, {"a.name": "ab"},
    ]
    for value in cases:
        for limits in limit_sets:
            assert V.value_problem(value, "r", limits) == _scan_only(monkeypatch, value, "r", limits)
    clean = {"segmentation": polygons, "bbox": [1.0, 2, 3, 4], "id": 5, "iscrowd": 0, "area": 1.5,
             "rle": {"counts": list(range(500)), "size": [10, 20]}, "name": "é"}
    assert V._clean_count(clean, {}, 0, V.MAX_NODES) == _visited(clean)
