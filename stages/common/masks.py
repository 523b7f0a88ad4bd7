"""Mask geometry in COCO RLE space, with crop-local decoding where pixels are needed.

Everything here is a pure function over ``schemas.records.Rle``. Area, box,
IoU and unions run inside pycocotools' C code on the run-length encoding; no
full-image array is decoded. Where pixels are needed (interior points,
polygons), only the mask's bounding box is decoded (``decode_crop``), straight
from the runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from orsgen.schemas.records import Rle


class MaskError(ValueError):
    """A mask is malformed; ``reason`` is the reject reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- RLE space


def encode_mask(mask: np.ndarray) -> Rle:
    """Encodes a full-image boolean/uint8 mask ``(h, w)`` as compressed RLE."""
    m = np.asfortranarray(mask.astype(np.uint8, copy=False))
    return Rle.from_coco(mask_utils.encode(m))


def empty_rle(height: int, width: int) -> Rle:
    """An all-zero mask of ``height`` x ``width`` pixels, without allocating it."""
    return Rle.from_coco(mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width))


def rle_area(rle: Rle) -> int:
    """Mask area in pixels, from the runs."""
    return int(mask_utils.area(rle.to_coco()))


def rle_bbox_xywh(rle: Rle) -> tuple[float, float, float, float]:
    """COCO box ``[x, y, w, h]`` (pixels) of the mask; zeros for an empty mask."""
    x, y, w, h = mask_utils.toBbox(rle.to_coco()).tolist()
    return (float(x), float(y), float(w), float(h))


def xywh_to_xyxy(b: Sequence[float]) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` -> ``[x0, y0, x1, y1]``."""
    x, y, w, h = (float(v) for v in b)
    return (x, y, x + w, y + h)


def xyxy_to_xywh(b: Sequence[float]) -> tuple[float, float, float, float]:
    """``[x0, y0, x1, y1]`` -> ``[x, y, w, h]``."""
    x0, y0, x1, y1 = (float(v) for v in b)
    return (x0, y0, x1 - x0, y1 - y0)


def instance_geometry(rle: Rle) -> dict[str, Any]:
    """The ``Instance`` fields that derive from its mask, computed on the runs.

    Every stage that makes or rewrites an instance (readers, CoRS merging,
    SAM2 refinement) uses this, so box and area always agree with the mask.

    Returns:
        ``{"bbox_xywh", "bbox_xyxy", "area_px"}``, ready for
        ``Instance(**...)`` or ``dataclasses.replace(inst, **...)``.
    """
    coco = rle.to_coco()  # once for both calls (rle_bbox_xywh and rle_area each convert it)
    x, y, w, h = mask_utils.toBbox(coco).tolist()
    bbox = (float(x), float(y), float(w), float(h))
    return {"bbox_xywh": bbox, "bbox_xyxy": xywh_to_xyxy(bbox), "area_px": int(mask_utils.area(coco))}


#: Masks per pycocotools call in ``instance_geometries``: ``area`` of 256 or
#: more masks raises with numpy 2 (it builds a placeholder ``uint8`` array
#: from the count), so batches stay below that.
_GEOMETRY_BATCH = 255


def instance_geometries(rles: Sequence[Rle]) -> list[tuple[tuple[float, float, float, float], tuple[float, float, float, float], int]]:
    """``(bbox_xywh, bbox_xyxy, area_px)`` of each mask: ``instance_geometry``'s values, batched.

    One ``toBbox`` and one ``area`` call per batch of masks instead of one
    each per mask: the same C functions on the same runs, element by element,
    so the same numbers (tests/test_ingest_fast.py compares them).
    """
    out = []
    for at in range(0, len(rles), _GEOMETRY_BATCH):
        coco = [r.to_coco() for r in rles[at : at + _GEOMETRY_BATCH]]
        for (x, y, w, h), area in zip(mask_utils.toBbox(coco).tolist(), mask_utils.area(coco).tolist()):
            # tolist() gives Python floats and ints, as float() and int() of
            # the single-mask arrays do.
            out.append(((x, y, w, h), (x, y, x + w, y + h), area))
    return out


def rle_iou_matrix(a: Sequence[Rle], b: Sequence[Rle]) -> np.ndarray:
    """Pairwise mask IoU, computed on the runs.

    Args:
        a: ``n`` masks of one size.
        b: ``m`` masks of the same size.

    Returns:
        ``(n, m)`` float64 IoU matrix (0 where both masks are empty).
    """
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    ious = mask_utils.iou([r.to_coco() for r in a], [r.to_coco() for r in b], [0] * len(b))
    return np.asarray(ious, dtype=np.float64).reshape(len(a), len(b))


def rle_iou(a: Rle, b: Rle) -> float:
    """IoU of two masks of one size, on the runs."""
    return float(rle_iou_matrix([a], [b])[0, 0])


def rle_intersection_area(a: Rle, b: Rle) -> int:
    """Pixels in both masks, on the runs."""
    inter = mask_utils.merge([a.to_coco(), b.to_coco()], intersect=True)
    return int(mask_utils.area(inter))


def rle_union(rles: Sequence[Rle], size: tuple[int, int] | None = None) -> Rle:
    """Union of masks, on the runs.

    Args:
        rles: masks of one size; may be empty if ``size`` is given.
        size: ``(h, w)``; needed when ``rles`` is empty (gives an empty mask).

    Returns:
        The union mask.
    """
    if not rles:
        if size is None:
            raise ValueError("rle_union of no masks needs size=(h, w) to build the empty mask.")
        return empty_rle(*size)
    if len(rles) == 1:
        return rles[0]
    return Rle.from_coco(mask_utils.merge([r.to_coco() for r in rles], intersect=False))


def rle_from_runs(runs: Sequence[int], size: tuple[int, int]) -> Rle:
    """Compresses uncompressed run lengths (zeros first, column-major) into an RLE."""
    h, w = size
    return Rle.from_coco(mask_utils.frPyObjects({"size": [h, w], "counts": [int(r) for r in runs]}, h, w))


def rle_complement(rle: Rle) -> Rle:
    """The inverted mask, on the runs: swapping which runs are foreground."""
    runs = rle_counts_to_runs(rle.counts).tolist()
    if runs and runs[0] == 0:
        runs = runs[1:]
    else:
        runs = [0, *runs]
    return rle_from_runs(runs, rle.size)


def rle_difference(a: Rle, b: Rle) -> Rle:
    """Pixels of ``a`` not in ``b`` (``a AND NOT b``), on the runs."""
    return Rle.from_coco(mask_utils.merge([a.to_coco(), rle_complement(b).to_coco()], intersect=True))


# ---------------------------------------------------------------- runs and crops


#: Decoded runs kept per process (bounded: a few hundred masks' runs, reused
#: by the centroid, the points and the polygon of one instance).
RUNS_CACHE_SIZE = 256


def rle_counts_to_runs(counts: str) -> np.ndarray:
    """Decodes COCO's compressed counts string into run lengths (read-only array).

    The last ``RUNS_CACHE_SIZE`` decodings are kept: the centroid, interior
    points and polygon of one instance all start from its runs.

    Args:
        counts: the compressed counts string.

    Returns:
        int64 array of alternating run lengths, starting with zeros, in
        column-major (Fortran) pixel order; read-only (it may be shared), so
        copy it before changing it.

    Raises:
        MaskError: the string is not valid compressed RLE.
    """
    key = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    return _cached_runs(key)


@functools.lru_cache(maxsize=RUNS_CACHE_SIZE)
def _cached_runs(data: bytes) -> np.ndarray:
    # warm_runs_cache leaves the runs it decoded in one pass here.
    runs = _WARM_RUNS.pop(data, None)
    if runs is None:
        runs = _decode_counts(data)
    runs.flags.writeable = False
    return runs


#: Runs decoded by ``warm_runs_cache``, on their way into ``_cached_runs``.
#: Only ever holds the exact runs of its key, so whichever thread takes an
#: entry gets the same array ``_decode_counts`` would have returned.
_WARM_RUNS: dict[bytes, np.ndarray] = {}
#: ``warm_runs_cache`` decodes at most this many counts bytes in one pass
#: (a hostile file's long strings are left to the checks mask by mask).
WARM_MAX_BYTES = 1 << 20


def warm_runs_cache(counts: Sequence[Any]) -> None:
    """Decodes several compressed counts strings in one numpy pass into the runs cache.

    ``rle_counts_to_runs`` (and ``validate_rle``) then find them cached: one
    image's masks cost one vectorised decode instead of one each (the numpy
    calls, not the bytes, are what a short counts string costs). Anything
    that is not clean compressed counts (not ASCII text, invalid bytes, a
    negative run, runs too long for the vectorised sums), more masks than
    the cache holds or more than ``WARM_MAX_BYTES`` in all are simply not
    warmed: the mask-by-mask call decodes or refuses them as before.

    Args:
        counts: candidate counts values (``str`` or ``bytes``; others are skipped).
    """
    keys: dict[bytes, None] = {}
    total = 0
    for c in counts:
        if type(c) is str and c.isascii():
            key = c.encode("ascii")
        elif type(c) is bytes:
            key = c
        else:
            continue
        if key and not key.translate(None, _COUNTS_BYTES) and _IS_FINAL[key[-1]]:
            keys[key] = None
            total += len(key)
    if len(keys) < 2 or len(keys) > RUNS_CACHE_SIZE or total > WARM_MAX_BYTES:
        return
    datas = list(keys)
    runs = _decode_counts_many(datas)
    if runs is None:
        return
    _WARM_RUNS.update(zip(datas, runs))
    try:
        for key in datas:
            _cached_runs(key)
    finally:
        for key in datas:
            _WARM_RUNS.pop(key, None)


def _decode_counts_many(datas: list[bytes]) -> list[np.ndarray] | None:
    """``[_decode_counts(d) for d in datas]`` in one pass, for clean strings only.

    Every string must be non-empty, hold only counts bytes and end with a
    run's final group (``warm_runs_cache`` checks). The strings are joined
    (each ends a run, so runs never straddle two strings), every run is
    summed from its 5-bit groups at once, and the delta chains (run ``k >= 3``
    of a string adds run ``k - 2``) are one cumulative sum that restarts at
    each string's runs 0, 1 and 2.

    Returns:
        One int64 runs array per string (views of one array), or None when a
        string needs the single-string path (runs beyond the vectorised
        bound, a negative run) to be decoded or refused exactly.
    """
    data = b"".join(datas)
    # The single-string bound with every run of every string counted: a
    # chain's sum stays below 2 ** 62 whenever one string's would.
    summed = _group_sums(data, data.translate(_IS_FINAL))
    if summed is None:
        return None
    x, firsts = summed
    # Each string's first run index, and every run's index inside its string.
    lengths = np.fromiter(map(len, datas), dtype=np.int64, count=len(datas))
    byte_starts = np.zeros(len(datas), dtype=np.int64)
    lengths[:-1].cumsum(out=byte_starts[1:])
    run_starts = firsts.searchsorted(byte_starts)
    n_runs = np.empty_like(run_starts)
    n_runs[:-1] = run_starts[1:] - run_starts[:-1]
    n_runs[-1] = x.size - run_starts[-1]
    local = np.arange(x.size, dtype=np.int64) - run_starts.repeat(n_runs)
    # Runs of one parity (globally, hence inside each string) in a row, then
    # the others: a chain is a stretch of one of them, and every run 0, 1 or
    # 2 of a string starts a stretch (run 0 is alone, as run 2 starts anew).
    half = (x.size + 1) // 2
    xs = np.concatenate((x[0::2], x[1::2]))
    starts = (np.concatenate((local[0::2], local[1::2])) <= 2).nonzero()[0]
    c = xs.cumsum()
    base = c[starts] - xs[starts]
    stretch = np.zeros(xs.size, dtype=np.int64)
    stretch[starts[1:]] = 1
    c -= base[stretch.cumsum()]
    if c.min() < 0:
        return None
    out = np.empty(x.size, dtype=np.int64)
    out[0::2] = c[:half]
    out[1::2] = c[half:]
    bounds = run_starts.tolist()
    return [out[a:b] for a, b in zip(bounds, [*bounds[1:], x.size])]


def _group_sums(data: bytes, final: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Every run of clean counts bytes summed from its 5-bit groups: ``(runs, first byte of each run)``.

    The runs are as stored (runs after the second still deltas). ``final``
    is ``data.translate(_IS_FINAL)`` and must end with a run's final group.
    None when a run has more than 12 groups or the runs' sums could pass
    2 ** 62 (int64 could not hold them): the caller decodes otherwise.
    """
    # Each byte's 5-bit group as a signed value: a run's final group (bit
    # 0x20 clear) carries the sign bit 0x10, i.e. is the 5-bit two's
    # complement -16..15, so the sum below is the signed run directly.
    v = np.frombuffer(data.translate(_GROUP_VALUE), dtype=np.int8).astype(np.int64)
    ends = np.frombuffer(final, dtype=np.bool_).nonzero()[0]
    # A run starts at the first byte and after each final group but the last.
    firsts = np.frombuffer(b"\x01" + final[:-1], dtype=np.bool_).nonzero()[0]
    group_len = ends - firsts + 1
    max_groups = int(group_len.max())
    if max_groups > 12 or ends.size * 2.0 ** (5 * max_groups) >= 2.0**62:
        return None
    k5 = 5 * (np.arange(len(data), dtype=np.int64) - firsts.repeat(group_len))
    # A set sign bit (0x10) in a run's final group makes the run negative (a
    # delta): that group's value minus 32 subtracts 2 ** (5 * groups).
    return np.add.reduceat(v << k5, firsts), firsts


def _decode_counts(data: bytes) -> np.ndarray:
    """Decodes COCO's compressed counts bytes into run lengths.

    COCO packs each run as 5-bit groups (LEB128-like, offset by 48) and stores
    runs after the second as deltas from the run two before. pycocotools does
    not expose this decoder, and decoding the whole mask to get runs would
    defeat the purpose, so it is done here, vectorised with numpy (every
    run's groups are summed at once and the deltas undone with two cumulative
    sums); a string with a run longer than 12 groups (60 bits, never made by a
    real mask) takes the scalar decoder, which gives the same answer.

    Args:
        data: the compressed counts as bytes.

    Returns:
        int64 array of alternating run lengths, starting with zeros, in
        column-major (Fortran) pixel order.

    Raises:
        MaskError: the string is not valid compressed RLE.
    """
    n = len(data)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Hot paths here call ndarray methods (x.cumsum(), x.repeat(...)) rather
    # than the np.* functions: the same computation without numpy's
    # dispatch wrapper, which costs more than the work on arrays this small.
    # Bytes outside 48..111 first (one C pass over the bytes), then the
    # translation tables below.
    if data.translate(None, _COUNTS_BYTES):
        p = next(i for i, b in enumerate(data) if not 48 <= b <= 111)
        raise MaskError("bad_rle", f"compressed RLE counts hold an invalid byte {data[p]!r}.")
    final = data.translate(_IS_FINAL)  # 1 at the final 5-bit group of a run
    if not final[-1]:
        raise MaskError("bad_rle", "compressed RLE counts end in the middle of a run.")
    summed = _group_sums(data, final)
    if summed is None:
        return _rle_counts_to_runs_scalar(data)
    x = summed[0]
    # Runs after the second are deltas from the run two before.
    x[1::2] = x[1::2].cumsum()
    x[2::2] = x[2::2].cumsum()
    if x.min() < 0:
        raise MaskError("bad_rle", "compressed RLE decodes to a negative run length.")
    return x


#: The bytes compressed counts may hold ("0" .. "o").
_COUNTS_BYTES = bytes(range(48, 112))
#: Per valid byte: its 5-bit group, sign-extended for a final group (an int8
#: byte); and whether it is a run's final group (bit 0x20 of byte - 48 clear).
_GROUP_VALUE = bytes(
    ((((b - 48) & 0x1F) ^ 0x10) - 0x10 if (b - 48) & 0x20 == 0 else (b - 48) & 0x1F) & 0xFF if 48 <= b <= 111 else 0
    for b in range(256)
)
_IS_FINAL = bytes(1 if 48 <= b <= 111 and (b - 48) & 0x20 == 0 else 0 for b in range(256))


def _rle_counts_to_runs_scalar(data: bytes) -> np.ndarray:
    """The byte-at-a-time decoder (for runs beyond 60 bits, which int64 cannot sum)."""
    runs: list[int] = []
    p = 0
    n = len(data)
    while p < n:
        x = 0
        k = 0
        more = 1
        while more:
            if p >= n:
                raise MaskError("bad_rle", "compressed RLE counts end in the middle of a run.")
            c = data[p] - 48
            if c < 0 or c > 63:
                raise MaskError("bad_rle", f"compressed RLE counts hold an invalid byte {data[p]!r}.")
            x |= (c & 0x1F) << (5 * k)
            more = c & 0x20
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    if any(r < 0 for r in runs):
        raise MaskError("bad_rle", "compressed RLE decodes to a negative run length.")
    if any(r >= 2**63 for r in runs):
        raise MaskError("bad_rle", "compressed RLE counts decode to a run longer than any image.")
    return np.asarray(runs, dtype=np.int64)


def validate_rle(rle: Rle) -> None:
    """Checks that the runs add up to ``h * w``.

    Raises:
        MaskError: with reason ``bad_rle`` or ``rle_size_mismatch``.
    """
    h, w = rle.size
    if h <= 0 or w <= 0:
        raise MaskError("bad_rle", f"RLE size {list(rle.size)} is not positive.")
    total = int(rle_counts_to_runs(rle.counts).sum())
    if total != h * w:
        raise MaskError(
            "rle_size_mismatch",
            f"RLE runs cover {total} pixels but its size {h}x{w} needs {h * w}.",
        )


def decode_crop(
    rle: Rle,
    bbox_xyxy: Sequence[float] | None = None,
    pad_px: int = 0,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes only the part of a mask inside a box.

    Only the image columns the box spans are expanded from the runs (the
    encoding is column-major), then the rows are cut; memory is
    ``h * box_width`` at most, never the whole image.

    Args:
        rle: the mask.
        bbox_xyxy: the window ``[x0, y0, x1, y1]`` in pixels; None uses the
            mask's own bounding box.
        pad_px: grow the window by this many pixels on each side; the part
            outside the image is zero-filled, so the returned crop is exactly
            the padded window.

    Returns:
        ``(crop, (x0, y0))``: a ``bool`` array of the (padded) window and the
        image coordinates of its top-left pixel (may be negative with padding).
    """
    h, w = rle.size
    if bbox_xyxy is None:
        bbox_xyxy = xywh_to_xyxy(rle_bbox_xywh(rle))
    wx0, wy0, wx1, wy1 = _crop_window(bbox_xyxy, pad_px)
    out = np.zeros((wy1 - wy0, wx1 - wx0), dtype=bool)
    cx0, cx1 = max(wx0, 0), min(wx1, w)
    cy0, cy1 = max(wy0, 0), min(wy1, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return out, (wx0, wy0)
    runs = rle_counts_to_runs(rle.counts)
    ends = runs.cumsum()
    lo, hi = cx0 * h, cx1 * h
    # The runs overlapping the column strip, clipped to it, expanded in one
    # np.repeat (foreground runs are the odd ones). The runs are never
    # negative (the decoder refuses them), so ``ends`` is sorted: run
    # ``first`` holds pixel ``lo``, run ``stop - 1`` pixel ``hi - 1`` (or is
    # the last run), and only those two are cut by the strip's ends.
    first = int(ends.searchsorted(lo, side="right"))
    stop = min(int(ends.searchsorted(hi, side="left")) + 1, runs.size)
    if first < stop:
        seg = runs[first:stop].copy()
        for k in {first, stop - 1}:
            end = int(ends[k])
            seg[k - first] = max(min(end, hi) - max(end - int(runs[k]), lo), 0)
        strip = _parity(first, stop).repeat(seg)
    else:
        strip = np.zeros(0, dtype=bool)
    if strip.size < hi - lo:  # runs that stop short of the strip: the rest is background
        strip = np.concatenate([strip, np.zeros(hi - lo - strip.size, dtype=bool)])
    cols = strip.reshape(cx1 - cx0, h).T  # column-major -> (h, ncols)
    out[cy0 - wy0 : cy1 - wy0, cx0 - wx0 : cx1 - wx0] = cols[cy0:cy1]
    return out, (wx0, wy0)


def _parity(first: int, stop: int) -> np.ndarray:
    """``np.arange(first, stop) % 2 == 1`` (read-only, shared): which of runs ``first .. stop - 1`` are foreground."""
    global _PARITY
    table = _PARITY  # one read: another thread may swap in a larger table meanwhile
    if table.size < stop:
        table = np.arange(max(2 * table.size, stop, 1024)) % 2 == 1
        table.flags.writeable = False
        _PARITY = table
    return table[first:stop]


_PARITY = np.zeros(0, dtype=bool)


def _crop_window(bbox_xyxy: Sequence[float], pad_px: int) -> tuple[int, int, int, int]:
    """The pixel window ``(x0, y0, x1, y1)`` (exclusive max) covering a box, grown by ``pad_px``."""
    bx0, by0, bx1, by1 = bbox_xyxy
    # math.floor/ceil give the same integers as int(np.floor(v)) for any
    # finite float (and raise alike for NaN/inf), without numpy's scalar cost.
    fx0, fy0 = math.floor(bx0), math.floor(by0)
    return (
        fx0 - pad_px,
        fy0 - pad_px,
        max(math.ceil(bx1), fx0 + 1) + pad_px,
        max(math.ceil(by1), fy0 + 1) + pad_px,
    )


class CompactCrop(NamedTuple):
    """A mask's pixels on only the rows and columns that can hold them or touch them (``compact_crop``).

    ``pixels[i, j]`` is the image pixel ``(cols[j], rows[i])``; every mask
    pixel and its eight neighbours are kept, and the frame of ``pixels`` is
    background. ``rle_to_geometries`` traces it as it would the full crop.
    """

    pixels: np.ndarray
    cols: np.ndarray
    rows: np.ndarray


def compact_crop(parts: Sequence[PaddedCrop]) -> CompactCrop:
    """The union of several masks' crops, without the empty rows and columns between the crops.

    The union of masks that lie apart (the targets of a set) has a large
    window, mostly background, and OpenCV's contour tracing costs per pixel
    of it. Here only the image columns (rows) inside some part's window, or
    next to one, are kept, in image order: no mask pixel is dropped (each
    lies inside its own crop), every mask pixel keeps its eight neighbours
    around it as in the image, and a run of background between two mask
    pixels may shrink but never vanishes (the pixel next to each mask pixel
    stays).

    Suzuki's border following, as OpenCV runs it, reads only the pixels next
    to mask pixels and the left-to-right, top-to-bottom order of the pixels
    it meets (the raster scan, and the order tests of its bounding boxes for
    a hole's parent); rows and columns of background that are removed change
    neither. So ``cv2.findContours`` of ``pixels`` gives the contours and
    hierarchy of the full crop, each point at its kept row and column:
    ``cols[x], rows[y]`` is its image position (tests/test_targets_fast.py
    checks this OpenCV property on tricky masks).

    Args:
        parts: ``decode_crop(rle)`` of each mask (any padding; each crop
            holds every pixel of its mask).

    Returns:
        ``CompactCrop(pixels, cols, rows)``: ``pixels`` is the OR of the parts
        on the kept rows and columns; ``cols`` and ``rows`` (int32, increasing)
        are their image coordinates.
    """
    xs = _merged_spans([(ox - 1, ox + crop.shape[1] + 1) for crop, (ox, _) in parts])
    ys = _merged_spans([(oy - 1, oy + crop.shape[0] + 1) for crop, (_, oy) in parts])
    cols = np.concatenate([np.arange(a, b, dtype=np.int32) for a, b, _ in xs])
    rows = np.concatenate([np.arange(a, b, dtype=np.int32) for a, b, _ in ys])
    out = np.zeros((rows.size, cols.size), dtype=bool)
    for k, (crop, (ox, oy)) in enumerate(parts):
        x, y = _kept_index(xs, ox), _kept_index(ys, oy)
        window = out[y : y + crop.shape[0], x : x + crop.shape[1]]
        if k:
            window |= crop
        else:
            window[...] = crop  # onto zeros: the same as OR, and cheaper
    return CompactCrop(out, cols, rows)


def _merged_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The union of half-open integer intervals as disjoint ``(start, end, kept index of start)``, in order."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out = []
    at = 0
    for a, b in merged:
        out.append((a, b, at))
        at += b - a
    return out


def _kept_index(spans: list[tuple[int, int, int]], v: int) -> int:
    """The kept index of image coordinate ``v`` (inside one of ``spans``)."""
    for a, b, at in spans:
        if a <= v < b:
            return at + v - a
    raise AssertionError("a part lies outside the kept spans")


class ApartCrops(NamedTuple):
    """Crops of masks that lie apart (``outline_parts``): their union's outline is traced from each crop alone.

    The crops' windows, each grown by one pixel to the right and below, do
    not meet: any two pixels of different masks are at least two columns or
    two rows apart, so no pixel of one mask is next to a pixel of another.
    """

    parts: tuple[PaddedCrop, ...]


def outline_parts(parts: Sequence[PaddedCrop]) -> ApartCrops | CompactCrop:
    """What ``rle_to_geometries`` traces for the union of the masks of ``parts`` (``decode_crop`` crops).

    ``ApartCrops`` when the masks lie apart (no two crop windows meet, with
    a pixel between them): the union's contours are then the masks' own
    contours, which ``rle_to_geometries`` traces once per crop and orders as
    OpenCV orders the union's. Otherwise ``compact_crop(parts)``.
    """
    boxes = [(ox, oy, ox + crop.shape[1] + 1, oy + crop.shape[0] + 1) for crop, (ox, oy) in parts]
    for k, (ax0, ay0, ax1, ay1) in enumerate(boxes):
        for bx0, by0, bx1, by1 in boxes[k + 1 :]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                return compact_crop(parts)
    return ApartCrops(tuple(parts))


def encode_crop(crop: np.ndarray, origin_xy: tuple[int, int], size: tuple[int, int]) -> Rle:
    """Encodes a crop (as from ``decode_crop``) back into a full-size RLE.

    Args:
        crop: boolean window.
        origin_xy: image coordinates of the window's top-left pixel.
        size: ``(h, w)`` of the image.

    Returns:
        The full-image mask (pixels outside the image are discarded).
    """
    h, w = size
    x0, y0 = origin_xy
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + crop.shape[1], w), min(y0 + crop.shape[0], h)
    full = np.zeros((h, w), dtype=np.uint8)
    if cx0 < cx1 and cy0 < cy1:
        full[cy0:cy1, cx0:cx1] = crop[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return encode_mask(full)


# ---------------------------------------------------------------- points


POINT_RULES = ("orsgen", "segzero")

#: ``decode_crop(rle, pad_px=1)`` of a mask: what ``interior_points`` and
#: ``rle_to_geometry`` both start from.
PaddedCrop = tuple[np.ndarray, tuple[int, int]]


def _as_uint8(crop: np.ndarray) -> np.ndarray:
    """A bool crop as OpenCV's uint8 image: a zero-copy view (same bytes, 0/1)."""
    if crop.dtype == np.bool_ and crop.flags.c_contiguous:
        return crop.view(np.uint8)
    return crop.astype(np.uint8)


def _median(values: np.ndarray) -> float:
    """``np.median`` of a non-empty 1-D float array, without its per-call overhead.

    The same arithmetic as numpy's: the middle element after a partition, or
    the mean ``(a + b) / 2`` of the two middle ones for an even count.
    """
    n = values.size
    k = n // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    part = np.partition(values, (k - 1, k))
    return float((part[k - 1] + part[k]) / 2.0)


def _squares(n: int) -> np.ndarray:
    """``(np.arange(2 * n) - n) ** 2`` (read-only, shared): ``[n - y : n - y + k]`` is ``(np.arange(k) - y) ** 2`` for ``0 <= y < n``, ``k <= n``.

    int32 while the sum of two of them fits (``2 * n**2 < 2**31``: crops
    under 32,768 pixels a side), which halves the memory the points' grid
    arithmetic moves; int64 beyond.
    """
    global _SQUARES
    if _SQUARES.size < 2 * n:
        dtype = np.int32 if n < _INT32_SQUARES_MAX_N else np.int64
        table = (np.arange(2 * n, dtype=np.int64) - n) ** 2
        table = table.astype(dtype)
        table.flags.writeable = False
        _SQUARES = table
    m = _SQUARES.size // 2
    return _SQUARES[m - n : m + n]


_SQUARES = np.zeros(0, dtype=np.int32)
#: Largest crop side (exclusive) whose squared distances ``dx**2 + dy**2`` fit int32.
_INT32_SQUARES_MAX_N = 32768


def _beyond_median(sq: np.ndarray, flat: np.ndarray, cw: int, x1: int, y1: int) -> np.ndarray:
    """Which mask pixels lie farther from ``(x1, y1)`` than the median pixel, as ``interior_points`` decides it.

    The direct rule is ``(d > _median(d)).nonzero()[0]`` with
    ``d = np.hypot(xs - x1, ys - y1)`` over the mask's pixels (``flat``: their
    row-major indices in a crop ``cw`` wide; ``sq``: their exact squared
    distances ``dx**2 + dy**2``). ``np.hypot`` costs several times the rest of
    the points' arithmetic per pixel. Its order is the order of the exact
    integer squared distance (hypot is accurate to an ulp or so, far finer
    than the relative gap between the square roots of two different integers
    below 2**40), so only the pixels whose squared distance equals one of the
    median's middle values need their hypot, for the median itself and for
    the comparison with it: a pixel strictly beyond them is farther than the
    median, one strictly before them is not. Pixels with the same squared
    distance but different offsets (3-4-5) keep their own hypot, so the answer
    is exactly the direct one.
    """
    n = sq.size
    k = n // 2
    if n % 2:
        lo = hi = np.partition(sq, k)[k]
        band = sq == lo
    else:
        part = np.partition(sq, (k - 1, k))
        lo, hi = part[k - 1], part[k]
        band = (sq == lo) if lo == hi else ((sq >= lo) & (sq <= hi))
    at = band.nonzero()[0]
    ys, xs = np.divmod(flat[at], cw)
    d = np.hypot(xs - x1, ys - y1)
    far = sq > hi
    if lo == hi and d.min() == d.max():
        # The usual case: one squared distance, one hypot value. The median
        # is that value ((v + v) / 2 == v), and no band pixel exceeds it.
        return far.nonzero()[0]
    below = int(np.count_nonzero(sq < lo))
    med = _median_ranks(d, k - below, n % 2 == 1)
    far[at[d > med]] = True
    return far.nonzero()[0]


def _median_ranks(d: np.ndarray, r: int, odd: bool) -> float:
    """The median ``_median`` gives, from the band holding its middle rank(s): ``r`` is rank ``n // 2`` within ``d``."""
    if odd:
        return float(np.partition(d, r)[r])
    part = np.partition(d, (r - 1, r))
    return float((part[r - 1] + part[r]) / 2.0)


def interior_points(
    rle: Rle, rule: str = "orsgen", crop: PaddedCrop | None = None, distance: np.ndarray | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two interior points by the Seg-Zero rule (``rule="orsgen"``) or exactly as Seg-Zero's code.

    The first point is the maximum of the mask's distance transform (the
    pixel deepest inside). The second is the distance-transform maximum among
    mask pixels farther from the first point than the median such distance,
    which puts it in another part of the object. Pixels outside the image count
    as background, so points keep away from the image border too. Ties break
    on the first pixel in row-major order, so the result is deterministic.

    ``rule="segzero"`` reproduces ``get_two_representative_points`` of
    Seg-Zero's data preparation (``prepare_dataset/training_data_prepare_toturial.ipynb``)
    instead: the distance transform runs on the image as it is, so pixels
    outside the image are *not* background (a mask touching the border has its
    deepest pixels on the border), and when no pixel lies farther from the
    first point than the median, the second point is the distance maximum in
    the 20 x 20 window ``[cy-10, cy+10) x [cx-10, cx+10)`` around the
    truncated centroid, snapped to the nearest mask pixel when it misses.

    Args:
        rle: a non-empty mask.
        rule: ``orsgen`` (points keep away from the image border) or
            ``segzero`` (Seg-Zero's own rule).
        crop: ``decode_crop(rle, pad_px=1)`` if already decoded (not changed).
        distance: OpenCV's precise distance transform of that crop if already
            computed (``padded_distance_transforms``; not changed).

    Returns:
        ``((x1, y1), (x2, y2))`` in integer image pixel coordinates.

    Raises:
        MaskError: the mask is empty (reason ``empty_mask``).
        ValueError: ``rule`` is not one of ``POINT_RULES``.
    """
    if rule not in POINT_RULES:
        raise ValueError(f"point rule {rule!r} is not one of {POINT_RULES}.")
    if rule == "segzero":
        if rle_area(rle) == 0:
            raise MaskError("empty_mask", "interior points of an empty mask do not exist.")
        return _segzero_points(rle)
    crop, (ox, oy) = crop if crop is not None else decode_crop(rle, pad_px=1)
    cw = crop.shape[1]
    if distance is None:
        distance = cv2.distanceTransform(_as_uint8(crop), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # The precise transform is exact: sqrt of an integer squared distance. Its
    # float32 result varies in the last bits between calls on different
    # threads (as Beam makes them), which flips ties; the rounded squared
    # distance is the exact integer, so ties break the same way every time.
    # (In place: d * d is what ``d ** 2`` computes.)
    dist = distance.astype(np.float64)
    np.multiply(dist, dist, out=dist)
    np.rint(dist, out=dist)
    i1 = int(dist.argmax())
    # Every mask pixel is at least 1 from the background and every other
    # pixel 0 (the padded crop covers the mask's box, so it holds every mask
    # pixel and a background ring): a zero maximum means an empty mask.
    if dist.flat[i1] == 0.0:
        raise MaskError("empty_mask", "interior points of an empty mask do not exist.")
    y1, x1 = divmod(i1, cw)
    # The squared distance of every crop pixel to the first point, from one
    # row and one column of squares (no per-pixel row/column split), then
    # the mask's pixels in row-major order (as np.nonzero lists them).
    ch = crop.shape[0]
    n = max(ch, cw)
    sqr = _squares(n)
    sq_grid = np.add.outer(sqr[n - y1 : n - y1 + ch], sqr[n - x1 : n - x1 + cw])
    sq = sq_grid[crop]
    m = sq.size
    k = m // 2
    # The middle value(s) of the squared distances: one selection, and for an
    # even count the largest value below it (partitioning at two ranks
    # costs about three times one).
    part = np.partition(sq, k)
    hi = int(part[k])
    lo = hi if m % 2 else int(part[:k].max())
    if lo == hi and _one_hypot(lo):
        # The usual case of ``_beyond_median``: one middle squared distance,
        # whose pixels all have one hypot, so the farther pixels are those
        # with a larger squared distance. Their distance-transform maximum,
        # first in row-major order, is the grid's first maximum once the
        # others are zeroed (pixels off the mask are 0 already, mask pixels
        # at least 1).
        far_dist = np.where(sq_grid > hi, dist, 0.0)
        j = int(far_dist.argmax())
        p2 = (j % cw, j // cw) if far_dist.flat[j] > 0.0 else (x1, y1)
        return (int(x1 + ox), int(y1 + oy)), (int(p2[0] + ox), int(p2[1] + oy))
    flat = crop.ravel().nonzero()[0]
    far = _beyond_median(sq, flat, cw, x1, y1)
    if far.size == 0:
        p2 = (x1, y1)
    else:
        cand = flat[far]
        # Row-major candidates, and argmax takes the first maximum.
        j = int(cand[int(dist.ravel()[cand].argmax())])
        p2 = (j % cw, j // cw)
    return (int(x1 + ox), int(y1 + oy)), (int(p2[0] + ox), int(p2[1] + oy))


#: Pixels per distance-transform mosaic (``padded_distance_transforms``):
#: bounds the mosaic's memory (4 bytes a pixel); a larger crop has its own.
MOSAIC_MAX_PX = 1 << 20


def padded_distance_transforms(crops: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``cv2.distanceTransform(crop, DIST_L2, DIST_MASK_PRECISE)`` of each padded crop, from mosaics of them.

    Every crop must have an all-background border (``decode_crop`` with
    ``pad_px >= 1`` makes such crops: the mask lies inside its box). Then
    the nearest background pixel of any crop pixel lies in its own crop (a
    pixel outside it is farther than the border pixel in the
    same row or column), so the precise (exact Euclidean) transform of a
    mosaic of crops holds each crop's own transform: the same exact roots,
    which ``interior_points`` squares and rounds. One transform per mosaic
    costs about two thirds of one per crop (OpenCV's cost per row and column
    is paid on a few long ones instead of many short ones).

    Crops go into mosaics of up to ``MOSAIC_MAX_PX`` pixels, on shelves:
    the tallest first, side by side up to about the square root of their
    area, the next shelf below.

    Returns:
        float32 views, one per crop, into the mosaics (read them, do not
        write: neighbours share the mosaic).
    """
    out: list[np.ndarray | None] = [None] * len(crops)
    group: list[int] = []
    area = 0
    for i, c in enumerate(crops):
        if c.size > MOSAIC_MAX_PX:
            out[i] = cv2.distanceTransform(_as_uint8(c), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            continue
        if area + c.size > MOSAIC_MAX_PX:
            _mosaic_distances(crops, group, out)
            group, area = [], 0
        group.append(i)
        area += c.size
    _mosaic_distances(crops, group, out)
    return out  # type: ignore[return-value]


def _mosaic_distances(crops: Sequence[np.ndarray], group: list[int], out: list[np.ndarray | None]) -> None:
    """Shelf-packs ``crops[i] for i in group`` into one image, transforms it, and stores each crop's view in ``out[i]``."""
    if not group:
        return
    if len(group) == 1:
        i = group[0]
        out[i] = cv2.distanceTransform(_as_uint8(crops[i]), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return
    order = sorted(group, key=lambda i: -crops[i].shape[0])
    width = max(max(crops[i].shape[1] for i in group), int(math.sqrt(sum(crops[i].size for i in group)) * 1.1))
    at: list[tuple[int, int, int]] = []
    x = y = shelf = right = 0
    for i in order:
        h, w = crops[i].shape
        if x + w > width:
            y, x, shelf = y + shelf, 0, 0
        shelf = shelf or h
        at.append((i, y, x))
        x += w
        right = max(right, x)
    mosaic = np.zeros((y + shelf, right), dtype=np.uint8)
    for i, y0, x0 in at:
        h, w = crops[i].shape
        mosaic[y0 : y0 + h, x0 : x0 + w] = crops[i]
    dist = cv2.distanceTransform(mosaic, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    for i, y0, x0 in at:
        h, w = crops[i].shape
        out[i] = dist[y0 : y0 + h, x0 : x0 + w]


@functools.lru_cache(maxsize=4096)
def _one_hypot(sq: int) -> bool:
    """Whether every pixel offset ``(dx, dy)`` with ``dx**2 + dy**2 == sq`` has the same ``np.hypot``.

    Then the pixels at squared distance ``sq`` from a point are all at one
    distance, whichever of them a mask holds (every sign and order of each
    way of writing ``sq`` as a sum of two squares is checked).
    """
    a = np.arange(math.isqrt(sq // 2) + 1, dtype=np.int64)
    b = np.sqrt((sq - a * a).astype(np.float64)).round().astype(np.int64)
    ok = a * a + b * b == sq
    a, b = a[ok].astype(np.float64), b[ok].astype(np.float64)
    d = np.hypot(np.concatenate([a, -a, a, -a, b, -b, b, -b]), np.concatenate([b, b, -b, -b, a, a, -a, -a]))
    return bool(d.size == 0 or d.min() == d.max())


def _exact_sq_dist(mask: np.ndarray) -> np.ndarray:
    # Squared Euclidean distance to the nearest zero pixel *inside the array*
    # (cv2, like scipy's distance_transform_edt, never treats the outside as
    # background). Rounded to the exact integer so ties break identically.
    if not (~mask).any():
        # No background anywhere: scipy returns each pixel's distance to a
        # virtual zero outside; no real mask (an object filling the whole
        # image) makes a useful point of it, so take the centre.
        h, w = mask.shape
        yy, xx = np.mgrid[0:h, 0:w]
        return -((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2)
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.rint(dist.astype(np.float64) ** 2)


def _segzero_points(rle: Rle) -> tuple[tuple[int, int], tuple[int, int]]:
    h, w = rle.size
    bx, by, bw, bh = (int(v) for v in rle_bbox_xywh(rle))
    # Pad by one pixel only where the box is inside the image: that ring is
    # background in the full image and holds every nearest zero, so the crop's
    # transform equals the full image's; at the image border nothing is added.
    x0, y0 = max(bx - 1, 0), max(by - 1, 0)
    x1, y1 = min(bx + bw + 1, w), min(by + bh + 1, h)
    crop, _ = decode_crop(rle, (x0, y0, x1, y1))
    dist = _exact_sq_dist(crop)
    # The first maximum in row-major order, as np.argmax over the full image.
    i1 = int(np.argmax(np.where(crop, dist, -np.inf)))
    py1, px1 = divmod(i1, crop.shape[1])
    ys, xs = np.nonzero(crop)  # row-major, as np.where
    d1 = np.sqrt((ys - py1) ** 2 + (xs - px1) ** 2)
    far = d1 > np.median(d1)
    if far.any():
        j = int(np.argmax(dist[ys[far], xs[far]]))
        py2, px2 = int(ys[far][j]), int(xs[far][j])
    else:
        # Window around the truncated centroid, in image coordinates, clipped.
        cy, cx = int(np.mean(ys + y0)), int(np.mean(xs + x0))
        wy0, wx0 = max(0, cy - 10), max(0, cx - 10)
        wy1, wx1 = min(h, cy + 10), min(w, cx + 10)
        win = np.zeros((wy1 - wy0, wx1 - wx0))
        # Outside the crop the full image's distance is 0 (background).
        oy0, oy1 = max(wy0, y0), min(wy1, y1)
        ox0, ox1 = max(wx0, x0), min(wx1, x1)
        if oy0 < oy1 and ox0 < ox1:
            part = np.where(crop, dist, 0.0)[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0]
            win[oy0 - wy0 : oy1 - wy0, ox0 - wx0 : ox1 - wx0] = np.maximum(part, 0.0)
        ly, lx = divmod(int(np.argmax(win)), win.shape[1])
        gy, gx = ly + wy0, lx + wx0
        on_mask = y0 <= gy < y1 and x0 <= gx < x1 and bool(crop[gy - y0, gx - x0])
        if not on_mask:
            k = int(np.argmin((xs + x0 - gx) ** 2 + (ys + y0 - gy) ** 2))
            gy, gx = int(ys[k] + y0), int(xs[k] + x0)
        py2, px2 = gy - y0, gx - x0
    return (int(px1 + x0), int(py1 + y0)), (int(px2 + x0), int(py2 + y0))


# ---------------------------------------------------------------- polygons


def rle_to_geometry(rle: Rle, tolerance_px: float = 0.0, crop: PaddedCrop | None = None) -> BaseGeometry:
    """A valid shapely (Multi)Polygon tracing the mask's pixel outline.

    Contours come from OpenCV on the cropped mask (outer rings and holes).
    Contour points are pixel centres, so each ring is grown by half a pixel
    (mitred) to trace the pixel edges; rasterising the result gives back the
    mask up to boundary rounding.

    Args:
        rle: the mask.
        tolerance_px: Douglas-Peucker simplification tolerance in pixels
            (0 keeps every vertex).
        crop: ``decode_crop(rle, pad_px=1)`` if already decoded (not changed).

    Returns:
        A valid ``Polygon`` or ``MultiPolygon`` in image pixel coordinates; an
        empty ``Polygon`` for an empty mask.
    """
    return rle_to_geometries([(rle, crop)], tolerance_px)[0]


def rle_to_geometries(
    masks: Sequence[tuple[Rle, PaddedCrop | CompactCrop | ApartCrops | None]], tolerance_px: float = 0.0
) -> list[BaseGeometry]:
    """``[rle_to_geometry(rle, tolerance_px, crop) for rle, crop in masks]``, GEOS called on arrays.

    A crop may also be a ``CompactCrop`` of the mask (``compact_crop`` of
    crops whose union is the mask): its contours, put back at their image
    rows and columns, are those of the full crop. Or ``ApartCrops`` of
    crops whose union is the mask (``outline_parts``): the union's contours
    are then those of the crops, each traced once per batch (``_apart_rings``).

    Each GEOS step (ring polygons, validity, repair, the half-pixel growth,
    validity after the union, simplification) runs once over the rings or
    outlines of all the masks: the same operation on each element as one
    call per mask, without the per-call Python cost of shapely's functions,
    which was about a fifth of an outline's time. The union of one mask's
    rings and its holes stay per mask.
    """
    out: list[BaseGeometry | None] = [None] * len(masks)
    # Per mask: (mask index, its outer contours in OpenCV's order, in runs
    # that share a crop origin: (outer contours, the holes of each, ox, oy)).
    traced: list[tuple[int, list[_RingRun]]] = []
    # findContours of each crop array met in this batch (a target's crop
    # is traced once for its own outline and for the unions that hold it).
    traces: dict[int, _Trace] = {}
    for i, (rle, crop) in enumerate(masks):
        if crop is None:
            if rle_area(rle) == 0:
                out[i] = Polygon()
                continue
            crop = decode_crop(rle, pad_px=1)
        if type(crop) is ApartCrops:
            runs = _apart_rings(crop, traces)
            if runs is None:
                crop = compact_crop(crop.parts)
            elif not runs:
                out[i] = Polygon()
                continue
            else:
                traced.append((i, runs))
                continue
        if type(crop) is CompactCrop:
            pixels, cols, rows = crop
            ox = oy = 0
            contours, hierarchy = cv2.findContours(_as_uint8(pixels), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        else:
            pixels, (ox, oy) = crop
            contours, hierarchy = _traced(pixels, traces)
        # An empty mask has no contour (the padded crop holds every mask pixel).
        if hierarchy is None:
            out[i] = Polygon()
            continue
        if type(crop) is CompactCrop:
            # Image coordinates with a zero origin: every later step adds
            # ``origin + 0.5`` to int coordinates, exact either way.
            contours = _uncompacted(contours, cols, rows)
        hier = hierarchy[0].tolist()
        outer_idx = [k for k, h in enumerate(hier) if h[3] == -1]  # the others are holes, attached below
        traced.append((i, [([contours[k] for k in outer_idx], [_holes(contours, hier, k) for k in outer_idx], ox, oy)]))
    grown = _grown_rings_many([(outer, ox, oy) for _, runs in traced for outer, _, ox, oy in runs])
    unions = []
    at = 0
    for _, runs in traced:
        polys = []
        for outer, holes, ox, oy in runs:
            run_polys = grown[at]
            at += 1
            for n, hole_contours in enumerate(holes):
                for cnt in hole_contours:
                    hole = _ring_geometry(cnt, ox, oy, grow=False)
                    if not hole.is_empty:
                        run_polys[n] = run_polys[n].difference(hole.buffer(-0.5, join_style="mitre"))
            polys.extend(run_polys)
        if len(polys) == 1 and type(polys[0]) is Polygon and not _is_empty(polys[0]):
            # GEOS's union of one non-empty polygon is a clone of it (its
            # cascaded union of a single item copies it; no overlay runs),
            # so the polygon itself is the union. An empty one would come
            # back as an empty collection: it takes the call.
            unions.append(polys[0])
        else:
            unions.append(shapely.unary_union(polys))
    if unions:
        geoms = np.empty(len(unions), dtype=object)
        geoms[:] = unions
        geoms = _made_valid(geoms)
        if tolerance_px > 0:
            geoms = _made_valid(shapely.simplify(geoms, tolerance_px, preserve_topology=True))
        for (i, *_), geom in zip(traced, geoms.tolist()):
            out[i] = _polygonal(geom)
    return out  # type: ignore[return-value]


#: A run of outer contours that share a crop origin: (contours, the hole contours of each, ox, oy).
_RingRun = tuple[list[np.ndarray], list[list[np.ndarray]], int, int]
#: A crop array and its ``cv2.findContours`` result.
_Trace = tuple[np.ndarray, Sequence[np.ndarray], np.ndarray | None]

#: ``rle_to_geometries`` traces an ``ApartCrops`` union crop by crop only
#: below this many contours in all (OpenCV's border labels are 7-bit: the
#: union's own trace never wraps them then).
APART_MAX_CONTOURS = 100


def _traced(pixels: np.ndarray, traces: dict[int, _Trace]) -> tuple[Sequence[np.ndarray], np.ndarray | None]:
    """``cv2.findContours`` (CCOMP, SIMPLE) of a crop, once per crop array (``traces``: by ``id``, with the array)."""
    got = traces.get(id(pixels))
    if got is None or got[0] is not pixels:  # an id is only reused once its array is gone
        contours, hierarchy = cv2.findContours(_as_uint8(pixels), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        got = traces[id(pixels)] = (pixels, contours, hierarchy)
    return got[1], got[2]


def _holes(contours: Sequence[np.ndarray], hier: list[list[int]], k: int) -> list[np.ndarray]:
    """The hole contours of outer contour ``k``, in OpenCV's order (its first child, then each next sibling)."""
    holes = []
    child = hier[k][2]
    while child != -1:
        holes.append(contours[child])
        child = hier[child][0]
    return holes


def _apart_rings(crop: ApartCrops, traces: dict[int, _Trace]) -> list[_RingRun] | None:
    """The outer contours (with holes) of the union of masks that lie apart, as ``cv2.findContours`` lists the union's.

    No pixel of one mask is next to a pixel of another, so Suzuki's border
    following, which reads only the eight neighbours of mask pixels, traces
    in the union exactly the borders it traces in each mask alone (same
    start pixel, chain and kept points; each hole stays with its own outer
    border). What the union changes is their order: OpenCV's raster scan
    finds each outer border at its component's first pixel in row-major
    order, which is the contour's first point, and RETR_CCOMP lists the
    outer borders last found first, each with its holes. So the masks'
    outer contours are merged in decreasing (row, column) of their first
    point in image coordinates. tests/test_targets_fast.py checks this
    against OpenCV's trace of the union on tricky masks.

    Returns:
        Runs of consecutive outer contours from one crop; None when the
        masks have ``APART_MAX_CONTOURS`` contours or more (trace the union).
    """
    parts: list[tuple[Sequence[np.ndarray], list[list[int]], int, int]] = []
    found: list[tuple[int, int, int, int]] = []  # (row, column) of the first point, part, contour
    total = 0
    for pixels, (ox, oy) in crop.parts:
        contours, hierarchy = _traced(pixels, traces)
        if hierarchy is None:
            continue
        total += len(contours)
        hier = hierarchy[0].tolist()
        n = len(parts)
        parts.append((contours, hier, ox, oy))
        for k, h in enumerate(hier):
            if h[3] == -1:
                first = contours[k][0, 0]
                found.append((int(first[1]) + oy, int(first[0]) + ox, n, k))
    if total >= APART_MAX_CONTOURS:
        return None
    found.sort(reverse=True)  # the first points of different outer contours are different pixels
    runs: list[_RingRun] = []
    last = -1
    for _, _, n, k in found:
        contours, hier, ox, oy = parts[n]
        if n != last:
            runs.append(([], [], ox, oy))
            last = n
        runs[-1][0].append(contours[k])
        runs[-1][1].append(_holes(contours, hier, k))
    return runs


def _uncompacted(contours: Sequence[np.ndarray], cols: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """OpenCV's contours of a ``CompactCrop``'s pixels, at image coordinates (same int32 ``(n, 1, 2)`` shape)."""
    pts = np.concatenate(contours)
    xy = pts.reshape(-1, 2)
    xy[:, 0] = cols[xy[:, 0]]
    xy[:, 1] = rows[xy[:, 1]]
    out = []
    at = 0
    for c in contours:
        out.append(pts[at : at + len(c)])
        at += len(c)
    return out


def _made_valid(geoms: np.ndarray) -> np.ndarray:
    """``_make_valid`` of each element of an object array (in place)."""
    invalid = ~_is_valid(geoms)
    if invalid.any():
        geoms[invalid] = shapely.make_valid(geoms[invalid])
    return geoms


def _make_valid(geom: BaseGeometry) -> BaseGeometry:
    """``shapely.make_valid``, skipped for a geometry that is already valid.

    GEOS's MakeValid returns an exact clone of a valid input (it checks
    validity first), so the answer is the same; but its check costs several
    times GEOS's ``is_valid``, and almost every mask outline is valid.
    """
    return geom if _is_valid(geom) else shapely.make_valid(geom)


#: GEOS's validity check itself: what ``shapely.is_valid`` calls inside its
#: Python wrapper (argument checks, a warnings filter it does not need here:
#: GEOS reports invalidity as the False result). Called on every outline
#: several times, where the wrapper cost as much as the check.
_is_valid = getattr(getattr(shapely, "lib", None), "is_valid", None) or shapely.is_valid
#: GEOS's emptiness check, likewise without shapely's wrapper.
_is_empty = getattr(getattr(shapely, "lib", None), "is_empty", None) or shapely.is_empty


def _grown_rings_many(groups: Sequence[tuple[Sequence[np.ndarray], int, int]]) -> list[list[BaseGeometry]]:
    """``[[_ring_geometry(c, ox, oy) for c in contours] for contours, ox, oy in groups]``, GEOS called once per step.

    Each group is one mask's contours with its crop origin; the rings of all
    groups go through each GEOS step together.

    Rings of three or more points become polygons together
    (``shapely.polygons`` / ``is_valid`` / ``buffer`` on arrays run the same
    GEOS operation on each element as the scalar calls); the rare one- and
    two-point contours take the scalar path.

    A ring met again (the same image coordinates, e.g. a target's own
    outline inside the union of a target set, traced once for each) is
    grown once and its geometry shared: each step is a pure function of the
    ring's coordinates, so the copy would be the same geometry. About a
    third of a dense COCO image's rings repeat.
    """
    out: list[list[BaseGeometry | None]] = [[None] * len(contours) for contours, _, _ in groups]
    rings: list[np.ndarray] = []
    at: list[tuple[int, int, int]] = []
    seen: dict[bytes, int] = {}
    for g, (contours, ox, oy) in enumerate(groups):
        shift = np.array([ox + 0.5, oy + 0.5])
        for i, cnt in enumerate(contours):
            if len(cnt) >= 3:
                ring = cnt.reshape(-1, 2).astype(np.float64) + shift
                # The float64 image coordinates, byte for byte: equal keys
                # are equal rings (same points, order and start).
                j = seen.setdefault(ring.tobytes(), len(rings))
                if j == len(rings):
                    rings.append(ring)
                at.append((g, i, j))
            else:
                out[g][i] = _ring_geometry(cnt, ox, oy)
    if rings:
        if len(rings) == 1:
            # One ring: the same ring without the grouping index.
            polys = np.empty(1, dtype=object)
            polys[0] = shapely.polygons(shapely.linearrings(rings[0]))
        else:
            index = np.arange(len(rings)).repeat([len(r) for r in rings])
            polys = shapely.polygons(shapely.linearrings(np.concatenate(rings), indices=index))
        polys = _made_valid(polys)
        grown = shapely.buffer(polys, 0.5, quad_segs=16, join_style="mitre", cap_style="square").tolist()
        for g, i, j in at:
            out[g][i] = grown[j]
    return out  # type: ignore[return-value]


def _ring_geometry(cnt: np.ndarray, ox: int, oy: int, grow: bool = True) -> BaseGeometry:
    pts = cnt.reshape(-1, 2).astype(np.float64) + np.array([ox + 0.5, oy + 0.5])
    if len(pts) == 1:
        g: BaseGeometry = shapely.Point(pts[0])
    elif len(pts) == 2:
        g = shapely.LineString(pts)
    else:
        g = _make_valid(Polygon(pts))
    return g.buffer(0.5, join_style="mitre", cap_style="square") if grow else g


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Keeps only the polygonal parts of a geometry."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    if not parts:
        return Polygon()
    return _make_valid(shapely.unary_union(parts))


def geometry_to_coco_polygons(geom: BaseGeometry) -> list[list[float]]:
    """Flattens a (Multi)Polygon's exterior rings into COCO polygon lists.

    COCO polygons cannot hold holes; a hole is kept by rasterising with
    ``geometry_to_rle`` instead. Use this for export formats that want
    ``[[x0, y0, x1, y1, ...], ...]``.
    """
    out: list[list[float]] = []
    for poly in _iter_polygons(geom):
        coords = np.asarray(poly.exterior.coords)[:-1]
        if len(coords) >= 3:
            out.append([float(v) for v in coords.reshape(-1)])
    return out


def _iter_polygons(geom: BaseGeometry) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and not g.is_empty]


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> Rle:
    """Rasterises COCO polygon lists ``[[x0, y0, x1, y1, ...], ...]`` to one RLE.

    Args:
        polygons: COCO polygons in image pixel coordinates; several polygons
            are merged into one mask; an empty list gives an empty mask.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        The union of the polygons as compressed RLE of size ``(height, width)``.

    Raises:
        MaskError: a polygon has fewer than 3 points, or non-finite or far
            out-of-image coordinates (reason ``bad_polygon``).
    """
    polys = [list(map(float, p)) for p in polygons]
    if not polys:
        return empty_rle(height, width)
    lim = 2.0 * max(height, width) + 1.0
    for p in polys:
        if len(p) < 6 or len(p) % 2:
            raise MaskError("bad_polygon", f"a COCO polygon needs >= 3 (x, y) pairs, got {len(p)} numbers.")
        # pycocotools' rasteriser crashes the process (not an exception) on
        # huge or non-finite coordinates, so refuse them before it sees them.
        # A finite sum means no NaN or inf, so min and max are then exact
        # (an overflowing sum of finite values goes to the array check).
        if math.isfinite(sum(p)) and -lim <= min(p) and max(p) <= lim:
            continue
        arr = np.asarray(p)
        if not np.isfinite(arr).all() or (np.abs(arr) > lim).any():
            raise MaskError("bad_polygon", f"polygon coordinates must be finite and within {lim:.0f} px of the image.")
    return rasterize_polygons(polys, height, width)


def rasterize_polygons(polygons: list[list[float]], height: int, width: int) -> Rle:
    """``polygons_to_rle``'s rasterisation, without its checks: only for polygons known to pass them.

    Every polygon must be a list of at least 6 (an even number of) finite
    numbers within ``polygons_to_rle``'s bounds, and ints among them must be
    exact as doubles (pycocotools converts each list with ``np.array(p,
    dtype=double)``, which gives ``float(v)`` for such an int): pycocotools'
    rasteriser crashes the process on what the checks refuse.
    """
    rles = mask_utils.frPyObjects(polygons, height, width)
    # The merge of one mask copies its runs and writes the same string again.
    return Rle.from_coco(rles[0] if len(rles) == 1 else mask_utils.merge(rles))


def geometry_to_rle(geom: BaseGeometry, height: int, width: int) -> Rle:
    """Rasterises a shapely (Multi)Polygon, holes included, to an RLE.

    The exteriors are rasterised with pycocotools and each hole is subtracted,
    both in RLE space.

    Args:
        geom: a (Multi)Polygon in image pixel coordinates (as from
            ``rle_to_geometry``); other geometry parts are ignored.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        The mask as compressed RLE; an empty mask for an empty geometry.
    """
    polys = _iter_polygons(geom)
    if not polys:
        return empty_rle(height, width)
    outer = polygons_to_rle(
        [np.asarray(p.exterior.coords)[:-1].reshape(-1).tolist() for p in polys if len(p.exterior.coords) >= 4],
        height,
        width,
    )
    holes = [
        np.asarray(r.coords)[:-1].reshape(-1).tolist() for p in polys for r in p.interiors if len(r.coords) >= 4
    ]
    if not holes:
        return outer
    return rle_difference(outer, polygons_to_rle(holes, height, width))


def svg_path(geom: BaseGeometry, width: int, height: int, precision: int = 4) -> str:
    """A normalised SVG path: ``M x y L x y ... Z`` per ring, coordinates in 0..1.

    Holes are written as further sub-paths, so an SVG renderer with the
    ``evenodd`` fill rule draws them as holes.

    Args:
        geom: a (Multi)Polygon in pixel coordinates.
        width: image width in pixels (x is divided by it).
        height: image height in pixels (y is divided by it).
        precision: decimals per coordinate.

    Returns:
        The path string; "" for an empty geometry.
    """
    return svg_paths([geom], width, height, precision)[0]


def svg_paths(geoms: Sequence[BaseGeometry], width: int, height: int, precision: int = 4) -> list[str]:
    """``[svg_path(g, width, height, precision) for g in geoms]``, the rings of all in one pass.

    The polygons (``_iter_polygons``: the non-empty Polygon parts), their
    rings (exterior, then holes) and the rings' coordinates come from one
    shapely array call each for all geometries, and the coordinates are
    divided and clipped in one numpy operation: the same float64 values,
    element by element, as geometry by geometry, so the same digits.
    """
    out = [""] * len(geoms)
    if not out:
        return out
    arr = np.empty(len(geoms), dtype=object)
    arr[:] = geoms
    parts, owner = shapely.get_parts(arr, return_index=True)
    # isinstance(part, Polygon) is type id 3; get_parts gives a Polygon
    # itself, and a collection's direct members (a nested MultiPolygon is
    # skipped, as _iter_polygons skips it).
    keep = (shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)
    polys = parts[keep]
    if not polys.size:
        return out
    rings, ring_poly = shapely.get_rings(polys, return_index=True)
    coords = shapely.get_coordinates(rings)
    flat = (coords / np.array([float(width), float(height)])).clip(0.0, 1.0).ravel().tolist()
    counts = shapely.get_num_coordinates(rings).tolist()
    ring_owner = owner[keep][ring_poly].tolist()
    pieces: list[str] = []
    at = 0
    last = ring_owner[0]
    for g, n in zip(ring_owner, counts):
        if g != last:
            out[last] = " ".join(pieces)
            pieces, last = [], g
        # A ring's last point repeats its first; the path closes with Z instead.
        k = n - 1
        if k <= 0:
            pieces.append(" Z")
        else:
            # One %-format of the whole ring writes the same digits as one
            # "%.4f %.4f" per point (and as format() of the numpy values).
            pieces.append(_ring_format(k, precision) % tuple(flat[2 * at : 2 * (at + k)]))
        at += n
    out[last] = " ".join(pieces)
    return out


@functools.lru_cache(maxsize=1024)
def _ring_format(n_points: int, precision: int) -> str:
    """``"M %.4f %.4f L %.4f %.4f ... Z"`` for ``n_points`` points (``precision`` decimals)."""
    point = f"%.{precision}f %.{precision}f"
    return "M " + " L ".join([point] * n_points) + " Z"


# ---------------------------------------------------------------- COCO segmentations


_PLAIN_NUMBER_TYPES = frozenset((int, float, bool))
_PLAIN_INT_TYPES = frozenset((int, bool))


def _is_number_list(p: Any) -> bool:
    """``isinstance(p, list)`` and every item an int or float (bools count, as ints)."""
    if type(p) is list and set(map(type, p)) <= _PLAIN_NUMBER_TYPES:
        return True  # one C pass over the item types; subclasses take the loop
    return isinstance(p, list) and all(isinstance(v, (int, float)) for v in p)


def _is_count_list(counts: list[Any]) -> bool:
    """Every item of an uncompressed RLE ``counts`` list is an int >= 0 (bools count, as ints)."""
    if set(map(type, counts)) <= _PLAIN_INT_TYPES:
        return not counts or min(counts) >= 0
    return all(isinstance(c, int) and c >= 0 for c in counts)


def segmentation_to_rle(segm: Any, height: int, width: int) -> tuple[Rle, str]:
    """Converts any COCO ``segmentation`` to compressed RLE.

    Accepts polygons (list of lists), uncompressed RLE (``counts`` a list) and
    compressed RLE (``counts`` a string), as COCO files mix all three.

    Args:
        segm: the annotation's ``segmentation`` value.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        ``(rle, origin)`` with origin ``polygon``, ``uncompressed_rle`` or ``rle``.

    Raises:
        MaskError: malformed segmentation, or an RLE whose size disagrees with
            the image (reason ``rle_size_mismatch``).
    """
    if isinstance(segm, list):
        if not segm:
            raise MaskError("empty_mask", "segmentation is an empty polygon list.")
        if not all(_is_number_list(p) for p in segm):
            raise MaskError("bad_polygon", "segmentation polygons must be lists of numbers.")
        return polygons_to_rle(segm, height, width), "polygon"
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise MaskError("bad_rle", f"RLE size must be [h, w] integers, got {size!r}.")
        if [int(size[0]), int(size[1])] != [height, width]:
            raise MaskError(
                "rle_size_mismatch",
                f"RLE size {size} disagrees with the image size [{height}, {width}].",
            )
        counts = segm["counts"]
        if isinstance(counts, list):
            if not _is_count_list(counts) or sum(counts) != height * width:
                raise MaskError("bad_rle", "uncompressed RLE counts must be non-negative ints summing to h*w.")
            return Rle.from_coco(mask_utils.frPyObjects(segm, height, width)), "uncompressed_rle"
        if isinstance(counts, (str, bytes)):
            rle = Rle.from_coco(segm)
            validate_rle(rle)
            return rle, "rle"
        raise MaskError("bad_rle", f"RLE counts must be a list or a string, got {type(counts).__name__}.")
    raise MaskError("bad_segmentation", f"segmentation must be polygons or an RLE dict, got {type(segm).__name__}.")
