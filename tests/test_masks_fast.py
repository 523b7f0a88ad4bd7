"""Shortcuts in the mask geometry (issue 14, session 3 round 2): each equals the direct computation.

The interior points' "farther than the median" test computes ``np.hypot`` only
for the pixels at the median's squared distance; these tests compare it with
the direct rule on inputs where many pixels share the median's squared
distance with different offsets (3-4-5, 5-12-13, 25 = 0+25 = 9+16 ...), odd and
even pixel counts, and check the ordering property of ``np.hypot`` the
shortcut relies on.
"""

from __future__ import annotations

import numpy as np
import pytest

from orsgen.stages.common import masks as M
from tests.conftest import coco_counts, interior_points_reference, random_mask


def _far_direct(flat: np.ndarray, cw: int, x1: int, y1: int) -> np.ndarray:
    ys, xs = np.divmod(flat, cw)
    d = np.hypot(xs - x1, ys - y1)
    return (d > np.median(d)).nonzero()[0]


def _far_fast(flat: np.ndarray, cw: int, x1: int, y1: int) -> np.ndarray:
    ys, xs = np.divmod(flat, cw)
    return M._beyond_median((xs - x1) ** 2 + (ys - y1) ** 2, flat, cw, x1, y1)


def _circle(h: int, w: int, cy: float, cx: float, r2: float, hole2: float = -1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= r2) & (d2 > hole2)


def test_hypot_orders_integer_offsets_as_their_squared_distance():
    # The shortcut's premise, checked on every offset pair up to 400: a larger
    # integer dx**2 + dy**2 never has a smaller (or equal) hypot.
    a = np.arange(0, 401)
    dx, dy = np.meshgrid(a, a)
    dx, dy = dx.ravel(), dy.ravel()
    sq = dx * dx + dy * dy
    d = np.hypot(dx, dy)
    order = np.lexsort((d, sq))
    sq, d = sq[order], d[order]
    step = sq[1:] > sq[:-1]
    assert (d[1:][step] > d[:-1][step]).all()
    # Negative offsets give the same values (hypot takes magnitudes).
    assert (np.hypot(-dx, dy) == np.hypot(dx, dy)).all()


def test_beyond_median_equals_the_direct_rule_on_ties(rng):
    cases = []
    # Discs and rings around a pixel: every squared distance is shared by
    # many offsets, and with 25, 50, 65, 85, 125 ... by different ones.
    for r2 in (0, 1, 2, 8, 25, 50, 65, 85, 125, 169, 325):
        for hole2 in (-1, 0, 4, 24):
            m = _circle(41, 41, 20, 20, r2, hole2)
            if m.any():
                cases.append((m, 20, 20))
    # Odd and even counts: the disc with one pixel more or less.
    for r2 in (25, 65, 125):
        m = _circle(41, 41, 20, 20, r2)
        for extra in ((0, 0), (0, 1), (40, 40)):
            mm = m.copy()
            mm[extra] = not mm[extra]
            cases.append((mm, 20, 20))
    # Off-centre reference points, lines, a single pixel, random masks.
    line = np.zeros((9, 30), bool)
    line[4, :] = True
    cases += [(line, 0, 4), (line, 29, 4), (line, 13, 4), (np.ones((1, 1), bool), 0, 0), (np.ones((2, 1), bool), 0, 1)]
    for _ in range(40):
        m = random_mask(rng, int(rng.integers(3, 60)), int(rng.integers(3, 60)))
        if m.any():
            ys, xs = np.nonzero(m)
            i = int(rng.integers(len(ys)))
            cases.append((m, int(xs[i]), int(ys[i])))
    odd = even = 0
    for m, x1, y1 in cases:
        flat = m.ravel().nonzero()[0]
        got = _far_fast(flat, m.shape[1], x1, y1)
        assert got.tolist() == _far_direct(flat, m.shape[1], x1, y1).tolist()
        odd += flat.size % 2
        even += 1 - flat.size % 2
    assert odd > 10 and even > 10


@pytest.mark.parametrize("size", [(23, 23), (40, 57)])
def test_interior_points_equal_the_direct_rule_on_symmetric_masks(rng, size):
    h, w = size
    shapes = [
        _circle(h, w, (h - 1) / 2, (w - 1) / 2, r2, hole2)
        for r2 in (2, 10, 25, 50, 65, 100)
        for hole2 in (-1, 3)
    ]
    diamond = np.abs(np.mgrid[0:h, 0:w] - np.array([h // 2, w // 2])[:, None, None]).sum(0) <= 7
    shapes += [diamond, ~diamond, np.ones((h, w), bool)]
    shapes += [random_mask(rng, h, w) for _ in range(10)]
    n = 0
    for m in shapes:
        if not m.any():
            continue
        rle = M.encode_mask(m)
        assert M.interior_points(rle) == interior_points_reference(rle)
        n += 1
    assert n >= 20


def test_beyond_median_ranks_offsets_with_one_squared_distance_but_two_hypots():
    # 28**2 + 47**2 == 52**2 + 17**2 == 2993, yet np.hypot gives them values
    # an ulp apart: when the median falls in that group, which of the two it
    # is (or their mean) decides whether the farther one counts as far.
    group = [(28, 47), (52, 17)]
    assert np.hypot(*group[0]) != np.hypot(*group[1])
    small, big = [(0, 0), (1, 0), (0, 1)], [(100, 0), (0, 100), (100, 100), (99, 99)]
    cw = 128
    for extra in (big[:2], big[:3], big[:4], big[:1]):  # odd and even counts, median in or at the group
        pts = small + group + extra
        flat = np.array(sorted(y * cw + x for x, y in pts))
        assert _far_fast(flat, cw, 0, 0).tolist() == _far_direct(flat, cw, 0, 0).tolist()
        # The same group seen from the other side of the crop.
        flat2 = np.array(sorted((127 - y) * cw + (127 - x) for x, y in pts))
        assert _far_fast(flat2, cw, 127, 127).tolist() == _far_direct(flat2, cw, 127, 127).tolist()


def test_squares_table_slices_are_the_direct_squares():
    M._SQUARES = np.zeros(0, dtype=np.int64)  # grown from empty, then reused and grown again
    for n in (1, 3, 2, 40, 7, 300, 41):
        sqr = M._squares(n)
        for k in {1, n // 2 + 1, n}:
            for y in {0, 1, k // 2, k - 1, n - 1}:
                assert sqr[n - y : n - y + k].tolist() == ((np.arange(k) - y) ** 2).tolist()
    assert not M._squares(5).flags.writeable


def test_counts_decoder_with_signed_groups_equals_the_scalar_decoder(rng):
    # Runs whose deltas from the run two before are negative and positive
    # with final groups of every length 1..6 (sign bit set and clear), runs
    # from real masks, and every one-byte string.
    cases = [[0], [5], [0, 7], [3, 1, 2], [16, 15, 1], [0, 16, 0, 16]]
    for groups in range(1, 7):
        big = 1 << (5 * groups - 1)
        for delta in (big - 1, -big, -(big - 1), big, -1, 1, 15, -16, 16, -17):
            base = 1 << (5 * groups + 1)
            cases.append([base, 3, base + delta, 5, base + delta + 7, 1])
    for _ in range(30):
        n = int(rng.integers(1, 40))
        cases.append([int(v) for v in rng.integers(0, 1 << int(rng.integers(1, 30)), n)])
    for _ in range(10):
        m = rng.random((int(rng.integers(1, 50)), int(rng.integers(1, 50)))) < rng.random()
        cases.append(M.rle_counts_to_runs(M.encode_mask(m).counts).tolist())
    for runs in cases:
        data = coco_counts(runs)
        assert M._decode_counts(data).tolist() == M._rle_counts_to_runs_scalar(data).tolist() == runs
    # A pycocotools-made string decodes to what our writer would write.
    m = rng.random((20, 30)) < 0.4
    rle = M.encode_mask(m)
    assert coco_counts(M._decode_counts(rle.counts.encode()).tolist()) == rle.counts.encode()
    for b in range(48, 112):
        data = bytes([b])
        try:
            want = M._rle_counts_to_runs_scalar(data).tolist()
        except M.MaskError as e:
            with pytest.raises(M.MaskError) as got:
                M._decode_counts(data)
            assert str(got.value) == str(e) and got.value.reason == e.reason
        else:
            assert M._decode_counts(data).tolist() == want
