"""Benchmark: decontamination recall / false positives, hashing throughput, matching cost.

Three measurements in one run:

(a) **Recall and false-positive rate.** ``--n-originals`` benchmark images
    (half demo scenes from ``pipelines/demo_data.py``, half other generated
    textures: smooth noise, stripes, checkers, random shapes) are indexed as
    a benchmark would be (``stages.decontaminate.image_hashes``: pHash and
    the one-side crops at ``crop_frac``). Each original yields 7 copies:
    JPEG quality 50, resized 0.5x, cut by 5% on the left / right / top /
    bottom side, and a renamed byte-identical copy. A copy is caught when its
    sha256 or its pHash (within ``max_distance`` bits) matches its original.
    ``--n-negatives`` unrelated images (other demo scenes and textures, never
    indexed) are matched against the whole index: one that matches anything
    is a false positive. Recall and FPR are reported per transform and for
    several thresholds.
(b) **Hashing throughput**, images per second on one core (this process is
    single-threaded), for what the stage does per image: decode, pHash of
    the image and of its four crops; for demo-sized JPEGs and for
    1500x2250 JPEGs (SA-1B's size).
(c) **Matching cost** against an index of ``--index-size`` pHashes (of
    generated textures and their crops): the multi-index search
    (``HammingIndex``, default layout, and the plain layout) against the
    named brute-force all-pairs baseline (``brute_force_pairs``, numpy, every
    query against every entry) on the same queries, CPU time, best of
    ``--reps`` repetitions (the baseline in a loop of its own, then the two
    layouts alternating), each call preceded by writing 32 MB. Extra
    baselines, in a loop of their own: a columnar numpy scan, and faiss's
    ``IndexBinaryFlat`` and ``IndexBinaryMultiHash`` range searches when
    ``faiss-cpu`` is installed (not a dependency). Every method's results
    must equal the baseline's; the ratios to the multi-index search are
    reported. Then each search once more after 2 s of other work ("cold":
    its tables have left the caches), with that ratio too.

    python benchmarks/bench_decontaminate.py               # full run (about 10 CPU-minutes)
    python benchmarks/bench_decontaminate.py --only matching --cache /tmp/dc  # rerun the timing on kept hashes
    python benchmarks/bench_decontaminate.py --quick       # small smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import cv2
import numpy as np
from PIL import Image

from orsgen.pipelines.demo_data import demo_scene
from orsgen.stages.decontaminate.hashing import crop_boxes, image_hashes
from orsgen.stages.decontaminate.matching import HammingIndex, as_codes, brute_force_pairs

TRANSFORMS = ("jpeg_q50", "resize_0.5", "crop_left", "crop_right", "crop_top", "crop_bottom", "rename")


def _jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """One generated textured image, ``(h, w, 3)`` uint8: noise, stripes, checkers and shapes."""
    kind = int(rng.integers(4))
    base = np.zeros((h, w, 3), np.float32)
    for octave in (4, 8, 16, 32):  # multi-octave smooth noise under everything
        small = rng.normal(0, 1, (octave, octave, 3)).astype(np.float32)
        base += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * (60 / octave**0.5)
    base += rng.uniform(60, 190, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 1:  # stripes at a random angle and period
        t, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        base += 40 * np.sin(2 * np.pi * (xx * np.cos(t) + yy * np.sin(t)) / period)[..., None]
    elif kind == 2:  # checkers
        c = rng.uniform(8, 48)
        base += 45 * (((xx // c) + (yy // c)) % 2 * 2 - 1)[..., None]
    img = np.clip(base, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):  # random filled shapes
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(min(w, h) // 20 + 2, min(w, h) // 4 + 3))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, -1)
        else:
            cv2.rectangle(img, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1)
    return img


def originals(n: int, seed: int, offset: int = 0) -> list[np.ndarray]:
    """``n`` images: every other one a demo scene, the rest textures (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(demo_scene(seed, ("coco", "refcoco", "sa1b")[i % 3], offset + i)[0])
        else:
            w, h = int(rng.integers(256, 641)), int(rng.integers(192, 481))
            out.append(texture(rng, w, h))
    return out


def transformed(img: np.ndarray, name: str, crop: float = 0.05) -> bytes:
    """The encoded copy of ``img`` made by transform ``name``."""
    h, w = img.shape[:2]
    if name == "jpeg_q50":
        return _jpeg(img, 50)
    if name == "resize_0.5":
        return _jpeg(np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.Resampling.BILINEAR)))
    if name.startswith("crop_"):
        side = ("left", "right", "top", "bottom").index(name[5:])
        box = crop_boxes(w, h, crop)[side]
        return _jpeg(img[box[1] : box[3], box[0] : box[2]])
    if name == "rename":
        return _jpeg(img)  # the same bytes under another name: the name plays no part
    raise ValueError(name)


def recall_fpr(args: argparse.Namespace) -> dict:
    origs = originals(args.n_originals, args.seed)
    negs = originals(args.n_negatives, args.seed + 1, offset=100_000)
    index_hashes = [image_hashes(_jpeg(o), args.crop_frac) for o in origs]
    codes = as_codes([c for h in index_hashes for c in h.all])
    owner = np.repeat(np.arange(len(origs)), [len(h.all) for h in index_hashes])
    sha_of = {h.sha256: i for i, h in enumerate(index_hashes)}
    # Copies are hashed as the stage hashes a build image: pHash and crops,
    # all of them queried (a crop on either side then matches).
    probes = {t: [image_hashes(transformed(o, t), args.crop_frac) for o in origs] for t in TRANSFORMS}
    neg_hashes = [image_hashes(_jpeg(o), args.crop_frac) for o in negs]
    full = HammingIndex(codes, 63)
    thresholds = sorted({args.max_distance, 15, 23, 31, 39})
    out: dict = {"n_originals": len(origs), "n_negatives": len(negs), "n_pairs": len(origs) * len(TRANSFORMS), "by_threshold": {}}
    # Nearest distance from each probe to its own original's hashes, and from
    # each negative to the whole index (searched once at the widest radius).
    nearest_own = {}
    for t, hs in probes.items():
        q_owner = np.repeat(np.arange(len(hs)), [len(h.all) for h in hs])
        q, e, d = full.search(as_codes([c for h in hs for c in h.all]))
        q = q_owner[q]
        best = np.full(len(hs), 10**6)
        own = owner[e] == q
        np.minimum.at(best, q[own], d[own])
        sha_hit = np.array([sha_of.get(h.sha256) == i for i, h in enumerate(hs)])
        nearest_own[t] = np.where(sha_hit, 0, best)
    n_owner = np.repeat(np.arange(len(negs)), [len(h.all) for h in neg_hashes])
    qn, _, dn = full.search(as_codes([c for h in neg_hashes for c in h.all]))
    qn = n_owner[qn]
    neg_best = np.full(len(negs), 10**6)
    np.minimum.at(neg_best, qn, dn)
    neg_sha = np.array([h.sha256 in sha_of for h in neg_hashes])
    # Wrong-owner hits of positives count too: a copy matched to another image.
    for k in thresholds:
        row = {t: float(np.mean(nearest_own[t] <= k)) for t in TRANSFORMS}
        fp = int(np.sum((neg_best <= k) | neg_sha))
        row["all"] = float(np.mean(np.concatenate([nearest_own[t] <= k for t in TRANSFORMS])))
        row["false_positives"] = fp
        row["fpr"] = fp / len(negs)
        out["by_threshold"][str(k)] = row
    out["positive_distance_p99"] = {t: float(np.percentile(nearest_own[t], 99)) for t in TRANSFORMS}
    out["positive_distance_max"] = {t: int(nearest_own[t].max()) for t in TRANSFORMS}
    out["negative_distance_min"] = int(neg_best.min())
    out["negative_distance_p01"] = float(np.percentile(neg_best, 1))
    return out


def throughput(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    res = {}
    for label, imgs in (
        ("demo_320x240", [_jpeg(demo_scene(args.seed, "coco", i)[0]) for i in range(args.n_throughput)]),
        ("sa1b_1500x2250", [_jpeg(texture(rng, 1500, 2250)) for _ in range(max(4, args.n_throughput // 8))]),
    ):
        image_hashes(imgs[0], args.crop_frac)  # warm-up (imports, scipy plans)
        t0 = time.process_time()
        for b in imgs:
            image_hashes(b, args.crop_frac)
        dt = time.process_time() - t0
        res[label] = {"images": len(imgs), "images_per_s_per_core": round(len(imgs) / dt, 1)}
    return res


def matching(args: argparse.Namespace) -> dict:
    cache = os.path.join(args.cache, f"matching-{args.index_size}-{args.n_queries}-{args.seed}-{args.crop_frac}.npz") if args.cache else ""
    if cache and os.path.exists(cache):
        with np.load(cache) as z:  # hashes made by an earlier run of this script (no pickles)
            codes, queries = z["codes"], z["queries"]
    else:
        rng = np.random.default_rng(args.seed + 7)
        n_img = args.index_size // 5
        hs = [image_hashes(_jpeg(texture(rng, 96, 96), 90), args.crop_frac) for _ in range(n_img)]
        codes = as_codes([c for h in hs for c in h.all])
        # Queries: half unrelated textures (re-encoded), half copies of indexed images.
        half = args.n_queries // 2
        pos_src = rng.choice(n_img, size=half, replace=False)
        queries = as_codes(
            [image_hashes(transformed(texture(np.random.default_rng(10_000 + i), 96, 96), "jpeg_q50"), 0).phash for i in range(half)]
            + [hs[i].phash for i in pos_src]
        )
        if cache:
            os.makedirs(args.cache, exist_ok=True)
            np.savez(cache, codes=codes, queries=queries)
    k = args.max_distance
    t0 = time.perf_counter()
    index = HammingIndex(codes, k)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = HammingIndex(codes, k, table_budget_bytes=0)  # the other layout, measured alongside
    build_plain_s = time.perf_counter() - t0
    cols = [np.ascontiguousarray(c) for c in codes.view(">u8").astype(np.uint64).T]
    baseline = {
        # The named baseline: every query against every entry, numpy.
        "brute_force": lambda: brute_force_pairs(queries, codes, k),
    }
    methods = {
        "multi_index": lambda: index.search(queries),
        "multi_index_plain": lambda: plain.search(queries),
    }
    extra = {
        # A second, tighter numpy scan: one word column at a time, uint8 sums.
        "brute_force_columnar": lambda: _columnar_scan(queries, cols, k),
    }
    faiss_note = _faiss_methods(extra, codes, queries, k)
    best = dict.fromkeys([*baseline, *methods, *extra], float("inf"))
    best_wall = dict.fromkeys(best, float("inf"))
    results = {}
    # Each group in a loop of its own, best of ``reps``: the box is shared,
    # so a burst of load is unlikely to hit every repetition. CPU time (this
    # process, one thread) is the headline, as for the hashing throughput:
    # wall time on a shared box also counts the time other processes held the
    # core. The brute-force baseline runs in its own loop because whatever
    # ran right after its 2-3 s of large temporary arrays measured 15-40 us a
    # query slower (either layout, on the idle box too), which is the
    # benchmark's doing, not the stage's (the stage never runs brute force).
    # The extra baselines run last (faiss's hash tables alone take more
    # memory than the whole cache). The two multi-index layouts alternate.
    scratch = np.zeros(32 << 20, np.uint8)
    for group in (baseline, methods, extra):
        for _ in range(args.reps):
            for name, fn in group.items():
                # Every method starts with the core's caches holding other
                # data, as the stage's matching follows image decoding: 32 MB
                # written first (the core's L2 is 2 MB), so the order in which
                # the methods run does not favour one.
                scratch += 1
                t0, w0 = time.process_time(), time.perf_counter()
                results[name] = fn()
                best[name] = min(best[name], time.process_time() - t0)
                best_wall[name] = min(best_wall[name], time.perf_counter() - w0)
    # The same searches once more, each after 2 s of other work (a Python
    # loop touching no arrays): on this VM that alone made the next search
    # 3-10x slower (its tables had left the core's caches and TLB), while the
    # streaming brute force barely changes. The stage searches a batch of 32
    # images between decodes, so its real cost per image lies between the
    # two figures.
    cold = {}
    for name, fn in (*baseline.items(), *methods.items()):
        t_end = time.perf_counter() + 2.0
        while time.perf_counter() < t_end:
            pass
        scratch += 1
        t0 = time.process_time()
        fn()
        cold[name] = time.process_time() - t0
    ref = results["brute_force"]
    equal = {name: all(np.array_equal(a, b) for a, b in zip(got, ref)) for name, got in results.items()}
    us = {name: round(1e6 * t / len(queries), 1) for name, t in best.items()}
    us_wall = {name: round(1e6 * t / len(queries), 1) for name, t in best_wall.items()}
    out = {
        "index_hashes": int(len(codes)),
        "queries": int(len(queries)),
        "matches": int(len(ref[0])),
        "equal_results": equal,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "index_build_s": round(build_s, 3),
        "index_layout": "expanded" if index.expanded else "plain",
        "index_build_plain_s": round(build_plain_s, 3),
        "cpu_us_per_query": us,
        "wall_us_per_query": us_wall,
        # The headline: the multi-index search against the named baseline.
        "speedup": round(best["brute_force"] / best["multi_index"], 1),
        "speedup_wall": round(best_wall["brute_force"] / best_wall["multi_index"], 1),
        "speedup_vs": {name: round(best[name] / best["multi_index"], 1) for name in best if name != "multi_index"},
        "cold_cpu_us_per_query": {name: round(1e6 * t / len(queries), 1) for name, t in cold.items()},
        "speedup_cold": round(cold["brute_force"] / cold["multi_index"], 1),
    }
    if faiss_note:
        out["faiss"] = faiss_note
    return out


def _columnar_scan(queries: np.ndarray, cols: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    qw = queries.view(">u8").astype(np.uint64)
    out_q, out_e, out_d = [], [], []
    for i in range(len(qw)):
        d = np.bitwise_count(cols[0] ^ qw[i, 0])
        for w in (1, 2, 3):
            d += np.bitwise_count(cols[w] ^ qw[i, w])
        e = np.flatnonzero(d <= k)
        out_q.append(np.full(len(e), i, np.int64))
        out_e.append(e.astype(np.int64))
        out_d.append(d[e].astype(np.int64))
    return np.concatenate(out_q), np.concatenate(out_e), np.concatenate(out_d)


def _faiss_methods(methods: dict, codes: np.ndarray, queries: np.ndarray, k: int) -> str:
    """Adds faiss's C++ baselines when faiss-cpu is installed (it is not a dependency)."""
    try:
        import faiss
    except ImportError:
        return ""
    faiss.omp_set_num_threads(1)  # one core, like the numpy methods
    flat = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    flat.add(codes)
    multi = faiss.IndexBinaryMultiHash(codes.shape[1] * 8, 16, 16)
    multi.nflip = k // 16  # exact by the same pigeonhole as HammingIndex
    multi.add(codes)

    def run(ix: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lims, dist, ids = ix.range_search(queries, k + 1)  # type: ignore[attr-defined]  # faiss: distance < radius
        q = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims).astype(np.int64))
        o = np.lexsort((ids, q))
        return q[o], ids[o].astype(np.int64), dist[o].astype(np.int64)

    methods["faiss_flat"] = lambda: run(flat)
    methods["faiss_multi_hash"] = lambda: run(multi)
    return f"faiss-cpu {faiss.__version__}, 1 thread: IndexBinaryFlat and IndexBinaryMultiHash(16 x 16 bits, nflip {k // 16}) range search"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-originals", type=int, default=1000)
    ap.add_argument("--n-negatives", type=int, default=2000)
    ap.add_argument("--n-throughput", type=int, default=200)
    ap.add_argument("--index-size", type=int, default=100_000)
    ap.add_argument("--n-queries", type=int, default=2000)
    ap.add_argument("--max-distance", type=int, default=31)
    ap.add_argument("--crop-frac", type=float, default=0.04)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--cache", default="", help="folder to keep the matching benchmark's generated hashes in (reruns skip generating them)")
    ap.add_argument("--only", choices=("recall", "throughput", "matching"), default=None)
    args = ap.parse_args()
    if args.quick:
        args.n_originals, args.n_negatives, args.n_throughput = 60, 120, 20
        args.index_size, args.n_queries, args.reps = 5000, 200, 1
    report = {"max_distance": args.max_distance, "crop_frac": args.crop_frac}
    if args.only in (None, "recall"):
        report["recall_fpr"] = recall_fpr(args)
    if args.only in (None, "throughput"):
        report["hashing"] = throughput(args)
    if args.only in (None, "matching"):
        report["matching"] = matching(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
