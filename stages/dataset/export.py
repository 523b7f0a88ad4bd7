"""Trainer-ready exports in each seed's own conventions.

``orsgen export DIR --format F --out OUT`` reads the Parquet output of a run and
writes one of these (the readings of each seed's code are documented in the
README, section *Exports*):

=================  =========  ==============================================================
format             container  one record per
=================  =========  ==============================================================
``segzero``        Parquet    single-target sample: 840x840 image, ``solution`` =
                              ``<box>(x1,y1),(x2,y2)</box><points>(x,y),(x,y)</points>``
``visionreasoner`` Parquet    sample: 840x840 image, ``solution`` = JSON list of
                              ``{"bbox_2d": [..], "point_2d": [..]}`` (``[]`` for no target)
``lens``           JSONL      sample with targets: LENS' grounding JSONL (``image_path``,
                              ``box`` px, ``segmentation`` RLEs, ``caption``) plus its
                              ``qwen2vl`` (0-1000) and ``qwen2p5vl`` (resized px) solutions
``qwen``           JSONL      sample: Qwen-VL fine-tuning chat (``image`` +
                              ``conversations``), answer a JSON list of
                              ``{"bbox_2d": [0-1000], "label": ..}``
``moondream``      Parquet    sample with targets: ``object``, normalised SVG ``path`` and
                              ``bbox`` ``{x_min, y_min, x_max, y_max}`` in 0..1
``refcoco-m``      Parquet    image: RefCOCO-M's schema, nested ``samples`` with sentences
                              and a COCO-RLE ``mask`` per target set
=================  =========  ==============================================================

Every function that builds records is pure (a row of ``EXAMPLE_SCHEMA`` in,
records and skip reasons out); ``export_dataset`` streams rows through them and
writes the result atomically: everything goes to a hidden temporary folder
that is renamed to ``OUT`` at the end, and an existing ``OUT`` is never
touched. A sample a format cannot express (a no-target sample for Seg-Zero,
say) is not dropped silently: it is counted per reason in
``OUT/export_stats.json`` and in the command's summary.
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
from orsgen.stages.common.masks import empty_rle, polygons_to_rle, rle_bbox_xywh, rle_difference, rle_union
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
    """LENS' two box conventions, computed as its dataset code does (``round``).

    Returns:
        ``{"qwen2vl": 0..1000 box, "qwen2p5vl": box in smart-resized pixels}``.
    """
    rh, rw = smart_resize(height, width)
    x0, y0, x1, y1 = box
    return {
        "qwen2vl": [round(x0 / width * 1000), round(y0 / height * 1000), round(x1 / width * 1000), round(y1 / height * 1000)],
        "qwen2p5vl": [round(x0 / width * rw), round(y0 / height * rh), round(x1 / width * rw), round(y1 / height * rh)],
    }


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
    of its sub-pixels is set; rings combine by cv2's fill, which equals the
    nonzero rule for orsgen's oriented, non-overlapping rings.
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
    canvas = np.zeros(((by1 - by0) * scale, (bx1 - bx0) * scale), np.uint8)
    # Sub-pixel (i, j) covers [i, i+1) on the fine grid; cv2 samples pixel
    # centres, so shift by half a sub-pixel; 8 fractional bits keep edges exact.
    pts = [np.round(((r - [bx0, by0]) * scale - 0.5) * 256).astype(np.int32) for r in rings]
    cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=8)
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


@dataclass(slots=True)
class ImageContext:
    """What the record builders of one image share.

    Attributes:
        row: the ``EXAMPLE_SCHEMA`` row (image bytes included when the format
            needs them).
        split: the split.
        image_path: where a JSONL format stored the image, relative to OUT.
        resized: the 840x840 JPEG (Seg-Zero family), built once per image.
    """

    row: dict[str, Any]
    split: str
    image_path: str = ""
    resized: bytes = b""
    _instances: dict[str, dict[str, Any]] | None = None

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


def segzero_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One Seg-Zero row; only single-target samples (Seg-Zero answers one box)."""
    targets = _targets(s)
    if not targets:
        raise Skip("no_target")
    if len(targets) > 1:
        raise Skip("multi_target")
    t = targets[0]
    w, h = ctx.width, ctx.height
    solution = segzero_solution(scale_box(t["bbox_xyxy"], w, h), scale_point(t["point_1"], w, h), scale_point(t["point_2"], w, h))
    return {
        "id": s["sample_id"],
        "problem": s["expression"],
        "solution": solution,
        "image": ctx.image_struct(ctx.resized),
        "img_height": h,
        "img_width": w,
    }


def visionreasoner_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One VisionReasoner row: every target as ``{bbox_2d, point_2d}``; ``[]`` for no target."""
    w, h = ctx.width, ctx.height
    solution = [
        {"bbox_2d": scale_box(t["bbox_xyxy"], w, h), "point_2d": scale_point(t["point_1"], w, h)} for t in _targets(s)
    ]
    return {
        "id": s["sample_id"],
        "problem": s["expression"],
        # json.dumps defaults, as VisionReasoner's gen_training_dataset.py writes it.
        "solution": json.dumps(solution),
        "image": ctx.image_struct(ctx.resized),
        "img_height": h,
        "img_width": w,
    }


def lens_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One LENS grounding line (its ``GSTrainDataset`` JSONL) for a sample with targets."""
    targets = _targets(s)
    if not targets:
        raise Skip("no_target")
    w, h = ctx.width, ctx.height
    box = _union_box(targets)
    rh, rw = smart_resize(h, w)
    sol = lens_solutions(box, w, h)
    return {
        "sample_id": s["sample_id"],
        "image_path": ctx.image_path,
        "caption": s["expression"],
        "box": box,
        "segmentation": [ctx.instance(t["instance_id"])["rle"] for t in targets],
        "solution_qwen2vl": sol["qwen2vl"],
        "solution_qwen2p5vl": sol["qwen2p5vl"],
        "width": w,
        "height": h,
        "resized_height": rh,
        "resized_width": rw,
        "kind": s["kind"],
    }


def qwen_answer(s: dict[str, Any]) -> str:
    """The assistant turn: a JSON list of ``{"bbox_2d": [0-1000], "label": expression}``."""
    return json.dumps(
        [{"bbox_2d": [int(v) for v in t["qwen_box"]], "label": s["expression"]} for t in _targets(s)],
        ensure_ascii=False,
    )


def qwen_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One Qwen-VL fine-tuning line (``image`` + ``conversations``); ``[]`` answers no target."""
    return {
        "id": s["sample_id"],
        "image": ctx.image_path,
        "conversations": [
            {"from": "human", "value": "<image>\n" + QWEN_PROMPT.format(expression=s["expression"])},
            {"from": "gpt", "value": qwen_answer(s)},
        ],
        "kind": s["kind"],
        "width": ctx.width,
        "height": ctx.height,
        "masks": [ctx.instance(t["instance_id"])["rle"] for t in _targets(s)],
    }


def moondream_record(ctx: ImageContext, s: dict[str, Any]) -> dict[str, Any]:
    """One Moondream segmentation row: normalised SVG ``path`` and ``bbox`` (0..1)."""
    targets = _targets(s)
    if not targets:
        raise Skip("no_target")
    if not s.get("union_svg"):
        raise Skip("empty_svg")
    w, h = ctx.width, ctx.height
    x0, y0, x1, y1 = _union_box(targets)
    return {
        "id": s["sample_id"],
        "image": ctx.image_struct(ctx.row["image"]),
        "object": s["expression"],
        "path": s["union_svg"],
        "bbox": {"x_min": x0 / w, "y_min": y0 / h, "x_max": x1 / w, "y_max": y1 / h},
        "width": w,
        "height": h,
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


def refcocom_record(ctx: ImageContext) -> dict[str, Any]:
    """One RefCOCO-M row (one image): samples grouped by (kind, target set).

    RefCOCO-M's ``samples`` are referred objects, each with all its sentences;
    orsgen's expressions on the same targets and of the same kind become the
    ``sentences`` of one entry, whose ``mask`` is the union of the targets and
    ``bbox`` its COCO ``[x, y, w, h]``. ``label`` is the kind's category text
    (the category names of the targets, "" for class-agnostic regions).
    """
    row = ctx.row
    img_num = numeric_image_id(row["image_id"])
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for s in row.get("samples") or ():
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
        samples.append(
            {
                "id": _stable_int("|".join([row["image_id"], kind, *target_ids])),
                "image_id": img_num,
                "category": ", ".join(cats),
                "supercategory": ", ".join(supers),
                "label": ", ".join(cats),
                "sentences": [m["expression"] for m in members],
                "bbox": box,
                "mask": {"counts": union["counts"], "size": [int(v) for v in union["size"]]},
                "kind": kind,
                "sample_ids": [m["sample_id"] for m in members],
                "target_ids": list(target_ids),
            }
        )
    return {
        "image": ctx.image_struct(row["image"]),
        "image_id": img_num,
        "file_name": row.get("file_name") or "",
        "samples": samples,
        "key": row["key"],
        "orsgen_image_id": row["image_id"],
        "split": ctx.split,
        "width": ctx.width,
        "height": ctx.height,
    }


# ------------------------------------------------------------------ features


def features_of(fmt: str) -> "datasets.Features":
    """HF ``datasets`` features of a Parquet export format.

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
                "width": Value("int64"),
                "height": Value("int64"),
                "kind": Value("string"),
            }
        )
    if fmt == "refcoco-m":
        return datasets.Features(
            {
                # RefCOCO-M's own columns and sample fields first, with its types.
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
                        "kind": Value("string"),
                        "sample_ids": List(Value("string")),
                        "target_ids": List(Value("string")),
                    }
                ),
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
    container: str  # "parquet" or "jsonl"
    per: str  # "sample" or "image"
    build: Callable[..., dict[str, Any]]
    needs_resized: bool = False
    stores_images: bool = False  # JSONL formats write images/<split>/<key>.<ext>


SPECS: dict[str, FormatSpec] = {
    "segzero": FormatSpec("segzero", "parquet", "sample", segzero_record, needs_resized=True),
    "visionreasoner": FormatSpec("visionreasoner", "parquet", "sample", visionreasoner_record, needs_resized=True),
    "lens": FormatSpec("lens", "jsonl", "sample", lens_record, stores_images=True),
    "qwen": FormatSpec("qwen", "jsonl", "sample", qwen_record, stores_images=True),
    "moondream": FormatSpec("moondream", "parquet", "sample", moondream_record),
    "refcoco-m": FormatSpec("refcoco-m", "parquet", "image", refcocom_record),
}


def records_for_image(spec: FormatSpec, ctx: ImageContext) -> tuple[list[dict[str, Any]], Counter[str]]:
    """All records of one image in one format, and the skipped samples per reason.

    Samples are taken in ``sample_id`` order, so exports are deterministic.
    """
    skipped: Counter[str] = Counter()
    if spec.per == "image":
        return ([spec.build(ctx)] if ctx.row.get("samples") else []), skipped
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
    """Streams records into ``data/<split>-NNNNN-of-MMMMM.parquet`` files."""

    def __init__(self, tmp: Path, split: str, features: "datasets.Features", max_bytes: int) -> None:
        self.tmp, self.split, self.max_bytes = tmp, split, max_bytes
        self.schema = features.arrow_schema
        self.parts: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[dict[str, Any]] = []
        self.part_bytes = 0

    def _open(self) -> None:
        path = self.tmp / "data" / f".{self.split}-part{len(self.parts):05d}.parquet"
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
            name = f"{self.split}-{i:05d}-of-{n:05d}.parquet"
            p.rename(p.parent / name)
            names.append(f"data/{name}")
        return names


class _JsonlSink:
    """Streams records into ``data/<split>.jsonl``."""

    def __init__(self, tmp: Path, split: str) -> None:
        self.path = tmp / "data" / f"{split}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def add(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")

    def close(self) -> list[str]:
        self.f.close()
        return [f"data/{self.path.name}"]


def _temp_dir_for(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _columns_for(spec: FormatSpec) -> list[str]:
    cols = ["key", "image_id", "width", "height", "file_name", "split", "samples"]
    if spec.name in ("lens", "qwen", "refcoco-m"):
        cols.append("instances")
    if spec.needs_resized or spec.stores_images or spec.name in ("moondream", "refcoco-m"):
        cols.append("image")
    return cols


def export_dataset(
    root: str,
    fmt: str,
    out: str | Path,
    splits: Sequence[str] | None = None,
    *,
    shard_max_bytes: int = SHARD_MAX_BYTES,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Exports an orsgen output folder in one trainer format.

    Args:
        root: the output folder of a run (any fsspec URL).
        fmt: one of ``FORMATS``.
        out: a local folder that must not exist yet.
        splits: splits to export (None: all).
        shard_max_bytes: Parquet exports start a new file past this many bytes
            of images.
        progress: called with ``(split, images done)`` now and then.

    Returns:
        The export summary, also written to ``OUT/export_stats.json``:
        format, per split images, samples, records, skipped samples per
        reason and files.

    Raises:
        ExportError: unknown format, or ``out`` exists.
        DatasetReadError: the folder or a split is missing.
    """
    if fmt not in SPECS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    spec = SPECS[fmt]
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists; orsgen never overwrites files. Choose a new --out.")
    chosen = resolve_splits(root, splits)
    for split in chosen:
        check_split_name(split)
    features = features_of(fmt) if spec.container == "parquet" else None
    tmp = _temp_dir_for(out)
    try:
        stats: dict[str, SplitStats] = {}
        for split in chosen:
            st = stats[split] = SplitStats()
            sink: _ParquetSink | _JsonlSink = (
                _ParquetSink(tmp, split, features, shard_max_bytes) if features is not None else _JsonlSink(tmp, split)
            )
            for row in iter_rows(root, split, _columns_for(spec), batch_rows=16):
                st.images += 1
                st.samples_in += len(row.get("samples") or ())
                if not row.get("samples"):
                    continue
                ctx = ImageContext(row=row, split=split)
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
        summary = {
            "format": fmt,
            "source": str(root),
            "container": spec.container,
            "splits": {k: v.to_json() for k, v in stats.items()},
        }
        (tmp / "export_stats.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if spec.container == "parquet":
            _write_loader_card(tmp, fmt, {k: v.files for k, v in stats.items()}, features)
        os.rename(tmp, out)  # atomic on one file system; `out` did not exist
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


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
    """Reads an export back (tests, debugging): JSONL lines or Parquet rows of one split."""
    p = Path(path)
    jsonl = p / "data" / f"{split}.jsonl"
    if jsonl.exists():
        with open(jsonl, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
        return
    for f in sorted((p / "data").glob(f"{split}-*.parquet")):
        yield from pq.read_table(f).to_pylist()
