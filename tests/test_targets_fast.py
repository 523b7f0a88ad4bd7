"""Trainer-target shortcuts (issue 14, per-image CPU): each gives exactly the direct computation's answer.

Outlines are compared as WKB (every coordinate, ring order and start point),
against the one-mask-at-a-time reference of ``tests/test_throughput.py``.
"""

from __future__ import annotations

import numpy as np

from orsgen.stages.common import masks as M
from tests.conftest import random_mask
from tests.test_throughput import _outline_reference


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
