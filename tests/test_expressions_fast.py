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


def _row_variants() -> list[dict]:
    import copy

    from tests.test_write import _example

    from orsgen.schemas.arrow import example_to_row

    rows = []
    for i, n_inst in ((0, 2), (1, 1), (2, 3)):
        row = example_to_row(_example(i, n_inst=n_inst))
        row["image"] = b""
        rows.append(row)
    base = rows[0]
    # Nulls and empties where the schema allows them, non-ASCII and NUL text,
    # NaN / -0.0 / huge floats, a missing key and an extra one.
    odd = copy.deepcopy(base)
    odd.update(source=None, uri="", width=None, file_name="dé\x00j\u00e0 vu \U0001f600", input_name=None)
    odd["instances"] = [dict(i, crop_box=None, predicted_iou=float("nan"), stability_score=-0.0, point_coords=[],
                             supercategory=None, bbox_xywh=[1e308, -0.0, 0.5, 3.0]) for i in odd["instances"]]
    odd["samples"] = [dict(s, union_rle=None, union_svg=None, targets=[], reground_box=None, reground_iou=None,
                           target_ids=[], sam2_ious=[float("inf")]) for s in odd["samples"]] + odd["samples"]
    odd["refs"] = [
        {"ref_id": 2**40, "image_id": "x", "ann_ids": [], "category_ids": [1, 2], "split": "val",
         "sentences": [{"sent_id": 1, "raw": "ü", "sent": ""}], "dataset": "refcoco"}
    ]
    rows.append(odd)
    missing = copy.deepcopy(base)
    del missing["sha256"]
    missing["extra"] = "ignored"
    rows.append(missing)
    return rows


def test_arrow_row_bytes_equal_from_pylist():
    import pyarrow as pa

    from orsgen.schemas.arrow import EXAMPLE_SCHEMA
    from orsgen.stages.write.plan import _arrow_row_bytes

    rows = _row_variants()
    assert any(r["samples"] for r in rows) and any(r["instances"] for r in rows)
    for row in rows:
        want = pa.RecordBatch.from_pylist([row], schema=EXAMPLE_SCHEMA).serialize().to_pybytes()
        got = _arrow_row_bytes(row)
        assert got == want
        back = pa.ipc.read_record_batch(pa.py_buffer(got), EXAMPLE_SCHEMA)
        assert back.schema == EXAMPLE_SCHEMA
