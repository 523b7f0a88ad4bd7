"""Region-selection cost on SA-1B-shaped input: RLE space vs decode-everything.

Each image holds ``--masks`` RLE masks at ``--height`` x ``--width`` (SA-1B:
about 100 masks at 1500x2250). Both sides run the same selection (area and
score thresholds, greedy mask NMS, cap) on the same masks, in one run:

* orsgen: ``stages.regions.select_regions``, all in pycocotools' RLE code;
* baseline: decode every mask to a dense array, then areas, boxes and NMS IoUs
  with numpy (IoUs on the two boxes' joint window, which is already kinder
  than a full-image comparison).

Prints per-image milliseconds and the speed-up ratio (target: >= 10x).

    python benchmarks/bench_regions.py [--images 3] [--masks 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pycocotools import mask as mask_utils

from orsgen.schemas.config import RegionConfig
from orsgen.schemas.records import Instance
from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, xywh_to_xyxy
from orsgen.stages.regions import select_regions


def make_image(rng: np.random.Generator, h: int, w: int, n: int) -> list[Instance]:
    """``n`` SAM-like masks: ellipses of many sizes, some near-duplicates."""
    yy, xx = np.ogrid[0:h, 0:w]
    insts: list[Instance] = []
    for i in range(n):
        if i > 0 and rng.random() < 0.2:
            base = insts[int(rng.integers(0, len(insts)))]
            m = mask_utils.decode(base.rle.to_coco()).astype(bool)
            m = np.roll(m, int(rng.integers(-8, 8)), axis=1)
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            ax, ay = rng.uniform(10, w / 3), rng.uniform(10, h / 3)
            m = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
        rle = encode_mask(m)
        xywh = rle_bbox_xywh(rle)
        insts.append(
            Instance(
                instance_id=f"sa1b:0/ann:{i:04d}", image_id="sa1b:0", rle=rle, bbox_xywh=xywh,
                bbox_xyxy=xywh_to_xyxy(xywh), area_px=rle_area(rle),
                predicted_iou=float(rng.uniform(0.8, 1.0)), stability_score=float(rng.uniform(0.85, 1.0)),
            )
        )
    return insts


def dense_select(insts: list[Instance], w: int, h: int, cfg: RegionConfig) -> list[str]:
    """The same selection, decoding every mask to a dense array first."""
    dense = [mask_utils.decode(i.rle.to_coco()).astype(bool) for i in insts]
    cands = []
    for inst, m in zip(insts, dense):
        area = int(np.count_nonzero(m))
        rows, cols = np.any(m, axis=1), np.any(m, axis=0)
        if not rows.any():
            continue
        y0, y1 = np.nonzero(rows)[0][[0, -1]]
        x0, x1 = np.nonzero(cols)[0][[0, -1]]
        frac = area / (w * h)
        if area < cfg.min_area_px or frac < cfg.min_area_frac or frac > cfg.max_area_frac:
            continue
        if inst.predicted_iou < cfg.pred_iou_thresh or inst.stability_score < cfg.stability_score_thresh:
            continue
        cands.append((inst, m, area, (x0, y0, x1 + 1, y1 + 1)))
    cands.sort(key=lambda c: (-(c[0].predicted_iou * c[0].stability_score), -c[2], c[0].instance_id))
    kept: list[tuple] = []
    for c in cands:
        dup = False
        for k in kept:
            bx0, by0 = min(c[3][0], k[3][0]), min(c[3][1], k[3][1])
            bx1, by1 = max(c[3][2], k[3][2]), max(c[3][3], k[3][3])
            a, b = c[1][by0:by1, bx0:bx1], k[1][by0:by1, bx0:bx1]
            union = np.count_nonzero(a | b)
            if union and np.count_nonzero(a & b) / union > cfg.mask_nms_thresh:
                dup = True
                break
        if not dup:
            kept.append(c)
    return sorted(c[0].instance_id for c in kept[: cfg.max_regions_per_image])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--width", type=int, default=2250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    cfg = RegionConfig(max_regions_per_image=args.masks)
    print(f"building {args.images} image(s) x {args.masks} masks at {args.height}x{args.width} ...", flush=True)
    images = [make_image(rng, args.height, args.width, args.masks) for _ in range(args.images)]

    t_rle = t_dense = 0.0
    for insts in images:
        t0 = time.perf_counter()
        kept, _ = select_regions(insts, args.width, args.height, cfg)
        t1 = time.perf_counter()
        ref = dense_select(insts, args.width, args.height, cfg)
        t2 = time.perf_counter()
        if sorted(k.instance_id for k in kept) != ref:
            raise SystemExit("the two selections disagree; the benchmark is not comparing like with like")
        t_rle += t1 - t0
        t_dense += t2 - t1
    n = len(images)
    print(f"{'method':<28}{'ms / image':>12}")
    print(f"{'orsgen (RLE space)':<28}{1000 * t_rle / n:>12.1f}")
    print(f"{'baseline (decode all)':<28}{1000 * t_dense / n:>12.1f}")
    print(f"speed-up: {t_dense / t_rle:.1f}x (target >= 10x); selections identical")


if __name__ == "__main__":
    main()
