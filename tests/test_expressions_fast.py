"""Fast paths of the expressions stage against the direct computation (issue 14)."""

from __future__ import annotations

import numpy as np

from orsgen.schemas.records import Rle
from orsgen.stages.common.masks import encode_mask, rle_from_runs
from orsgen.stages.expressions.geometry import rle_moments, rle_moments_many


def _tricky_rles() -> list[Rle]:
    rng = np.random.default_rng(14)
    out: list[Rle] = []
    for h, w in [(1, 1), (1, 7), (7, 1), (5, 6), (13, 9)]:
        out.append(encode_mask(np.zeros((h, w), dtype=np.uint8)))  # empty
        out.append(encode_mask(np.ones((h, w), dtype=np.uint8)))  # full: one run over every column
        m = np.zeros((h, w), dtype=np.uint8)
        m[h - 1, w - 1] = 1  # last pixel only
        out.append(encode_mask(m))
        m = np.zeros((h, w), dtype=np.uint8)
        m[0, 0] = 1  # first pixel only (the leading background run is empty)
        out.append(encode_mask(m))
        for p in (0.1, 0.5, 0.9):
            out.append(encode_mask((rng.random((h, w)) < p).astype(np.uint8)))
    # Runs starting mid-column and spanning several columns, and a mask whose
    # foreground runs include zero-length ones.
    out.append(rle_from_runs([3, 20, 2, 30, 1, 4], (7, 9)))
    out.append(rle_from_runs([0, 0, 5, 0, 0, 3, 2], (5, 2)))
    out.append(rle_from_runs([63], (7, 9)))
    # A large mask whose sums need more than 2**31.
    big = np.zeros((3000, 2000), dtype=np.uint8)
    big[5:2990, 3:1999] = 1
    big[100:200, 50:60] = 0
    out.append(encode_mask(big))
    return out


def test_rle_moments_many_is_bit_identical_to_rle_moments():
    rles = _tricky_rles()
    want = [rle_moments(r) for r in rles]
    for batch in (rles, rles[::-1], rles[:1], rles[-1:], rles[5:9], []):
        got = rle_moments_many(batch)
        ref = [rle_moments(r) for r in batch]
        assert len(got) == len(ref)
        for (ga, gx, gy), (ra, rx, ry) in zip(got, ref):
            assert type(ga) is int and ga == ra
            assert type(gx) is float and gx.hex() == float(rx).hex()
            assert type(gy) is float and gy.hex() == float(ry).hex()
    assert any(a > 0 for a, _, _ in want) and any(a == 0 for a, _, _ in want)
