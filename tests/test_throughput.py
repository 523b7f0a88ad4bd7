"""The throughput work (issue 14): each shortcut gives exactly the answer of the work it skips.

Faster RLE decoding, shared crops, cached trainer targets, the plural table and
the MakeValid shortcut are checked against the slow, direct computations, each
with a bad-input twin; the benchmark's plain loop is checked to write the
same data files as the Beam pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from pycocotools import mask as mask_utils
from shapely.geometry import Polygon

from orsgen.schemas.records import Instance, Rle, Sample
from orsgen.stages.common import masks as M
from orsgen.stages.common import targets as T
from tests.conftest import interior_points_reference, random_mask

REPO = Path(__file__).resolve().parents[1]


def _scalar_runs(counts: str) -> list[int]:
    """COCO's counts decoder written out byte by byte (the reference)."""
    runs: list[int] = []
    data, p = counts.encode("ascii"), 0
    while p < len(data):
        x = k = 0
        more = 1
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = c & 0x20
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _masks(rng: np.random.Generator, n: int = 80):
    for i in range(n):
        h, w = int(rng.integers(2, 80)), int(rng.integers(2, 80))
        m = random_mask(rng, h, w, int(rng.integers(0, 4))) if i % 5 else rng.random((h, w)) < rng.random()
        yield m


# ------------------------------------------------------------------ RLE runs and crops


def test_vectorised_runs_equal_the_scalar_decoder(rng):
    for m in _masks(rng):
        r = M.encode_mask(m)
        runs = M.rle_counts_to_runs(r.counts)
        assert runs.dtype == np.int64
        assert runs.tolist() == _scalar_runs(r.counts)
        assert int(runs.sum()) == m.size
    # A 1500x2250 SA-1B-sized mask: long runs, several 5-bit groups each.
    big = np.zeros((1500, 2250), dtype=bool)
    big[100:1400, 7:2000] = True
    r = M.encode_mask(big)
    assert M.rle_counts_to_runs(r.counts).tolist() == _scalar_runs(r.counts)


def test_runs_are_read_only_and_bad_counts_are_rejected():
    r = M.encode_mask(np.eye(6, dtype=bool))
    runs = M.rle_counts_to_runs(r.counts)
    with pytest.raises(ValueError):
        runs[0] = 7  # shared by the cache: never changed in place
    for bad, words in (("0a\x7f", "invalid byte"), ("0`", "middle of a run"), ("@", "negative run")):
        with pytest.raises(M.MaskError, match=words):
            M.rle_counts_to_runs(bad)
    # The first byte outside "0".."o" is named, whichever side it falls on.
    for bad, byte in (("0/1", 47), ("0p1", 112), ("00\x00o", 0), ("0 ", 32)):
        with pytest.raises(M.MaskError, match=f"invalid byte {byte}\\."):
            M.rle_counts_to_runs(bad)
    with pytest.raises(M.MaskError, match="invalid byte 255"):
        M._decode_counts(b"00\xff0")
    # Negative deltas (a run shorter than the one two before), one group and
    # several groups long, undone exactly.
    for h, (a, b), (c, d) in ((20, (2, 10), (12, 14)), (5000, (100, 3100), (3200, 3210)), (70000, (10, 60010), (60100, 60101))):
        m = np.zeros((h, 1), dtype=bool)
        m[a:b] = m[c:d] = True
        counts = M.encode_mask(m).counts
        assert any((ch - 48) & 0x30 == 0x10 for ch in counts.encode())  # a final group with the sign bit
        assert M._decode_counts(counts.encode()).tolist() == [a, b - a, c - b, d - c, h - d] == _scalar_runs(counts)
    # A run of more than 60 bits takes the scalar path: same rejection as before.
    with pytest.raises(M.MaskError):
        M.rle_counts_to_runs("0" + "o" * 14 + "?")


def test_decode_crop_equals_a_dense_decode(rng):
    for m in _masks(rng, 60):
        r = M.encode_mask(m)
        h, w = m.shape
        dense = mask_utils.decode(r.to_coco()).astype(bool)
        x0, x1 = sorted(rng.uniform(-4, w + 4, size=2))
        y0, y1 = sorted(rng.uniform(-4, h + 4, size=2))
        for box, pad in ((None, 0), (None, 1), ((x0, y0, x1, y1), 2)):
            crop, (ox, oy) = M.decode_crop(r, box, pad)
            ys, xs = np.mgrid[oy : oy + crop.shape[0], ox : ox + crop.shape[1]]
            inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            ref = np.zeros(crop.shape, dtype=bool)
            ref[inside] = dense[ys[inside], xs[inside]]
            assert np.array_equal(crop, ref)


def test_decode_crop_of_runs_that_stop_short_fills_background():
    # Runs covering fewer pixels than h * w (a malformed mask): the rest reads as background.
    short = M.rle_from_runs([2, 3], (4, 4))
    crop, _ = M.decode_crop(short, (0, 0, 4, 4))
    assert crop.sum() == 3 and crop.shape == (4, 4)


# ------------------------------------------------------------------ geometry shortcuts


def test_make_valid_shortcut_keeps_valid_geometry_and_fixes_invalid():
    square = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)])
    assert M._make_valid(square) is square
    assert shapely.make_valid(square).wkb == square.wkb  # what GEOS gives without the shortcut
    bowtie = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])
    fixed = M._make_valid(bowtie)
    assert not bowtie.is_valid and fixed.is_valid
    assert fixed.wkb == shapely.make_valid(bowtie).wkb


def test_batched_rings_equal_the_scalar_rings():
    # Contours of 1, 2, 3+ points, a self-touching one (invalid as a polygon) and a hole-free blob.
    contours = [
        np.array([[[5, 5]]], dtype=np.int32),
        np.array([[[0, 0]], [[3, 0]]], dtype=np.int32),
        np.array([[[0, 0]], [[4, 0]], [[4, 4]], [[0, 4]]], dtype=np.int32),
        np.array([[[0, 0]], [[2, 2]], [[4, 0]], [[4, 4]], [[2, 2]], [[0, 4]]], dtype=np.int32),
        np.array([[[1, 1]], [[6, 1]], [[6, 2]], [[1, 2]]], dtype=np.int32),
    ]
    got = M._grown_rings_many([(contours, 3, -2)])[0]
    want = [M._ring_geometry(c, 3, -2) for c in contours]
    assert [g.wkb for g in got] == [g.wkb for g in want]
    assert M._grown_rings_many([([], 0, 0)]) == [[]]
    # Each contour alone (one ring takes the path without a grouping index),
    # the self-touching one included, and pairs mixing small and large ones.
    for c in contours:
        assert [g.wkb for g in M._grown_rings_many([([c], 3, -2)])[0]] == [M._ring_geometry(c, 3, -2).wkb]
    for a, b in ((0, 2), (3, 1), (2, 3)):
        pair = [contours[a], contours[b]]
        assert [g.wkb for g in M._grown_rings_many([(pair, -1, 7)])[0]] == [M._ring_geometry(c, -1, 7).wkb for c in pair]
    # GEOS's check without shapely's wrapper: the same answers, scalar and array.
    bowtie, square = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)]), Polygon([(0, 0), (4, 0), (4, 4), (0, 4)])
    assert bool(M._is_valid(square)) and not bool(M._is_valid(bowtie))
    arr = np.array([square, bowtie, Polygon()], dtype=object)
    assert M._is_valid(arr).tolist() == shapely.is_valid(arr).tolist() == [True, False, True]


def test_fast_median_is_numpys_median(rng):
    for n in (1, 2, 3, 10, 11, 1000):
        v = rng.random(n) * 50
        v[: n // 3] = v[0]  # ties
        assert M._median(v) == float(np.median(v))


def test_interior_points_equal_the_reference_on_ties_and_borders(rng):
    h, w = 31, 44
    shapes = []
    for y0, y1, x0, x1 in [(0, h, 0, w), (5, 6, 3, 40), (0, 1, 0, 1), (10, 20, 10, 20), (0, 9, w - 9, w), (3, 4, 3, 4)]:
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True  # full image, a 1-pixel line, single pixels, a square (ties everywhere), a corner
        shapes.append(m)
    two = np.zeros((h, w), bool)
    two[2:8, 2:8] = two[20:26, 30:36] = True  # two equal blobs: the first maximum must win
    ring = np.zeros((h, w), bool)
    ring[5:25, 5:25] = True
    ring[9:21, 9:21] = False
    shapes += [two, ring] + list(_masks(rng, 60))
    n = 0
    for m in shapes:
        if not m.any():
            continue
        rle = M.encode_mask(m)
        got = M.interior_points(rle)
        assert got == interior_points_reference(rle)
        assert all(type(v) is int for p in got for v in p)
        n += 1
    assert n > 50


def test_points_and_outline_from_a_given_crop_match_and_empty_crops_are_refused(rng):
    mask = random_mask(rng, 40, 30)
    rle = M.encode_mask(mask)
    crop = M.decode_crop(rle, pad_px=1)
    assert M.interior_points(rle, crop=crop) == M.interior_points(rle)
    assert M.rle_to_geometry(rle, 1.0, crop).wkb == M.rle_to_geometry(rle, 1.0).wkb
    empty = M.empty_rle(40, 30)
    with pytest.raises(M.MaskError, match="empty"):
        M.interior_points(empty, crop=M.decode_crop(empty, pad_px=1))
    assert M.rle_to_geometry(empty, 1.0, M.decode_crop(empty, pad_px=1)).is_empty


def _svg_reference(geom, w: int, h: int, precision: int = 4) -> str:
    """The SVG path ring by ring, point by point, with format() of the numpy values."""
    ref = []
    for poly in M._iter_polygons(geom):
        for coords in (poly.exterior.coords, *(i.coords for i in poly.interiors)):
            pts = np.asarray(coords)[:-1]
            xs, ys = np.clip(pts[:, 0] / w, 0, 1), np.clip(pts[:, 1] / h, 0, 1)
            cmds = [f"{'M' if i == 0 else 'L'} {x:.{precision}f} {y:.{precision}f}" for i, (x, y) in enumerate(zip(xs, ys))]
            ref.append(" ".join(cmds) + " Z")
    return " ".join(ref)


def test_svg_formatting_writes_the_same_digits_as_format(rng):
    for m in _masks(rng, 30):
        if not m.any():
            continue
        r = M.encode_mask(m)
        geom = M.rle_to_geometry(r, 1.0)
        h, w = m.shape
        assert M.svg_path(geom, w, h) == _svg_reference(geom, w, h)
    assert M.svg_path(Polygon(), 10, 10) == ""


def test_batched_svg_rings_match_ring_by_ring_on_tricky_geometry():
    # Several polygons with holes of different sizes, coordinates outside the
    # image on both sides (clipped), values that round at the 4th/2nd decimal,
    # and a geometry collection whose non-polygon parts are skipped.
    holed = Polygon([(0, 0), (30, 0), (30, 30), (0, 30)], [[(5, 5), (10, 5), (10, 10)], [(20, 20), (25, 20), (25, 26), (20, 25)]])
    outside = Polygon([(-3.3, -1), (70.123456, 2.00005), (69.99995, 44.5), (1 / 3, 50)])
    multi = shapely.MultiPolygon([holed, shapely.affinity.translate(outside, 35, 0)])
    coll = shapely.GeometryCollection([shapely.Point(1, 1), holed, shapely.LineString([(0, 0), (1, 1)])])
    for geom in (holed, outside, multi, coll):
        for w, h, precision in ((64, 48, 4), (7, 3, 2), (1000, 1, 6)):
            got = M.svg_path(geom, w, h, precision)
            assert got == _svg_reference(geom, w, h, precision)
            assert got.count("M ") == sum(1 + len(p.interiors) for p in M._iter_polygons(geom))
    assert M.svg_path(shapely.MultiPolygon(), 10, 10) == ""


def test_compact_crop_holds_the_union_on_the_rows_and_columns_it_keeps(rng):
    h, w = 37, 53
    border = np.zeros((h, w), bool)
    border[0:3, 0:4] = True  # touches two image edges: its padded window leaves the image
    border[-1, -5:] = True
    pixel = np.zeros((h, w), bool)
    pixel[18, 26] = True
    far = np.zeros((h, w), bool)
    far[-2:, 0] = True
    masks = [border, pixel, far, np.zeros((h, w), bool)] + [random_mask(rng, h, w, 2) for _ in range(6)]
    rles = [M.encode_mask(m) for m in masks]
    groups = [(0, 1), (1, 2), (0, 2), (1, 3), (3, 3), (0, 1, 2, 3), (4, 5), (4, 5, 6, 7, 8, 9), (5, 5), (2, 9)]
    for group in groups:
        union = np.logical_or.reduce([masks[i] for i in group])
        for part_pad in (0, 1, 2):
            pixels, cols, rows = M.compact_crop([M.decode_crop(rles[i], pad_px=part_pad) for i in group])
            assert cols.dtype == rows.dtype == np.int32
            assert np.all(np.diff(cols) > 0) and np.all(np.diff(rows) > 0)
            # The kept pixels are the union's (background off the image) ...
            inside = (rows[:, None] >= 0) & (rows[:, None] < h) & (cols[None, :] >= 0) & (cols[None, :] < w)
            want = np.zeros(pixels.shape, bool)
            want[inside] = union[np.clip(rows, 0, h - 1)[:, None], np.clip(cols, 0, w - 1)[None, :]][inside]
            assert np.array_equal(pixels, want), (group, part_pad)
            # ... every union pixel and its neighbours are kept, and the frame is background.
            ys, xs = union.nonzero()
            for d in (-1, 0, 1):
                assert np.isin(xs + d, cols).all() and np.isin(ys + d, rows).all()
            assert not pixels[[0, -1], :].any() and not pixels[:, [0, -1]].any()


def test_crop_window_equals_numpy_floor_and_ceil():
    def ref(b, pad):
        bx0, by0, bx1, by1 = b
        return (
            int(np.floor(bx0)) - pad, int(np.floor(by0)) - pad,
            max(int(np.ceil(bx1)), int(np.floor(bx0)) + 1) + pad, max(int(np.ceil(by1)), int(np.floor(by0)) + 1) + pad,
        )

    boxes = [(0, 0, 0, 0), (0.5, 1.5, 2.5, 3.49), (-2.5, -0.1, -0.0, 4.0), (3, 4, 3, 4), (1e15 + 0.5, 2, 1e15 + 3, 2.2),
             (np.float64(2.7), np.float32(1.2), np.int64(5), 9.999999999), (7.0, 7.0, 6.0, 6.5)]
    for b in boxes:
        for pad in (0, 1, 4):
            assert M._crop_window(b, pad) == ref(b, pad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises((ValueError, OverflowError)):
            M._crop_window((bad, 0, 1, 1), 1)


# ------------------------------------------------------------------ trainer targets cache


def _instance(image_id: str, k: int, m: np.ndarray) -> Instance:
    rle = M.encode_mask(m)
    xywh = M.rle_bbox_xywh(rle)
    return Instance(f"{image_id}/ann:{k}", image_id, rle, xywh, M.xywh_to_xyxy(xywh), M.rle_area(rle))


def test_target_cache_gives_the_uncached_answer_and_computes_once(rng, monkeypatch):
    h, w = 48, 64
    insts = [_instance("img", k, random_mask(rng, h, w, 2)) for k in range(4)]
    by_id = {i.instance_id: i for i in insts}
    ids = [i.instance_id for i in insts]
    target_sets = [(ids[0],), (ids[1],), (ids[0], ids[1]), (ids[0],), (ids[0], ids[1]), (), tuple(ids)]
    samples = [
        Sample(sample_id=f"s{k}", image_id="img", expression=f"e{k}", kind="category", target_ids=t, generator="t")
        for k, t in enumerate(target_sets)
    ]
    plain = [T.attach_targets(s, by_id, w, h) for s in samples]

    calls = {"points": 0, "polygon": 0}
    points, outlines = M.interior_points, M.rle_to_geometries

    def count_points(*a, **k):
        calls["points"] += 1
        return points(*a, **k)

    def count_polygons(masks, *a, **k):
        calls["polygon"] += len(masks)  # one outline per mask handed over
        return outlines(masks, *a, **k)

    monkeypatch.setattr(T, "interior_points", count_points)
    monkeypatch.setattr(T, "rle_to_geometries", count_polygons)
    cache = T.TargetCache()
    cached = [T.attach_targets(s, by_id, w, h, cache=cache) for s in samples]
    assert cached == plain
    assert calls == {"points": 4, "polygon": 4}  # 4 instances; 4 distinct non-empty target sets


def test_target_cache_still_rejects_bad_targets(rng):
    inst = _instance("img", 0, random_mask(rng, 20, 20, 1))
    empty = dataclasses.replace(_instance("img", 1, np.zeros((20, 20), bool)), area_px=0)
    cache = T.TargetCache()
    by_id = {inst.instance_id: inst, empty.instance_id: empty}
    for targets, reason in (((inst.instance_id, "img/ann:9"), "missing_target"), ((empty.instance_id,), "empty_mask")):
        s = Sample(sample_id="s", image_id="img", expression="e", kind="category", target_ids=targets, generator="t")
        with pytest.raises(T.TargetError) as err:
            T.attach_targets(s, by_id, 20, 20, cache=cache)
        assert err.value.reason == reason


# ------------------------------------------------------------------ plurals without inflect


def test_plural_table_is_exactly_what_inflect_says():
    import inflect

    from orsgen.stages.expressions.plurals import KNOWN_PLURALS

    engine = inflect.engine()
    assert len(KNOWN_PLURALS) >= 80
    for name, plural in KNOWN_PLURALS.items():
        assert engine.plural_noun(name) == plural, name


def test_names_outside_the_table_still_go_to_inflect():
    from orsgen.stages.expressions.plurals import KNOWN_PLURALS
    from orsgen.stages.expressions.templates import noun_forms

    assert "goose" not in KNOWN_PLURALS
    assert noun_forms("goose").plural == "geese"  # inflect's irregular plural, not "gooses"
    with pytest.raises(TypeError):
        KNOWN_PLURALS["cup"] = "cupz"  # type: ignore[index]


def test_a_coco_run_does_not_import_inflect(tmp_path):
    code = (
        "import sys\n"
        "from orsgen.stages.expressions.templates import noun_forms\n"
        "assert noun_forms('person').plural == 'people' and noun_forms('sports ball').plural\n"
        "print('inflect' in sys.modules)\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ the benchmark's plain loop


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "benchmarks" / "bench_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules.setdefault("bench_pipeline", mod)  # dataclasses look their module up
    spec.loader.exec_module(sys.modules["bench_pipeline"])
    return sys.modules["bench_pipeline"]


@pytest.mark.slow
def test_plain_loop_writes_what_the_pipeline_writes(tmp_path):
    from orsgen.pipelines.run import run_pipeline
    from orsgen.schemas.config import load_config

    bench = _bench_module()
    coco_cfg, sa1b_cfg = bench.make_inputs(tmp_path / "inputs", n_coco=2, n_sa1b=3)
    for path in (coco_cfg, sa1b_cfg):
        cfg = load_config(path, ["write.num_buckets=4"])
        bench.plain_loop(cfg, str(tmp_path / f"loop-{path.stem}"))
        run_pipeline(cfg, str(tmp_path / f"beam-{path.stem}"), ["--runner=FnApiRunner"], show_progress=False)
        loop, beam = bench.data_digest(tmp_path / f"loop-{path.stem}"), bench.data_digest(tmp_path / f"beam-{path.stem}")
        assert loop == beam, path.name
        assert bench.written_images(tmp_path / f"loop-{path.stem}") > 0
        assert (tmp_path / f"loop-{path.stem}" / "manifest.json").is_file()


def test_plain_loop_refuses_a_multi_input_config(tmp_path):
    from orsgen.schemas.config import load_config

    bench = _bench_module()
    coco_cfg, _ = bench.make_inputs(tmp_path / "inputs", n_coco=1, n_sa1b=1)
    cfg = load_config(coco_cfg)
    two = cfg.model_copy(update={"inputs": [cfg.inputs[0], cfg.inputs[0].model_copy(update={"name": "coco2"})]})
    with pytest.raises(AssertionError, match="single-input"):
        bench.plain_loop(two, str(tmp_path / "out"))


def test_dense_demo_scenes_are_busy_and_leave_the_default_alone():
    from orsgen.pipelines.demo_data import DENSE_IMAGE_SIZES, IMAGE_SIZES, demo_scene

    image, objects = demo_scene(0, "coco", 100_002, dense=True)
    assert (image.shape[1], image.shape[0]) in DENSE_IMAGE_SIZES and len(objects) >= 8
    small, few = demo_scene(0, "coco", 100_002)
    assert (small.shape[1], small.shape[0]) in IMAGE_SIZES and len(few) < len(objects)
    again, _ = demo_scene(0, "coco", 100_002, dense=False)
    assert hashlib.sha256(small.tobytes()).digest() == hashlib.sha256(again.tobytes()).digest()


def test_c_work_is_grouped_by_the_library_that_does_it(tmp_path):
    from orsgen.schemas.config import load_config

    bench = _bench_module()
    site = "/venv/lib/python3.11/site-packages"
    assert bench.classify_profile_entry("~", "<findContours>") == "OpenCV"
    assert bench.classify_profile_entry("~", "<distanceTransform>") == "OpenCV"
    assert bench.classify_profile_entry("~", "<simplify_preserve_topology_scalar>") == "GEOS (shapely)"
    assert bench.classify_profile_entry("<GEOS>", "buffer") == "GEOS (shapely)"
    assert bench.classify_profile_entry("<pycocotools>", "frPyObjects") == "pycocotools"
    # shapely's own Python (wrappers, geometry classes, decorators) is not GEOS.
    assert bench.classify_profile_entry(f"{site}/shapely/constructive.py", "buffer") is None
    assert bench.classify_profile_entry(f"{site}/shapely/geometry/base.py", "is_valid") is None
    assert bench.classify_profile_entry(f"{site}/shapely/decorators.py", "wrapper") is None
    assert bench.classify_profile_entry("~", "<method 'decode' of 'ImagingDecoder' objects>") == "libjpeg (Pillow decode)"
    assert bench.classify_profile_entry("~", "<method 'read' of '_io.BufferedReader' objects>") == "file I/O (system calls)"
    assert bench.classify_profile_entry("~", "<built-in method builtins.isinstance>") is None
    assert bench.classify_profile_entry("~", "<built-in method _hashlib.openssl_sha256>") is None
    assert bench.classify_profile_entry("/repo/stages/common/masks.py", "rle_to_geometry") is None

    coco_cfg, _ = bench.make_inputs(tmp_path / "inputs", n_coco=2, n_sa1b=1)
    cpu_s, images, groups = bench.c_work(load_config(coco_cfg, ["write.num_buckets=2"]), str(tmp_path / "out"))
    assert images >= 1 and cpu_s > 0
    assert groups["GEOS (shapely)"] > 0 and groups["OpenCV"] > 0 and groups["libjpeg (Pillow decode)"] > 0
    assert groups["pycocotools"] > 0
    assert sum(groups.values()) < cpu_s
    # The wrappers are gone afterwards.
    import numpy as np
    import shapely.lib

    assert isinstance(shapely.lib.buffer, np.ufunc)
    from orsgen.stages.common import masks

    assert masks._is_valid is shapely.lib.is_valid


# ------------------------------------------------------------------ seeded decisions


def test_memoised_unit_and_shuffle_equal_the_direct_hash():
    from orsgen.schemas.config import ExpressionConfig
    from orsgen.stages.expressions.context import ImageContext
    from orsgen.stages.expressions.stage import margins_for
    from orsgen.stages.splits import hash_unit

    ctx = ImageContext.build("coco:7", 64, 48, [], margins_for(ExpressionConfig(), 64, 48), seed=3)

    def direct(*parts: object) -> float:
        return hash_unit("\x00".join(["coco:7", *(str(p) for p in parts)]), "expressions:3")

    # Parts that are equal as dict keys but differ as text (1, 1.0, True) must
    # not share a memoised number; asking twice gives the first answer.
    for parts in [(1,), (1.0,), (True,), ("1",), ("a", "b"), ("a\x00b",), ("order", "x"), ()]:
        assert ctx.unit(*parts) == direct(*parts)
        assert ctx.unit(*parts) == direct(*parts)
    assert ctx.unit(1) != ctx.unit(1.0)
    assert ctx.pick(list("abcdefg"), "p", 2) == list("abcdefg")[min(int(direct("p", 2) * 7), 6)]

    # The seeded order: by (unit("order", str(key)), str(key)), stable for
    # items with the same name, whatever the key returns (ints, tuples).
    items = [(k % 5, i) for i, k in enumerate([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9])]
    for key in (lambda it: it[0], lambda it: str(it[0]), lambda it: it):
        want = sorted(items, key=lambda it: (direct("order", key(it)), str(key(it))))
        assert ctx.shuffled(items, key=key) == want
        assert ctx.shuffled(list(reversed(items)), key=key) == sorted(
            reversed(items), key=lambda it: (direct("order", key(it)), str(key(it)))
        )
    # Another seed or image is another memo (a fresh context), not a stale hit.
    other = ImageContext.build("coco:7", 64, 48, [], margins_for(ExpressionConfig(), 64, 48), seed=4)
    assert other.unit("x") == hash_unit("coco:7\x00x", "expressions:4") != ctx.unit("x")


# ------------------------------------------------------------------ position semantics


def _absolute_conditions_table(g, region: str, width: int, height: int, reading: str) -> list[float]:
    """The absolute-region conditions as the full table (the reference)."""
    from orsgen.stages.expressions.geometry import _point

    x, y = _point(g, reading)
    left, right = width / 3.0 - x, x - 2.0 * width / 3.0
    top, bottom = height / 3.0 - y, y - 2.0 * height / 3.0
    return {
        "left": [left], "right": [right], "top": [top], "bottom": [bottom],
        "center": [-left, -right, -top, -bottom],
        "top_left": [top, left], "top_right": [top, right],
        "bottom_left": [bottom, left], "bottom_right": [bottom, right],
    }[region]


def test_absolute_conditions_and_truth_equal_the_full_table(rng):
    from orsgen.stages.expressions import geometry as G

    def truth_ref(values, m):
        return G._truth([G.additive(v, m) for v in values])

    w, h = 90, 61  # thirds that are not exact binary fractions
    # Centroids and boxes on the third lines (ties with margin 0), just off
    # them, outside the image, and NaN.
    special = [w / 3.0, 2.0 * w / 3.0, h / 3.0, 2.0 * h / 3.0, 0.0, -5.0, w + 3.0, float("nan")]
    vals = [*special, *(float(v) for v in rng.uniform(-10, 100, 40))]
    geoms = []
    for k in range(200):
        cx, cy, x0, y0 = (vals[int(i)] for i in rng.integers(0, len(vals), 4))
        geoms.append(G.Geom(f"i{k}", "cup", False, 10.0, cx, cy, x0, y0, x0 + float(rng.integers(0, 30)), y0 + 7.0))
    for m in (0.0, 2.5, 1e-9):
        margins = G.Margins(position_px=m, size_ratio=0.25, near_px=10.0)
        for region in G.ABSOLUTE_REGIONS:
            want = []
            for g in geoms:
                per = []
                for r in G.READINGS:
                    ref = _absolute_conditions_table(g, region, w, h, r)
                    got = G.absolute_conditions(g, region, w, h, r)
                    assert np.array_equal(np.array(got), np.array(ref), equal_nan=True)
                    assert G._additive_truth(got, m) is truth_ref(ref, m)
                    per.append(truth_ref(ref, m))
                want.append(G.both_readings(*per))
            assert G.absolute_truth(geoms, region, w, h, margins) == want
    with pytest.raises(ValueError, match="unknown absolute region"):
        G.absolute_conditions(geoms[0], "middle", w, h)


# ------------------------------------------------------------------ reject redaction


def test_reused_secret_values_follow_every_environment_change(monkeypatch):
    from orsgen.schemas.config import redact as R
    from orsgen.schemas.records import Reject

    def check() -> list[str]:
        got = R.secret_values()
        assert got == R._scan_secret_values()
        return got

    monkeypatch.delenv("ORSGEN_TEST_API_KEY", raising=False)
    base = check()
    assert check() == base  # reused, same answer
    monkeypatch.setenv("ORSGEN_TEST_API_KEY", "first-secret-value")
    assert "first-secret-value" in check()
    assert Reject("k", "s", "r", "server said first-secret-value").message == "server said ***"
    monkeypatch.setenv("ORSGEN_TEST_API_KEY", "second-secret-value")  # same name, new value
    got = check()
    assert "second-secret-value" in got and "first-secret-value" not in got
    assert Reject("k", "s", "r", "echo second-secret-value").message == "echo ***"
    monkeypatch.setenv("PLAIN_VARIABLE_X", "not-a-secret-value")  # not secret by name ...
    assert "not-a-secret-value" not in check()
    monkeypatch.setenv(R.SECRET_ENV_LIST, "PLAIN_VARIABLE_X")  # ... until registered
    assert "not-a-secret-value" in check()
    monkeypatch.delenv("ORSGEN_TEST_API_KEY")
    assert "second-secret-value" not in check()
    # A caller changing the returned list does not change the next answer.
    got = R.secret_values()
    got.clear()
    assert R.secret_values() == R._scan_secret_values() != []


def test_sample_id_equals_safe_key_of_the_whole_id():
    from orsgen.schemas.records import safe_key
    from orsgen.stages.expressions.context import Candidate
    from orsgen.stages.expressions.stage import sample_id_of

    # Keys with dots, slashes, colons, spaces, non-ASCII letters and digits,
    # a lone surrogate, and an already safe key.
    keys = ["coco-coco_1", "a.b/c:d e", "refcoco-coco:391895", "café-ß-٣", "x\ud800y", "", "-x"]
    texts = ["the cup", "the CUP", "the cup ", "ünïcode ☕", ""]
    for key in keys:
        for kind in ("category", "description"):
            for text in texts:
                cand = Candidate(kind=kind, expression=text, target_ids=(), template="t")
                digest = hashlib.sha256(f"{kind}\x00{text}".encode("utf-8")).hexdigest()[:12]
                assert sample_id_of(key, cand) == safe_key(f"{key}-x{digest}")


def test_samples_built_once_equal_attach_targets_and_errors_match(rng):
    from orsgen.schemas.config import ExpressionConfig
    from orsgen.stages.expressions.stage import add_expressions
    from tests.test_expressions import TEMPLATES, VOCAB, _example, _scene

    out, rejects, _ = add_expressions(_example(_scene()), VOCAB, TEMPLATES, ExpressionConfig(negative_ratio=1.0), seed=3)
    by_id = {i.instance_id: i for i in out.instances}
    w, h = out.image.width, out.image.height
    assert len(out.samples) > 5 and not rejects
    assert any(len(s.target_ids) > 1 for s in out.samples) and any(not s.target_ids for s in out.samples)
    for s in out.samples:
        bare = dataclasses.replace(s, union_rle=None, union_svg="", targets=())
        assert T.attach_targets(bare, by_id, w, h) == s
    # The errors are attach_targets' own, reason and message.
    empty = dataclasses.replace(_instance("img", 1, np.zeros((20, 20), bool)), area_px=0)
    for ids, insts in ((("img/ann:9",), {}), ((empty.instance_id,), {empty.instance_id: empty})):
        s = Sample(sample_id="s", image_id="img", expression="e", kind="category", target_ids=ids, generator="t")
        with pytest.raises(T.TargetError) as want:
            T.attach_targets(s, insts, 20, 20)
        with pytest.raises(T.TargetError) as got:
            T.target_fields(ids, insts, 20, 20, image_id="img")
        assert (got.value.reason, str(got.value)) == (want.value.reason, str(want.value))


# ------------------------------------------------------------------ outlines of many masks at once


def _outline_reference(rle, tolerance_px: float):
    """The outline one mask at a time with scalar shapely calls (the reference)."""
    import cv2

    if M.rle_area(rle) == 0:
        return Polygon()
    crop, (ox, oy) = M.decode_crop(rle, pad_px=1)
    contours, hierarchy = cv2.findContours(crop.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    hier = hierarchy[0].tolist()
    polys = []
    for k, h in enumerate(hier):
        if h[3] != -1:
            continue
        poly = M._ring_geometry(contours[k], ox, oy)
        child = h[2]
        while child != -1:
            hole = M._ring_geometry(contours[child], ox, oy, grow=False)
            if not hole.is_empty:
                poly = poly.difference(hole.buffer(-0.5, join_style="mitre"))
            child = hier[child][0]
        polys.append(poly)
    geom = shapely.unary_union(polys)
    geom = geom if geom.is_valid else shapely.make_valid(geom)
    if tolerance_px > 0:
        geom = geom.simplify(tolerance_px, preserve_topology=True)
        geom = geom if geom.is_valid else shapely.make_valid(geom)
    return M._polygonal(geom)


def test_outlines_of_many_masks_equal_one_at_a_time(rng):
    h, w = 40, 50
    ring = np.zeros((h, w), bool)
    ring[5:30, 5:30] = True
    ring[10:25, 10:25] = False
    ring[14:18, 14:18] = True  # an island in the hole
    specks = np.zeros((h, w), bool)
    specks[0, 0] = specks[2, 5:7] = specks[-1, -1] = True  # 1- and 2-point contours at the border
    touch = np.zeros((h, w), bool)
    touch[10:15, 10:15] = touch[15:20, 15:20] = True  # touching corners: a self-touching contour
    noise = np.zeros((h, w), bool)
    noise[3:15, 30:44] = rng.random((12, 14)) < 0.7  # many holes and specks, small
    masks = [ring, specks, touch, noise, np.zeros((h, w), bool), np.ones((h, w), bool)]
    masks += [random_mask(rng, h, w, int(rng.integers(0, 4))) for _ in range(12)]
    rles = [M.encode_mask(m) for m in masks]
    for tol in (0.0, 1.0, 2.5):
        want = [_outline_reference(r, tol).wkb for r in rles]
        # Crops given, crops decoded inside, and a mixture, in one batch.
        given = [(r, M.decode_crop(r, pad_px=1)) for r in rles]
        assert [g.wkb for g in M.rle_to_geometries(given, tol)] == want
        assert [g.wkb for g in M.rle_to_geometries([(r, None) for r in rles], tol)] == want
        assert [M.rle_to_geometry(r, tol).wkb for r in rles] == want
    assert M.rle_to_geometries([]) == []


def test_prepared_target_sets_give_what_each_set_gives_alone(rng):
    h, w = 48, 64
    insts = [_instance("img", k, random_mask(rng, h, w, 2)) for k in range(5)]
    empty = dataclasses.replace(_instance("img", 9, np.zeros((h, w), bool)), area_px=0)
    by_id = {i.instance_id: i for i in [*insts, empty]}
    ids = [i.instance_id for i in insts]
    sets = [(ids[0],), (ids[0], ids[1]), (ids[2], ids[3], ids[4]), (), (ids[1], "img/ann:77"), (empty.instance_id,),
            (ids[0], ids[1]), (ids[4],)]
    prepared = T.TargetCache()
    prepared.prepare(sets, by_id, w, h)
    assert len(prepared._shapes) == 4  # the distinct valid, non-empty sets; the others are left to target_fields
    fresh = T.TargetCache()
    for target_ids in sets:
        try:
            want = T.target_fields(target_ids, by_id, w, h, cache=T.TargetCache())
        except T.TargetError as err:
            with pytest.raises(T.TargetError) as got:
                T.target_fields(target_ids, by_id, w, h, cache=prepared)
            assert (got.value.reason, str(got.value)) == (err.reason, str(err))
            continue
        assert T.target_fields(target_ids, by_id, w, h, cache=prepared) == want
        assert T.target_fields(target_ids, by_id, w, h, cache=fresh) == want
    assert len(prepared._shapes) == 5  # the empty set, computed on demand


def test_with_split_equals_dataclasses_replace():
    """The positional copy of a sample == ``dataclasses.replace``, every field set; a subclass keeps its type."""
    from orsgen.pipelines.build import _with_split
    from orsgen.schemas.records import Rle, Sample, TargetGeometry

    assert all(f.init for f in dataclasses.fields(Sample))
    full = Sample(
        sample_id="s", image_id="i", expression="e", kind="phrase", target_ids=("a", "b"), split="train",
        generator="g", template="t", model="m", union_rle=Rle((2, 3), "06"), union_svg="M 0 0 Z",
        targets=(TargetGeometry("a", (0.0, 1.0, 2.0, 3.0), (1, 1), (2, 2), (0, 0, 9, 9)),), sam2_ious=(0.5,),
        reground_box=(0.0, 0.0, 1.0, 1.0), reground_iou=0.25, screened=True, metadata={"k": [1]},
    )

    class Sub(Sample):
        __slots__ = ()

    for sample in (full, Sample("s", "i", "e", "no_target", ()), Sub("s", "i", "e", "phrase", ("a",), split="val")):
        for split in ("test", "", "train"):
            got, want = _with_split(sample, split), dataclasses.replace(sample, split=split)
            assert got == want and type(got) is type(want) and got.split == split
            assert all(getattr(got, f.name) is getattr(want, f.name) for f in dataclasses.fields(Sample) if f.name != "split")
