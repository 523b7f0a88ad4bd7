"""Benchmark: the expressions stage on COCO-shaped images.

Geometry first: the descriptive semantics need every instance's centroid.
orsgen computes it from the RLE runs (``rle_moments``, closed-form sums per
run); the baseline decodes each mask to a full image array and averages the
pixel coordinates. Both are measured in the same run and their centroids
compared. Then the whole per-image stage (candidates, dedup/caps, trainer
targets) is timed.

    python benchmarks/bench_expressions.py [--images 40] [--instances 25]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pycocotools import mask as mask_utils

from orsgen.schemas.config import ExpressionConfig
from orsgen.schemas.records import Category, ImageExample, ImageRecord, Instance
from orsgen.stages.expressions.context import ImageContext
from orsgen.stages.expressions.geometry import instance_geom
from orsgen.stages.expressions.stage import add_expressions, generate_candidates, margins_for
from orsgen.stages.expressions.templates import load_templates, noun_forms
from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, xywh_to_xyxy

W, H = 640, 480
CATS = [Category(i, n, s) for i, (n, s) in enumerate(
    [("person", "person"), ("cup", "kitchen"), ("bowl", "kitchen"), ("chair", "furniture"), ("car", "vehicle"),
     ("dog", "animal"), ("cat", "animal"), ("book", "indoor"), ("bottle", "kitchen"), ("clock", "indoor")], 1)]


def scene(rng: np.random.Generator, image_id: str, n: int) -> list[Instance]:
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    cats = rng.choice(len(CATS), size=5, replace=False)
    for k in range(n):
        c = CATS[int(cats[int(rng.integers(len(cats)))])]
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        rx, ry = rng.uniform(8, 90), rng.uniform(8, 90)
        m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        if not m.any():
            continue
        rle = encode_mask(m)
        xywh = rle_bbox_xywh(rle)
        out.append(Instance(f"{image_id}/ann:{k}", image_id, rle, xywh, xywh_to_xyxy(xywh), rle_area(rle),
                            category_id=c.id, category_name=c.name, supercategory=c.supercategory))
    return out


def dense_centroid(inst: Instance) -> tuple[float, float]:
    m = mask_utils.decode(inst.rle.to_coco())
    ys, xs = np.nonzero(m)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--instances", type=int, default=25)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    scenes = [scene(rng, f"coco:{i}", args.instances) for i in range(args.images)]
    insts = [i for s in scenes for i in s]

    t0 = time.perf_counter()
    base = [dense_centroid(i) for i in insts]
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = [(g.cx, g.cy) for g in map(instance_geom, insts)]
    t_ours = time.perf_counter() - t0
    assert np.allclose(base, ours), "RLE-moment centroids disagree with the dense ones"
    n = len(insts)
    print(f"centroids of {n} masks at {W}x{H}: decode-every-mask {1e3 * t_base / n:.3f} ms/mask, "
          f"RLE moments {1e3 * t_ours / n:.3f} ms/mask: {t_base / t_ours:.1f}x faster, identical centroids")

    templates = load_templates()
    cfg = ExpressionConfig()
    noun_forms("person")  # first-call costs (COCO names come from a table; others import inflect): not per-image work
    t0 = time.perf_counter()
    n_cands = 0
    for k, s in enumerate(scenes):
        ctx = ImageContext.build(f"coco:{k}", W, H, s, margins_for(cfg, W, H), seed=0)
        n_cands += len(generate_candidates(ctx, CATS, templates, cfg)[0])
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_samples = 0
    for k, s in enumerate(scenes):
        img = ImageRecord(f"coco:{k}", "coco", "", W, H, "")
        ex = ImageExample(f"coco-{k}", img, b"", tuple(s), input_name="coco")
        n_samples += len(add_expressions(ex, CATS, templates, cfg, seed=0)[0].samples)
    t_all = time.perf_counter() - t0
    print(f"{args.images} images x {args.instances} instances: candidates + dedup/caps {1e3 * t_gen / args.images:.1f} ms/image "
          f"({n_cands / args.images:.1f} samples/image); with trainer targets {1e3 * t_all / args.images:.1f} ms/image")


if __name__ == "__main__":
    main()
