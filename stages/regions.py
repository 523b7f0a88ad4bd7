"""Region selection: which instances of an image are worth writing.

SA-1B gives ~100 class-agnostic masks per image, many of them fragments,
duplicates or slivers. ``select_regions`` applies SAM's own thresholds
(``pred_iou_thresh``, ``stability_score_thresh``), area and border limits,
mask NMS and a per-image cap, all in RLE space: areas, boxes and IoUs come
from pycocotools' run-length code, so a 1500x2250 image with 100 masks never
has a mask decoded.

Every drop carries a reason code (``dropped_<reason>``) that becomes a reject
and a counter, so the manifest accounts for every region.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orsgen.schemas.config import RegionConfig
from orsgen.schemas.records import Instance
from orsgen.stages.common.masks import rle_iou_matrix

DROPPED_CROWD = "dropped_crowd"
DROPPED_SMALL = "dropped_small"
DROPPED_LARGE = "dropped_large"
DROPPED_LOW_PRED_IOU = "dropped_low_pred_iou"
DROPPED_LOW_STABILITY = "dropped_low_stability"
DROPPED_BORDER = "dropped_border"
DROPPED_DUPLICATE = "dropped_duplicate"
DROPPED_OVER_CAP = "dropped_over_cap"

REASONS = (
    DROPPED_CROWD,
    DROPPED_SMALL,
    DROPPED_LARGE,
    DROPPED_LOW_PRED_IOU,
    DROPPED_LOW_STABILITY,
    DROPPED_BORDER,
    DROPPED_DUPLICATE,
    DROPPED_OVER_CAP,
)


def region_filter(inst: Instance, width: int, height: int, cfg: RegionConfig) -> tuple[bool, str, str]:
    """Applies the per-region thresholds to one instance.

    Args:
        inst: the region; its ``area_px`` and ``bbox_xyxy`` were computed from
            the RLE at ingest.
        width: image width in pixels.
        height: image height in pixels.
        cfg: thresholds.

    Returns:
        ``(keep, reason, message)``; reason and message are "" when kept.
    """
    img_area = float(width * height)
    frac = inst.area_px / img_area if img_area else 0.0
    if cfg.drop_crowd and inst.iscrowd:
        return False, DROPPED_CROWD, "crowd annotation (regions.drop_crowd is true)"
    if inst.area_px < cfg.min_area_px or frac < cfg.min_area_frac:
        return False, DROPPED_SMALL, (
            f"area {inst.area_px} px ({frac:.5f} of the image) is under "
            f"min_area_px={cfg.min_area_px} / min_area_frac={cfg.min_area_frac}"
        )
    if frac > cfg.max_area_frac:
        return False, DROPPED_LARGE, f"area fraction {frac:.4f} is above max_area_frac={cfg.max_area_frac}"
    if inst.predicted_iou is not None and inst.predicted_iou < cfg.pred_iou_thresh:
        return False, DROPPED_LOW_PRED_IOU, (
            f"predicted_iou {inst.predicted_iou:.4f} is under pred_iou_thresh={cfg.pred_iou_thresh}"
        )
    if inst.stability_score is not None and inst.stability_score < cfg.stability_score_thresh:
        return False, DROPPED_LOW_STABILITY, (
            f"stability_score {inst.stability_score:.4f} is under stability_score_thresh={cfg.stability_score_thresh}"
        )
    if cfg.drop_border_touching:
        x0, y0, x1, y1 = inst.bbox_xyxy
        m = cfg.border_margin_px
        if x0 <= m or y0 <= m or x1 >= width - m or y1 >= height - m:
            return False, DROPPED_BORDER, f"box {list(inst.bbox_xyxy)} is within {m} px of the image border"
    return True, "", ""


def _rank_key(inst: Instance) -> tuple[float, int, str]:
    # SAM's own ranking signal first (higher is better), then larger area, then
    # the id so that ties resolve the same way on every worker.
    score = (inst.predicted_iou if inst.predicted_iou is not None else 1.0) * (
        inst.stability_score if inst.stability_score is not None else 1.0
    )
    return (-score, -inst.area_px, inst.instance_id)


def mask_nms(instances: Sequence[Instance], iou_thresh: float) -> tuple[list[Instance], list[tuple[Instance, Instance, float]]]:
    """Greedy mask NMS in RLE space.

    Args:
        instances: candidate regions of one image.
        iou_thresh: a region whose mask IoU with a better-ranked kept region
            is above this is a duplicate. 1.0 disables NMS.

    Returns:
        ``(kept, suppressed)``; ``kept`` is in rank order, ``suppressed`` holds
        ``(dropped, kept_by, iou)`` triples.
    """
    ranked = sorted(instances, key=_rank_key)
    if iou_thresh >= 1.0 or len(ranked) < 2:
        return ranked, []
    ious = rle_iou_matrix([i.rle for i in ranked], [i.rle for i in ranked])
    alive = np.ones(len(ranked), dtype=bool)
    kept: list[Instance] = []
    suppressed: list[tuple[Instance, Instance, float]] = []
    for i in range(len(ranked)):
        if not alive[i]:
            continue
        kept.append(ranked[i])
        dup = np.nonzero(alive & (ious[i] > iou_thresh))[0]
        for j in dup:
            if j > i:
                alive[j] = False
                suppressed.append((ranked[j], ranked[i], float(ious[i, j])))
    return kept, suppressed


def select_regions(
    instances: Sequence[Instance],
    width: int,
    height: int,
    cfg: RegionConfig,
    *,
    annotated: bool = False,
) -> tuple[list[Instance], list[tuple[Instance, str, str]]]:
    """Selects the regions of one image.

    Order: per-region thresholds, then mask NMS (skipped for human-annotated
    sources unless ``cfg.nms_annotated``), then the per-image cap, best first.

    Args:
        instances: all regions of the image.
        width: image width in pixels.
        height: image height in pixels.
        cfg: the thresholds.
        annotated: True for human-annotated sources (COCO), whose overlapping
            instances are usually distinct objects.

    Returns:
        ``(kept, dropped)``: kept regions sorted by ``instance_id``, and
        ``(instance, reason, message)`` for every dropped one.
    """
    dropped: list[tuple[Instance, str, str]] = []
    passing: list[Instance] = []
    for inst in instances:
        keep, reason, msg = region_filter(inst, width, height, cfg)
        if keep:
            passing.append(inst)
        else:
            dropped.append((inst, reason, msg))
    if annotated and not cfg.nms_annotated:
        ranked = sorted(passing, key=_rank_key)
    else:
        ranked, suppressed = mask_nms(passing, cfg.mask_nms_thresh)
        for dup, by, iou in suppressed:
            dropped.append((dup, DROPPED_DUPLICATE, f"mask IoU {iou:.3f} with {by.instance_id} is above mask_nms_thresh={cfg.mask_nms_thresh}"))
    kept = ranked[: cfg.max_regions_per_image]
    for inst in ranked[cfg.max_regions_per_image :]:
        dropped.append((inst, DROPPED_OVER_CAP, f"over max_regions_per_image={cfg.max_regions_per_image}"))
    kept.sort(key=lambda i: i.instance_id)
    return kept, dropped
