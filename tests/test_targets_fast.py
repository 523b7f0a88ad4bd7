"""Trainer-target shortcuts (issue 14, per-image CPU): each gives exactly the direct computation's answer.

Outlines are compared as WKB (every coordinate, ring order and start point),
against the one-mask-at-a-time reference of ``tests/test_throughput.py``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon

from orsgen.schemas.records import Instance
from orsgen.stages.common import masks as M
from orsgen.stages.common import targets as T
from tests.conftest import interior_points_reference, random_mask
from tests.test_throughput import _outline_reference, _svg_reference


def _contour(points: list[tuple[int, int]]) -> np.ndarray:
    return np.array(points, dtype=np.int32).reshape(-1, 1, 2)


def test_repeated_rings_are_grown_once_and_equal_the_scalar_rings():
    square = _contour([(0, 0), (4, 0), (4, 4), (0, 4)])
    touching = _contour([(0, 0), (2, 2), (4, 0), (4, 4), (2, 2), (0, 4)])  # self-touching: make_valid path
    bar = _contour([(1, 1), (6, 1), (6, 2), (1, 2)])
    shifted = square + np.int32(2)  # square's pixels 2 px further right and down
    groups = [
        ([square, touching, bar], 3, -2),
        ([bar, square], 3, -2),  # the same rings at the same origin, another order
        ([shifted, touching], 1, -4),  # shifted at origin (1, -4): square's image coordinates again; touching moved
        ([square], 5, 0),  # square's crop coordinates at another origin: another ring
        ([touching, _contour([(7, 7)]), touching], 3, -2),  # a one-point contour; a repeat within one group
    ]
    got = M._grown_rings_many(groups)
    want = [[M._ring_geometry(c, ox, oy).wkb for c in cs] for cs, ox, oy in groups]
    assert [[g.wkb for g in gs] for gs in got] == want
    # The repeats share one geometry; different image coordinates never do.
    assert got[1][1] is got[0][0] and got[2][0] is got[0][0] and got[4][2] is got[4][0] is got[0][1]
    assert got[3][0] is not got[0][0] and got[2][1] is not got[0][1]
    assert got[3][0].wkb != got[0][0].wkb


def test_outlines_of_targets_and_their_unions_in_one_batch_equal_one_at_a_time(rng):
    # Target masks and the unions of target sets share most rings (a target
    # apart from the others keeps its outline in the union).
    h, w = 60, 80
    parts = [random_mask(rng, h, w, int(rng.integers(1, 4))) for _ in range(6)]
    far = np.zeros((h, w), bool)
    far[50:58, 2:9] = True
    far[53:55, 4:6] = False  # a hole
    near = np.zeros((h, w), bool)
    near[50:58, 10:14] = True  # touches far's box, not its pixels
    diag = np.zeros((h, w), bool)
    diag[42:50, 14:18] = True  # meets near at one corner only
    masks = [*parts, far, near, diag, far | near, far | near | diag, parts[0] | far, parts[1] | parts[2] | near]
    rles = [M.encode_mask(m) for m in masks]
    for tol in (0.0, 1.0):
        want = [_outline_reference(r, tol).wkb for r in rles]
        assert [g.wkb for g in M.rle_to_geometries([(r, M.decode_crop(r, pad_px=1)) for r in rles], tol)] == want


def test_one_hypot_says_whether_every_offset_at_a_squared_distance_has_one_hypot():
    span = np.arange(-80, 81, dtype=np.float64)
    dx, dy = np.meshgrid(span, span)
    sq = (dx * dx + dy * dy).astype(np.int64).ravel()
    d = np.hypot(dx, dy).ravel()
    values = np.unique(sq[sq <= 80 * 80])
    lo = np.full(values.size, np.inf)
    hi = np.full(values.size, -np.inf)
    at = np.searchsorted(values, sq[sq <= 80 * 80])
    np.minimum.at(lo, at, d[sq <= 80 * 80])
    np.maximum.at(hi, at, d[sq <= 80 * 80])
    want = dict(zip(values.tolist(), (lo == hi).tolist()))
    got = {v: M._one_hypot(v) for v in want}
    assert got == want
    assert not got[2993] and not got[3874] and got[25] and got[0]  # 17,52 / 28,47 and 25,57 / 43,45 differ


def test_interior_points_where_the_median_pixels_have_two_hypots_and_on_even_counts(rng):
    # A disc whose median squared distance from its centre is 3874 = 25**2 + 57**2
    # = 43**2 + 45**2, two hypot values: the band's farther pixels are beyond
    # the median and hold the farthest pixels' deepest point. Taking the
    # squared distance alone for the distance there moves the second point.
    yy, xx = np.mgrid[-128:129, -128:129]
    disc = np.zeros((261, 261), bool)
    disc[2:-2, 2:-2] = xx * xx + yy * yy <= 7748
    assert M.interior_points(M.encode_mask(disc)) == interior_points_reference(M.encode_mask(disc)) == ((130, 130), (87, 85))
    # Even pixel counts (two middle values), odd ones, lines and single pixels.
    for h, w in [(2, 2), (3, 5), (1, 9), (40, 31)]:
        for _ in range(12):
            m = random_mask(rng, h, w, 2) if min(h, w) > 1 else rng.random((h, w)) < 0.6
            if m.any():
                rle = M.encode_mask(m)
                assert M.interior_points(rle) == interior_points_reference(rle)


def test_distance_transforms_from_mosaics_equal_one_crop_at_a_time(rng, monkeypatch):
    masks = [random_mask(rng, int(rng.integers(2, 40)), int(rng.integers(2, 40)), 3) for _ in range(40)]
    masks += [np.ones((1, 1), bool), np.ones((1, 30), bool), np.ones((25, 1), bool), np.ones((30, 30), bool), np.zeros((4, 6), bool)]
    crops = [M.decode_crop(M.encode_mask(m), pad_px=1)[0] for m in masks]
    crops.insert(7, np.zeros((60, 61), bool))  # larger than the patched limit: its own transform

    def squared(d):
        return np.rint(d.astype(np.float64) ** 2)

    want = [squared(cv2.distanceTransform(c.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)) for c in crops]
    for limit in (1 << 20, 2000, 1):  # one mosaic; several; every crop alone
        monkeypatch.setattr(M, "MOSAIC_MAX_PX", limit)
        got = M.padded_distance_transforms(crops)
        assert [g.shape for g in got] == [c.shape for c in crops]
        assert all(np.array_equal(squared(g), w) for g, w in zip(got, want))
    assert M.padded_distance_transforms([]) == []


@pytest.mark.parametrize("limit", [1 << 20, 6000])  # one mosaic; two or three crops per mosaic
def test_points_prepared_from_mosaics_equal_the_points_of_each_mask(rng, monkeypatch, limit):
    monkeypatch.setattr(M, "MOSAIC_MAX_PX", limit)
    h, w = 60, 80
    rles = [M.encode_mask(random_mask(rng, h, w, int(rng.integers(1, 4)))) for _ in range(12)]
    rles = [r for r in rles if M.rle_area(r)]
    insts = [
        Instance(f"img/ann:{k}", "img", r, M.rle_bbox_xywh(r), M.xywh_to_xyxy(M.rle_bbox_xywh(r)), M.rle_area(r))
        for k, r in enumerate(rles)
    ]
    # A record that says its mask has pixels when it has none: its error must surface where it did.
    blank = M.empty_rle(h, w)
    insts.append(Instance("img/ann:99", "img", blank, (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), 5))
    by_id = {i.instance_id: i for i in insts}
    ids = list(by_id)
    sets = [(i,) for i in ids] + [tuple(ids[:3]), tuple(ids[2:6])]
    cache = T.TargetCache()
    cache.prepare(sets, by_id, w, h)
    for target_ids in sets:
        if "img/ann:99" in target_ids:
            with pytest.raises(M.MaskError, match="empty"):
                T.target_fields(target_ids, by_id, w, h, cache=cache)
            continue
        got = T.target_fields(target_ids, by_id, w, h, cache=cache)
        assert [(g.point_1, g.point_2) for g in got[2]] == [M.interior_points(by_id[i].rle) for i in target_ids]
        assert got == T.target_fields(target_ids, by_id, w, h, cache=T.TargetCache())


def test_svg_paths_of_a_batch_equal_each_geometry_written_alone(rng):
    holed = Polygon([(0, 0), (30, 0), (30, 30), (0, 30)], [[(5, 5), (10, 5), (10, 10)], [(20, 20), (25, 20), (25, 26), (20, 25)]])
    outside = Polygon([(-3.3, -1), (70.123456, 2.00005), (69.99995, 44.5), (1 / 3, 50)])
    multi = MultiPolygon([holed, shapely.affinity.translate(outside, 35, 0)])
    # A collection's polygons are written; its points, lines, empty polygons
    # and nested multipolygons are not (as _iter_polygons reads it).
    coll = shapely.GeometryCollection([shapely.Point(1, 1), holed, Polygon(), shapely.LineString([(0, 0), (1, 1)]), multi, outside])
    only_lines = shapely.GeometryCollection([shapely.LineString([(0, 0), (1, 1)])])
    outlines = [M.rle_to_geometry(M.encode_mask(random_mask(rng, 23, 31)), 1.0) for _ in range(6)]
    geoms = [Polygon(), holed, MultiPolygon(), outside, coll, only_lines, multi, *outlines, Polygon(), holed]
    for w, h, precision in ((64, 48, 4), (31, 23, 4), (7, 3, 2)):
        want = [_svg_reference(g, w, h, precision) for g in geoms]
        assert M.svg_paths(geoms, w, h, precision) == want
        assert [M.svg_path(g, w, h, precision) for g in geoms] == want
        assert M.svg_paths(geoms[:1] + geoms[2:3], w, h, precision) == ["", ""]
    assert M.svg_paths([], 10, 10) == []


def test_grown_rings_without_repeats_and_with_short_contours_between_equal_the_scalar_rings():
    # No ring repeats (the rings go to GEOS as the one coordinate array), one-
    # and two-point contours between them, groups at negative origins, a
    # self-touching ring, and a batch of a single ring.
    square = _contour([(0, 0), (4, 0), (4, 4), (0, 4)])
    touching = _contour([(0, 0), (2, 2), (4, 0), (4, 4), (2, 2), (0, 4)])
    tri = _contour([(0, 0), (5, 1), (2, 6)])
    groups = [
        ([_contour([(3, 3)]), square, _contour([(1, 1), (2, 1)])], -1, -1),
        ([tri, _contour([(0, 0)]), touching], 7, 2),
        ([], 0, 0),
        ([square + np.int32(9), tri + np.int32(1)], -3, 5),
    ]
    for batch in (groups, groups[1:2], [([square], 2, 2)]):
        got = M._grown_rings_many(batch)
        want = [[M._ring_geometry(c, ox, oy).wkb for c in cs] for cs, ox, oy in batch]
        assert [[g.wkb for g in gs] for gs in got] == want


def test_union_of_one_polygon_is_the_polygon_itself_except_when_empty():
    # rle_to_geometries skips GEOS's union for a mask whose grown rings are one
    # non-empty Polygon: its cascaded union of one item is a clone. An invalid
    # bow tie, a repeated point and a hole must come back with the same WKB;
    # an empty polygon does not (so the shortcut tests emptiness).
    polys = [
        Polygon([(0, 0), (4, 0), (4, 3), (0, 3)]),
        Polygon([(0, 0), (4, 4), (4, 0), (0, 4)]),  # bow tie (invalid)
        Polygon([(0, 0), (4, 0), (4, 0), (4, 3), (0, 3)]),  # repeated point
        Polygon([(0, 0), (9, 0), (9, 9), (0, 9)], [[(3, 3), (3, 6), (6, 6), (6, 3)]]),
        Polygon([(0.5, 0.25), (7.75, 0.5), (3.25, 5.5)]),
    ]
    for p in polys:
        assert shapely.unary_union([p]).wkb == p.wkb
    assert shapely.unary_union([Polygon()]).geom_type == "GeometryCollection"
    # And through rle_to_geometries: one-component masks (one with a hole) equal the reference.
    for m in (np.pad(np.ones((5, 7), bool), 3), np.pad(np.eye(6, dtype=bool) | np.eye(6, k=1, dtype=bool), 2)):
        r = M.encode_mask(m)
        for tol in (0.0, 1.0):
            assert M.rle_to_geometries([(r, None)], tol)[0].wkb == _outline_reference(r, tol).wkb
    ring = np.pad(np.ones((7, 7), bool), 2)
    ring[4:7, 4:7] = False
    r = M.encode_mask(ring)
    for tol in (0.0, 1.0):
        assert M.rle_to_geometries([(r, None)], tol)[0].wkb == _outline_reference(r, tol).wkb


def _ring_part(h: int, w: int, x: int, y: int, size: int = 3) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y : y + size, x : x + size] = True
    m[y + size // 2, x + size // 2] = False  # a one-pixel hole
    return m


def _spread_part_groups(rng: np.random.Generator, h: int, w: int) -> list[list[np.ndarray]]:
    """Groups of target masks whose unions are mostly background: far apart, 1-2 px apart, meeting at a corner."""
    nested = np.zeros((h, w), bool)
    nested[5:40, 5:40] = True
    nested[10:35, 10:35] = False
    nested[15:30, 15:30] = True  # an island in the hole, with a hole of its own
    nested[20:25, 20:25] = False
    corner = np.zeros((h, w), bool)
    corner[50:55, 60:65] = True
    corner2 = np.zeros((h, w), bool)
    corner2[55:60, 65:70] = True  # meets corner diagonally: one component together
    gap1 = np.zeros((h, w), bool)
    gap1[50:60, 71:74] = True  # one empty column after corner2
    gap2 = np.zeros((h, w), bool)
    gap2[61:63, 50:75] = True  # one empty row under corner2; two under gap1's end
    edge = np.zeros((h, w), bool)
    edge[0:4, w - 6 :] = True  # at the image's corner: padded windows leave the image
    edge[h - 1, 0:3] = True
    # Many small holed rings, each its own target: more than OpenCV's 127
    # contour labels, holes and all, their windows apart by 0 to 4 pixels.
    rings, x, y = [], 80, 2
    while len(rings) < 90:
        rings.append(_ring_part(h, w, x, y))
        x += 3 + int(rng.integers(0, 5))
        if x > w - 10:
            x, y = 80, y + 3 + int(rng.integers(0, 5))
    groups = [
        [nested, corner],
        [corner, corner2, gap1, gap2],
        [nested, edge, gap1],
        rings,
        rings[::3] + [nested, edge],
        [corner, corner],  # the same mask twice
        [corner, corner | corner2],  # one part inside another
    ]
    groups += [[random_mask(rng, h, w, 1) for _ in range(int(rng.integers(2, 5)))] for _ in range(6)]
    return groups


def test_contours_of_a_compact_crop_are_the_contours_of_the_full_crop(rng):
    # The OpenCV property compact_crop rests on: background rows and columns
    # away from every mask pixel change no contour and no hierarchy row, only
    # the positions (which the kept rows and columns give back).
    h, w = 70, 400
    most, removed = 0, 0
    for parts in _spread_part_groups(rng, h, w):
        union = M.encode_mask(np.logical_or.reduce(parts))
        full, (ox, oy) = M.decode_crop(union, pad_px=1)
        want, want_h = cv2.findContours(full.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        for pad in (0, 1):
            crop = M.compact_crop([M.decode_crop(M.encode_mask(p), pad_px=pad) for p in parts])
            removed += full.size - crop.pixels.size
            got, got_h = cv2.findContours(crop.pixels.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            assert np.array_equal(got_h, want_h) and len(got) == len(want)
            for g, c in zip(M._uncompacted(got, crop.cols, crop.rows), want):
                assert g.dtype == c.dtype == np.int32 and g.shape == c.shape
                assert np.array_equal(g, c + np.array([ox, oy], dtype=np.int32))
        most = max(most, len(want))
    # The rings' union has more contours than OpenCV's 127 labels (its hole
    # parents are then found by box order), and rows and columns went.
    assert most > 127 and removed > 10_000


def test_outlines_from_compact_crops_equal_the_outlines_of_the_unions(rng):
    h, w = 70, 400
    groups = _spread_part_groups(rng, h, w)
    unions = [M.encode_mask(np.logical_or.reduce(parts)) for parts in groups]
    for tol in (0.0, 1.0):
        want = [_outline_reference(u, tol).wkb for u in unions]
        crops = [M.compact_crop([M.decode_crop(M.encode_mask(p), pad_px=1) for p in parts]) for parts in groups]
        given = list(zip(unions, crops))
        assert [g.wkb for g in M.rle_to_geometries(given, tol)] == want
        # Mixed with full crops in one batch (rings shared between them).
        mixed = given + [(u, M.decode_crop(u, pad_px=1)) for u in unions]
        assert [g.wkb for g in M.rle_to_geometries(mixed, tol)] == want + want


def test_targets_of_different_mask_sizes_trace_their_union_as_before(rng):
    """Masks of two sizes (ingest rejects them first): pycocotools' union is its empty 0x0 mask.

    The outline is that union's (empty), as before the compact crops; the
    targets' own crops would show their pixels instead.
    """
    a = np.zeros((10, 10), dtype=bool)
    a[2:5, 2:5] = True
    b = np.zeros((10, 12), dtype=bool)
    b[6:9, 7:11] = True
    insts = {}
    for k, m in enumerate((a, b)):
        r = M.encode_mask(m)
        insts[f"i{k}"] = Instance(f"i{k}", "img", r, M.rle_bbox_xywh(r), M.xywh_to_xyxy(M.rle_bbox_xywh(r)), M.rle_area(r))
    union = M.rle_union([i.rle for i in insts.values()], size=(10, 12))
    cache = T.TargetCache()
    cache.prepare([["i0", "i1"]], insts, 12, 10)
    got_union, svg = cache.union_and_svg(list(insts.values()), 12, 10, T.SVG_TOLERANCE_PX)
    assert got_union == union and svg == M.svg_path(_outline_reference(union, T.SVG_TOLERANCE_PX), 12, 10) == ""


def test_decode_crop_of_any_runs_equals_the_runs_expanded(rng):
    # decode_crop expands only the runs over the window's columns, cutting the
    # first and last of them: check it against every pixel expanded from the
    # runs, for runs with zero-length runs anywhere (first, last, in a row),
    # runs that stop short of h * w, and windows that start or end exactly
    # on a run boundary, cut one run at both ends, or leave the image.
    cases = [
        ([2, 0, 3, 0, 0, 4, 1], (4, 4)),
        ([0, 16], (4, 4)),
        ([16], (4, 4)),
        ([0, 0, 0, 5], (4, 4)),  # stops short
        ([4, 4, 4, 4], (4, 4)),  # run boundaries on column boundaries
        ([1, 14, 1], (4, 4)),  # one run crossing every column
        ([0], (3, 5)),
    ]
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 9, size=2))
        runs = rng.integers(0, 5, size=int(rng.integers(1, 12)))
        runs[rng.random(runs.size) < 0.3] = 0
        total = int(runs.sum())
        if total > h * w:
            runs = np.diff(np.minimum(np.concatenate([[0], runs.cumsum()]), h * w))
        elif rng.random() < 0.6:
            runs = np.concatenate([runs, [h * w - total]])
        cases.append(([int(v) for v in runs], (h, w)))
    for runs, (h, w) in cases:
        rle = M.rle_from_runs(runs, (h, w))
        assert M.rle_counts_to_runs(rle.counts).tolist() == runs
        flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
        dense = np.concatenate([flat, np.zeros(h * w - flat.size, dtype=bool)]).reshape(w, h).T
        boxes = [(x0, y0, x1, y1) for x0 in (-2, 0, 1, w - 1) for x1 in (x0 + 1, w, w + 3) for y0, y1 in ((0, h), (1, max(h - 1, 2)), (-1, h + 2))]
        for box in boxes:
            for pad in (0, 1):
                crop, (ox, oy) = M.decode_crop(rle, box, pad)
                ys, xs = np.mgrid[oy : oy + crop.shape[0], ox : ox + crop.shape[1]]
                inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
                ref = np.zeros(crop.shape, dtype=bool)
                ref[inside] = dense[ys[inside], xs[inside]]
                assert crop.dtype == np.bool_ and np.array_equal(crop, ref), (runs, (h, w), box, pad)


def _apart_part(rng: np.random.Generator, h: int, w: int, x: int, y: int) -> np.ndarray:
    """A small mask at (x, y): speckle (several components, single pixels, diagonal steps), or a ring with an island."""
    m = np.zeros((h, w), bool)
    bh, bw = (int(v) for v in rng.integers(1, 9, size=2))
    if rng.random() < 0.3 and bh >= 5 and bw >= 5:
        m[y : y + bh, x : x + bw] = True
        m[y + 1 : y + bh - 1, x + 1 : x + bw - 1] = False
        if bh >= 7 and bw >= 7:
            m[y + 3 : y + bh - 3, x + 3 : x + bw - 3] = True  # an island in the hole
    else:
        m[y : y + bh, x : x + bw] = rng.random((bh, bw)) < 0.45
        m[y, x] = True
    return m


def test_contours_of_masks_apart_merged_are_the_contours_of_their_union(rng):
    # The OpenCV property ApartCrops rests on: when no pixel of one mask is
    # next to a pixel of another, the union's CCOMP contours are the masks'
    # own (same points, same holes under each outer contour), its outer
    # contours last found first, each found at its first point.
    h, w = 40, 60
    apart = interleaved = 0
    for trial in range(150):
        parts = []
        for _ in range(int(rng.integers(2, 5))):
            parts.append(_apart_part(rng, h, w, int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))))
        if trial % 5 == 0:  # side by side: rows shared, windows 0 to 3 px apart
            gap = int(rng.integers(0, 4))
            parts = [_apart_part(rng, h, w, 2, 5), _apart_part(rng, h, w, 12 + gap, 4)]
        union = np.logical_or.reduce(parts)
        full, (ox, oy) = M.decode_crop(M.encode_mask(union), pad_px=1)
        want, want_h = cv2.findContours(full.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        hier = want_h[0].tolist()
        shift = np.array([ox, oy], dtype=np.int32)
        want_outer = [want[k] + shift for k, r in enumerate(hier) if r[3] == -1]
        want_holes = [[c + shift for c in M._holes(want, hier, k)] for k, r in enumerate(hier) if r[3] == -1]
        for pad in (0, 1):
            crops = [M.decode_crop(M.encode_mask(p), pad_px=pad) for p in parts]
            got = M.outline_parts(crops)
            if type(got) is not M.ApartCrops:
                assert type(got) is M.CompactCrop
                continue
            apart += 1
            runs = M._apart_rings(got, {})
            outer = [c + np.array([rx, ry], dtype=np.int32) for cs, _, rx, ry in runs for c in cs]
            holes = [[c + np.array([rx, ry], dtype=np.int32) for c in hs] for _, hss, rx, ry in runs for hs in hss]
            assert len(outer) == len(want_outer) and len(holes) == len(want_holes)
            for g, c in zip(outer, want_outer):
                assert g.dtype == c.dtype and np.array_equal(g, c)
            for gs, cs in zip(holes, want_holes):
                assert len(gs) == len(cs) and all(np.array_equal(g, c) for g, c in zip(gs, cs))
            # Outer contours of one crop met again after another crop's.
            interleaved += len(runs) > len({(rx, ry) for _, _, rx, ry in runs})
    assert apart > 100 and interleaved > 10


def test_outlines_of_masks_apart_equal_the_outlines_of_their_unions(rng):
    h, w = 70, 400
    groups = _spread_part_groups(rng, h, w)
    # 60 holed rings 3 px apart: 120 contours, more than the crop-by-crop limit.
    groups.append([_ring_part(h, w, 80 + 6 * (k % 50), 2 + 6 * (k // 50)) for k in range(60)])
    for _ in range(12):
        groups.append([_apart_part(rng, h, w, int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))) for _ in range(4)])
    unions = [M.encode_mask(np.logical_or.reduce(parts)) for parts in groups]
    part_crops = [[M.decode_crop(M.encode_mask(p), pad_px=1) for p in parts] for parts in groups]
    given = [(u, M.outline_parts(crops)) for u, crops in zip(unions, part_crops)]
    kinds = [type(c) for _, c in given]
    assert kinds.count(M.ApartCrops) >= 8 and kinds.count(M.CompactCrop) >= 3
    # The 60 rings lie apart but have more contours than the limit: traced as a union.
    rings = given[len(groups) - 13][1]
    assert type(rings) is M.ApartCrops and M._apart_rings(rings, {}) is None
    for tol in (0.0, 1.0):
        want = [_outline_reference(u, tol).wkb for u in unions]
        assert [g.wkb for g in M.rle_to_geometries(given, tol)] == want
        # With the parts' own outlines in the batch (their traces shared), and undecoded unions.
        own = [(M.encode_mask(p), c) for parts, crops in zip(groups, part_crops) for p, c in zip(parts, crops)]
        own_want = [_outline_reference(r, tol).wkb for r, _ in own]
        mixed = own + given + [(u, None) for u in unions]
        assert [g.wkb for g in M.rle_to_geometries(mixed, tol)] == own_want + want + want
