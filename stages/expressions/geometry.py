"""Exact geometric semantics of the descriptive template families.

Every descriptive expression orsgen writes is a statement about instance
geometry that this module can evaluate: centroids (first moments of the mask,
computed on the RLE runs without decoding), visible mask areas and pixel
boxes. A predicate is a conjunction of scalar conditions, each ``value > 0``
in pixels (or log-area units for size). With a margin ``m`` a condition is

* clearly true when ``value > m``,
* clearly false when ``value < -m``,
* unsure otherwise.

Relative conditions ("larger than") use a relative margin ``s`` instead:
``x > y`` is clearly true when ``x > (1 + s) y`` and clearly false when
``(1 + s) x < y``. An instance is ``TRUE`` when all conditions are clearly true, ``FALSE`` when
at least one is clearly false, and ``UNSURE`` otherwise. An expression is
emitted only when at least one instance of the named category is ``TRUE`` and
none is ``UNSURE``: near-ties never become data, and what the expression
says picks out exactly its targets among all instances of the category.

Families (``cx, cy`` centroid; ``x0, y0, x1, y1`` box, exclusive max; ``W, H``
image size; ``a`` visible mask area):

Two readings of where an object is. People judge position by the bulk of
an object (its centroid) *and* by its extent (its box): "the zebra furthest
to the left" is false when the other zebra's head reaches further left, even
if its body's centroid does not. Positional families (absolute, ordinal) are
evaluated under both readings; an instance is ``TRUE`` only when both say
``TRUE``, ``FALSE`` only when both say ``FALSE``, and ``UNSURE`` otherwise.

* ``absolute``: image thirds. ``left``: ``W/3 - x``; ``right``: ``x - 2W/3``;
  ``top``: ``H/3 - y``; ``bottom``: ``y - 2H/3``; ``center``: the four
  conditions of the middle cell; corners: the two conditions of the cell.
  ``(x, y)`` is the centroid ``(cx, cy)`` in the centroid reading and the box
  centre ``((x0 + x1)/2, (y0 + y1)/2)`` in the box reading.
* ``ordinal`` (side, rank ``k``): with ``v = cx`` (left), ``-cx`` (right),
  ``cy`` (top) or ``-cy`` (bottom) in the centroid reading, and the leading
  box edge ``v = x0``, ``-x1``, ``y0`` or ``-y1`` in the box reading,
  instance ``i`` is ``TRUE`` in a reading when exactly ``k`` others have
  ``v < v_i - m`` and none lies within ``m`` of it; ``FALSE`` when its
  possible ranks exclude ``k``.
* ``size``: ``largest`` is ``a_i > a_j`` for every other ``j`` (relative
  margin ``s``: ``TRUE`` when ``a_i > (1 + s) a_j`` for all, ``FALSE`` when
  some ``a_j > (1 + s) a_i``); ``smallest`` mirrors it.
* ``relation`` to an anchor ``r`` (another category with exactly one
  instance): ``left_of``: ``cx_r - cx_i``; ``right_of``: ``cx_i - cx_r``;
  ``above``: ``cy_r - cy_i``; ``below``: ``cy_i - cy_r``. A directional
  relation must also be *plain*: the boxes are separated along its axis
  (``t * min(extent_i, extent_r) - overlap``, with ``t`` the configured
  ``relation_max_axis_overlap`` and ``overlap`` the boxes' overlap on the
  axis), the subject's box leads on both edges (``x1_r - x1_i`` and
  ``x0_r - x0_i`` for ``left_of``), and neither centroid lies inside the
  other's box (``outside(c_i, box_r)`` and ``outside(c_r, box_i)``, the
  distance from the point to the box, negative inside). A plainness
  condition can only make an instance ``UNSURE``, never ``FALSE``: a cup
  standing on the left end of a table is neither plainly left of it nor
  plainly not. ``next_to``:
  ``near - gap`` with ``gap`` the Euclidean distance between the two boxes
  (0 when they overlap), plain when neither centroid lies inside the other's
  box (a person sitting on a bench is on it, not next to it);
  ``on``: ``overlap_x - 0.6 w_i`` (mostly over the
  anchor), ``y1_i - y0_r`` (its bottom below the anchor's top edge),
  ``cy_r - y1_i`` (its bottom above the anchor's centroid) and
  ``y0_r - y0_i`` (it rises above the anchor); ``holding``: the anchor's box
  inside the subject's box (four conditions), the anchor's centroid in the
  band 20%-75% down the subject's box, and ``0.5 a_i > a_r`` (the anchor
  is at most half the subject's area; relative size margin).

These are the definitions the independent test in
``tests/test_expression_semantics.py`` re-implements on dense masks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from orsgen.schemas.records import Instance, Rle, slots_constructor
from orsgen.stages.common.masks import rle_counts_to_runs, warm_runs_cache

#: ``on``: the subject's box must overlap the anchor's box on at least this
#: fraction of the subject's width.
ON_MIN_X_OVERLAP = 0.6
#: ``holding``: the anchor's centroid lies in this band of the subject's box
#: height (fractions from its top): hands, not head or feet.
HOLD_BAND = (0.2, 0.75)
#: ``holding``: the anchor covers at most this fraction of the subject's area.
HOLD_MAX_AREA_RATIO = 0.5

ABSOLUTE_REGIONS = (
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "top_left",
    "top_right",
    "bottom_left",
    "bottom_right",
)
ORDINAL_SIDES = ("left", "right", "top", "bottom")
SIZE_ORDERS = ("largest", "smallest")
RELATIONS = ("left_of", "right_of", "above", "below", "next_to", "on", "holding")


class Truth(Enum):
    """Whether an instance satisfies a predicate, with the margin applied."""

    TRUE = "true"
    FALSE = "false"
    UNSURE = "unsure"


@dataclass(frozen=True, slots=True)
class Geom:
    """The geometry of one instance that the semantics read.

    Attributes:
        instance_id: the instance.
        category: its category name, or None (class-agnostic).
        iscrowd: COCO crowd flag.
        area_px: visible mask area in pixels.
        cx: centroid x in pixels (pixel centres at ``x + 0.5``).
        cy: centroid y in pixels.
        x0: box left (pixels).
        y0: box top.
        x1: box right (exclusive).
        y1: box bottom (exclusive).
    """

    instance_id: str
    category: str | None
    iscrowd: bool
    area_px: float
    cx: float
    cy: float
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return self.y1 - self.y0


@dataclass(frozen=True, slots=True)
class Margins:
    """Margins of the semantics for one image.

    Attributes:
        position_px: margin of every pixel-valued condition.
        size_ratio: relative margin of size conditions (0.25: 25% larger).
        near_px: the largest box gap that counts as ``next_to``.
        axis_overlap_frac: directional relations allow the boxes to overlap
            on the relation's axis by at most this fraction of the smaller
            box's extent on that axis.
    """

    position_px: float
    size_ratio: float
    near_px: float
    axis_overlap_frac: float = 0.1

    @classmethod
    def for_image(
        cls,
        width: int,
        height: int,
        *,
        margin_px: float,
        margin_frac: float,
        size_margin: float,
        next_to_max_gap_frac: float,
        axis_overlap_frac: float = 0.1,
    ) -> "Margins":
        """Margins scaled to an image.

        Args:
            width: image width in pixels.
            height: image height in pixels.
            margin_px: the smallest position margin, in pixels.
            margin_frac: position margin as a fraction of ``min(width, height)``;
                the larger of the two margins applies.
            size_margin: an area must exceed another by this fraction (0.25:
                25% larger) to count as clearly larger.
            next_to_max_gap_frac: ``next_to`` box gap limit, as a fraction of
                ``min(width, height)``.
            axis_overlap_frac: see the attribute.
        """
        side = float(min(width, height))
        return cls(
            position_px=max(float(margin_px), float(margin_frac) * side),
            size_ratio=float(size_margin),
            near_px=float(next_to_max_gap_frac) * side,
            axis_overlap_frac=float(axis_overlap_frac),
        )


# ---------------------------------------------------------------- moments


def rle_moments(rle: Rle) -> tuple[int, float, float]:
    """Area and pixel-coordinate sums of a mask, computed on its runs.

    COCO runs are column-major: pixel ``p`` is at ``x = p // h``,
    ``y = p % h``. A foreground run splits into a partial first column, whole
    middle columns and a partial last column, whose coordinate sums have
    closed forms, so no pixel is decoded.

    Args:
        rle: the mask.

    Returns:
        ``(area, sum_x, sum_y)`` over the mask's pixels (integer pixel
        indices, not centres).
    """
    return rle_moments_many([rle])[0]


def rle_moments_many(rles: Sequence[Rle]) -> list[tuple[int, float, float]]:
    """``[rle_moments(r) for r in rles]``, computed in one pass over all runs.

    The masks' counts are decoded in one numpy pass (``warm_runs_cache``;
    the runs stay cached for the target stage). A foreground run's
    coordinate sums are the difference of a prefix's closed-form sums at
    its two ends (``_rle_moments_by_prefix``): a few int64 operations over
    every run of every mask. Those sums are exact integers below 2 ** 52,
    so the floats equal the column-wise formulas' (``_rle_moments_by_columns``,
    which masks beyond that bound, or whose runs do not cover their size,
    still take); tests/test_expressions_fast.py checks both against the
    mask-at-a-time code.
    """
    n = len(rles)
    if n == 0:
        return []
    warm_runs_cache([r.counts for r in rles])
    runs_list = [rle_counts_to_runs(r.counts) for r in rles]
    got = _rle_moments_by_prefix(runs_list, rles)
    return got if got is not None else _rle_moments_by_columns(runs_list, rles)


#: A mask's prefix sums stay exact (and halve exactly as floats) below this.
_EXACT_SUM_BOUND = 2**52
_ZERO_RUN = np.zeros(1, dtype=np.int64)
_ZERO_PAIR = np.zeros(2, dtype=np.int64)


def _rle_moments_by_prefix(runs_list: Sequence[np.ndarray], rles: Sequence[Rle]) -> list[tuple[int, float, float]] | None:
    """``_rle_moments_by_columns`` from prefix sums, or None where their exactness is not guaranteed.

    For a prefix of ``p`` pixels (``c = p // h`` whole columns, ``q = p % h``
    more), twice its x sum is ``X(p) = h c (c - 1) + 2 q c`` and twice its y
    sum ``Y(p) = c h (h - 1) + q (q - 1)``; a foreground run's sums are the
    difference at its two ends. Each mask's runs are padded to an even count
    (zero-length runs, which add nothing; a mask with no runs gets a pair),
    so the foreground runs are the odd entries of the concatenation and a
    mask's sums are those of ``F(end of run 2i + 1) - F(end of run 2i)`` over
    its pairs: ``F`` is evaluated once per run end, and the differences are
    summed per mask (``np.add.reduceat``; every mask has a pair).
    """
    parts: list[np.ndarray] = []
    n_runs: list[int] = []
    hs: list[int] = []
    sizes: list[int] = []
    bound = 0
    for rle, runs in zip(rles, runs_list):
        h, w = int(rle.size[0]), int(rle.size[1])
        # Twice a prefix's x or y sum, and every product below, stays under
        # this when the runs cover the mask's h * w pixels (checked below).
        b = h * w * (max(h, w) + 3)
        if h <= 0 or w < 0 or b >= _EXACT_SUM_BOUND:
            return None
        bound += b
        hs.append(h)
        sizes.append(h * w)
        parts.append(runs)
        k = len(runs)
        if k & 1:
            parts.append(_ZERO_RUN)
            k += 1
        elif not k:
            parts.append(_ZERO_PAIR)
            k = 2
        n_runs.append(k)
    runs = np.concatenate(parts)
    # No int64 wrap anywhere: the cumulative sums stay under 2 ** 62.
    if bound >= 2**62 or runs.size >= 2**22 or int(runs.max()) >= 2**40:
        return None
    n = np.array(n_runs, dtype=np.int64)
    first = np.zeros(n.size + 1, dtype=np.int64)  # each mask's first run, and the end
    n.cumsum(out=first[1:])
    ends = runs.cumsum()
    mask_ends = ends[first[1:] - 1]
    base = np.zeros(n.size, dtype=np.int64)  # where each mask starts in the concatenation
    base[1:] = mask_ends[:-1]
    if not np.array_equal(mask_ends - base, sizes):
        return None  # runs that do not cover the mask: the column-wise code's answer
    p = ends - base.repeat(n)  # each run's end within its mask
    h = np.array(hs, dtype=np.int64).repeat(n)
    c, q = np.divmod(p, h)
    f = np.empty((3, p.size), dtype=np.int64)
    f[0] = p
    f[1] = h * c * (c - 1) + 2 * q * c
    f[2] = c * (h * (h - 1)) + q * (q - 1)
    sums = np.add.reduceat(f[:, 1::2] - f[:, 0::2], first[:-1] >> 1, axis=1)
    # Exact integers below 2 ** 52: float and halving are exact.
    return list(zip(sums[0].tolist(), (sums[1] / 2.0).tolist(), (sums[2] / 2.0).tolist()))


def _rle_moments_by_columns(runs_list: Sequence[np.ndarray], rles: Sequence[Rle]) -> list[tuple[int, float, float]]:
    """``rle_moments_many`` by columns: each mask's foreground runs split into a
    partial first column, whole middle columns and a partial last column;
    their terms are exact int64 segment sums per mask, and the float steps
    are the same operations in the same order as a mask-at-a-time
    computation, so every result is bit-identical to it. The terms of the
    run kind a mask lacks are added as ``0.0``, which leaves a non-negative
    sum unchanged.
    """
    n = len(rles)
    lengths = np.fromiter((len(r) for r in runs_list), dtype=np.int64, count=n)
    runs = np.concatenate(runs_list) if n > 1 else runs_list[0]
    if runs.size == 0:
        return [(0, 0.0, 0.0)] * n
    seg_start = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=seg_start[1:])
    seg_of_run = np.repeat(np.arange(n, dtype=np.int64), lengths)
    total = np.zeros(runs.size + 1, dtype=np.int64)
    np.cumsum(runs, out=total[1:])
    # Each mask's cumulative sums start at zero: subtract the total before it.
    ends = total[1:] - total[seg_start][seg_of_run]
    starts = ends - runs
    local = np.arange(runs.size, dtype=np.int64) - seg_start[seg_of_run]
    fg = (local & 1).astype(bool)
    s, e, seg = starts[fg], ends[fg], seg_of_run[fg]
    keep = e > s
    s, e, seg = s[keep], e[keep], seg[keep]
    h = np.fromiter((int(r.size[0]) for r in rles), dtype=np.int64, count=n)[seg]
    c0, r0 = np.divmod(s, h)
    c1, r1 = np.divmod(e - 1, h)
    one = c0 == c1
    m = ~one
    n_one = np.where(one, e - s, 0)
    n_first = np.where(m, h - r0, 0)
    n_last = np.where(m, r1 + 1, 0)
    n_mid = np.where(m, c1 - c0 - 1, 0)
    terms = np.stack(
        [
            n_one * c0,  # sx, one column
            (r0 + r1) * n_one,  # 2 sy, one column
            n_one + n_first + n_last + n_mid * h,  # area
            n_first * c0 + n_last * c1,  # sx, partial columns
            h * (c0 + c1) * n_mid,  # 2 sx, middle columns
            (r0 + h - 1) * n_first,  # 2 sy, first partial
            np.where(m, r1 * (r1 + 1), 0),  # 2 sy, last partial
            n_mid * h * (h - 1),  # 2 sy, middle columns
        ]
    )
    acc = np.zeros((terms.shape[0], terms.shape[1] + 1), dtype=np.int64)
    np.cumsum(terms, axis=1, out=acc[:, 1:])
    bounds = np.searchsorted(seg, np.arange(n + 1, dtype=np.int64))
    sums = acc[:, bounds[1:]] - acc[:, bounds[:-1]]
    f = sums.astype(np.float64)
    sx = f[0] + f[3]
    sx += f[4] / 2.0
    sy = f[1] / 2.0
    sy += f[5] / 2.0
    sy += f[6] / 2.0
    sy += f[7] / 2.0
    return list(zip(sums[2].tolist(), sx.tolist(), sy.tolist()))


def instance_geom(inst: Instance, moments: tuple[int, float, float] | None = None) -> Geom:
    """The ``Geom`` of an instance: centroid from RLE moments, box from the record.

    ``moments`` is ``rle_moments(inst.rle)`` when the caller has it already.
    """
    area, sx, sy = rle_moments(inst.rle) if moments is None else moments
    if area:
        cx, cy = sx / area + 0.5, sy / area + 0.5
    else:
        x0, y0, x1, y1 = inst.bbox_xyxy
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    x0, y0, x1, y1 = map(float, inst.bbox_xyxy)
    return _make_geom(inst.instance_id, inst.category_name, bool(inst.iscrowd), float(area), float(cx), float(cy), x0, y0, x1, y1)


#: ``Geom(...)`` without the frozen dataclass's ``object.__setattr__`` per field
#: (ten fields; ``ImageContext.build`` makes one per instance of every image).
_make_geom = slots_constructor(Geom)


# ---------------------------------------------------------------- conditions


#: A condition as ``(true_if_positive, false_if_negative)``: clearly true when
#: the first value is > 0, clearly false when the second is < 0.
Condition = tuple[float, float]


def additive(value: float, margin: float) -> Condition:
    """``value > 0`` with an additive margin: true above ``margin``, false below ``-margin``."""
    return (value - margin, value + margin)


def ratio(x: float, y: float, margin: float) -> Condition:
    """``x > y`` with a relative margin: true when ``x > (1 + margin) y``, false when ``(1 + margin) x < y``.

    Compared as products, not logarithms, so that a boundary case is decided
    the same way by anyone who writes the definition down.
    """
    f = 1.0 + margin
    return (x - f * y, f * x - y)


def plain(value: float, margin: float) -> Condition:
    """``value > 0`` as a plainness condition: true above ``margin``, never clearly false.

    Used where failing the condition makes a statement doubtful rather than
    false (overlapping objects): the instance becomes ``UNSURE``, so an
    expression is emitted neither about it nor about its rivals.
    """
    return (value - margin, math.inf)


def _truth(conditions: Sequence[Condition]) -> Truth:
    """Combines conditions (a conjunction) into a ``Truth``."""
    if any(fv < 0 for _tv, fv in conditions):
        return Truth.FALSE
    if all(tv > 0 for tv, _fv in conditions):
        return Truth.TRUE
    return Truth.UNSURE


#: The two readings of an object's position (see the module docstring).
READINGS = ("centroid", "box")


def _point(g: Geom, reading: str) -> tuple[float, float]:
    if reading == "centroid":
        return g.cx, g.cy
    if reading == "box":
        return (g.x0 + g.x1) / 2.0, (g.y0 + g.y1) / 2.0
    raise ValueError(f"unknown reading {reading!r}; use one of {READINGS}.")


def absolute_conditions(g: Geom, region: str, width: int, height: int, reading: str = "centroid") -> list[float]:
    """Condition values (pixels) of an absolute-position region under one reading."""
    x, y = _point(g, reading)
    # Only the region's own values are computed (a hot path: every instance,
    # region and reading); each is the same expression as in the full table
    # left / right / top / bottom, center = their negations.
    if region == "left":
        return [width / 3.0 - x]
    if region == "right":
        return [x - 2.0 * width / 3.0]
    if region == "top":
        return [height / 3.0 - y]
    if region == "bottom":
        return [y - 2.0 * height / 3.0]
    if region == "top_left":
        return [height / 3.0 - y, width / 3.0 - x]
    if region == "top_right":
        return [height / 3.0 - y, x - 2.0 * width / 3.0]
    if region == "bottom_left":
        return [y - 2.0 * height / 3.0, width / 3.0 - x]
    if region == "bottom_right":
        return [y - 2.0 * height / 3.0, x - 2.0 * width / 3.0]
    if region == "center":
        return [-(width / 3.0 - x), -(x - 2.0 * width / 3.0), -(height / 3.0 - y), -(y - 2.0 * height / 3.0)]
    raise ValueError(f"unknown absolute region {region!r}; use one of {ABSOLUTE_REGIONS}.")


def box_gap_px(a: Geom, b: Geom) -> float:
    """Euclidean distance between two boxes; 0 when they overlap or touch."""
    dx = max(0.0, b.x0 - a.x1, a.x0 - b.x1)
    dy = max(0.0, b.y0 - a.y1, a.y0 - b.y1)
    return math.hypot(dx, dy)


def outside_px(x: float, y: float, g: Geom) -> float:
    """How far the point ``(x, y)`` lies outside ``g``'s box (Chebyshev); negative inside."""
    return max(g.x0 - x, x - g.x1, g.y0 - y, y - g.y1)


def _apart(g: Geom, anchor: Geom, m: float) -> list[Condition]:
    """Neither centroid lies inside the other's box (plainness conditions)."""
    return [plain(outside_px(g.cx, g.cy, anchor), m), plain(outside_px(anchor.cx, anchor.cy, g), m)]


def _directional(g: Geom, anchor: Geom, relation: str, margins: Margins) -> list[Condition]:
    """``left_of`` / ``right_of`` / ``above`` / ``below``: centroid order, made plain."""
    m = margins.position_px
    horizontal = relation in ("left_of", "right_of")
    if horizontal:
        c_g, c_a, lo_g, hi_g, lo_a, hi_a = g.cx, anchor.cx, g.x0, g.x1, anchor.x0, anchor.x1
    else:
        c_g, c_a, lo_g, hi_g, lo_a, hi_a = g.cy, anchor.cy, g.y0, g.y1, anchor.y0, anchor.y1
    overlap = min(hi_g, hi_a) - max(lo_g, lo_a)  # negative: a gap
    allowed = margins.axis_overlap_frac * min(hi_g - lo_g, hi_a - lo_a)
    if relation in ("left_of", "above"):
        order = [additive(c_a - c_g, m), plain(hi_a - hi_g, m), plain(lo_a - lo_g, m)]
    else:
        order = [additive(c_g - c_a, m), plain(hi_g - hi_a, m), plain(lo_g - lo_a, m)]
    return order + [plain(allowed - overlap, m)] + _apart(g, anchor, m)


def relation_conditions(g: Geom, anchor: Geom, relation: str, margins: Margins) -> list[Condition]:
    """The conditions of ``g <relation> anchor``."""
    m = margins.position_px
    if relation in ("left_of", "right_of", "above", "below"):
        return _directional(g, anchor, relation, margins)
    if relation == "next_to":
        return [additive(margins.near_px - box_gap_px(g, anchor), m)] + _apart(g, anchor, m)
    if relation == "on":
        overlap_x = min(g.x1, anchor.x1) - max(g.x0, anchor.x0)
        return [
            additive(overlap_x - ON_MIN_X_OVERLAP * g.width, m),
            additive(g.y1 - anchor.y0, m),
            additive(anchor.cy - g.y1, m),
            additive(anchor.y0 - g.y0, m),
        ]
    if relation == "holding":
        band_top = g.y0 + HOLD_BAND[0] * g.height
        band_bottom = g.y0 + HOLD_BAND[1] * g.height
        return [
            additive(anchor.x0 - g.x0, m),
            additive(g.x1 - anchor.x1, m),
            additive(anchor.y0 - g.y0, m),
            additive(g.y1 - anchor.y1, m),
            additive(anchor.cy - band_top, m),
            additive(band_bottom - anchor.cy, m),
            ratio(HOLD_MAX_AREA_RATIO * g.area_px, anchor.area_px, margins.size_ratio),
        ]
    raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}.")


def _ordinal_value(g: Geom, side: str, reading: str = "centroid") -> float:
    box = reading == "box"
    if side == "left":
        return g.x0 if box else g.cx
    if side == "right":
        return -g.x1 if box else -g.cx
    if side == "top":
        return g.y0 if box else g.cy
    if side == "bottom":
        return -g.y1 if box else -g.cy
    raise ValueError(f"unknown ordinal side {side!r}; use one of {ORDINAL_SIDES}.")


def both_readings(a: Truth, b: Truth) -> Truth:
    """``TRUE`` when both readings say so, ``FALSE`` when both do, else ``UNSURE``."""
    if a is b:
        return a
    return Truth.UNSURE


# ---------------------------------------------------------------- per-family truth


def absolute_truth(pool: Sequence[Geom], region: str, width: int, height: int, margins: Margins) -> list[Truth]:
    """Truth of an absolute-position region for every instance of ``pool``."""
    m = margins.position_px
    out = []
    for g in pool:
        a = _additive_truth(absolute_conditions(g, region, width, height, READINGS[0]), m)
        b = _additive_truth(absolute_conditions(g, region, width, height, READINGS[1]), m)
        out.append(both_readings(a, b))
    return out


_BY_CLASS = (Truth.FALSE, Truth.UNSURE, Truth.TRUE)


def absolute_truth_table(pool: Sequence[Geom], width: int, height: int, margins: Margins) -> dict[str, list[Truth]]:
    """``absolute_truth`` of every region in ``ABSOLUTE_REGIONS`` at once: ``{region: truths}``.

    A hot path (the descriptive generator asks every region of every
    category): each reading's four base values (left, right, top, bottom,
    and the negations the centre uses) are computed and classified once per
    instance; a region's truth is the conjunction of its values' classes,
    which is ``_additive_truth`` of the region's ``absolute_conditions``
    (tests/test_expressions_fast.py checks the two agree).
    """
    m = margins.position_px
    w3, w23, h3, h23 = width / 3.0, 2.0 * width / 3.0, height / 3.0, 2.0 * height / 3.0
    by_class = _BY_CLASS
    unsure = Truth.UNSURE
    cols: list[list[Truth]] = [[] for _ in range(9)]
    for g in pool:
        both = []
        for x, y in ((g.cx, g.cy), ((g.x0 + g.x1) / 2.0, (g.y0 + g.y1) / 2.0)):
            # Classes: 0 clearly false (v + m < 0, checked first as in
            # _additive_truth), 2 clearly true, 1 unsure (NaN included); a
            # conjunction's class is the smallest of its values' classes.
            v = w3 - x
            cl = 0 if v + m < 0 else 2 if v - m > 0 else 1
            nl = 0 if -v + m < 0 else 2 if -v - m > 0 else 1
            v = x - w23
            cr = 0 if v + m < 0 else 2 if v - m > 0 else 1
            nr = 0 if -v + m < 0 else 2 if -v - m > 0 else 1
            v = h3 - y
            ct = 0 if v + m < 0 else 2 if v - m > 0 else 1
            nt = 0 if -v + m < 0 else 2 if -v - m > 0 else 1
            v = y - h23
            cb = 0 if v + m < 0 else 2 if v - m > 0 else 1
            nb = 0 if -v + m < 0 else 2 if -v - m > 0 else 1
            both.append(
                (
                    cl,
                    cr,
                    ct,
                    cb,
                    min(nl, nr, nt, nb),
                    min(ct, cl),
                    min(ct, cr),
                    min(cb, cl),
                    min(cb, cr),
                )
            )
        a, b = both
        for col, ca, cb_ in zip(cols, a, b):
            col.append(by_class[ca] if ca == cb_ else unsure)
    return dict(zip(_TABLE_REGIONS, cols))


#: The regions in ``absolute_truth_table``'s column order.
_TABLE_REGIONS = ("left", "right", "top", "bottom", "center", "top_left", "top_right", "bottom_left", "bottom_right")


def _additive_truth(values: Sequence[float], m: float) -> Truth:
    """``_truth`` of ``additive(v, m)`` conditions, without building them (a hot path)."""
    for v in values:
        if v + m < 0:
            return Truth.FALSE
    for v in values:
        if not v - m > 0:  # not ``<=``: a NaN value is never clearly true
            return Truth.UNSURE
    return Truth.TRUE


def ordinal_truth(pool: Sequence[Geom], side: str, rank: int, margins: Margins) -> list[Truth]:
    """Truth of "``rank``-th from ``side``" (0 = the -most) for every instance, under both readings."""
    by_reading = [_ordinal_truth_one(pool, side, rank, margins, r) for r in READINGS]
    return [both_readings(a, b) for a, b in zip(*by_reading)]


def _ordinal_truth_one(pool: Sequence[Geom], side: str, rank: int, margins: Margins, reading: str) -> list[Truth]:
    m = margins.position_px
    vals = [_ordinal_value(g, side, reading) for g in pool]
    ordered = sorted(vals)
    out = []
    for v in vals:
        # Counted on the sorted values: the instance itself is never below
        # v - m (m >= 0) and always at most v + m, hence the - 1.
        lo = bisect.bisect_left(ordered, v - m)  # others certainly before it
        hi = bisect.bisect_right(ordered, v + m) - 1  # others possibly before it
        if lo == hi == rank:
            out.append(Truth.TRUE)
        elif rank < lo or rank > hi:
            out.append(Truth.FALSE)
        else:
            out.append(Truth.UNSURE)
    return out


def ordinal_bounds(pool: Sequence[Geom], side: str, margins: Margins) -> list[tuple[int, int, int, int]]:
    """Each instance's possible ranks from ``side`` under both readings: ``(lo, hi)`` centroid, then box.

    The rank-free part of ``ordinal_truth`` (the sort and the counts),
    computed once per category and side for every rank
    (``ordinal_truth_of_bounds``).
    """
    m = margins.position_px
    # _ordinal_value of each reading, a list at a time.
    if side == "left":
        readings = ([g.cx for g in pool], [g.x0 for g in pool])
    elif side == "right":
        readings = ([-g.cx for g in pool], [-g.x1 for g in pool])
    elif side == "top":
        readings = ([g.cy for g in pool], [g.y0 for g in pool])
    elif side == "bottom":
        readings = ([-g.cy for g in pool], [-g.y1 for g in pool])
    else:
        raise ValueError(f"unknown ordinal side {side!r}; use one of {ORDINAL_SIDES}.")
    left, right = bisect.bisect_left, bisect.bisect_right
    per_reading = []
    for vals in readings:
        ordered = sorted(vals)
        per_reading.append([(left(ordered, v - m), right(ordered, v + m) - 1) for v in vals])
    return [(a[0], a[1], b[0], b[1]) for a, b in zip(*per_reading)]


def ordinal_truth_of_bounds(bounds: Sequence[tuple[int, int, int, int]], rank: int) -> list[Truth]:
    """``ordinal_truth`` for ``rank`` from the instances' ``ordinal_bounds``."""
    true, false, unsure = Truth.TRUE, Truth.FALSE, Truth.UNSURE
    out = []
    for lo_c, hi_c, lo_b, hi_b in bounds:
        a = true if lo_c == hi_c == rank else false if rank < lo_c or rank > hi_c else unsure
        b = true if lo_b == hi_b == rank else false if rank < lo_b or rank > hi_b else unsure
        out.append(a if a is b else unsure)
    return out


def size_truth(pool: Sequence[Geom], order: str, margins: Margins) -> list[Truth]:
    """Truth of ``largest`` / ``smallest`` (visible mask area) for every instance."""
    if order not in SIZE_ORDERS:
        raise ValueError(f"unknown size order {order!r}; use one of {SIZE_ORDERS}.")
    s = margins.size_ratio
    out = []
    for i, g in enumerate(pool):
        others = [h for j, h in enumerate(pool) if j != i]
        if order == "largest":
            conds = [ratio(g.area_px, h.area_px, s) for h in others]
        else:
            conds = [ratio(h.area_px, g.area_px, s) for h in others]
        out.append(_truth(conds) if conds else Truth.UNSURE)
    return out


def size_truth_table(pool: Sequence[Geom], margins: Margins) -> dict[str, list[Truth]]:
    """``size_truth`` of both orders at once: ``{"largest": truths, "smallest": truths}``.

    A hot path (every category asks both): each pair's two ``ratio``
    conditions are the same float expressions, written inline, and an
    instance's truth is ``_truth`` of its conditions against all others
    (tests/test_expressions_fast.py checks against ``size_truth``).
    """
    f = 1.0 + margins.size_ratio
    unsure, true, false = Truth.UNSURE, Truth.TRUE, Truth.FALSE
    areas = [g.area_px for g in pool]
    largest: list[Truth] = []
    smallest: list[Truth] = []
    if len(areas) < 2:
        return {"largest": [unsure] * len(areas), "smallest": [unsure] * len(areas)}  # no others: nothing decides
    for i, a in enumerate(areas):
        # largest: ratio(a, b) = (a - f b, f a - b); smallest: ratio(b, a) = (b - f a, f b - a).
        l_false = s_false = False
        l_true = s_true = True
        for j, b in enumerate(areas):
            if j == i:
                continue
            if f * a - b < 0:
                l_false = True
            if not a - f * b > 0:
                l_true = False
            if f * b - a < 0:
                s_false = True
            if not b - f * a > 0:
                s_true = False
        largest.append(false if l_false else true if l_true else unsure)
        smallest.append(false if s_false else true if s_true else unsure)
    return {"largest": largest, "smallest": smallest}


def relation_truth(pool: Sequence[Geom], anchor: Geom, relation: str, margins: Margins) -> list[Truth]:
    """Truth of ``<instance> <relation> anchor`` for every instance of ``pool``.

    ``_truth(relation_conditions(g, anchor, relation, margins))`` for each
    instance, without building the conditions: a hot path wherever a category
    has a single instance (every relation template asks about every instance
    against every anchor). Each condition's values are the same float
    expressions, computed in full, and combined in ``_truth``'s order: any
    clearly false (an ``additive`` or ``ratio`` value plus its margin below
    0; a ``plain`` one never is), then all clearly true (each ``tv > 0``, so
    a NaN is never true). tests/test_expressions_fast.py checks it against
    the conditions.
    """
    m = margins.position_px
    true, false, unsure = Truth.TRUE, Truth.FALSE, Truth.UNSURE
    out: list[Truth] = []
    if relation in _DIRECTIONAL:
        horizontal = relation in ("left_of", "right_of")
        before = relation in ("left_of", "above")
        frac = margins.axis_overlap_frac
        a = anchor
        # The anchor's centroid, tested against each instance's box (_apart).
        acx, acy = a.cx, a.cy
        for g in pool:
            if horizontal:
                c_g, c_a, lo_g, hi_g, lo_a, hi_a = g.cx, a.cx, g.x0, g.x1, a.x0, a.x1
            else:
                c_g, c_a, lo_g, hi_g, lo_a, hi_a = g.cy, a.cy, g.y0, g.y1, a.y0, a.y1
            overlap = min(hi_g, hi_a) - max(lo_g, lo_a)
            allowed = frac * min(hi_g - lo_g, hi_a - lo_a)
            if before:
                v, p1, p2 = c_a - c_g, hi_a - hi_g, lo_a - lo_g
            else:
                v, p1, p2 = c_g - c_a, hi_g - hi_a, lo_g - lo_a
            p3 = allowed - overlap
            p4 = outside_px(g.cx, g.cy, a)
            p5 = outside_px(acx, acy, g)
            if v + m < 0:
                out.append(false)
            elif v - m > 0 and p1 - m > 0 and p2 - m > 0 and p3 - m > 0 and p4 - m > 0 and p5 - m > 0:
                out.append(true)
            else:
                out.append(unsure)
        return out
    if relation == "next_to":
        near = margins.near_px
        for g in pool:
            v = near - box_gap_px(g, anchor)
            p4 = outside_px(g.cx, g.cy, anchor)
            p5 = outside_px(anchor.cx, anchor.cy, g)
            if v + m < 0:
                out.append(false)
            elif v - m > 0 and p4 - m > 0 and p5 - m > 0:
                out.append(true)
            else:
                out.append(unsure)
        return out
    if relation == "on":
        for g in pool:
            overlap_x = min(g.x1, anchor.x1) - max(g.x0, anchor.x0)
            v1 = overlap_x - ON_MIN_X_OVERLAP * g.width
            v2 = g.y1 - anchor.y0
            v3 = anchor.cy - g.y1
            v4 = anchor.y0 - g.y0
            if v1 + m < 0 or v2 + m < 0 or v3 + m < 0 or v4 + m < 0:
                out.append(false)
            elif v1 - m > 0 and v2 - m > 0 and v3 - m > 0 and v4 - m > 0:
                out.append(true)
            else:
                out.append(unsure)
        return out
    if relation == "holding":
        f = 1.0 + margins.size_ratio
        for g in pool:
            band_top = g.y0 + HOLD_BAND[0] * g.height
            band_bottom = g.y0 + HOLD_BAND[1] * g.height
            v1 = anchor.x0 - g.x0
            v2 = g.x1 - anchor.x1
            v3 = anchor.y0 - g.y0
            v4 = g.y1 - anchor.y1
            v5 = anchor.cy - band_top
            v6 = band_bottom - anchor.cy
            # ratio(HOLD_MAX_AREA_RATIO * g.area_px, anchor.area_px, size_ratio) = (x - f y, f x - y)
            x, y = HOLD_MAX_AREA_RATIO * g.area_px, anchor.area_px
            r_true, r_false = x - f * y, f * x - y
            if v1 + m < 0 or v2 + m < 0 or v3 + m < 0 or v4 + m < 0 or v5 + m < 0 or v6 + m < 0 or r_false < 0:
                out.append(false)
            elif v1 - m > 0 and v2 - m > 0 and v3 - m > 0 and v4 - m > 0 and v5 - m > 0 and v6 - m > 0 and r_true > 0:
                out.append(true)
            else:
                out.append(unsure)
        return out
    # An unknown relation: relation_conditions raises its error (for a non-empty pool, as before).
    return [_truth(relation_conditions(g, anchor, relation, margins)) for g in pool]


_DIRECTIONAL = ("left_of", "right_of", "above", "below")


def unique_selection(truths: Sequence[Truth]) -> list[int] | None:
    """Indices of the ``TRUE`` instances, or None when the predicate is not decisive.

    Decisive means: at least one ``TRUE`` and no ``UNSURE``.
    """
    if any(t is Truth.UNSURE for t in truths):
        return None
    sel = [i for i, t in enumerate(truths) if t is Truth.TRUE]
    return sel or None
