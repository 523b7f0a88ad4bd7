"""Mask geometry against dense reference computations on random masks."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from orsgen.stages.common import masks as M
from tests.conftest import random_mask


def _dense_bbox(m: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(m)
    if not len(xs):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


def _masks(rng, n=60):
    for _ in range(n):
        h, w = int(rng.integers(3, 70)), int(rng.integers(3, 70))
        m = random_mask(rng, h, w, int(rng.integers(0, 4)))
        if rng.random() < 0.3:
            m ^= rng.random((h, w)) < 0.05
        yield m


def test_area_bbox_iou_match_dense(rng):
    prev = None
    for m in _masks(rng):
        r = M.encode_mask(m)
        assert M.rle_area(r) == int(m.sum())
        assert M.rle_bbox_xywh(r) == _dense_bbox(m)
        if prev is not None and prev.shape == m.shape:
            union = (prev | m).sum()
            ref = (prev & m).sum() / union if union else 0.0
            assert M.rle_iou(M.encode_mask(prev), r) == pytest.approx(ref)
            assert M.rle_intersection_area(M.encode_mask(prev), r) == int((prev & m).sum())
            u = M.rle_union([M.encode_mask(prev), r])
            assert M.rle_area(u) == int((prev | m).sum())
            d = M.rle_difference(M.encode_mask(prev), r)
            assert M.rle_area(d) == int((prev & ~m).sum())
        prev = m


def test_iou_matrix_shape_and_values(rng):
    ms = [random_mask(rng, 30, 40) for _ in range(5)]
    rles = [M.encode_mask(m) for m in ms]
    mat = M.rle_iou_matrix(rles, rles[:3])
    assert mat.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            u = (ms[i] | ms[j]).sum()
            ref = (ms[i] & ms[j]).sum() / u if u else 0.0
            assert mat[i, j] == pytest.approx(ref)


def test_runs_decoder_matches_pycocotools(rng):
    from pycocotools import mask as mu

    for m in _masks(rng, 40):
        r = M.encode_mask(m)
        runs = M.rle_counts_to_runs(r.counts)
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
        assert (flat.reshape(m.shape[1], m.shape[0]).T == m).all()
        assert (mu.decode(M.rle_from_runs(runs, r.size).to_coco()).astype(bool) == m).all()


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_decode_crop_equals_dense_window(rng, pad):
    for m in _masks(rng, 40):
        if not m.any():
            continue
        r = M.encode_mask(m)
        crop, (ox, oy) = M.decode_crop(r, pad_px=pad)
        h, w = m.shape
        padded = np.zeros((h + 2 * pad, w + 2 * pad), dtype=bool)
        padded[pad : pad + h, pad : pad + w] = m
        ref = padded[oy + pad : oy + pad + crop.shape[0], ox + pad : ox + pad + crop.shape[1]]
        assert crop.shape == ref.shape and (crop == ref).all()
        # Round trip back to a full-image RLE.
        assert M.encode_crop(crop, (ox, oy), r.size) == r


def test_decode_crop_arbitrary_window(rng):
    m = random_mask(rng, 50, 60)
    r = M.encode_mask(m)
    crop, (ox, oy) = M.decode_crop(r, (10.2, 5.0, 33.0, 41.7))
    assert (ox, oy) == (10, 5)
    assert (crop == m[5:42, 10:33]).all()


def _seg_zero_reference(m: np.ndarray):
    """Seg-Zero's rule, densely, with scipy's exact EDT (independent of cv2)."""
    from scipy.ndimage import distance_transform_edt

    padded = np.pad(m, 1)
    dist = distance_transform_edt(padded)[1:-1, 1:-1]
    y1, x1 = np.unravel_index(np.argmax(dist), dist.shape)
    ys, xs = np.nonzero(m)
    d1 = np.hypot(xs - x1, ys - y1)
    far = d1 > np.median(d1)
    return dist, (int(x1), int(y1)), far, xs, ys


def test_interior_points_follow_seg_zero_rule(rng):
    for m in _masks(rng, 60):
        if not m.any():
            continue
        r = M.encode_mask(m)
        (x1, y1), (x2, y2) = M.interior_points(r)
        assert m[y1, x1] and m[y2, x2]
        dist, _, _, _, _ = _seg_zero_reference(m)
        # The first point is a distance-transform maximum (cv2's precise
        # transform may tie-break differently from scipy's).
        assert dist[y1, x1] == pytest.approx(dist.max(), abs=1e-3)
        ys, xs = np.nonzero(m)
        d1 = np.hypot(xs - x1, ys - y1)
        far = d1 > np.median(d1)
        if far.any():
            assert np.hypot(x2 - x1, y2 - y1) > np.median(d1)
            assert dist[y2, x2] == pytest.approx(dist[ys[far], xs[far]].max(), abs=1e-3)
        else:
            assert (x2, y2) == (x1, y1)


def test_interior_points_empty_mask_raises():
    with pytest.raises(M.MaskError) as err:
        M.interior_points(M.empty_rle(5, 5))
    assert err.value.reason == "empty_mask"


def test_polygon_round_trip(rng):
    for m in _masks(rng, 60):
        if not m.any():
            continue
        r = M.encode_mask(m)
        g = M.rle_to_geometry(r)
        assert g.is_valid and not g.is_empty
        back = M.geometry_to_rle(g, *r.size)
        assert M.rle_iou(r, back) > 0.85
        # Simplified polygons stay valid and close.
        gs = M.rle_to_geometry(r, tolerance_px=1.0)
        assert gs.is_valid


def test_clean_shapes_round_trip_exactly():
    m = np.zeros((40, 50), dtype=bool)
    m[5:30, 10:40] = True
    m[12:20, 18:25] = False  # a hole
    r = M.encode_mask(m)
    g = M.rle_to_geometry(r)
    assert isinstance(g, shapely.Polygon) and len(g.interiors) == 1
    assert M.rle_iou(r, M.geometry_to_rle(g, 40, 50)) == pytest.approx(1.0)
    # OpenCV traces holes 8-connected, chamfering each hole corner by 1/4 px.
    assert g.area == pytest.approx(m.sum(), abs=1.0)


def test_coco_polygons_to_rle_round_trip():
    poly = [[10.0, 10.0, 30.0, 10.0, 30.0, 25.0, 10.0, 25.0]]
    r = M.polygons_to_rle(poly, 40, 50)
    g = M.rle_to_geometry(r)
    back = M.polygons_to_rle(M.geometry_to_coco_polygons(g), 40, 50)
    assert M.rle_iou(r, back) > 0.97


def test_svg_path_normalised():
    m = np.zeros((20, 40), dtype=bool)
    m[0:10, 0:20] = True
    g = M.rle_to_geometry(M.encode_mask(m))
    path = M.svg_path(g, 40, 20)
    assert path.startswith("M ") and path.endswith(" Z")
    nums = [float(t) for t in path.replace("M", "").replace("L", "").replace("Z", "").split()]
    assert all(0.0 <= v <= 1.0 for v in nums)
    assert max(nums[0::2]) == pytest.approx(0.5) and max(nums[1::2]) == pytest.approx(0.5)
    assert M.svg_path(shapely.Polygon(), 10, 10) == ""


def test_segmentation_variants_and_errors():
    h, w = 20, 30
    m = np.zeros((h, w), dtype=bool)
    m[2:8, 3:9] = True
    rle = M.encode_mask(m)
    r1, o1 = M.segmentation_to_rle(rle.to_json(), h, w)
    assert o1 == "rle" and r1 == rle
    runs = M.rle_counts_to_runs(rle.counts).tolist()
    r2, o2 = M.segmentation_to_rle({"size": [h, w], "counts": runs}, h, w)
    assert o2 == "uncompressed_rle" and r2 == rle
    r3, o3 = M.segmentation_to_rle([[3, 2, 9, 2, 9, 8, 3, 8]], h, w)
    assert o3 == "polygon" and M.rle_area(r3) > 0
    with pytest.raises(M.MaskError) as e:
        M.segmentation_to_rle({"size": [h + 1, w], "counts": rle.counts}, h, w)
    assert e.value.reason == "rle_size_mismatch"
    with pytest.raises(M.MaskError) as e:
        M.segmentation_to_rle({"size": [h, w], "counts": "0000"}, h, w)
    assert e.value.reason in {"rle_size_mismatch", "bad_rle"}
    with pytest.raises(M.MaskError) as e:
        M.segmentation_to_rle([[1, 2]], h, w)
    assert e.value.reason == "bad_polygon"
    with pytest.raises(M.MaskError):
        M.segmentation_to_rle("nope", h, w)
