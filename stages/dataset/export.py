"""Trainer-ready exports in each consumer's own conventions.

``orsgen export DIR --format F [--variant V] --out OUT`` reads the Parquet
output of a run and writes one of these (the repository, file and commit each
matches are named in the README, section *Exports for trainers*):

=====================  ==========================  ==========================================
format (variant)       layout                      one record per
=====================  ==========================  ==========================================
segzero (current)      ``save_to_disk`` DatasetDict  sample with targets: 840x840 image,
                                                   ``solution`` = JSON ``bbox_2d``/``point_2d``
segzero (v1)           Parquet                     single-target sample, ``<box>..<points>..``
visionreasoner         ``save_to_disk`` DatasetDict  as segzero current (no-target opt-in)
lens                   JSONL per split folder      sample with targets, union RLE
qwen (qwen3vl)         JSONL + images              sample, ``bbox_2d`` on 0-1000 (``round``)
qwen (qwen2.5vl)       JSONL + images              sample, ``bbox_2d`` in resized pixels
moondream              Parquet                     sample with targets: bbox-relative path
refcoco-m (hub)        Parquet, ``validation``       image, exactly the Hub card's features
refcoco-m (extended)   Parquet                     image, plus orsgen's link fields
=====================  ==========================  ==========================================

Box corners, points and rounding that differ from the dataset's stored
targets (Seg-Zero's inclusive box and border points, Qwen's ``round``,
Moondream's paths) are recomputed here from the masks, so the build output
stays as it is. Every function that builds records is pure (a row of
``EXAMPLE_SCHEMA`` in, records and skip reasons out); ``export_dataset``
streams rows through them and writes the result atomically: everything goes
to a hidden temporary folder that is renamed to ``OUT`` at the end, and an
existing ``OUT`` is never touched. A sample a format cannot express (a
no-target sample for Seg-Zero, say) is not dropped silently: it is counted
per reason in ``OUT/export_stats.json`` and in the command's summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from orsgen.stages.common.qwen_resize import smart_resize as _smart_resize
from orsgen.schemas.records import ExpressionKind, Rle
from orsgen.stages.common.masks import (
    empty_rle,
    interior_points,
    polygons_to_rle,
    rle_bbox_xywh,
    rle_difference,
    rle_union,
)
from orsgen.stages.dataset.read import check_split_name, iter_rows, resolve_splits

if TYPE_CHECKING:
    import datasets

FORMATS = ("segzero", "visionreasoner", "lens", "qwen", "moondream", "refcoco-m")

# Seg-Zero / VisionReasoner resize every image to this square and scale
# coordinates by SEGZERO_SIZE / W and SEGZERO_SIZE / H (their gen_training_dataset.py).
SEGZERO_SIZE = 840
# LENS' grounding datasets resize with qwen_vl_utils.smart_resize(h, w, 28, max_pixels=1_000_000).
LENS_FACTOR = 28
LENS_MIN_PIXELS = 4 * 28 * 28
LENS_MAX_PIXELS = 1_000_000
# Qwen3-VL grounding prompt, in the wording of the Qwen3-VL cookbooks.
QWEN_PROMPT = 'Locate every object that matches the description "{expression}" in the image. Report bbox coordinates in JSON format.'
JPEG_QUALITY = 95
# Parquet exports roll over to a new file past this many bytes of images.
SHARD_MAX_BYTES = 500 * 1024 * 1024
# Small row groups keep the Hub's dataset viewer under its scan limits.
ROW_GROUP_ROWS = 100


class ExportError(ValueError):
    """The export cannot be written as asked."""


# ------------------------------------------------------------------ coordinates


def scale_coord(v: float, src_size: int, dst_size: int = SEGZERO_SIZE) -> int:
    """Scales a pixel coordinate to a resized image, Seg-Zero's way.

    ``int(v * dst_size / src_size + 0.5)``: rounding half up, as Seg-Zero's
    ``scale_box_coordinates`` does.
    """
    return int(v * (dst_size / src_size) + 0.5)


def scale_box(box: Sequence[float], width: int, height: int, size: int = SEGZERO_SIZE) -> list[int]:
    """``[x0, y0, x1, y1]`` pixels -> the same box on a ``size`` x ``size`` image."""
    return [
        scale_coord(box[0], width, size),
        scale_coord(box[1], height, size),
        scale_coord(box[2], width, size),
        scale_coord(box[3], height, size),
    ]


def scale_point(p: Sequence[float], width: int, height: int, size: int = SEGZERO_SIZE) -> list[int]:
    """``(x, y)`` pixels -> the same point on a ``size`` x ``size`` image."""
    return [scale_coord(p[0], width, size), scale_coord(p[1], height, size)]


def smart_resize(
    height: int,
    width: int,
    factor: int = LENS_FACTOR,
    min_pixels: int = LENS_MIN_PIXELS,
    max_pixels: int = LENS_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule (``qwen_vl_utils.smart_resize``), used by LENS.

    Both sides become multiples of ``factor``, the pixel count lands in
    ``[min_pixels, max_pixels]`` and the aspect ratio is kept as closely as
    possible. ``tests/test_export.py`` checks it against transformers' copy.

    Returns:
        ``(resized_height, resized_width)``.

    Raises:
        ExportError: the aspect ratio is above 200 (Qwen refuses those).
    """
    try:
        return _smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError as err:
        raise ExportError(str(err)) from None


def lens_solutions(box: Sequence[float], width: int, height: int) -> dict[str, list[int]]:
    """LENS' two box conventions, computed as its dataset code does (``round``, no clamping).

    Returns:
        ``{"qwen2vl": 0..1000 box, "qwen2p5vl": box in smart-resized pixels}``.
    """
    rh, rw = smart_resize(height, width)
    x0, y0, x1, y1 = box
    return {
        "qwen2vl": [round(x0 / width * 1000), round(y0 / height * 1000), round(x1 / width * 1000), round(y1 / height * 1000)],
        "qwen2p5vl": [round(x0 / width * rw), round(y0 / height * rh), round(x1 / width * rw), round(y1 / height * rh)],
    }


# Qwen2.5-VL's processor defaults, as Qwen's tools/process_bbox.ipynb uses them
# for ``convert_to_qwen25vl_format``.
QWEN25_FACTOR = 28
QWEN25_MIN_PIXELS = 56 * 56
QWEN25_MAX_PIXELS = 14 * 14 * 4 * 1280


def qwen3vl_box(box: Sequence[float], width: int, height: int) -> list[int]:
    """A pixel box on Qwen3-VL's (and Qwen2-VL's) 0-1000 grid, as Qwen's ``convert_to_qwen2vl_format``.

    ``round(x / W * 1000)`` with Python's ``round`` (a half goes to the even
    neighbour: 62.5 -> 62), clamped to [0, 1000]. The dataset's stored
    ``qwen_box`` rounds halves up; the export recomputes from ``bbox_xyxy``.
    """
    x0, y0, x1, y1 = box
    return [min(1000, max(0, round(v / size * 1000))) for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))]


def qwen25vl_box(box: Sequence[float], width: int, height: int) -> tuple[list[int], tuple[int, int]]:
    """A pixel box in Qwen2.5-VL's absolute coordinates, as Qwen's ``convert_to_qwen25vl_format``.

    The image is ``smart_resize``d (factor 28, 56*56 to 14*14*4*1280 pixels);
    each coordinate becomes ``round(x * new_w / W)`` clamped to
    ``[0, new_w - 1]`` (``[0, new_h - 1]`` for y).

    Returns:
        ``(box, (resized_height, resized_width))``.
    """
    try:
        rh, rw = _smart_resize(height, width, QWEN25_FACTOR, QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS)
    except ValueError as err:
        raise ExportError(str(err)) from None
    x0, y0, x1, y1 = box
    out = [
        min(n - 1, max(0, round(v * n / size)))
        for v, n, size in ((x0, rw, width), (y0, rh, height), (x1, rw, width), (y1, rh, height))
    ]
    return out, (rh, rw)


def segzero_box(rle: Rle) -> list[int]:
    """Seg-Zero's box of a mask: ``[left, top, right, bottom]`` of its first/last pixels (inclusive).

    Seg-Zero's data preparation takes ``np.where(mask)`` minima and maxima, so
    the max corner is the last mask pixel: COCO's ``x + w`` minus one.
    """
    x, y, w, h = (int(v) for v in rle_bbox_xywh(rle))
    return [x, y, x + w - 1, y + h - 1]


def segzero_solution(box: Sequence[int], p1: Sequence[int], p2: Sequence[int]) -> str:
    """Seg-Zero's ground-truth string (parsed by its reward functions' regexes)."""
    return f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box><points>({p1[0]},{p1[1]}),({p2[0]},{p2[1]})</points>"


SEGZERO_BOX_RE = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")
SEGZERO_POINTS_RE = re.compile(r"<points>\((\d+),(\d+)\),\((\d+),(\d+)\)</points>")


def parse_segzero_solution(solution: str) -> tuple[list[int], list[int], list[int]]:
    """Inverse of ``segzero_solution``, with Seg-Zero's own regexes.

    Raises:
        ExportError: the string is not in Seg-Zero's syntax.
    """
    b = SEGZERO_BOX_RE.search(solution)
    p = SEGZERO_POINTS_RE.search(solution)
    if not b or not p:
        raise ExportError(f"not a Seg-Zero solution string: {solution!r}")
    box = [int(v) for v in b.groups()]
    pts = [int(v) for v in p.groups()]
    return box, pts[:2], pts[2:]


# ------------------------------------------------------------------ SVG paths

# Moondream's segmentation paths live in a 960 x 960 viewbox spanning the
# object's box (kestrel's ``utils/svg.py``): coordinates are ``u / 960`` with
# u an integer, written with 3 decimals and no trailing zeros.
MOONDREAM_GRID = 960
# Simplification tolerances tried in turn (pixels); the first whose path
# rasterises back to MOONDREAM_MIN_IOU of the mask is kept, 0 keeps every
# pixel corner.
MOONDREAM_TOLERANCES_PX = (1.0, 0.5, 0.0)
MOONDREAM_MIN_IOU = 0.95


def _format_unit(u: int) -> str:
    return f"{u / MOONDREAM_GRID:.3f}".rstrip("0").rstrip(".") or "0"


def _quantised_rings(geom: Any, box: Sequence[int]) -> list[list[tuple[int, int]]]:
    from shapely.geometry.polygon import orient

    x0, y0, bw, bh = box
    rings: list[list[tuple[int, int]]] = []
    polys = [geom] if geom.geom_type == "Polygon" else list(getattr(geom, "geoms", []))
    for poly in polys:
        if poly.geom_type != "Polygon" or poly.is_empty:
            continue
        # Exterior and holes wind in opposite directions, so SVG's default
        # nonzero fill (Moondream renders with it) and evenodd agree.
        poly = orient(poly, 1.0)
        for ring in [poly.exterior, *poly.interiors]:
            pts: list[tuple[int, int]] = []
            for x, y in np.asarray(ring.coords)[:-1]:
                q = (int(round((x - x0) / bw * MOONDREAM_GRID)), int(round((y - y0) / bh * MOONDREAM_GRID)))
                if not pts or pts[-1] != q:
                    pts.append(q)
            if len(pts) > 1 and pts[0] == pts[-1]:
                pts.pop()
            if len(set(pts)) >= 3:
                rings.append(pts)
    return rings


def _rings_to_path(rings: Sequence[Sequence[tuple[int, int]]]) -> str:
    parts = []
    for ring in rings:
        cmds = [f"{'M' if i == 0 else 'L'} {_format_unit(u)} {_format_unit(v)}" for i, (u, v) in enumerate(ring)]
        parts.append(" ".join(cmds) + " Z")
    return " ".join(parts)


def coverage_rle(rings_px: Sequence[np.ndarray], size: tuple[int, int], scale: int = 4) -> Rle:
    """Rasterises rings (``(n, 2)`` image-pixel arrays) the way Moondream does.

    Moondream renders a path with librsvg and keeps every pixel of alpha > 0,
    i.e. every pixel the fill touches. Emulated here by filling on a
    ``scale`` x finer grid over the rings' box and keeping a pixel when any
    of its sub-pixels is set.
    """
    h, w = size
    rings = [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings_px if len(r) >= 3]
    if not rings:
        return empty_rle(h, w)
    allp = np.concatenate(rings)
    bx0 = max(int(np.floor(allp[:, 0].min())) - 1, 0)
    by0 = max(int(np.floor(allp[:, 1].min())) - 1, 0)
    bx1 = min(int(np.ceil(allp[:, 0].max())) + 1, w)
    by1 = min(int(np.ceil(allp[:, 1].max())) + 1, h)
    if bx0 >= bx1 or by0 >= by1:
        return empty_rle(h, w)
    fh, fw = (by1 - by0) * scale, (bx1 - bx0) * scale
    # cv2 fills every sub-pixel whose centre lies within half a sub-pixel of
    # the span, both ends included, so an edge exactly on a pixel boundary
    # would spill into the next pixel. Filling twice, shifted by +-1/256 of a
    # sub-pixel, and keeping the intersection removes exactly those ties.
    # Rings combine by cv2's even-odd scanline fill, which equals nonzero for
    # orsgen's oriented, non-overlapping rings.
    canvas = np.ones((fh, fw), np.uint8)
    for shift in (-0.5 + 1 / 256, -0.5 - 1 / 256):
        c = np.zeros((fh, fw), np.uint8)
        pts = [np.round(((r - [bx0, by0]) * scale + shift) * 256).astype(np.int32) for r in rings]
        cv2.fillPoly(c, pts, 1, lineType=cv2.LINE_8, shift=8)
        canvas &= c
    cov = canvas.reshape(by1 - by0, scale, bx1 - bx0, scale).max(axis=(1, 3))
    full = np.zeros((h, w), np.uint8)
    full[by0:by1, bx0:bx1] = cov
    return Rle.from_coco(mask_utils.encode(np.asfortranarray(full)))


def _rings_px(rings: Sequence[Sequence[tuple[int, int]]], box: Sequence[int]) -> list[np.ndarray]:
    x0, y0, bw, bh = box
    return [np.array([[x0 + u / MOONDREAM_GRID * bw, y0 + v / MOONDREAM_GRID * bh] for u, v in r]) for r in rings]


def moondream_target(union: Rle) -> tuple[str, dict[str, float], float]:
    """Moondream's ``path`` and ``bbox`` of a mask, and the path's fidelity.

    The box is the mask's pixel box normalised to the image (``x_max`` is the
    exclusive edge ``(x + w) / W``); the path's coordinates are relative to
    that box (0 = its left/top edge, 1 = its right/bottom edge), quantised to
    Moondream's 960-unit grid. Moondream rasterises with librsvg and keeps
    every pixel of alpha > 0, which grows a shape by every pixel its edge
    touches; so the path traces the mask's pixel outline inset by half a pixel
    (plus half a grid step of quantisation), and each boundary pixel is still
    covered while no background pixel is touched. It is simplified with the
    largest of ``MOONDREAM_TOLERANCES_PX`` that keeps ``MOONDREAM_MIN_IOU``.

    Returns:
        ``(path, bbox, iou)``: ``iou`` is the path rasterised back the way
        Moondream does (every touched pixel) against the mask.

    Raises:
        ExportError: the mask is empty.
    """
    from orsgen.stages.common.masks import rle_area, rle_iou, rle_to_geometry

    if rle_area(union) == 0:
        raise ExportError("an empty mask has no Moondream path.")
    h, w = union.size
    box = tuple(int(v) for v in rle_bbox_xywh(union))
    x0, y0, bw, bh = box
    bbox = {"x_min": x0 / w, "y_min": y0 / h, "x_max": (x0 + bw) / w, "y_max": (y0 + bh) / h}
    inset = 0.5 + 0.5 * max(bw, bh) / MOONDREAM_GRID
    best: tuple[str, float] = ("", -1.0)
    for tol in MOONDREAM_TOLERANCES_PX:
        geom = rle_to_geometry(union, tol)
        shrunk = geom.buffer(-inset, join_style="mitre")
        rings = _quantised_rings(shrunk if not shrunk.is_empty else geom, box)
        if not rings:
            continue
        iou = rle_iou(coverage_rle(_rings_px(rings, box), (h, w)), union)
        if iou > best[1]:
            best = (_rings_to_path(rings), iou)
        if iou >= MOONDREAM_MIN_IOU:
            break
    if not best[0]:
        # A mask too thin for any ring (a 1-pixel line): its pixel box.
        full_box = [[(0, 0), (MOONDREAM_GRID, 0), (MOONDREAM_GRID, MOONDREAM_GRID), (0, MOONDREAM_GRID)]]
        best = (_rings_to_path(full_box), rle_iou(coverage_rle(_rings_px(full_box, box), (h, w)), union))
    return best[0], bbox, best[1]


_SVG_TOKEN_RE = re.compile(r"[MLZ]|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def svg_path_to_rle(path: str, height: int, width: int, bbox: dict[str, float] | None = None) -> Rle:
    """Rasterises an SVG path (``M x y L x y ... Z``) to an RLE.

    With ``bbox`` (Moondream's ``{x_min, y_min, x_max, y_max}``, 0..1) the
    coordinates are relative to that box, as ``moondream_target`` writes them
    and Moondream reads them; without it they are normalised to the image
    (0..1), as the dataset's ``union_svg``. Every sub-path is a ring. With
    ``bbox`` the rings are rasterised as Moondream does (``coverage_rle``:
    every touched pixel, nonzero rule); without it they combine with the
    ``evenodd`` rule (XOR in RLE space) and pycocotools' polygon fill.

    Raises:
        ExportError: the path uses commands other than M, L and Z.
    """
    if bbox is None:
        ox, oy, sx, sy = 0.0, 0.0, float(width), float(height)
    else:
        ox, oy = bbox["x_min"] * width, bbox["y_min"] * height
        sx, sy = (bbox["x_max"] - bbox["x_min"]) * width, (bbox["y_max"] - bbox["y_min"]) * height
    rings: list[list[float]] = []
    cur: list[float] = []
    tokens = _SVG_TOKEN_RE.findall(path)
    if "".join(tokens).replace(" ", "") != re.sub(r"[\s,]+", "", path):
        raise ExportError(f"SVG path holds commands other than M, L, Z: {path[:80]!r}")
    nums: list[float] = []
    for tok in tokens + ["M"]:
        if tok in ("M", "L", "Z"):
            if len(nums) % 2:
                raise ExportError("SVG path has an odd number of coordinates.")
            for i in range(0, len(nums), 2):
                cur += [ox + nums[i] * sx, oy + nums[i + 1] * sy]
            nums = []
            if tok in ("M", "Z") and cur:
                rings.append(cur)
                cur = []
        else:
            nums.append(float(tok))
    if bbox is not None:
        return coverage_rle([np.asarray(r).reshape(-1, 2) for r in rings if len(r) >= 6], (height, width))
    out = empty_rle(height, width)
    for ring in rings:
        if len(ring) < 6:
            continue
        r = polygons_to_rle([ring], height, width)
        inter = Rle.from_coco(mask_utils.merge([out.to_coco(), r.to_coco()], intersect=True))
        out = rle_difference(rle_union([out, r]), inter)
    return out


# ------------------------------------------------------------------ images


def _image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def resize_image(data: bytes, size: tuple[int, int], quality: int = JPEG_QUALITY) -> bytes:
    """Decodes, resizes (``cv2.INTER_AREA``, as Seg-Zero) and re-encodes as JPEG.

    EXIF orientation is ignored, so pixels stay where the masks say they are.

    Args:
        data: encoded image bytes.
        size: ``(width, height)`` of the result.
        quality: JPEG quality.

    Raises:
        ExportError: the bytes do not decode.
    """
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:
        raise ExportError("an image of the dataset does not decode; rebuild it with image.verify: full.")
    out = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - encoding a valid array does not fail
        raise ExportError("JPEG encoding failed.")
    return buf.tobytes()


# ------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """How a format is written, beyond its name.

    Attributes:
        variant: the consumer version (``VARIANTS``): ``segzero``: ``current``
            (Seg-Zero main: ``save_to_disk`` DatasetDict, JSON list of
            ``bbox_2d`` / ``point_2d``) or ``v1`` (the first release: Parquet,
            ``<box>..</box><points>..</points>``, one target); ``qwen``:
            ``qwen3vl`` (0-1000 grid) or ``qwen2.5vl`` (absolute pixels on the
            ``smart_resize``d image); ``refcoco-m``: ``hub`` (exactly
            ``moondream/refcoco-m``'s features and ``validation`` split) or
            ``extended`` (orsgen's link fields, no-target entries, orsgen's
            split names).
        keep_no_target: ``visionreasoner`` only: write no-target samples with
            ``solution = "[]"`` (VisionReasoner's reward cannot score them).
    """

    variant: str = ""
    keep_no_target: bool = False


VARIANTS: dict[str, tuple[str, ...]] = {
    "segzero": ("current", "v1"),
    "qwen": ("qwen3vl", "qwen2.5vl"),
    "refcoco-m": ("hub", "extended"),
}


def resolve_options(fmt: str, variant: str | None = None, keep_no_target: bool = False) -> ExportOptions:
    """Checks a format's options and fills in its default variant.

    Raises:
        ExportError: the variant does not exist for the format, or
            ``keep_no_target`` is given to a format other than visionreasoner.
    """
    choices = VARIANTS.get(fmt, ())
    if variant is None:
        variant = choices[0] if choices else ""
    elif variant not in choices:
        have = f"one of {', '.join(choices)}" if choices else "none (it has one layout)"
        raise ExportError(f"format {fmt!r} has no variant {variant!r}; its variants are {have}.")
    if keep_no_target and fmt != "visionreasoner":
        raise ExportError("--keep-no-target only applies to --format visionreasoner (the others skip or keep no-target samples by their own rules).")
    return ExportOptions(variant=variant, keep_no_target=keep_no_target)


@dataclass(slots=True)
class ImageContext:
    """What the record builders of one image share.

    Attributes:
        row: the ``EXAMPLE_SCHEMA`` row (image bytes included when the format
            needs them).
        split: the split.
        image_path: where a JSONL format stored the image, relative to OUT.
        resized: the 840x840 JPEG (Seg-Zero family), built once per image.
        options: the export's options.
    """

    row: dict[str, Any]
    split: str
    image_path: str = ""
    resized: bytes = b""
    options: ExportOptions = field(default_factory=ExportOptions)
    _instances: dict[str, dict[str, Any]] | None = None
    _segzero: dict[str, tuple[list[int], tuple[int, int], tuple[int, int]]] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.row["width"])

    @property
    def height(self) -> int:
        return int(self.row["height"])

    def instance(self, instance_id: str) -> dict[str, Any]:
        """The row's instance by id (the per-target masks)."""
        if self._instances is None:
            self._instances = {i["instance_id"]: i for i in self.row.get("instances") or ()}
        try:
            return self._instances[instance_id]
        except KeyError:
            raise ExportError(f"sample target {instance_id} is not an instance of image {self.row['image_id']}.") from None

    def segzero_geometry(self, instance_id: str) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
        """Seg-Zero's inclusive box and two points of a target, from its mask (cached per image)."""
        if instance_id not in self._segzero:
            rle = Rle.from_coco(self.instance(instance_id)["rle"])
            p1, p2 = interior_points(rle, rule="segzero")
            self._segzero[instance_id] = (segzero_box(rle), p1, p2)
        return self._segzero[instance_id]

    def image_struct(self, data: bytes) -> dict[str, Any]:
        """A ``datasets.Image`` value: bytes plus a file name for the extension."""
        return {"bytes": data, "path": f"{self.row['key']}.{_image_ext(data)}"}


class Skip(Exception):
    """A sample this format cannot express; ``reason`` is counted, never hidden."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _targets(sample: dict[str, Any]) -> list[dict[str, Any]]:
    targets = sample.get("targets") or []
    if sample["kind"] != ExpressionKind.NO_TARGET and sample.get("target_ids") and not targets:
        raise Skip("missing_trainer_targets")
    return targets


def _union_box(targets: Sequence[dict[str, Any]]) -> list[float]:
    boxes = np.asarray([t["bbox_xyxy"] for t in targets], dtype=np.float64)
    return [float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())]


def _segzero_row(ctx: ImageContext, s: dict[str, Any], solution: str) -> dict[str, Any]:
    return {
        "id": s["sample_id"],
        "problem": s["expression"],
        "solution": solution,
        "image": ctx.image_struct(ctx.resized),
        "img_height": ctx.height,
        "img_width": ctx.width,
    }


def segzero_objects(ctx: ImageContext, targets: Sequence[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """``[{"bbox_2d": [..], "point_2d": [..]}, ...]`` on the 840 grid, Seg-Zero's way.

    Box: first and last mask pixel (inclusive); point: the first of Seg-Zero's
    two representative points; both scaled with ``int(v * 840 / W + 0.5)``.
    """
    w, h = ctx.width, ctx.height
    out = []
    for t in targets:
        box, p1, _ = ctx.segzero_geometry(t["instance_id"])
        out.append({"bbox_2d": scale_box(box, w, h), "point_2d": scale_point(p1, w, h)})
    return out


def segzero_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One Seg-Zero row.

    ``current``: every target as ``{bbox_2d, point_2d}`` (``json.dumps``
    defaults), no-target samples skipped (Seg-Zero's data never holds one).
    ``v1``: single-target samples only, ``<box>(x1,y1),(x2,y2)</box><points>(x,y),(x,y)</points>``.
    """
    targets = _targets(s)
    if not targets:
        raise Skip("no_target")
    if ctx.options.variant == "v1":
        if len(targets) > 1:
            raise Skip("multi_target")
        w, h = ctx.width, ctx.height
        box, p1, p2 = ctx.segzero_geometry(targets[0]["instance_id"])
        return _segzero_row(ctx, s, segzero_solution(scale_box(box, w, h), scale_point(p1, w, h), scale_point(p2, w, h)))
    return _segzero_row(ctx, s, json.dumps(segzero_objects(ctx, targets)))


def visionreasoner_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One VisionReasoner row: every target as ``{bbox_2d, point_2d}``.

    No-target samples are skipped unless ``keep_no_target`` (then ``[]``):
    VisionReasoner's reward splits the boxes of an empty list, the error is
    swallowed and the accuracy term is 0 for any answer, so ``[]`` scores 2.0
    and an invented box 4.0.
    """
    targets = _targets(s)
    if not targets and not ctx.options.keep_no_target:
        raise Skip("no_target")
    # json.dumps defaults, as VisionReasoner's gen_training_dataset.py writes it.
    return _segzero_row(ctx, s, json.dumps(segzero_objects(ctx, targets)))


def lens_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One LENS grounding line (its ``GSTrainDataset`` JSONL) for a sample with targets.

    ``segmentation`` holds one RLE, the union of the targets: LENS sums the
    RLEs of a list without ``> 0``, so overlapping targets would reach its SAM
    loss as values 2 and 3. The per-target RLEs follow in
    ``target_segmentations``, which LENS does not read.
    """
    targets = _targets(s)
    if not targets:
        raise Skip("no_target")
    if not s.get("union_rle"):
        raise ExportError(f"sample {s['sample_id']} has targets but no union mask; rebuild the dataset.")
    w, h = ctx.width, ctx.height
    box = _union_box(targets)
    rh, rw = smart_resize(h, w)
    sol = lens_solutions(box, w, h)
    union = s["union_rle"]
    return {
        "sample_id": s["sample_id"],
        "image_path": ctx.image_path,
        "caption": s["expression"],
        "box": box,
        "segmentation": [{"counts": union["counts"], "size": [int(v) for v in union["size"]]}],
        "target_segmentations": [ctx.instance(t["instance_id"])["rle"] for t in targets],
        "solution_qwen2vl": sol["qwen2vl"],
        "solution_qwen2p5vl": sol["qwen2p5vl"],
        "resized_height": rh,
        "resized_width": rw,
        "width": w,
        "height": h,
        "kind": s["kind"],
    }


def qwen_answer(ctx: ImageContext, s: dict[str, Any]) -> str:
    """The assistant turn: a JSON list of ``{"bbox_2d": [..], "label": expression}`` in the variant's coordinates."""
    w, h = ctx.width, ctx.height
    objs = []
    for t in _targets(s):
        box = qwen25vl_box(t["bbox_xyxy"], w, h)[0] if ctx.options.variant == "qwen2.5vl" else qwen3vl_box(t["bbox_xyxy"], w, h)
        objs.append({"bbox_2d": box, "label": s["expression"]})
    return json.dumps(objs, ensure_ascii=False)


def qwen_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One Qwen-VL fine-tuning line (``image`` + ``conversations``); ``[]`` answers no target."""
    rec = {
        "id": s["sample_id"],
        "image": ctx.image_path,
        "conversations": [
            {"from": "human", "value": "<image>\n" + QWEN_PROMPT.format(expression=s["expression"])},
            {"from": "gpt", "value": qwen_answer(ctx, s)},
        ],
        "kind": s["kind"],
        "width": ctx.width,
        "height": ctx.height,
        "masks": [ctx.instance(t["instance_id"])["rle"] for t in _targets(s)],
    }
    if ctx.options.variant == "qwen2.5vl":
        _, (rh, rw) = qwen25vl_box((0, 0, 0, 0), ctx.width, ctx.height)
        rec["resized_height"], rec["resized_width"] = rh, rw
    return rec


def moondream_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One Moondream segmentation row: ``path`` relative to ``bbox`` (0..1 of the image).

    ``path_iou`` is the path rasterised back as Moondream does against the
    union mask (its fidelity; see ``moondream_target``).
    """
    targets = _targets(s)
    if not targets:
        raise Skip("no_target")
    if not s.get("union_rle"):
        raise ExportError(f"sample {s['sample_id']} has targets but no union mask; rebuild the dataset.")
    path, bbox, iou = moondream_target(Rle.from_coco(s["union_rle"]))
    return {
        "id": s["sample_id"],
        "image": ctx.image_struct(ctx.row["image"]),
        "object": s["expression"],
        "path": path,
        "bbox": bbox,
        "path_iou": round(iou, 6),
        "width": ctx.width,
        "height": ctx.height,
        "kind": s["kind"],
    }


def _stable_int(text: str) -> int:
    # RefCOCO-M ids are int64; a 63-bit hash of orsgen's string id is stable
    # across runs and machines (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def numeric_image_id(image_id: str) -> int:
    """RefCOCO-M's int ``image_id``: the source's own number (``coco:391895`` -> 391895), else a stable hash."""
    tail = image_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else _stable_int(image_id)


REFCOCOM_SAMPLE_FIELDS = ("id", "image_id", "category", "supercategory", "label", "sentences", "bbox", "mask")


def refcocom_record(ctx: ImageContext, skipped: Counter[str]) -> dict[str, Any] | None:
    """One RefCOCO-M row (one image): samples grouped by (kind, target set).

    RefCOCO-M's ``samples`` are referred objects, each with all its sentences;
    orsgen's expressions on the same targets and of the same kind become the
    ``sentences`` of one entry, whose ``mask`` is the union of the targets and
    ``bbox`` its COCO ``[x, y, w, h]``. ``label`` is the kind's category text
    (the category names of the targets, "" for class-agnostic regions).

    The ``hub`` variant keeps exactly RefCOCO-M's fields and leaves
    no-target samples out (counted in ``skipped``; RefCOCO-M has none); the
    ``extended`` one adds ``kind``, ``sample_ids``, ``target_ids`` per entry
    and ``key``, ``orsgen_image_id``, ``split``, ``width``, ``height`` per row.

    Returns:
        The row, or None when no entry is left.
    """
    row = ctx.row
    hub = ctx.options.variant != "extended"
    img_num = numeric_image_id(row["image_id"])
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for s in row.get("samples") or ():
        if hub and not s["target_ids"]:
            skipped["no_target"] += 1
            continue
        groups.setdefault((s["kind"], tuple(s["target_ids"])), []).append(s)
    samples = []
    for (kind, target_ids), members in sorted(groups.items()):
        members = sorted(members, key=lambda m: m["sample_id"])
        first = members[0]
        union = first.get("union_rle")
        if union is None:
            union = empty_rle(ctx.height, ctx.width).to_json() if not target_ids else None
        if union is None:
            raise ExportError(f"sample {first['sample_id']} has targets but no union mask; rebuild the dataset.")
        insts = [ctx.instance(t) for t in target_ids]
        cats = sorted({i["category_name"] for i in insts if i.get("category_name")})
        supers = sorted({i["supercategory"] for i in insts if i.get("supercategory")})
        box = list(rle_bbox_xywh(Rle.from_coco(union))) if target_ids else [0.0, 0.0, 0.0, 0.0]
        entry = {
            "id": _stable_int("|".join([row["image_id"], kind, *target_ids])),
            "image_id": img_num,
            "category": ", ".join(cats),
            "supercategory": ", ".join(supers),
            "label": ", ".join(cats),
            "sentences": [m["expression"] for m in members],
            "bbox": box,
            "mask": {"counts": union["counts"], "size": [int(v) for v in union["size"]]},
        }
        if not hub:
            entry.update(kind=kind, sample_ids=[m["sample_id"] for m in members], target_ids=list(target_ids))
        samples.append(entry)
    if not samples:
        return None
    out = {
        "image": ctx.image_struct(row["image"]),
        "image_id": img_num,
        "file_name": row.get("file_name") or "",
        "samples": samples,
    }
    if not hub:
        out.update(key=row["key"], orsgen_image_id=row["image_id"], split=ctx.split, width=ctx.width, height=ctx.height)
    return out


# ------------------------------------------------------------------ features


def refcocom_hub_features() -> "datasets.Features":
    """``moondream/refcoco-m``'s ``dataset_info.features``, field for field and in order."""
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


def features_of(fmt: str, variant: str | None = None) -> "datasets.Features":
    """HF ``datasets`` features of a Parquet / Arrow export format.

    Written into the Parquet schema metadata, so ``load_dataset`` decodes the
    ``image`` column as ``Image`` and keeps every nested type.
    """
    import datasets
    from datasets import List, Value

    if fmt in ("segzero", "visionreasoner"):
        return datasets.Features(
            {
                "id": Value("string"),
                "problem": Value("string"),
                "solution": Value("string"),
                "image": datasets.Image(),
                "img_height": Value("int64"),
                "img_width": Value("int64"),
            }
        )
    if fmt == "moondream":
        return datasets.Features(
            {
                "id": Value("string"),
                "image": datasets.Image(),
                "object": Value("string"),
                "path": Value("string"),
                "bbox": {k: Value("float64") for k in ("x_min", "y_min", "x_max", "y_max")},
                "path_iou": Value("float64"),
                "width": Value("int64"),
                "height": Value("int64"),
                "kind": Value("string"),
            }
        )
    if fmt == "refcoco-m":
        hub = refcocom_hub_features()
        if variant != "extended":
            return hub
        sample = dict(hub["samples"].feature)
        sample.update(kind=Value("string"), sample_ids=List(Value("string")), target_ids=List(Value("string")))
        return datasets.Features(
            {
                **{k: v for k, v in hub.items() if k != "samples"},
                "samples": List(sample),
                "key": Value("string"),
                "orsgen_image_id": Value("string"),
                "split": Value("string"),
                "width": Value("int64"),
                "height": Value("int64"),
            }
        )
    raise ExportError(f"format {fmt!r} is not a Parquet format.")


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """How one format is built and stored."""

    name: str
    container: str  # "parquet", "disk" (save_to_disk DatasetDict) or "jsonl"
    per: str  # "sample" or "image"
    build: Callable[..., Any]
    needs_resized: bool = False
    stores_images: bool = False  # JSONL formats write images/<split>/<key>.<ext>


SPECS: dict[str, FormatSpec] = {
    "segzero": FormatSpec("segzero", "disk", "sample", segzero_record, needs_resized=True),
    "visionreasoner": FormatSpec("visionreasoner", "disk", "sample", visionreasoner_record, needs_resized=True),
    "lens": FormatSpec("lens", "jsonl", "sample", lens_record, stores_images=True),
    "qwen": FormatSpec("qwen", "jsonl", "sample", qwen_record, stores_images=True),
    "moondream": FormatSpec("moondream", "parquet", "sample", moondream_record),
    "refcoco-m": FormatSpec("refcoco-m", "parquet", "image", refcocom_record),
}


def container_of(spec: FormatSpec, options: ExportOptions) -> str:
    """Where a format's records go: Seg-Zero v1 is Parquet, the rest as ``spec.container``."""
    if spec.name == "segzero" and options.variant == "v1":
        return "parquet"
    return spec.container


def records_for_image(spec: FormatSpec, ctx: ImageContext) -> tuple[list[dict[str, Any]], Counter[str]]:
    """All records of one image in one format, and the skipped samples per reason.

    Samples are taken in ``sample_id`` order, so exports are deterministic.
    """
    skipped: Counter[str] = Counter()
    if spec.per == "image":
        if not ctx.row.get("samples"):
            return [], skipped
        rec = spec.build(ctx, skipped)
        return ([rec] if rec is not None else []), skipped
    out = []
    for s in sorted(ctx.row.get("samples") or (), key=lambda s: s["sample_id"]):
        try:
            out.append(spec.build(ctx, s))
        except Skip as skip:
            skipped[skip.reason] += 1
    return out, skipped


# ------------------------------------------------------------------ writing


@dataclass
class SplitStats:
    """What one split of an export holds."""

    images: int = 0
    samples_in: int = 0
    records: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "samples_in": self.samples_in,
            "records": self.records,
            "skipped": dict(sorted(self.skipped.items())),
            "files": self.files,
        }


class _ParquetSink:
    """Streams records into ``<folder>/<name>-NNNNN-of-MMMMM.parquet`` files."""

    def __init__(self, tmp: Path, name: str, features: "datasets.Features", max_bytes: int, folder: str = "data") -> None:
        self.tmp, self.name, self.folder, self.max_bytes = tmp, name, folder, max_bytes
        self.schema = features.arrow_schema
        self.parts: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[dict[str, Any]] = []
        self.part_bytes = 0

    def _open(self) -> None:
        path = self.tmp / self.folder / f".{self.name}-part{len(self.parts):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parts.append(path)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd", write_page_index=True)
        self.part_bytes = 0

    def _flush(self) -> None:
        if self.buffer:
            assert self.writer is not None
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
            self.buffer = []

    def add(self, rec: dict[str, Any]) -> None:
        img = rec.get("image")
        size = len(img["bytes"]) if isinstance(img, dict) and img.get("bytes") else 0
        if self.part_bytes > 0 and self.part_bytes + size > self.max_bytes:
            self._flush()
            assert self.writer is not None
            self.writer.close()
            self.writer = None
        if self.writer is None:
            self._open()
        self.buffer.append(rec)
        self.part_bytes += size
        if len(self.buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> list[str]:
        self._flush()
        if self.writer is not None:
            self.writer.close()
        n = len(self.parts)
        names = []
        for i, p in enumerate(self.parts):
            name = f"{self.name}-{i:05d}-of-{n:05d}.parquet"
            p.rename(p.parent / name)
            names.append(f"{self.folder}/{name}")
        return names


class _JsonlSink:
    """Streams records into one JSONL file (``rel`` inside the export)."""

    def __init__(self, tmp: Path, rel: str) -> None:
        self.rel = rel
        self.path = tmp / rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def add(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")

    def close(self) -> list[str]:
        self.f.close()
        return [self.rel]


def _temp_dir_for(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _columns_for(spec: FormatSpec) -> list[str]:
    cols = ["key", "image_id", "width", "height", "file_name", "split", "samples"]
    if spec.name in ("segzero", "visionreasoner", "lens", "qwen", "refcoco-m"):
        cols.append("instances")
    if spec.needs_resized or spec.stores_images or spec.name in ("moondream", "refcoco-m"):
        cols.append("image")
    return cols


def _jsonl_rel(fmt: str, split: str) -> str:
    # LENS globs every *.jsonl of its anno_path, so each split has a folder.
    return f"annotations/{split}/{split}.jsonl" if fmt == "lens" else f"data/{split}.jsonl"


def export_dataset(
    root: str,
    fmt: str,
    out: str | Path,
    splits: Sequence[str] | None = None,
    *,
    variant: str | None = None,
    keep_no_target: bool = False,
    shard_max_bytes: int = SHARD_MAX_BYTES,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Exports an orsgen output folder in one trainer format.

    Args:
        root: the output folder of a run (any fsspec URL).
        fmt: one of ``FORMATS``.
        out: a local folder that must not exist yet.
        splits: splits to export (None: all). ``refcoco-m``'s ``hub`` variant
            has one split, ``validation``, and takes exactly one orsgen split.
        variant: the consumer version (``VARIANTS``; None: the first).
        keep_no_target: visionreasoner only: write no-target samples too.
        shard_max_bytes: Parquet exports start a new file past this many bytes
            of images.
        progress: called with ``(split, images done)`` now and then.

    Returns:
        The export summary, also written to ``OUT/export_stats.json``:
        format, variant, per split images, samples, records, skipped samples
        per reason and files.

    Raises:
        ExportError: unknown format or variant, or ``out`` exists.
        DatasetReadError: the folder or a split is missing.
    """
    if fmt not in SPECS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    spec = SPECS[fmt]
    options = resolve_options(fmt, variant, keep_no_target)
    container = container_of(spec, options)
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists; orsgen never overwrites files. Choose a new --out.")
    chosen = resolve_splits(root, splits)
    for split in chosen:
        check_split_name(split)
    hub_refcocom = fmt == "refcoco-m" and options.variant == "hub"
    if hub_refcocom and len(chosen) != 1:
        raise ExportError(
            f"refcoco-m (variant hub) has a single split, 'validation', but {len(chosen)} orsgen splits were chosen "
            f"({', '.join(chosen)}); export one with --split (e.g. --split {chosen[-1]}), or use --variant extended "
            "to keep orsgen's split names."
        )
    features = features_of(fmt, options.variant) if container in ("parquet", "disk") else None
    tmp = _temp_dir_for(out)
    try:
        stats: dict[str, SplitStats] = {}
        for split in chosen:
            st = stats[split] = SplitStats()
            sink: _ParquetSink | _JsonlSink
            if container == "jsonl":
                sink = _JsonlSink(tmp, _jsonl_rel(fmt, split))
            else:
                assert features is not None
                name = "validation" if hub_refcocom else split
                folder = ".parts" if container == "disk" else "data"
                sink = _ParquetSink(tmp, name, features, shard_max_bytes, folder)
            for row in iter_rows(root, split, _columns_for(spec), batch_rows=16):
                st.images += 1
                st.samples_in += len(row.get("samples") or ())
                if not row.get("samples"):
                    continue
                ctx = ImageContext(row=row, split=split, options=options)
                if spec.stores_images:
                    rel = f"images/{split}/{row['key']}.{_image_ext(row['image'])}"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(row["image"])
                    ctx.image_path = rel
                if spec.needs_resized:
                    ctx.resized = resize_image(row["image"], (SEGZERO_SIZE, SEGZERO_SIZE))
                recs, skipped = records_for_image(spec, ctx)
                for r in recs:
                    sink.add(r)
                st.records += len(recs)
                st.skipped.update(skipped)
                if progress is not None and st.images % 64 == 0:
                    progress(split, st.images)
            st.files = sink.close()
        if container == "disk":
            assert features is not None
            saved = _save_to_disk(tmp, {k: v.files for k, v in stats.items()}, features)
            for k, v in stats.items():
                v.files = saved.get(k, [])
        summary = {
            "format": fmt,
            "variant": options.variant or None,
            "keep_no_target": options.keep_no_target,
            "source": str(root),
            "container": container,
            "splits": {k: v.to_json() for k, v in stats.items()},
        }
        if hub_refcocom:
            summary["hub_split"] = {"validation": chosen[0]}
        (tmp / "export_stats.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if container == "parquet":
            assert features is not None
            names = {("validation" if hub_refcocom else k): v.files for k, v in stats.items()}
            _write_loader_card(tmp, fmt, names, features)
        os.rename(tmp, out)  # atomic on one file system; `out` did not exist
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _save_to_disk(tmp: Path, files: dict[str, list[str]], features: "datasets.Features") -> dict[str, list[str]]:
    """Turns the Parquet parts into a ``DatasetDict.save_to_disk`` folder at ``tmp``.

    Seg-Zero's and VisionReasoner's ``rl_dataset.py`` read
    ``load_from_disk(path)["train"]`` (older copies ``load_dataset(path)["train"]``);
    both read this layout (``dataset_dict.json`` plus one Arrow folder per
    split, keyed by orsgen's split names).

    Returns:
        The Arrow files of each split, relative to ``tmp``.
    """
    import datasets

    cache = tmp / ".hf_cache"
    parts: dict[str, Any] = {}
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the command prints its own summary
    try:
        for split, fl in files.items():
            if fl:
                parts[split] = datasets.Dataset.from_parquet(
                    [str(tmp / f) for f in fl], features=features, cache_dir=str(cache), split=split
                )
        dd = datasets.DatasetDict(parts)
        dd.save_to_disk(str(tmp / ".dd"))
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    names = list(parts)
    del dd, parts
    for p in (tmp / ".dd").iterdir():
        p.rename(tmp / p.name)
    shutil.rmtree(tmp / ".dd")
    shutil.rmtree(tmp / ".parts", ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    # The fingerprint datasets records names the temporary cache; make it a
    # content hash so the same input exports byte-identical files.
    for state_path in sorted(tmp.glob("*/state.json")):
        state = json.loads(state_path.read_text(encoding="utf-8"))
        h = hashlib.sha256()
        for f in state.get("_data_files", []):
            h.update((state_path.parent / f["filename"]).read_bytes())
        state["_fingerprint"] = h.hexdigest()[:16]
        state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {split: sorted(f"{split}/{f.name}" for f in (tmp / split).glob("*.arrow")) for split in names}


def _write_loader_card(tmp: Path, fmt: str, files: dict[str, list[str]], features: "datasets.Features") -> None:
    """A minimal README.md whose YAML ``configs`` let ``load_dataset(OUT)`` find every split."""
    from orsgen.stages.dataset.publish import card_yaml_configs

    configs = card_yaml_configs({"default": {s: [f"data/{s}-*.parquet"] for s, fl in files.items() if fl}})
    import yaml

    header = yaml.safe_dump({"configs": configs}, sort_keys=False)
    body = (
        f"# orsgen export: {fmt}\n\n"
        "Written by `orsgen export`; see `export_stats.json` for counts and skipped samples.\n"
    )
    (tmp / "README.md").write_text(f"---\n{header}---\n\n{body}", encoding="utf-8")


def iter_export_records(path: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Reads an export back (tests, debugging): JSONL lines, Parquet rows or Arrow rows of one split.

    Image columns come back as ``{"bytes", "path"}`` dicts in every layout.
    """
    p = Path(path)
    for jsonl in (p / "annotations" / split / f"{split}.jsonl", p / "data" / f"{split}.jsonl"):
        if jsonl.exists():
            with open(jsonl, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)
            return
    if (p / "dataset_dict.json").exists():
        if not (p / split).is_dir():
            return
        import datasets

        ds = datasets.load_from_disk(str(p / split))
        ds = ds.cast_column("image", datasets.Image(decode=False)) if "image" in ds.features else ds
        yield from ds
        return
    for f in sorted((p / "data").glob(f"{split}-*.parquet")):
        yield from pq.read_table(f).to_pylist()
