"""Fast paths of the expressions stage against the direct computation (issue 14)."""

from __future__ import annotations

import numpy as np

from orsgen.schemas.records import Rle
from orsgen.stages.common.masks import encode_mask, rle_counts_to_runs, rle_from_runs
from orsgen.stages.expressions.geometry import rle_moments, rle_moments_many


def _rle_moments_one_at_a_time(rle: Rle) -> tuple[int, float, float]:
    """The mask-at-a-time closed forms (the code ``rle_moments`` had before the batch): the oracle."""
    h, _w = rle.size
    runs = rle_counts_to_runs(rle.counts)
    if runs.size < 2:
        return 0, 0.0, 0.0
    ends = runs.cumsum()
    starts = ends - runs
    fg = slice(1, None, 2)
    s, e = starts[fg], ends[fg]
    keep = e > s
    s, e = s[keep], e[keep]
    if s.size == 0:
        return 0, 0.0, 0.0
    c0, r0 = np.divmod(s, h)
    c1, r1 = np.divmod(e - 1, h)
    one = c0 == c1
    # Runs within one column.
    n_one = (e - s)[one]
    sx = float((n_one * c0[one]).sum())
    sy = float(((r0[one] + r1[one]) * n_one).sum()) / 2.0
    area = int(n_one.sum())
    # Runs spanning columns: first partial, middle full, last partial.
    m = ~one
    if m.any():
        a0, b0, a1, b1 = c0[m], r0[m], c1[m], r1[m]
        n_first = h - b0
        n_last = b1 + 1
        n_mid_cols = a1 - a0 - 1
        area += int((n_first + n_last + n_mid_cols * h).sum())
        sx += float((n_first * a0).sum() + (n_last * a1).sum())
        # Sum of the columns a0+1 .. a1-1, each h pixels.
        sx += float((h * (a0 + a1) * n_mid_cols).sum()) / 2.0
        sy += float(((b0 + h - 1) * n_first).sum()) / 2.0
        sy += float((b1 * (b1 + 1)).sum()) / 2.0
        sy += float((n_mid_cols * h * (h - 1)).sum()) / 2.0
    return area, sx, sy


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
    want = [_rle_moments_one_at_a_time(r) for r in rles]
    assert [rle_moments(r) for r in rles] == want
    for batch in (rles, rles[::-1], rles[:1], rles[-1:], rles[5:9], []):
        got = rle_moments_many(batch)
        ref = [_rle_moments_one_at_a_time(r) for r in batch]
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


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _floats(v)


def test_rows_batch_equals_from_pylist(monkeypatch):
    # The writer's Parquet rows come from the JSON members: the same
    # serialized batch as from_pylist of the rows themselves, on both paths
    # (Arrow's JSON reader, and json.loads for what it might read otherwise),
    # across the Python path's chunk boundary, with nulls, NaN, -0.0, huge
    # and subnormal floats, big ints, non-ASCII / NUL / escaped text, a
    # missing key and an extra one.
    import copy

    import pyarrow as pa

    from orsgen.schemas.arrow import EXAMPLE_SCHEMA
    from orsgen.stages.write import plan as P
    from orsgen.stages.write.plan import _ROWS_PER_CONVERSION, _read_members, _rows_batch_python, rows_batch
    from tests.conftest import json_member_reference as _json_bytes

    variants = _row_variants()
    assert any(r["samples"] for r in variants) and any(r["instances"] for r in variants)
    finite = copy.deepcopy(variants[0])
    finite["instances"][0]["bbox_xywh"] = [-0.0, 1e308, 5e-324, 0.30000000000000004]
    finite["file_name"] = "d\u00e9\x00j \x1f \u2028 \\ \" \U0001f600"
    finite["refs"] = [{"ref_id": 2**62, "image_id": "x", "ann_ids": [-(2**63)], "category_ids": [1], "split": "val",
                       "sentences": [{"sent_id": 1, "raw": "\n", "sent": ""}], "dataset": "r"}]
    variants.append(finite)
    batches = [[r] for r in variants] + [(variants * _ROWS_PER_CONVERSION)[: 2 * _ROWS_PER_CONVERSION + 3]]
    fast = 0
    for rows in batches:
        images = [f"img-{i}".encode() for i in range(len(rows))]
        full = [dict(r, image=img) for r, img in zip(rows, images)]
        members = [_json_bytes({k: v for k, v in r.items() if k != "image"}) for r in rows]
        want = pa.RecordBatch.from_pylist(full, schema=EXAMPLE_SCHEMA).serialize().to_pybytes()
        # Few rows take the Python path; with that switched off, the reader where it may.
        for few in (P._FEW_ROWS, 0):
            monkeypatch.setattr(P, "_FEW_ROWS", few)
            got = rows_batch(members, images)
            assert got.schema == EXAMPLE_SCHEMA and got.num_rows == len(rows)
            assert got.serialize().to_pybytes() == want
        assert _rows_batch_python(members, pa.array(images, type=pa.binary())).serialize().to_pybytes() == want
        fast += _read_members(members) is not None
    # Most batches take the JSON reader; the ones with NaN / inf do not.
    def non_finite(rows):
        return any(x != x or x in (float("inf"), float("-inf")) for r in rows for x in _floats(r))

    assert fast == sum(1 for rows in batches if not non_finite(rows))
    assert 0 < fast < len(batches)
    # "NaN" inside a string (RLE counts often hold it) is no reason to leave the reader.
    in_text = dict(variants[0], file_name="aNaN NaN: -Infinity", uri="[NaNa")
    assert _read_members([_json_bytes({k: v for k, v in in_text.items() if k != "image"})]) is not None
    assert rows_batch([], []).num_rows == 0
    # A null key (not nullable) or a value Arrow refuses goes the Python way.
    no_key = dict(variants[0], key=None)
    assert _read_members([_json_bytes({k: v for k, v in no_key.items() if k != "image"})]) is None


def _polygon_range_problem_reference(segm, width, height):
    # The per-coordinate loop as it was before the fast path (issue 14).
    if not isinstance(segm, list):
        return None
    for poly in segm:
        if not isinstance(poly, list):
            continue
        for j, v in enumerate(poly):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            lim = width if j % 2 == 0 else height
            if not (-lim <= v <= 2 * lim):
                axis = "x" if j % 2 == 0 else "y"
                return (
                    f"polygon {axis} coordinate {v!r} is not finite or lies more than one image size outside "
                    f"the {width}x{height} image."
                )
    return None


def test_polygon_range_fast_path_matches_the_loop():
    from orsgen.stages.ingest.coco import _polygon_clearly_in_range, _polygon_range_problem

    nan, inf = float("nan"), float("inf")
    w, h = 40, 30
    edge = [-w, -h, 2 * w, 2 * h, 0, 0]
    values = [
        0, 1, -w, -w - 1, 2 * w, 2 * w + 1, -h, 2 * h, 2 * h + 0.5, -h - 1e-9, 12.5, nan, inf, -inf, True, False,
        10**400, -(10**400), 1e308, "3", None, [1, 2], np.float64(2e9), np.float64(3.0), np.int64(-5000),
    ]
    segms = [
        None, {"size": [h, w], "counts": "x"}, [], [[]], [edge], [edge, [1.0, 2.0, 3.0]], [[1e308, 1e308, 1e308]],
        [[1, 2, 3]], [[-w - 0.5, 0, 0, 0]], [[0, 0], "not a list", [0, 2 * h + 1]], [[1e308, 0, 1e308, 0, -1e308, 0]],
    ]
    rng = np.random.default_rng(3)
    for _ in range(300):
        k = int(rng.integers(1, 3))
        polys = []
        for _ in range(k):
            n = int(rng.integers(0, 9))
            poly = [float(rng.uniform(-1.2 * w, 2.2 * w)) if rng.random() < 0.7 else values[int(rng.integers(len(values)))] for _ in range(n)]
            polys.append(poly)
        segms.append(polys)
    fast = 0
    for segm in segms:
        assert _polygon_range_problem(segm, w, h) == _polygon_range_problem_reference(segm, w, h), segm
        if isinstance(segm, list):
            fast += sum(1 for p in segm if isinstance(p, list) and p and _polygon_clearly_in_range(p, w, h))
    assert fast > 10  # the fast path is taken, not only the loop
    assert _polygon_clearly_in_range(edge, w, h)
    for bad in ([nan, 0], [0, inf], [True, 0], [10**400, 0], [np.float64(1.0), 0], [2 * w + 1, 0], [0, -h - 1]):
        assert not _polygon_clearly_in_range(bad, w, h), bad


def test_descriptive_order_is_the_reshuffled_order():
    # balance() takes the descriptive candidates in the order of its one
    # seeded shuffle instead of shuffling them again by the same key.
    from orsgen.stages.expressions.balance import _DESCRIPTIVE, KIND_ORDER, _cand_key
    from orsgen.stages.expressions.context import Candidate, ImageContext
    from orsgen.stages.expressions.geometry import Margins

    rng = np.random.default_rng(5)
    margins = Margins(position_px=2.0, size_ratio=0.25, near_px=4.0, axis_overlap_frac=0.5)
    for trial in range(40):
        ctx = ImageContext.build(f"img{trial}", 64, 48, [], margins, seed=trial)
        cands = []
        for j in range(int(rng.integers(0, 40))):
            kind = KIND_ORDER[int(rng.integers(len(KIND_ORDER) - 1))]
            # Few texts and targets: equal keys in one kind, equal texts across kinds.
            text = f"the thing {int(rng.integers(4))}"
            targets = tuple(sorted({f"t{int(rng.integers(3))}" for _ in range(int(rng.integers(1, 3)))}))
            cands.append(Candidate(kind=kind, expression=text, target_ids=targets, template=f"tp{int(rng.integers(2))}", metadata={"j": j}))
        order = ctx.shuffled(cands, key=_cand_key)
        by_kind: dict[str, list] = {}
        for c in order:
            by_kind.setdefault(c.kind, []).append(c)
        reshuffled = ctx.shuffled([c for k in _DESCRIPTIVE for c in by_kind.get(k, [])], key=_cand_key)
        got = [c for c in order if c.kind in _DESCRIPTIVE]
        assert [id(c) for c in got] == [id(c) for c in reshuffled]


def test_sample_metadata_json_equals_json_dumps():
    import dataclasses
    import json

    from tests.test_write import _example

    from orsgen.schemas.arrow import _METADATA_JSON, example_to_row

    metas = [
        {},
        {"b": 1, "a": [1.5, float("nan"), float("inf"), -0.0], "é": "ü\x00\U0001f600", "n": None, "t": True},
        {"nested": {"z": {"y": [1, {"x": 2}]}, "a": ()}, "big": 10**30, "f": 1e-310},
    ]
    for m in metas:
        assert _METADATA_JSON.encode(m) == json.dumps(m, sort_keys=True, separators=(",", ":"))
    ex = _example(0, n_inst=2)
    samples = tuple(dataclasses.replace(s, metadata=m) for s in ex.samples for m in metas)
    row = example_to_row(dataclasses.replace(ex, samples=samples))
    assert [r["metadata"] for r in row["samples"]] == [
        json.dumps(s.metadata, sort_keys=True, separators=(",", ":")) for s in samples
    ]
    # Numbers converted by map(float / int) as by float() / int() one by one.
    inst = dataclasses.replace(ex.instances[0], bbox_xywh=(np.float32(1.1), np.int64(2), True, 3), crop_box=(np.float64(0.1), 1, 2, 3))
    r = example_to_row(dataclasses.replace(ex, instances=(inst,)))["instances"][0]
    assert r["bbox_xywh"] == [float(np.float32(1.1)), 2.0, 1.0, 3.0] and all(type(v) is float for v in r["bbox_xywh"])
    assert r["crop_box"] == [0.1, 1.0, 2.0, 3.0] and all(type(v) is float for v in r["crop_box"])


def test_unit_pick_and_shuffle_equal_hash_unit_of_the_joined_text():
    """``unit`` hashes a per-image head joined once; ``pick`` of one option hashes nothing."""
    import dataclasses

    from orsgen.schemas.config import ExpressionConfig
    from orsgen.stages.expressions.context import ImageContext
    from orsgen.stages.expressions.stage import margins_for
    from orsgen.stages.splits import hash_unit

    class Loud:
        def __str__(self) -> str:
            raise AssertionError("pick() of one option must not need a number")

    for image_id, seed in [("coco:7", 3), ("sa1b:é\x00x", 0), ("", -12), ("x" * 300, 2**70)]:
        m = margins_for(ExpressionConfig(), 64, 48)
        built = ImageContext.build(image_id, 64, 48, [], m, seed=seed)
        # A context made field by field, and a replaced one, hash under their own seed and id.
        made = ImageContext(image_id, 64, 48, {}, {}, frozenset(), frozenset(), frozenset(), frozenset(), frozenset(), m, seed)
        other = dataclasses.replace(built, seed=seed + 1, image_id=image_id + "!")

        def direct(ctx: ImageContext, *parts: object) -> float:
            return hash_unit("\x00".join([ctx.image_id, *map(str, parts)]), f"expressions:{ctx.seed}")

        for ctx in (built, made, other):
            for parts in [(1,), (1.0,), (True,), ("a", "b"), ("a\x00b",), ("order", "x"), (), ("é", None, (1, 2))]:
                assert ctx.unit(*parts) == direct(ctx, *parts)
            for n in range(1, 8):
                options = [f"o{i}" for i in range(n)]
                for parts in [("t", "description", "", "i1"), ("category", "cup"), (n,)]:
                    assert ctx.pick(options, *parts) == options[min(int(direct(ctx, *parts) * n), n - 1)]
            assert ctx.pick(["only"], Loud()) == "only"
            items = [(k % 5, i) for i, k in enumerate([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9])]
            for key in (lambda it: it[0], lambda it: it, lambda it: f"é\x00{it}"):
                want = sorted(items, key=lambda it: (direct(ctx, "order", key(it)), str(key(it))))
                assert ctx.shuffled(items, key=key) == want
        assert built.unit("x") != other.unit("x")
    try:
        built.pick([], "x")
    except ValueError:
        pass
    else:
        raise AssertionError("pick() of no options must raise")


def _tricky_geoms(width: int, height: int, m: float, rng: np.random.Generator) -> list:
    """Instances on and around the third lines (within, at and past the margin), NaN and off-image."""
    from orsgen.stages.expressions.geometry import Geom

    lines_x = [width / 3.0, 2.0 * width / 3.0]
    lines_y = [height / 3.0, 2.0 * height / 3.0]
    xs = [lx + d for lx in lines_x for d in (-m, -m / 2, 0.0, m / 2, m, m + 1e-9, -m - 1e-9)]
    xs += [-5.0, 0.0, float(width), width + 7.0, float("nan"), width / 2.0]
    ys = [ly + d for ly in lines_y for d in (-m, 0.0, m, m + 1e-9)] + [float("nan"), -1.0, height / 2.0]
    out = []
    for i in range(60):
        cx, cy = float(rng.choice(xs)), float(rng.choice(ys))
        # A box whose centre is another (or the same) tricky point.
        bx, by = float(rng.choice(xs)), float(rng.choice(ys))
        hw, hh = float(rng.choice([0.0, 0.5, m, 3.0])), float(rng.choice([0.0, 1.0, 2 * m]))
        out.append(Geom(f"i{i:02d}", "cup", False, 10.0, cx, cy, bx - hw, by - hh, bx + hw, by + hh))
    return out


def test_absolute_truth_table_equals_absolute_truth_per_region():
    from orsgen.stages.expressions.geometry import ABSOLUTE_REGIONS, Margins, absolute_truth, absolute_truth_table

    rng = np.random.default_rng(5)
    seen = set()
    for width, height in [(640, 480), (100, 100), (7, 3000)]:
        for m_px in (0.0, 2.0, 8.5, -1.0):
            margins = Margins(position_px=m_px, size_ratio=0.25, near_px=10.0)
            geoms = _tricky_geoms(width, height, abs(m_px), rng)
            for pool in [geoms, geoms[:1], [], geoms[5:9]]:
                table = absolute_truth_table(pool, width, height, margins)
                assert list(table) == list(ABSOLUTE_REGIONS)
                for region in ABSOLUTE_REGIONS:
                    want = absolute_truth(pool, region, width, height, margins)
                    assert table[region] == want, (width, height, m_px, region)
                    seen.update(want)
    assert len(seen) == 3  # TRUE, FALSE and UNSURE all reached


def test_ordinal_bounds_give_ordinal_truth_for_every_rank():
    from orsgen.stages.expressions.geometry import (
        ORDINAL_SIDES,
        Margins,
        ordinal_bounds,
        ordinal_truth,
        ordinal_truth_of_bounds,
    )

    rng = np.random.default_rng(9)
    seen = set()
    for m_px in (0.0, 1.0, 6.0):
        margins = Margins(position_px=m_px, size_ratio=0.25, near_px=10.0)
        geoms = _tricky_geoms(90, 60, max(m_px, 1.0), rng)
        pools = [geoms[:2], geoms[:3], geoms[10:17], [geoms[0], geoms[0]], geoms[:1], []]
        for pool in pools:
            for side in ORDINAL_SIDES:
                bounds = ordinal_bounds(pool, side, margins)
                for rank in range(len(pool) + 2):
                    want = ordinal_truth(pool, side, rank, margins)
                    assert ordinal_truth_of_bounds(bounds, rank) == want, (m_px, side, rank)
                    seen.update(want)
    assert len(seen) == 3
    try:
        ordinal_bounds(geoms[:2], "middle", Margins(1.0, 0.25, 10.0))
    except ValueError as err:
        assert "middle" in str(err)
    else:
        raise AssertionError("an unknown side must raise")


def test_rle_moments_by_prefix_sums_equal_the_column_formulas_and_refuse_out_of_bounds():
    from orsgen.stages.expressions import geometry as G

    rng = np.random.default_rng(1414)
    # The tricky masks whose runs cover their size, and random ones of every
    # run count parity (an odd count ends in background), zero-length runs included.
    rles = [r for r in _tricky_rles() if int(rle_counts_to_runs(r.counts).sum()) == r.size[0] * r.size[1]]
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        runs = [int(v) for v in rng.integers(0, 4, size=int(rng.integers(0, 30))).cumsum() % 5]
        while sum(runs) > h * w:
            runs.pop()
        runs.append(h * w - sum(runs))
        rles.append(rle_from_runs(runs, (h, w)))
    # No pixels: no runs at all (a mask with no pair), one or two zero runs; all background; all foreground.
    edges = [rle_from_runs(r, size) for r, size in (([], (4, 0)), ([0], (4, 0)), ([0, 0], (4, 0)), ([12], (4, 3)), ([0, 12], (4, 3)))]
    for batch in (rles, rles[::-1], rles[:1], rles[7:8], rles[30:45], edges, edges[::-1], rles[:3] + edges + rles[3:6], edges[:1]):
        runs_list = [rle_counts_to_runs(r.counts) for r in batch]
        fast = G._rle_moments_by_prefix(runs_list, batch)
        assert fast is not None  # the prefix sums are taken for every mask of the bench's size
        ref = [_rle_moments_one_at_a_time(r) for r in batch]
        for got in (fast, G._rle_moments_by_columns(runs_list, batch), rle_moments_many(batch)):
            assert [(a, x.hex(), y.hex()) for a, x, y in got] == [(a, float(x).hex(), float(y).hex()) for a, x, y in ref]
    # Beyond the exact bound (a 2**18-pixel square), runs longer or shorter than
    # the mask, and no height: the prefix sums step aside for the column formulas.
    from tests.conftest import coco_counts

    huge = Rle(size=(2**18, 2**18), counts=coco_counts([3, 2**30, 5, 2**36 - 2**30 - 8]).decode("ascii"))
    short = Rle(size=(5, 6), counts=rle_from_runs([4, 3, 2], (3, 3)).counts)
    long = Rle(size=(2, 2), counts=rle_from_runs([1, 9], (2, 5)).counts)
    flat = Rle(size=(0, 3), counts=rle_from_runs([0], (0, 3)).counts)
    for odd in (huge, short, long, flat):
        batch = [rles[3], odd]
        runs_list = [rle_counts_to_runs(r.counts) for r in batch]
        assert G._rle_moments_by_prefix(runs_list, batch) is None
        assert rle_moments_many(batch) == G._rle_moments_by_columns(runs_list, batch)
    assert rle_moments(huge) == _rle_moments_one_at_a_time(huge)


def test_description_texts_are_the_seeded_picks_and_candidates_equal_built_ones():
    """``description_candidates`` inlines ``ctx.pick`` and plans each template set once: every
    text is the pick of its own template set's texts, from the asked families only."""
    import dataclasses

    import pytest

    from orsgen.schemas.config import ExpressionConfig
    from orsgen.stages.expressions.context import Candidate, ImageContext, make_candidate
    from orsgen.stages.expressions.descriptions import description_candidates, template_semantics
    from orsgen.stages.expressions.geometry import Geom
    from orsgen.stages.expressions.stage import margins_for
    from orsgen.stages.expressions.templates import load_templates, noun_forms, parse_templates

    bundled = load_templates()
    # Another template set with the same ids (its plan must not be the bundled
    # one's): other texts, another text count, a template switched off.
    data = bundled.model_dump()
    for t in data["templates"]:
        extra = ["one more {noun}"] if t["family"] != "relation" else []
        t["description"] = [x.replace("the ", "that ") for x in t["description"]] + extra
    data["templates"][0]["enabled"] = False
    other = parse_templates(data)
    all_families = ["absolute", "ordinal", "size", "relation"]
    rng = np.random.default_rng(21)
    w, h = 120, 90
    picked = anchored = 0
    used: set[tuple[int, str]] = set()
    cases = [
        ("coco:9", 0, bundled, all_families),
        ("é\x00 id", 5, other, all_families),
        ("x" * 200, -3, bundled, ["size", "relation"]),
        ("coco:9", 1, other, ["ordinal", "absolute"]),
        ("coco:9", 0, bundled, all_families),
    ]
    for image_id, seed, templates, families in cases * 6:
        by_id = {t.id: t for t in templates.enabled() if t.family in families}
        geoms = []
        for cat, n in (("cup", int(rng.integers(1, 5))), ("dining table", 1), ("person", int(rng.integers(1, 4))), ("kite", 1)):
            for _k in range(n):
                x0, y0 = float(rng.integers(0, w - 10)), float(rng.integers(0, h - 10))
                x1, y1 = x0 + float(rng.integers(2, 30)), y0 + float(rng.integers(2, 30))
                area = float(rng.integers(1, 900))
                geoms.append(Geom(f"{image_id}/ann:{len(geoms)}é", cat, False, area, (x0 + x1) / 2, (y0 + y1) / 2, x0, y0, x1, y1))
        geoms.sort(key=lambda g: g.instance_id)
        pools: dict[str, list[Geom]] = {}
        for g in geoms:
            pools.setdefault(g.category, []).append(g)
        m = margins_for(ExpressionConfig(), w, h)
        ids = frozenset(g.instance_id for g in geoms)
        ctx = ImageContext(image_id, w, h, {g.instance_id: g for g in geoms}, pools, frozenset(), frozenset(pools), frozenset(), frozenset(), ids, m, seed)
        cands, _ = description_candidates(ctx, templates, families=families)
        for c in cands:
            t = by_id[c.template]  # an enabled template of the asked families
            assert c.metadata["semantics"] == template_semantics(t)
            texts = getattr(t, f"{c.kind}_plural" if len(c.target_ids) > 1 else c.kind)
            anchor = c.metadata.get("anchor_category", "")
            forms = noun_forms(c.metadata["category"], templates.nouns)
            want = ctx.pick(texts, t.id, c.kind, anchor, *c.target_ids).format(
                noun=forms.singular, plural=forms.plural, anchor=noun_forms(anchor, templates.nouns).singular if anchor else ""
            )
            assert c.expression == want
            assert type(c) is Candidate and c == Candidate(c.kind, c.expression, c.target_ids, c.template, dict(c.metadata))
            picked += len(texts) > 1
            anchored += bool(anchor)
            used.add((id(templates), t.family))
    assert picked > 50 and anchored > 10  # multi-text picks and anchored relations were both checked
    assert {f for _, f in used} == set(all_families) and {i for i, _ in used} == {id(bundled), id(other)}
    # make_candidate builds what the dataclass builds, and the result stays frozen.
    fields = ("phrase", "the cup", ("a", "b"), "t.x", {"k": [1]})
    made = make_candidate(*fields)
    assert made == Candidate(*fields) and repr(made) == repr(Candidate(*fields)) and made.metadata is fields[4]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.kind = "x"  # type: ignore[misc]


def test_size_truth_table_equals_size_truth_per_order():
    from orsgen.stages.expressions.geometry import SIZE_ORDERS, Geom, Margins, size_truth, size_truth_table

    rng = np.random.default_rng(33)
    reached = set()
    for size_ratio in (0.0, 0.25, 0.5, -0.1):
        f = 1.0 + size_ratio
        # Areas at, just inside and just past the ratio of one another, equal, zero, NaN and inf.
        base = [100.0, 100.0 * f, 100.0 * f + 1e-9, 100.0 * f - 1e-9, 100.0 / f if f else 7.0, 100.0, 0.0, 3.0]
        base += [float("nan"), float("inf"), 1e12, 250.0, 1.0]
        margins = Margins(position_px=3.0, size_ratio=size_ratio, near_px=10.0)
        for n in (0, 1, 2, 3, 5, 9):
            for _ in range(25):
                pool = [Geom(f"i{k}", "cup", False, float(rng.choice(base)), 0, 0, 0, 0, 1, 1) for k in range(n)]
                table = size_truth_table(pool, margins)
                for order in SIZE_ORDERS:
                    want = size_truth(pool, order, margins)
                    assert table[order] == want, (order, [g.area_px for g in pool], size_ratio)
                    reached.update(want)
    assert len(reached) == 3  # TRUE, FALSE and UNSURE all checked


def _balance_by_the_keyed_shuffle(ctx, positives, negatives, cfg):
    """balance() as written before issue 14's one-pass version: the oracle."""
    from collections import Counter

    from orsgen.stages.expressions.balance import _DESCRIPTIVE, KIND_ORDER, _cand_key, merge_identical, normalize, stochastic_round

    merged, counts = merge_identical(positives)
    by_kind: dict[str, list] = {}
    order = ctx.shuffled(merged, key=_cand_key)
    for c in order:
        by_kind.setdefault(c.kind, []).append(c)
    per_target: Counter = Counter()
    allowed = set()
    for c in [c for c in order if c.kind in _DESCRIPTIVE]:
        if per_target[c.target_ids] < cfg.max_per_target:
            per_target[c.target_ids] += 1
            allowed.add(id(c))
        else:
            counts["over_target_cap"] += 1
    for k in _DESCRIPTIVE:
        by_kind[k] = [c for c in by_kind.get(k, []) if id(c) in allowed]
    for k in list(by_kind):
        cap = getattr(cfg.max_per_kind, k)
        if len(by_kind[k]) > cap:
            counts["over_kind_cap"] += len(by_kind[k]) - cap
            by_kind[k] = by_kind[k][:cap]
    queue, lists = [], [list(by_kind.get(k, [])) for k in KIND_ORDER[:-1]]
    while any(lists):
        for lst in lists:
            if lst:
                queue.append(lst.pop(0))
    n_pos0 = min(len(queue), cfg.max_per_image)
    want = stochastic_round(cfg.negative_ratio * n_pos0, ctx.unit("negative_count"))
    n_neg = min(want, cfg.max_per_kind.no_target, len(negatives), cfg.max_per_image)
    if want > n_neg:
        counts["negatives_short"] += want - n_neg
    n_pos = min(n_pos0, cfg.max_per_image - n_neg)
    counts["over_image_cap"] += len(queue) - n_pos
    selected = queue[:n_pos] + list(negatives[:n_neg])
    selected.sort(key=lambda c: (KIND_ORDER.index(c.kind), normalize(c.expression), c.expression))
    return selected, counts


def test_named_shuffle_and_one_pass_balance_equal_the_keyed_shuffle():
    """``shuffled_named`` is ``shuffled`` by identity (ties in input order); balance() equals the oracle."""
    from orsgen.schemas.config import ExpressionConfig
    from orsgen.stages.expressions.balance import KIND_ORDER, _cand_key, balance
    from orsgen.stages.expressions.context import Candidate, ImageContext
    from orsgen.stages.expressions.geometry import Margins

    margins = Margins(position_px=2.0, size_ratio=0.25, near_px=4.0, axis_overlap_frac=0.5)
    rng = np.random.default_rng(14)
    for trial, image_id in enumerate(["img", "é\x00x", "", "z" * 200]):
        ctx = ImageContext.build(image_id, 64, 48, [], margins, seed=trial - 1)
        # Equal names (ties keep the input order), NUL, non-ASCII, empty names.
        names = ["a", "b", "a", "", "é\x00", "\x00", "a", "b\U0001f600", ""] + [f"n{i % 7}" for i in range(40)]
        items = [object() for _ in names]
        for perm in (range(len(names)), range(len(names) - 1, -1, -1), rng.permutation(len(names))):
            its, nms = [items[i] for i in perm], [names[i] for i in perm]
            keyed = ctx.shuffled(list(zip(its, nms)), key=lambda it: it[1])
            assert [id(x) for x in ctx.shuffled_named(its, nms)] == [id(x) for x, _ in keyed]
        assert ctx.shuffled_named([], []) == []
        for sub in range(30):
            cands = []
            for j in range(int(rng.integers(0, 60))):
                kind = KIND_ORDER[int(rng.integers(len(KIND_ORDER) - 1))]
                # Few texts and targets: merges, conflicts, equal keys, tight per-target caps.
                text = f"The  thing {int(rng.integers(12))}" if rng.random() < 0.5 else f"the thing {int(rng.integers(12))}"
                targets = tuple(sorted({f"t{int(rng.integers(3))}" for _ in range(int(rng.integers(1, 3)))}))
                cands.append(Candidate(kind, text, targets, f"tp{int(rng.integers(3))}", {"j": j}))
            negs = [Candidate(KIND_ORDER[-1], f"no {i % 3}", (), "no_target.category", {"i": i}) for i in range(int(rng.integers(0, 5)))]
            cfg = ExpressionConfig(
                max_per_target=int(rng.integers(1, 4)), max_per_image=int(rng.integers(1, 30)), negative_ratio=float(rng.random())
            )
            got, want = balance(ctx, cands, negs, cfg), _balance_by_the_keyed_shuffle(ctx, cands, negs, cfg)
            # Equal, not identical: a merge makes a new candidate in each call.
            assert got[0] == want[0] and list(got[1].items()) == list(want[1].items())
    assert _cand_key(Candidate("phrase", "x", ("a", "b"), "t", {})) == "phrase\x00t\x00x\x00a,b"


def test_negative_candidates_made_as_drawn_equal_the_full_list():
    """``NegativeCandidates`` reads like ``negative_candidates``' list, and fails where it fails."""
    import pytest

    from orsgen.schemas.records import Category, Presence
    from orsgen.stages.expressions import load_templates
    from orsgen.stages.expressions.context import ImageContext
    from orsgen.stages.expressions.geometry import Margins
    from orsgen.stages.expressions.negatives import NegativeCandidates, negative_candidates
    from orsgen.stages.expressions.plurals import KNOWN_PLURALS

    templates = load_templates()
    margins = Margins(position_px=2.0, size_ratio=0.25, near_px=4.0, axis_overlap_frac=0.5)
    sups = ["vehicle", "animal", "kitchen", "food", ""]
    vocab = tuple(Category(i, name, sups[i % len(sups)]) for i, name in enumerate(KNOWN_PLURALS))
    for seed, present in ((0, ()), (3, (Presence(1, "bicycle", "animal"), Presence(50, "x\x00é", "kitchen")))):
        ctx = ImageContext.build("img:é", 64, 48, [], margins, seed=seed, presence=present)
        for hard_first in (True, False):
            want = negative_candidates(ctx, vocab, templates, held_out={"dog"}, hard_first=hard_first)
            got = NegativeCandidates(ctx, vocab, templates, held_out={"dog"}, hard_first=hard_first)
            n = len(want)
            assert len(got) == n > 70 and any(c.metadata["hard"] for c in want) == bool(present)
            for sl in (slice(0, 3), slice(None), slice(5, 2), slice(-4, None), slice(1, 60, 7), slice(0, 10**6)):
                assert got[sl] == want[sl]
            assert [got[i] for i in range(-n, n)] == want + want and list(got) == want
            assert got[2] is got[2] and got[:3][2] is got[2]  # made once
            for bad in (n, -n - 1):
                with pytest.raises(IndexError):
                    got[bad]
    assert len(NegativeCandidates(ctx, (), templates)) == 0
    # A name whose noun forms cannot be written fails at once, as the full list does.
    odd = vocab + (Category(999, "", "x"),)
    with pytest.raises(Exception) as full:
        negative_candidates(ctx, odd, templates)
    with pytest.raises(type(full.value)):
        NegativeCandidates(ctx, odd, templates)


def test_cached_suffixes_equal_the_written_forms_tails():
    """``Coverage.suffixes`` kept per (name, noun override) equals the tails of the words it is asked for then."""
    from orsgen.stages.expressions.templates import NounForms
    from orsgen.stages.expressions.vocabulary import Coverage

    cov = Coverage(version=1, table={})

    def direct(name, nouns):
        return frozenset(t[i + 1 :] for t in cov.words(name, nouns) for i, ch in enumerate(t) if ch in " -")

    override = {"coffee table": NounForms(singular="end-stand", plural="end stands")}
    for _ in range(2):
        for name in ("coffee table", "hot-dog", "dining_table", "cup", "a b-c d", "x(y)"):
            for nouns in (None, {}, override):
                assert cov.suffixes(name, nouns) == direct(name, nouns)
    assert cov.suffixes("coffee table", override) != cov.suffixes("coffee table")
    assert "stand" in cov.suffixes("coffee table", override) and "stand" not in cov.suffixes("coffee table")


def test_relation_truth_equals_the_truth_of_its_conditions():
    """``relation_truth`` without building conditions == ``_truth(relation_conditions(...))``."""
    import math

    import pytest

    from orsgen.stages.expressions.geometry import (
        RELATIONS,
        Geom,
        Margins,
        Truth,
        _truth,
        relation_conditions,
        relation_truth,
    )

    rng = np.random.default_rng(7)
    # Coordinates on a coarse grid (ties, margins hit exactly), plus NaN / inf now and then.
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0]

    def value(lo: float, hi: float) -> float:
        if rng.random() < 0.03:
            return specials[int(rng.integers(len(specials)))]
        return float(rng.integers(int(lo), int(hi) + 1)) / 2.0

    def geom(i: int) -> Geom:
        x0, y0 = value(0, 120), value(0, 120)
        x1, y1 = x0 + value(0, 60), y0 + value(0, 60)
        return Geom(f"g{i}", "c", False, value(0, 4000), value(0, 160), value(0, 160), x0, y0, x1, y1)

    seen = {r: set() for r in RELATIONS}
    margins_list = [
        Margins(position_px=2.0, size_ratio=0.25, near_px=4.0, axis_overlap_frac=0.1),
        Margins(position_px=0.0, size_ratio=0.0, near_px=0.0, axis_overlap_frac=0.0),
        Margins(position_px=8.5, size_ratio=1.5, near_px=30.0, axis_overlap_frac=0.5),
        Margins(position_px=math.inf, size_ratio=0.25, near_px=4.0, axis_overlap_frac=0.1),
        Margins(position_px=math.nan, size_ratio=math.nan, near_px=math.nan, axis_overlap_frac=math.nan),
    ]
    for trial in range(400):
        pool = [geom(i) for i in range(int(rng.integers(0, 6)))]
        anchor = geom(99)
        j = lambda: float(rng.integers(-8, 9)) / 2.0  # noqa: E731
        if trial % 3 == 1:  # a hand around a cup: "holding" can be true, and "on" false
            anchor = Geom("a", "cup", False, 500.0 + 50 * j(), 40 + j(), 45 + j(), 20 + j(), 30 + j(), 60 + j(), 60 + j())
            pool.append(Geom("h", "person", False, 4000.0 + 100 * j(), 50.0, 50.0, 0.0 + j(), 0.0 + j(), 100 + j(), 100 + j()))
        elif trial % 3 == 2:  # a cat on a sofa: "on" can be true
            anchor = Geom("a", "sofa", False, 6000.0, 50 + j(), 60 + j(), 0.0 + j(), 20 + j(), 100 + j(), 100 + j())
            pool.append(Geom("o", "cat", False, 800.0, 30 + j(), 15 + j(), 10 + j(), 0.0 + j(), 50 + j(), 30 + j()))
        margins = margins_list[trial % len(margins_list)]
        for relation in RELATIONS:
            want = [_truth(relation_conditions(g, anchor, relation, margins)) for g in pool]
            got = relation_truth(pool, anchor, relation, margins)
            assert got == want, (relation, pool, anchor, margins)
            seen[relation].update(want)
    assert all(s == {Truth.TRUE, Truth.FALSE, Truth.UNSURE} for s in seen.values()), {r: sorted(map(str, s)) for r, s in seen.items()}
    # Values exactly at a bound: the area ratio's false value is 0 (0.625 * 800 - 500), a margin exactly met.
    m0 = margins_list[0]
    hand = Geom("h", "person", False, 800.0, 50.0, 50.0, 0.0, 0.0, 100.0, 100.0)
    for cup in (Geom("a", "cup", False, 500.0, 40.0, 45.0, 20.0, 30.0, 60.0, 60.0),
                Geom("a", "cup", False, 100.0, 40.0, 45.0, 2.0, 2.0, 98.0, 98.0)):
        for relation in RELATIONS:
            want = [_truth(relation_conditions(hand, cup, relation, m0))]
            assert relation_truth([hand], cup, relation, m0) == want, relation
    # An unknown relation fails as the conditions do (and, as before, not for an empty pool).
    with pytest.raises(ValueError, match="unknown relation"):
        relation_truth([geom(0)], geom(1), "under", margins_list[0])
    assert relation_truth([], geom(1), "under", margins_list[0]) == []


def test_sha256_unit_normalize_and_the_float_sort_equal_the_written_formulas(monkeypatch):
    """``sha256_unit`` is the first 8 digest bytes over 2**64, ``normalize`` the split and join; ``shuffled_named`` orders by (unit, name, index)."""
    import hashlib

    from orsgen.stages.expressions import context as context_module
    from orsgen.stages.expressions.balance import normalize
    from orsgen.stages.expressions.context import ImageContext
    from orsgen.stages.expressions.geometry import Margins
    from orsgen.stages.splits import sha256_unit

    for text in ["", "a", "\x00", "é\x00x", "\U0001f600" * 40, "x" * 1000, "expressions:0\x00img\x00order\x00a"]:
        want = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64
        assert sha256_unit(text) == want and 0.0 <= want < 1.0
    # balance's normalize, kept per text, answers as the split and join do, asked once or again.
    for text in ["", " ", "The  Cup", "the cup", "ÉCLAIR\tà\u00a0la\u2003crème ", "\u0130x", "a\x00 B", "ǅ"] * 2:
        assert normalize(text) == " ".join(text.lower().split())

    margins = Margins(position_px=2.0, size_ratio=0.25, near_px=4.0, axis_overlap_frac=0.5)
    ctx = ImageContext.build("img", 64, 48, [], margins, seed=0)
    rng = np.random.default_rng(15)
    names = [f"n{i}" for i in range(60)] + ["a", "a", "", "é\x00"]

    def reference(items, nms):
        units = [context_module.sha256_unit(f"{ctx._unit_prefix}\x00order\x00{n}") for n in nms]
        return [items[i] for _, _, i in sorted(zip(units, nms, range(len(nms))))]

    def check():
        for _ in range(20):
            nms = [names[int(i)] for i in rng.integers(0, len(names), int(rng.integers(0, 40)))]
            items = [object() for _ in nms]
            assert [id(x) for x in ctx.shuffled_named(items, nms)] == [id(x) for x in reference(items, nms)]

    check()  # real digests: distinct names never tie on the unit (only equal names do)
    # Coarse units: distinct names tie on their unit, and the name then decides.
    for levels in (1, 2, 5):
        monkeypatch.setattr(context_module, "sha256_unit", lambda t, k=levels: (sum(map(ord, t)) % k) / k)
        check()


def _word_covers_by_scan(cov, words, name, supercategory="", nouns=None):
    """``Coverage.word_covers`` as written before its set form (a scan with ``endswith``): the oracle."""
    from orsgen.stages.expressions.vocabulary import normalize

    target = cov.words(name, nouns)
    if words & target:
        return True
    sup = normalize(supercategory) if supercategory else ""
    for w in words:
        listed = cov.table.get(w)
        if listed and not listed.isdisjoint(target):
            return True
        if sup and w == sup:
            return True
        if any(t.endswith(" " + w) or t.endswith("-" + w) for t in target):
            return True
    return False


def test_word_covers_by_sets_equals_the_scan():
    """The set form of ``word_covers`` answers like the scan, on COCO-, LVIS-style and odd names and words."""
    from dataclasses import replace

    from orsgen.stages.expressions import load_templates
    from orsgen.stages.expressions.plurals import KNOWN_PLURALS
    from orsgen.stages.expressions.templates import NounForms
    from orsgen.stages.expressions.vocabulary import load_vocabulary

    bundled = load_vocabulary()
    extra = {**bundled.table, "ball": frozenset({"tennis ball"}), "dog": frozenset({"hot-dog"}), "-": frozenset({"a-"})}
    rng = np.random.default_rng(16)
    names = sorted(KNOWN_PLURALS)[:60] + [
        "tennis ball", "hot-dog", "dining_table", "glass_(drink_container)", "a-", "x -y", "coffee table", "ball",
        "table", "a b-c d", "Hot Dog", "-", "x(y)",
    ]
    sups = ["", "animal", "Animal", "kitchen(x)", "_", "()", "food", "table", "vehicle", "-"]
    pool = sorted({w for n in names for w in bundled.words(n)} | {"", "-", " ", "dog", "table", "ball", "d", "y", "animal"})
    overrides = {"coffee table": NounForms(singular="end-stand", plural="end stands")}
    templates = load_templates()
    reached = set()
    for cov in (bundled, replace(bundled, table=extra, _words={}, _suffixes={})):
        for nouns in (None, templates.nouns, overrides):
            for _ in range(300):
                words = frozenset(pool[int(i)] for i in rng.integers(0, len(pool), int(rng.integers(0, 4))))
                name = names[int(rng.integers(len(names)))]
                sup = sups[int(rng.integers(len(sups)))]
                want = _word_covers_by_scan(cov, words, name, sup, nouns)
                assert cov.word_covers(words, name, sup, nouns) == want, (words, name, sup)
                assert cov.word_covers(set(words), name, sup, nouns) == want
                reached.add(want)
            for name in names:  # every name's own words and its tails
                for sup in sups:
                    for w in sorted(cov.words(name, nouns) | cov.suffixes(name, nouns) | {"", "-", "animal"}):
                        words = frozenset({w})
                        assert cov.word_covers(words, name, sup, nouns) == _word_covers_by_scan(cov, words, name, sup, nouns)
    assert reached == {True, False}


def _anchors_by_scan(ctx, target_category):
    """``descriptions._anchors`` as written before the image's anchors were made once: the oracle."""
    out = []
    for name in sorted(ctx.pools):
        pool = ctx.pools[name]
        if name == target_category or ctx.unknown_extent(name) or len(pool) != 1:
            continue
        if ctx.covers_another(name) is not None:
            continue
        if pool[0].instance_id in ctx.kept_ids:
            out.append((name, pool[0]))
    return out


def test_image_anchors_and_formatted_texts_equal_the_direct_ones():
    """The anchors made once per image equal the per-target scan; the kept formatted texts equal ``str.format``."""
    import pytest

    from orsgen.stages.expressions import load_templates
    from orsgen.stages.expressions.context import ImageContext
    from orsgen.stages.expressions.descriptions import _anchors, _formatted, _image_anchors
    from orsgen.stages.expressions.geometry import Geom, Margins
    from orsgen.stages.expressions.vocabulary import load_vocabulary

    coverage, nouns = load_vocabulary(), load_templates().nouns
    margins = Margins(position_px=2.0, size_ratio=0.25, near_px=4.0, axis_overlap_frac=0.5)
    names = ["cup", "dining table", "coffee_table", "dog", "tennis ball", "ball", "person", "hot dog", "zebra"]
    rng = np.random.default_rng(17)
    seen = set()
    for trial in range(60):
        present = [n for n in names if rng.random() < 0.6]
        pools = {
            n: [Geom(f"{n}:{k}", n, False, 10.0, 5.0 * k, 3.0, 0.0, 0.0, 9.0, 9.0) for k in range(int(rng.integers(1, 3)))]
            for n in present
        }
        geoms = {g.instance_id: g for pool in pools.values() for g in pool}
        ctx = ImageContext(
            image_id=f"img{trial}",
            width=64,
            height=48,
            geoms=geoms,
            pools=pools,
            crowd_categories=frozenset(n for n in present if rng.random() < 0.2),
            present_names=frozenset(present),
            present_ids=frozenset(),
            present_supercategories=frozenset(),
            kept_ids=frozenset(i for i in geoms if rng.random() < 0.8),
            margins=margins,
            seed=0,
            rejected_categories=frozenset(n for n in present if rng.random() < 0.2),
            present_categories=tuple(sorted((n, "") for n in present)),
            coverage=coverage if trial % 3 else None,
            nouns=nouns,
        )
        for target in names + ["absent", ""]:
            got = _anchors(_image_anchors(ctx), target)
            assert got == _anchors_by_scan(ctx, target), (trial, target)
            seen.add(len(got))
    assert max(seen) >= 2 and 0 in seen
    for text in ["the {noun}", "{plural} left of the {anchor}", "{noun!r}", "{{noun}}", "{noun:>9}|", "", "{anchor}{anchor}"]:
        for forms in (("cup", "cups", ""), ("é\x00", "", "dog"), ("{noun}", "{plural}", "{anchor}")):
            for _ in range(2):
                assert _formatted(text, *forms) == text.format(noun=forms[0], plural=forms[1], anchor=forms[2])
    for bad in ["{x}", "{0}", "{noun", "{noun.x}"]:
        for _ in range(2):  # raised again, not a kept answer
            with pytest.raises(Exception) as want:
                bad.format(noun="cup", plural="cups", anchor="")
            with pytest.raises(type(want.value)):
                _formatted(bad, "cup", "cups", "")


def _merge_identical_by_groups(cands):
    """``merge_identical`` as written before it kept one candidate per text (a list per text): the oracle."""
    from collections import Counter
    from dataclasses import replace

    from orsgen.stages.expressions.balance import KIND_ORDER, normalize

    groups: dict = {}
    for c in cands:
        groups.setdefault(normalize(c.expression), []).append(c)
    kept, counts = [], Counter()
    for _text, group in sorted(groups.items()):
        if len(group) == 1:
            kept.append(group[0])
            continue
        if len({c.target_ids for c in group}) > 1:
            counts["conflict"] += len(group)
            continue
        group = sorted(group, key=lambda c: (KIND_ORDER.index(c.kind) if c.kind in KIND_ORDER else 99, c.template, c.expression))
        first = group[0]
        counts["merged"] += len(group) - 1
        others = sorted({c.template for c in group[1:]} - {first.template})
        if others:
            first = replace(first, metadata={**first.metadata, "merged_templates": others})
        kept.append(first)
    return kept, counts


def test_merge_identical_equals_the_grouping_by_lists():
    """One candidate per text plus lists for repeats: the same kept candidates, in the same order, and counts."""
    from orsgen.stages.expressions.balance import KIND_ORDER, merge_identical
    from orsgen.stages.expressions.context import Candidate

    rng = np.random.default_rng(18)
    texts = ["the cup", "The  cup", "the cup ", "a dog", "A DOG", "\tthe\ncup", "é x", "É X", "z"]
    seen = set()
    for trial in range(300):
        cands = []
        for j in range(int(rng.integers(0, 25 if trial % 2 else 6))):
            kind = KIND_ORDER[int(rng.integers(len(KIND_ORDER)))] if rng.random() < 0.9 else "other"
            targets = tuple(sorted({f"t{int(rng.integers(2))}" for _ in range(int(rng.integers(1, 3)))}))
            text = texts[int(rng.integers(len(texts)))] if trial % 3 else f"text {j}"
            cands.append(Candidate(kind, text, targets, f"tp{int(rng.integers(3))}", {"j": j}))
        got, want = merge_identical(cands), _merge_identical_by_groups(cands)
        assert got[0] == want[0] and list(got[1].items()) == list(want[1].items())
        assert all(a is b for a, b in zip(got[0], want[0]) if "merged_templates" not in a.metadata)
        seen.update(got[1])
        seen.add("none" if not got[1] else "some")
    assert {"merged", "conflict", "none"} <= seen


def test_instance_geom_made_by_slots_equals_the_dataclass_built_one():
    """``instance_geom`` sets Geom's slots directly: the same fields (types included), frozen, equal and hashed alike."""
    import dataclasses

    import pytest

    from orsgen.schemas.records import Instance
    from orsgen.stages.expressions.geometry import Geom, instance_geom

    rles = _tricky_rles()[:6]
    cases = [
        ((3, 7.0, 12.0), (1, 2, 4, 9), "cup", 0),
        ((0, 0.0, 0.0), (1.5, -0.0, 4, 9), None, True),  # no area: the box's centre
        ((5, 1e300, -3.5), (float("nan"), 2, float("inf"), 9), "é\x00", 1),
        (None, (0, 0, 1, 1), "", False),  # moments from the mask
    ]
    for k, (moments, box, name, crowd) in enumerate(cases):
        inst = Instance(
            instance_id=f"i{k}", image_id="img", rle=rles[k], bbox_xywh=(0.0, 0.0, 1.0, 1.0), bbox_xyxy=box,
            area_px=1, category_name=name, iscrowd=crowd,
        )
        g = instance_geom(inst, moments)
        area, sx, sy = moments if moments is not None else rle_moments(inst.rle)
        if area:
            cx, cy = sx / area + 0.5, sy / area + 0.5
        else:
            cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
        want = Geom(f"i{k}", name, bool(crowd), float(area), float(cx), float(cy), *(float(v) for v in box))
        assert type(g) is Geom and repr(g) == repr(want)
        assert [type(v) for v in dataclasses.astuple(g)] == [type(v) for v in dataclasses.astuple(want)]
        if all(v == v for v in dataclasses.astuple(want)[3:]):  # NaN is never equal
            assert g == want and hash(g) == hash(want)
        with pytest.raises(dataclasses.FrozenInstanceError):
            g.cx = 0.0
    with pytest.raises(ValueError):
        instance_geom(dataclasses.replace(inst, bbox_xyxy=(0, 1, 2)), (1, 0.0, 0.0))
