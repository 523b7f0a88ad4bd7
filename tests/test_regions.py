"""Region selection: thresholds, NMS in RLE space, caps, reasons."""

from __future__ import annotations

import numpy as np

from orsgen.schemas.config import RegionConfig
from orsgen.schemas.records import Instance
from orsgen.stages import regions as R
from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, xywh_to_xyxy


def _inst(i: int, m: np.ndarray, piou: float | None = 0.95, stab: float | None = 0.97, crowd: bool = False) -> Instance:
    rle = encode_mask(m)
    xywh = rle_bbox_xywh(rle)
    return Instance(
        instance_id=f"img/ann:{i:03d}", image_id="img", rle=rle, bbox_xywh=xywh, bbox_xyxy=xywh_to_xyxy(xywh),
        area_px=rle_area(rle), predicted_iou=piou, stability_score=stab, iscrowd=crowd, source_ann_id=i,
    )


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


H, W = 100, 120


def test_each_threshold_drops_with_its_reason():
    cfg = RegionConfig(min_area_px=10, min_area_frac=0.0, max_area_frac=0.9, pred_iou_thresh=0.8,
                       stability_score_thresh=0.9, drop_border_touching=True, border_margin_px=0,
                       mask_nms_thresh=0.7, max_regions_per_image=10, drop_crowd=True)
    insts = [
        _inst(0, _box(H, W, 10, 30, 10, 30)),  # kept
        _inst(1, _box(H, W, 50, 52, 50, 53)),  # 6 px: small
        _inst(2, _box(H, W, 1, 99, 1, 119)),  # large
        _inst(3, _box(H, W, 40, 60, 40, 60), piou=0.5),
        _inst(4, _box(H, W, 40, 60, 70, 90), stab=0.5),
        _inst(5, _box(H, W, 0, 20, 60, 80)),  # touches the top border
        _inst(6, _box(H, W, 10, 30, 11, 30), piou=0.9),  # duplicate of 0, ranks lower
        _inst(7, _box(H, W, 70, 90, 10, 30), crowd=True),
    ]
    kept, dropped = R.select_regions(insts, W, H, cfg)
    assert [k.source_ann_id for k in kept] == [0]
    reasons = {d[0].source_ann_id: d[1] for d in dropped}
    assert reasons == {
        1: R.DROPPED_SMALL, 2: R.DROPPED_LARGE, 3: R.DROPPED_LOW_PRED_IOU, 4: R.DROPPED_LOW_STABILITY,
        5: R.DROPPED_BORDER, 6: R.DROPPED_DUPLICATE, 7: R.DROPPED_CROWD,
    }
    assert len(kept) + len(dropped) == len(insts)
    assert all(msg for _, _, msg in dropped)


def test_cap_keeps_best_ranked():
    cfg = RegionConfig(min_area_px=1, min_area_frac=0.0, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       max_regions_per_image=2)
    insts = [_inst(i, _box(H, W, 5 + 10 * i, 12 + 10 * i, 5, 20), piou=0.9 + i * 0.01) for i in range(5)]
    kept, dropped = R.select_regions(insts, W, H, cfg)
    assert sorted(k.source_ann_id for k in kept) == [3, 4]
    assert {d[1] for d in dropped} == {R.DROPPED_OVER_CAP}


def test_nms_matches_dense_greedy(rng):
    ms = []
    for _ in range(25):
        y0, x0 = rng.integers(0, 60), rng.integers(0, 80)
        ms.append(_box(H, W, y0, y0 + rng.integers(15, 40), x0, x0 + rng.integers(15, 40)))
    insts = [_inst(i, m, piou=float(rng.uniform(0.9, 1.0))) for i, m in enumerate(ms)]
    kept, suppressed = R.mask_nms(insts, 0.5)
    # Dense reference greedy NMS.
    order = sorted(range(len(ms)), key=lambda i: (-insts[i].predicted_iou * insts[i].stability_score, -ms[i].sum(), i))
    ref_kept = []
    for i in order:
        if all((ms[i] & ms[j]).sum() / (ms[i] | ms[j]).sum() <= 0.5 for j in ref_kept):
            ref_kept.append(i)
    assert [k.source_ann_id for k in kept] == ref_kept
    assert len(kept) + len(suppressed) == len(insts)


def test_annotated_sources_skip_nms_by_default():
    cfg = RegionConfig(min_area_px=1, min_area_frac=0.0)
    a = _inst(0, _box(H, W, 10, 30, 10, 30), piou=None, stab=None)
    b = _inst(1, _box(H, W, 10, 30, 11, 30), piou=None, stab=None)
    kept, _ = R.select_regions([a, b], W, H, cfg, annotated=True)
    assert len(kept) == 2
    kept, dropped = R.select_regions([a, b], W, H, cfg, annotated=False)
    assert len(kept) == 1 and dropped[0][1] == R.DROPPED_DUPLICATE
