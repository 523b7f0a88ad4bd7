"""Synthetic demo inputs in the real source formats, for ``orsgen demo``.

``generate_demo_inputs(root)`` draws small scenes (COCO-category objects as
circles, ellipses, rectangles and triangles on a textured background) and
writes them as the four sources orsgen reads, byte-identically for one seed::

    root/
      sa1b/sa_000000.tar ...          sa_<id>.jpg + sa_<id>.json (SA-1B per-image JSON)
      coco/annotations/instances_demo.json
      coco/images/<id:012d>.jpg
      refcoco/refs(unc).p             pickle (protocol 2) of a list of ref dicts
      refcoco/instances.json          COCO instances of the ref images
      refcoco/images/COCO_train2014_<id:012d>.jpg
      grefcoco/grefs(unc).json        gRefCOCO refs (ann_id lists, no-target refs)
      grefcoco/instances.json         the same instances (gRefCOCO shares RefCOCO's images)
      demo.yaml                       an orsgen config listing all of the above

Every mask is exact. Each object's outline is a polygon rasterised by
pycocotools itself, so a COCO polygon decodes to exactly the drawn pixels;
later objects occlude earlier ones, and each object's mask is what stays
visible. Every scene is a pure function of ``(seed, source, image_id)``
(``demo_scene``, ``demo_sa1b_image``), so tests can redraw the truth.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils


# ---------------------------------------------------------------- vocabulary


@dataclass(frozen=True, slots=True)
class DemoCategory:
    """A real COCO category and how the demo draws and names it.

    Attributes:
        id: COCO category id.
        name: COCO category name.
        supercategory: COCO supercategory.
        noun: the word sentences use ("ball" for "sports ball").
        plural: plural of ``noun``.
        shape: outline kind drawn (see ``_outline``).
        colours: colour names (keys of ``COLOURS``) this category may take.
    """

    id: int
    name: str
    supercategory: str
    noun: str
    plural: str
    shape: str
    colours: tuple[str, ...]


# Saturated RGB colours that stand out from the muted background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 20),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
}

_ANY = ("red", "green", "blue", "yellow", "purple", "white")

DEMO_CATEGORIES: tuple[DemoCategory, ...] = (
    DemoCategory(37, "sports ball", "sports", "ball", "balls", "circle", _ANY),
    DemoCategory(38, "kite", "sports", "kite", "kites", "triangle", _ANY),
    DemoCategory(47, "cup", "kitchen", "cup", "cups", "trapezoid", _ANY),
    DemoCategory(51, "bowl", "kitchen", "bowl", "bowls", "half_ellipse", _ANY),
    DemoCategory(53, "apple", "food", "apple", "apples", "ellipse", ("red", "green", "yellow")),
    DemoCategory(55, "orange", "food", "orange", "oranges", "circle", ("orange",)),
    DemoCategory(84, "book", "indoor", "book", "books", "rectangle", _ANY),
    DemoCategory(85, "clock", "indoor", "clock", "clocks", "octagon", _ANY),
)
_BY_ID = {c.id: c for c in DEMO_CATEGORIES}

# (width, height) in pixels; small so that the demo runs fast on 2 cores.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((256, 192), (288, 216), (320, 240))
# COCO's common sizes, for the dense scenes of the throughput benchmark.
DENSE_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (640, 427), (480, 640))

# Per-source salt of the scene seed, so that sources draw different scenes.
_SALT = {"sa1b": 1, "coco": 2, "refcoco": 3, "sa1b_regions": 4, "refs": 5}

COCO_IMAGE_ID_BASE = 100_000
REF_IMAGE_ID_BASE = 500_000
REF_SPLITS = ("train", "val", "testA", "testB", "train", "train")
CROWD_EVERY = 4  # COCO images whose index is a multiple of this hold a crowd
JPEG_QUALITY = 90


@dataclass(frozen=True)
class DemoObject:
    """One drawn object.

    Attributes:
        category_id: COCO category id (a key of ``DEMO_CATEGORIES``).
        colour: colour name (a key of ``COLOURS``).
        polygon: the outline as a COCO polygon ``[x0, y0, x1, y1, ...]`` in pixels.
        full_mask: ``(h, w)`` bool, the rasterised outline before occlusion.
        mask: ``(h, w)`` bool, the pixels still visible in the image; never empty.
        crowd: a member of the image's crowd cluster (annotated as one
            ``iscrowd`` region, not individually).
    """

    category_id: int
    colour: str
    polygon: tuple[float, ...]
    full_mask: np.ndarray
    mask: np.ndarray
    crowd: bool = False

    @property
    def occluded(self) -> bool:
        """Whether a later object hides part of this one."""
        return not np.array_equal(self.mask, self.full_mask)


@dataclass(frozen=True)
class Sa1bRegion:
    """One class-agnostic SA-1B-style region.

    Attributes:
        mask: ``(h, w)`` bool, never empty.
        predicted_iou: SAM's predicted IoU.
        stability_score: SAM's stability score.
        crop_box: ``[x, y, w, h]`` of the crop the region came from.
        kind: why it exists: ``object``, ``part``, ``background``, ``tiny``,
            ``low_score`` or ``duplicate`` (not written to the JSON).
    """

    mask: np.ndarray
    predicted_iou: float
    stability_score: float
    crop_box: tuple[int, int, int, int]
    kind: str


# ---------------------------------------------------------------- drawing


def _rng(seed: int, source: str, image_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SALT[source], image_id])


def rasterize_polygon(polygon: tuple[float, ...], height: int, width: int) -> np.ndarray:
    """Rasterises a COCO polygon with pycocotools, so that decoding it later is exact."""
    rles = mask_utils.frPyObjects([list(polygon)], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> tuple[float, ...]:
    """A closed outline of ``shape`` of radius ``r`` pixels centred on (cx, cy)."""
    c, ri, a = (int(round(cx)), int(round(cy))), max(int(round(r)), 3), int(round(angle))
    if shape == "circle":
        pts = cv2.ellipse2Poly(c, (ri, ri), 0, 0, 360, 10)
    elif shape == "ellipse":
        pts = cv2.ellipse2Poly(c, (ri, max(int(ri * 0.75), 2)), a, 0, 360, 10)
    elif shape == "octagon":
        pts = cv2.ellipse2Poly(c, (ri, ri), 22, 0, 360, 45)
    elif shape == "half_ellipse":  # a bowl: the lower half of an ellipse (y grows down)
        pts = cv2.ellipse2Poly(c, (ri, max(int(ri * 0.6), 2)), 0, 0, 180, 10)
    elif shape == "triangle":
        t = np.deg2rad(np.array([-90.0, 30.0, 150.0]) + angle / 4)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    elif shape == "rectangle":
        pts = cv2.boxPoints(((cx, cy), (0.8 * r, 1.3 * r), angle / 4))
    elif shape == "trapezoid":  # a cup: wider at the rim
        pts = np.array([[-0.7, -0.65], [0.7, -0.65], [0.5, 0.65], [-0.5, 0.65]]) * r + [cx, cy]
    else:
        raise ValueError(f"unknown demo shape {shape!r}; use one of the shapes in DEMO_CATEGORIES.")
    # Rounded before rasterising, so that the JSON value rasterises identically.
    return tuple(round(float(v), 1) for v in np.asarray(pts, dtype=np.float64).reshape(-1))


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A muted gradient with low-frequency blotches and fine grain, ``(h, w, 3)`` float."""
    c0, c1 = rng.uniform(90, 170, size=(2, 3))
    t = np.deg2rad(rng.uniform(0, 360))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = (xx * np.cos(t) + yy * np.sin(t)) / np.hypot(w, h) + 0.5
    img = c0 + (c1 - c0) * np.clip(ramp, 0, 1)[..., None]
    blotch = cv2.resize(rng.normal(0, 1, size=(6, 8)), (w, h), interpolation=cv2.INTER_CUBIC)
    img += 14 * blotch[..., None] + rng.normal(0, 4, size=(h, w, 3))
    return img


def _paint(img: np.ndarray, obj_mask: np.ndarray, rgb: tuple[int, int, int], rng: np.random.Generator) -> None:
    """Fills ``obj_mask`` with ``rgb``, lit from the top left, with a darker rim, in place."""
    ys, xs = np.nonzero(obj_mask)
    span = max(xs.max() - xs.min() + ys.max() - ys.min(), 1)
    shade = 1.0 - 0.18 * ((xs - xs.min()) + (ys - ys.min())) / span
    img[ys, xs] = np.asarray(rgb, dtype=np.float64) * shade[:, None] + rng.normal(0, 3, size=(len(ys), 3))
    # A darker rim inside the outline keeps touching look-alikes apart to the eye.
    rim = obj_mask & ~cv2.erode(obj_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    img[rim] *= 0.6


def _visible_masks(full: list[np.ndarray]) -> list[np.ndarray]:
    """What stays visible of each mask when later masks are drawn on top."""
    out: list[np.ndarray] = []
    covered = np.zeros_like(full[0]) if full else None
    for m in reversed(full):
        out.append(m & ~covered)
        covered = covered | m
    return out[::-1]


def make_scene(
    rng: np.random.Generator, w: int, h: int, *, crowd: bool = False, dense: bool = False
) -> tuple[np.ndarray, list[DemoObject]]:
    """Draws one scene of 2-3 categories, 1-3 instances each, with occlusions.

    An object is placed only where it leaves every earlier object at least half
    visible, so no mask is empty or a sliver.

    Args:
        rng: the only source of randomness.
        w: width in pixels.
        h: height in pixels.
        crowd: also draw a cluster of 5 small objects of the first category
            (under everything else), annotated as one ``iscrowd`` region; the
            category also gets separate instances.
        dense: a COCO-like busy scene instead: 4-7 categories, 2-5
            instances each, smaller objects (about 10-25 instances; the
            throughput benchmark's input). The default scenes are unchanged.

    Returns:
        ``(image, objects)``: ``(h, w, 3)`` uint8 RGB and the objects in drawing
        order (crowd members first).
    """
    if dense:
        cats = [DEMO_CATEGORIES[i] for i in rng.choice(len(DEMO_CATEGORIES), size=int(rng.integers(4, 8)), replace=False)]
        plan = [cats[0]] * int(rng.integers(3, 6)) + [c for c in cats[1:] for _ in range(int(rng.integers(2, 5)))]
        radius_frac = (0.05, 0.11)
    else:
        cats = [DEMO_CATEGORIES[i] for i in rng.choice(len(DEMO_CATEGORIES), size=int(rng.integers(2, 4)), replace=False)]
        plan = [cats[0]] * int(rng.integers(2, 4)) + [c for c in cats[1:] for _ in range(int(rng.integers(1, 3)))]
        radius_frac = (0.09, 0.17)
    plan = [plan[i] for i in rng.permutation(len(plan))]

    # (category, colour, polygon, full mask, crowd)
    placed: list[tuple[DemoCategory, str, tuple[float, ...], np.ndarray, bool]] = []
    if crowd:
        cat = cats[0]
        ccx, ccy = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.3 * h, 0.7 * h)
        for _ in range(5):
            r = rng.uniform(6, 9)
            cx, cy = ccx + rng.uniform(-14, 14), ccy + rng.uniform(-10, 10)
            poly = _outline(cat.shape, cx, cy, r, rng.uniform(-60, 60))
            placed.append((cat, str(rng.choice(cat.colours)), poly, rasterize_polygon(poly, h, w), True))

    for cat in plan:
        for _ in range(40):
            r = rng.uniform(*radius_frac) * h
            if placed and rng.random() < 0.4:  # lean on an earlier object, so occlusions happen
                px, py = _centre(placed[int(rng.integers(len(placed)))][3])
                t = rng.uniform(0, 2 * np.pi)
                cx, cy = px + np.cos(t) * r * rng.uniform(0.9, 1.5), py + np.sin(t) * r * rng.uniform(0.9, 1.5)
            else:
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            cx, cy = float(np.clip(cx, r + 3, w - r - 3)), float(np.clip(cy, r + 3, h - r - 3))
            poly = _outline(cat.shape, cx, cy, r, rng.uniform(-60, 60))
            full = rasterize_polygon(poly, h, w)
            if full.sum() >= 150 and _keeps_visible(placed, full):
                placed.append((cat, str(rng.choice(cat.colours)), poly, full, False))
                break

    img = _background(rng, w, h)
    for cat, colour, _, full, _ in placed:
        _paint(img, full, COLOURS[colour], rng)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    visible = _visible_masks([p[3] for p in placed])
    objects = [
        DemoObject(cat.id, colour, poly, full, vis, is_crowd)
        for (cat, colour, poly, full, is_crowd), vis in zip(placed, visible)
    ]
    return image, objects


def _centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _keeps_visible(placed: list[tuple[Any, ...]], new: np.ndarray, min_frac: float = 0.5) -> bool:
    """Whether drawing ``new`` on top leaves each earlier object (and the crowd as a whole) half visible."""
    full = [p[3] for p in placed]
    vis = _visible_masks([*full, new])[:-1]
    groups = [[i] for i, p in enumerate(placed) if not p[4]] + [[i for i, p in enumerate(placed) if p[4]]]
    for g in groups:
        if not g:
            continue
        before = np.logical_or.reduce([full[i] for i in g]).sum()
        after = np.logical_or.reduce([vis[i] for i in g]).sum()
        if after < min_frac * before or after < 60:
            return False
    return True


def demo_scene(seed: int, source: str, image_id: int, *, dense: bool = False) -> tuple[np.ndarray, list[DemoObject]]:
    """The scene of one demo image: a pure function of its arguments.

    Args:
        seed: the demo seed (>= 0).
        source: ``sa1b``, ``coco`` or ``refcoco`` (gRefCOCO shares RefCOCO's images).
        image_id: the image id written to the source's files.
        dense: a COCO-sized busy scene (see ``make_scene``).

    Returns:
        ``(image, objects)`` as from ``make_scene``.
    """
    rng = _rng(seed, source, image_id)
    sizes = DENSE_IMAGE_SIZES if dense else IMAGE_SIZES
    w, h = sizes[int(rng.integers(len(sizes)))]
    crowd = source == "coco" and (image_id - COCO_IMAGE_ID_BASE - 1) % CROWD_EVERY == 0
    return make_scene(rng, w, h, crowd=crowd, dense=dense)


# ---------------------------------------------------------------- SA-1B regions


def _split_parts(mask: np.ndarray, how: str) -> list[np.ndarray]:
    """Halves (``x``/``y``) or ``quarters`` of a mask, cut at its box centre."""
    ys, xs = np.nonzero(mask)
    mx, my = (int(xs.min()) + int(xs.max()) + 1) // 2, (int(ys.min()) + int(ys.max()) + 1) // 2
    left = np.zeros_like(mask)
    left[:, :mx] = True
    top = np.zeros_like(mask)
    top[:my, :] = True
    if how == "x":
        cuts = [left, ~left]
    elif how == "y":
        cuts = [top, ~top]
    else:
        cuts = [left & top, ~left & top, left & ~top, ~left & ~top]
    return [mask & c for c in cuts]


def _crop_for(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A SAM crop-layer box ``[x, y, w, h]`` holding the mask, or the whole image."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cw, ch = -(-w * 3 // 5), -(-h * 3 // 5)
    crops = [(0, 0, cw, ch), (w - cw, 0, cw, ch), (0, h - ch, cw, ch), (w - cw, h - ch, cw, ch)]
    inside = [c for c in crops if c[0] <= xs.min() and xs.max() < c[0] + c[2] and c[1] <= ys.min() and ys.max() < c[1] + c[3]]
    if inside and rng.random() < 0.5:
        return inside[int(rng.integers(len(inside)))]
    return (0, 0, w, h)


def sa1b_regions(rng: np.random.Generator, objects: list[DemoObject]) -> list[Sa1bRegion]:
    """Class-agnostic regions like SAM's automatic mask generator makes.

    Whole objects, part fragments (halves, quarters), the background, a few
    tiny fragments (below ``min_area_px``), a low-score box-shaped mask
    (below ``pred_iou_thresh`` / ``stability_score_thresh``), and 1-pixel
    dilations or erosions of objects (mask IoU > 0.8, lower score, for NMS).

    Args:
        rng: the only source of randomness.
        objects: the scene's objects (none may be crowd members).

    Returns:
        Non-empty regions in a shuffled order.
    """
    h, w = objects[0].mask.shape
    full_box = (0, 0, w, h)
    out: list[Sa1bRegion] = []

    def add(mask: np.ndarray, iou: float, stab: float, kind: str, crop: tuple[int, int, int, int] = full_box) -> None:
        if mask.any():
            out.append(Sa1bRegion(mask, round(float(iou), 4), round(float(stab), 4), crop, kind))

    for o in objects:
        add(o.mask, rng.uniform(0.9, 0.99), rng.uniform(0.93, 0.99), "object")
    for o in objects:
        if rng.random() < 0.6:
            for part in _split_parts(o.mask, str(rng.choice(["x", "y", "quarters"]))):
                if part.sum() >= 30:
                    add(part, rng.uniform(0.86, 0.97), rng.uniform(0.9, 0.98), "part", _crop_for(part, rng))
    background = ~np.logical_or.reduce([o.mask for o in objects])
    add(background, rng.uniform(0.89, 0.96), rng.uniform(0.93, 0.98), "background")
    for i in rng.choice(len(objects), size=min(2, len(objects)), replace=False):
        m = objects[int(i)].mask
        dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5)
        y, x = divmod(int(np.argmax(dist)), w)
        win = np.zeros_like(m)
        win[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 3] = True
        add(m & win, rng.uniform(0.9, 0.97), rng.uniform(0.93, 0.98), "tiny")
    o = objects[int(rng.integers(len(objects)))]
    ys, xs = np.nonzero(o.mask)
    box = np.zeros_like(o.mask)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    add(box, rng.uniform(0.55, 0.85), rng.uniform(0.6, 0.9), "low_score")
    kernel = np.ones((3, 3), np.uint8)
    for i in rng.choice(len(objects), size=min(2, len(objects)), replace=False):
        orig = out[int(i)]  # the object's own region (objects were added first)
        op = cv2.dilate if rng.random() < 0.5 else cv2.erode
        dup = op(orig.mask.astype(np.uint8), kernel).astype(bool)
        inter, union = (dup & orig.mask).sum(), (dup | orig.mask).sum()
        if 0.8 < inter / union < 1.0:
            add(dup, orig.predicted_iou - rng.uniform(0.005, 0.03), orig.stability_score - rng.uniform(0.0, 0.01), "duplicate")
    return [out[i] for i in rng.permutation(len(out))]


def demo_sa1b_image(seed: int, image_id: int) -> tuple[np.ndarray, list[DemoObject], list[Sa1bRegion]]:
    """The image, objects and regions of SA-1B demo image ``image_id``."""
    image, objects = demo_scene(seed, "sa1b", image_id)
    return image, objects, sa1b_regions(_rng(seed, "sa1b_regions", image_id), objects)


# ---------------------------------------------------------------- encodings


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: column-major run lengths, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def _bbox(mask: np.ndarray) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))]


def _point_in(mask: np.ndarray) -> list[float]:
    """The mask pixel nearest the mask's centroid, ``[x, y]``."""
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return [float(xs[i]), float(ys[i])]


def sa1b_json(image_id: int, width: int, height: int, regions: list[Sa1bRegion]) -> dict[str, Any]:
    """The published SA-1B per-image JSON of one image."""
    return {
        "image": {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"},
        "annotations": [
            {
                "id": image_id * 1000 + k,
                "segmentation": _rle(r.mask),
                "bbox": _bbox(r.mask),
                "area": int(r.mask.sum()),
                "predicted_iou": r.predicted_iou,
                "stability_score": r.stability_score,
                "crop_box": [int(v) for v in r.crop_box],
                "point_coords": [_point_in(r.mask)],
            }
            for k, r in enumerate(regions)
        ],
    }


def coco_annotations(objects: list[DemoObject], image_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """COCO instance annotations of one scene, in drawing order, crowd last.

    Unoccluded objects are written as their outline polygon (which decodes to
    exactly the drawn pixels); occluded ones alternate compressed and
    uncompressed RLE; the crowd cluster is one ``iscrowd: 1`` uncompressed RLE
    of its members' union, as COCO writes crowds.
    """
    anns: list[dict[str, Any]] = []
    n_occluded = 0

    def add(cat_id: int, mask: np.ndarray, segm: Any, iscrowd: int) -> None:
        anns.append({
            "id": first_ann_id + len(anns),
            "image_id": image_id,
            "category_id": cat_id,
            "segmentation": segm,
            "area": float(mask.sum()),
            "bbox": _bbox(mask),
            "iscrowd": iscrowd,
        })

    for o in objects:
        if o.crowd:
            continue
        if not o.occluded:
            segm: Any = [list(o.polygon)]
        elif n_occluded % 2 == 0:
            segm = _rle(o.mask)
        else:
            segm = {"size": list(o.mask.shape), "counts": mask_runs(o.mask)}
        n_occluded += o.occluded
        add(o.category_id, o.mask, segm, 0)
    crowd = [o for o in objects if o.crowd]
    if crowd:
        union = np.logical_or.reduce([o.mask for o in crowd])
        add(crowd[0].category_id, union, {"size": list(union.shape), "counts": mask_runs(union)}, 1)
    return anns


def _coco_file(images: list[dict[str, Any]], annotations: list[dict[str, Any]], description: str) -> dict[str, Any]:
    return {
        "info": {
            "description": description,
            "url": "",
            "version": "1.0",
            "year": 2024,
            "contributor": "orsgen demo (synthetic)",
            "date_created": "2024/01/01",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"supercategory": c.supercategory, "id": c.id, "name": c.name} for c in DEMO_CATEGORIES],
    }


def _image_entry(image_id: int, file_name: str, image: np.ndarray) -> dict[str, Any]:
    return {
        "id": image_id,
        "file_name": file_name,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "license": 1,
        "date_captured": "2024-01-01 00:00:00",
    }


# ---------------------------------------------------------------- sentences


def _colour_noun(o: DemoObject) -> str:
    cat = _BY_ID[o.category_id]
    return cat.noun if o.colour == cat.noun else f"{o.colour} {cat.noun}"


def _position(o: DemoObject, peers: list[DemoObject], margin_px: float = 15.0) -> tuple[str, str] | None:
    """Where ``o`` is among look-alike ``peers`` (itself included), if clearly so."""
    c = {id(p): _centre(p.mask) for p in peers}
    x, y = c[id(o)]
    others = [c[id(p)] for p in peers if p is not o]
    for axis, lo, hi in ((0, "left", "right"), (1, "top", "bottom")):
        v = (x, y)[axis]
        if all(v + margin_px < q[axis] for q in others):
            return lo, ("on the left" if lo == "left" else "at the top")
        if all(v - margin_px > q[axis] for q in others):
            return hi, ("on the right" if hi == "right" else "at the bottom")
    return None


def describe(objects: list[DemoObject]) -> dict[int, list[str]]:
    """Unambiguous referring sentences per object index (raw, human-style).

    The sentence names the category, then the colour when another object of
    the category exists, then the position among same-colour look-alikes.
    Objects that none of these singles out get no entry.
    """
    out: dict[int, list[str]] = {}
    crowd_cats = {o.category_id for o in objects if o.crowd}
    for i, o in enumerate(objects):
        if o.crowd or o.category_id in crowd_cats:
            continue
        noun = _BY_ID[o.category_id].noun
        same_cat = [p for p in objects if p.category_id == o.category_id]
        lookalikes = [p for p in same_cat if p.colour == o.colour]
        cn = _colour_noun(o)
        if len(same_cat) == 1:
            out[i] = [f"The {cn}", noun]
        elif len(lookalikes) == 1:
            out[i] = [f"the {cn}", f"{cn}"]
        else:
            pos = _position(o, lookalikes)
            if pos is not None:
                word, phrase = pos
                out[i] = [f"the {cn} {phrase}", f"{word} {cn}"]
    return out


def _sentence(raw: str, sent_id: int) -> dict[str, Any]:
    sent = re.sub(r"[^a-z0-9 ]", "", raw.lower()).strip()
    return {"raw": raw, "sent": sent, "sent_id": sent_id, "tokens": sent.split()}


_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def group_sentences(objects: list[DemoObject]) -> list[tuple[list[int], list[str]]]:
    """Multi-target sentences: ``(object indices, raw sentences)``.

    "all apples" for each category with several instances, "all red balls"
    when a colour picks out several of them, and "the X and the Y" for two
    single objects of different categories.
    """
    out: list[tuple[list[int], list[str]]] = []
    regular = [i for i, o in enumerate(objects) if not o.crowd]
    for cat in DEMO_CATEGORIES:
        idx = [i for i in regular if objects[i].category_id == cat.id]
        if len(idx) >= 2:
            out.append((idx, [f"all {cat.plural}", f"the {_COUNT_WORDS.get(len(idx), 'many')} {cat.plural}"]))
        for colour in sorted({objects[i].colour for i in idx}):
            sub = [i for i in idx if objects[i].colour == colour]
            if 2 <= len(sub) < len(idx):
                out.append((sub, [f"all {colour} {cat.plural}", f"the {colour} {cat.plural}"]))
    singles = [i for i in regular if sum(objects[j].category_id == objects[i].category_id for j in regular) == 1]
    if len(singles) >= 2:
        a, b = singles[:2]
        out.append(([a, b], [f"the {_colour_noun(objects[a])} and the {_colour_noun(objects[b])}"]))
    return out


# ---------------------------------------------------------------- writers


def _write(path: Path, data: bytes) -> None:
    """Writes to a temporary name, then renames, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg",
        cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_OPTIMIZE, 0, cv2.IMWRITE_JPEG_PROGRESSIVE, 0],
    )
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as JPEG.")
    return buf.tobytes()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar with fixed metadata (mtime 0, root owner), for byte-identical reruns."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_sa1b(out_dir: Path, seed: int, n_shards: int, images_per_shard: int) -> list[Path]:
    """Writes ``sa_000000.tar`` ... with ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs.

    Image ids run 1, 2, ... across shards, so they are unique.

    Returns:
        The shard paths.
    """
    shards = []
    for s in range(n_shards):
        members = []
        for k in range(images_per_shard):
            image_id = s * images_per_shard + k + 1
            image, _, regions = demo_sa1b_image(seed, image_id)
            h, w = image.shape[:2]
            members.append((f"sa_{image_id}.jpg", _jpeg(image)))
            members.append((f"sa_{image_id}.json", _json(sa1b_json(image_id, w, h, regions))))
        path = out_dir / f"sa_{s:06d}.tar"
        _write(path, _tar(members))
        shards.append(path)
    return shards


def write_coco(out_dir: Path, seed: int, n_images: int, *, dense: bool = False) -> Path:
    """Writes ``annotations/instances_demo.json`` and ``images/<id:012d>.jpg``.

    ``dense`` draws COCO-sized busy scenes (``make_scene``) instead of the
    small default ones.

    Returns:
        The annotations path.
    """
    images, anns = [], []
    for k in range(n_images):
        image_id = COCO_IMAGE_ID_BASE + k + 1
        image, objects = demo_scene(seed, "coco", image_id, dense=dense)
        file_name = f"{image_id:012d}.jpg"
        _write(out_dir / "images" / file_name, _jpeg(image))
        images.append(_image_entry(image_id, file_name, image))
        anns += coco_annotations(objects, image_id, len(anns) + 1)
    path = out_dir / "annotations" / "instances_demo.json"
    _write(path, _json(_coco_file(images, anns, "orsgen demo COCO-format instances")))
    return path


def write_refs(root: Path, seed: int, n_images: int) -> tuple[Path, Path]:
    """Writes RefCOCO (``refcoco/``) and gRefCOCO (``grefcoco/``) on shared images.

    RefCOCO gets one ref per object that ``describe`` singles out. gRefCOCO
    gets those as one-element ``ann_id`` lists, the multi-target refs of
    ``group_sentences``, and one no-target ref per image naming a category
    absent from it (``ann_id`` and ``category_id`` ``[-1]``,
    ``no_target: true``). Splits are per image, cycling train/val/testA/testB.

    Returns:
        The paths of ``refs(unc).p`` and ``grefs(unc).json``.
    """
    images, anns, refs, grefs = [], [], [], []
    sent_id = gsent_id = 0
    for k in range(n_images):
        image_id = REF_IMAGE_ID_BASE + k + 1
        image, objects = demo_scene(seed, "refcoco", image_id)
        rng = _rng(seed, "refs", image_id)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        _write(root / "refcoco" / "images" / file_name, _jpeg(image))
        images.append(_image_entry(image_id, file_name, image))
        image_anns = coco_annotations(objects, image_id, 10_001 + len(anns))
        anns += image_anns
        ann_of = {i: a["id"] for i, a in zip([i for i, o in enumerate(objects) if not o.crowd], image_anns)}
        split = REF_SPLITS[k % len(REF_SPLITS)]

        def ref_dict(ref_id: int, ann_id: Any, cat: Any, sents: list[dict[str, Any]], suffix: int) -> dict[str, Any]:
            return {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "category_id": cat,
                "image_id": image_id,
                "split": split,
                "sentences": sents,
                "sent_ids": [s["sent_id"] for s in sents],
                "file_name": f"COCO_train2014_{image_id:012d}_{suffix}.jpg",
            }

        for i, raws in describe(objects).items():
            a, c = ann_of[i], objects[i].category_id
            sents = [_sentence(r, sent_id + j) for j, r in enumerate(raws)]
            sent_id += len(sents)
            refs.append(ref_dict(len(refs), a, c, sents, a))
            gs = [_sentence(r, gsent_id + j) for j, r in enumerate(raws)]
            gsent_id += len(gs)
            grefs.append({**ref_dict(len(grefs), [a], [c], gs, a), "no_target": False})
        for idx, raws in group_sentences(objects):
            gs = [_sentence(r, gsent_id + j) for j, r in enumerate(raws)]
            gsent_id += len(gs)
            ids = [ann_of[i] for i in idx]
            grefs.append({**ref_dict(len(grefs), ids, [objects[i].category_id for i in idx], gs, ids[0]), "no_target": False})
        present = {o.category_id for o in objects}
        absent = [c for c in DEMO_CATEGORIES if c.id not in present]
        cat = absent[int(rng.integers(len(absent)))]
        colour = str(rng.choice(cat.colours))
        cn = cat.noun if colour == cat.noun else f"{colour} {cat.noun}"
        gs = [_sentence(r, gsent_id + j) for j, r in enumerate([f"the {cn}", f"{cat.noun} on the left"])]
        gsent_id += len(gs)
        grefs.append({**ref_dict(len(grefs), [-1], [-1], gs, 0), "no_target": True})

    instances = _json(_coco_file(images, anns, "orsgen demo RefCOCO-style instances"))
    _write(root / "refcoco" / "instances.json", instances)
    _write(root / "grefcoco" / "instances.json", instances)
    refs_path = root / "refcoco" / "refs(unc).p"
    _write(refs_path, pickle.dumps(refs, protocol=2))
    grefs_path = root / "grefcoco" / "grefs(unc).json"
    _write(grefs_path, _json(grefs))
    return refs_path, grefs_path


def demo_config(seed: int, shards: list[str]) -> dict[str, Any]:
    """The ``demo.yaml`` mapping; paths are relative to the demo root."""
    return {
        "name": "orsgen-demo",
        "seed": seed,
        "inputs": [
            {"name": "sa1b", "type": "sa1b", "shards": shards},
            {
                "name": "coco",
                "type": "coco",
                "annotations": "coco/annotations/instances_demo.json",
                "images": "coco/images",
            },
            {
                "name": "refcoco",
                "type": "refcoco",
                "refs": "refcoco/refs(unc).p",
                "instances": "refcoco/instances.json",
                "images": "refcoco/images",
                "dataset": "refcoco_unc",
            },
            {
                "name": "grefcoco",
                "type": "grefcoco",
                "refs": "grefcoco/grefs(unc).json",
                "instances": "grefcoco/instances.json",
                "images": "refcoco/images",
                "dataset": "grefcoco_unc",
            },
        ],
        "write": {"num_buckets": 2, "shard_max_images": 4},
    }


def generate_demo_inputs(
    root: Path,
    seed: int = 0,
    *,
    n_sa1b_shards: int = 2,
    sa1b_images_per_shard: int = 3,
    n_coco_images: int = 8,
    n_ref_images: int = 6,
    dense_coco: bool = False,
) -> Path:
    """Writes a small synthetic input set in the real source formats.

    Output is byte-identical for one seed and set of counts. Existing files of
    the same names under ``root`` are replaced; nothing else is touched.

    Args:
        root: output folder (created if missing).
        seed: seed of every drawing decision (>= 0).
        n_sa1b_shards: SA-1B tar shards to write (>= 1).
        sa1b_images_per_shard: images per SA-1B shard (>= 1).
        n_coco_images: COCO images (>= 1).
        n_ref_images: RefCOCO / gRefCOCO images (>= 1).
        dense_coco: draw the COCO images as COCO-sized busy scenes (about
            10-25 instances each; the throughput benchmark's input) instead
            of the small default scenes; the other sources are unchanged.

    Returns:
        The path of ``root/demo.yaml``, a config listing every input with
        paths relative to ``root``.

    Raises:
        ValueError: a negative seed or a count below 1.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    counts = {
        "n_sa1b_shards": n_sa1b_shards,
        "sa1b_images_per_shard": sa1b_images_per_shard,
        "n_coco_images": n_coco_images,
        "n_ref_images": n_ref_images,
    }
    bad = {k: v for k, v in counts.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"demo counts must be integers >= 1, got {bad}.")
    root = Path(root)
    shards = write_sa1b(root / "sa1b", seed, n_sa1b_shards, sa1b_images_per_shard)
    write_coco(root / "coco", seed, n_coco_images, dense=dense_coco)
    write_refs(root, seed, n_ref_images)
    config_path = root / "demo.yaml"
    config = demo_config(seed, [p.relative_to(root).as_posix() for p in shards])
    _write(config_path, yaml.safe_dump(config, sort_keys=False, default_flow_style=False).encode("utf-8"))
    return config_path
