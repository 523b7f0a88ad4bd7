"""SA1B-DeRS assembly: one discriminative description per salient region, re-grounded.

The recipe (SA1B-ORS, Qwen3-VL-Seg): the VLM sees the image and an overlay
that highlights one target (translucent fill, contour, box) and writes one
expression that singles it out. The expression is then given back to the VLM
on the *original* image, without the overlay, to ground it; the sample is kept
only when the re-grounded box has IoU >= 0.8 with the target's box. Only
regions that pass a saliency gate (area fraction) are described; the others
stay in the dataset without a description.

Everything here is pure; the Beam wiring is ``pipelines/caption.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orsgen.schemas.config import DersConfig
from orsgen.schemas.records import ExpressionKind, ImageExample, Instance, Reject, RejectLevel, Sample, safe_key
from orsgen.stages.caption.cors import Box, box_iou, clip_box
from orsgen.stages.common.targets import TargetError, attach_targets

STAGE = "caption"

REGROUND_FAILED = "ders_reground_failed"


def ders_sample_id(key: str, instance_id: str) -> str:
    """Sample id of a region's DeRS sample (WebDataset-safe)."""
    return safe_key(f"{key}-ders-{instance_id}")


def select_salient(ex: ImageExample, cfg: DersConfig) -> tuple[list[Instance], list[tuple[str, int]]]:
    """The regions of one image that get a description.

    The saliency gate keeps regions covering at least ``cfg.min_area_frac``
    of the image; of those, the ``cfg.max_regions_per_image`` largest (ties to
    the smaller id). Regions left out are not rejected: they stay in the
    dataset, only without a DeRS sample, and are counted as events.

    Returns:
        ``(regions in id order, events)`` with events
        ``caption/ders_not_salient`` and ``caption/ders_over_cap``.
    """
    img_area = float(ex.image.width * ex.image.height) or 1.0
    salient = [i for i in ex.instances if i.area_px / img_area >= cfg.min_area_frac and i.area_px > 0]
    not_salient = len(ex.instances) - len(salient)
    ranked = sorted(salient, key=lambda i: (-i.area_px, i.instance_id))
    chosen = ranked[: cfg.max_regions_per_image]
    events = []
    if not_salient:
        events.append(("caption/ders_not_salient", not_salient))
    if len(ranked) > len(chosen):
        events.append(("caption/ders_over_cap", len(ranked) - len(chosen)))
    return sorted(chosen, key=lambda i: i.instance_id), events


@dataclass(frozen=True, slots=True)
class DersCandidate:
    """A description waiting for its re-grounding check.

    Attributes:
        sample_id: the would-be sample's id (also its reject key).
        instance_id: the described region.
        target_box: the region's box ``[x0, y0, x1, y1]`` in pixels.
        expression: the VLM's description.
        model: the model that wrote it.
        prompt_version: the describe prompt's id@version.
    """

    sample_id: str
    instance_id: str
    target_box: Box
    expression: str
    model: str
    prompt_version: str


@dataclass(frozen=True, slots=True)
class RegroundResult:
    """The re-grounding answer of one candidate, mapped to image pixels.

    Attributes:
        boxes: the boxes the VLM found for the expression, in pixels.
        model: the model that answered.
        prompt_version: the re-ground prompt's id@version.
    """

    boxes: tuple[Box, ...]
    model: str = ""
    prompt_version: str = ""


def reground_check(
    target_box: Sequence[float],
    boxes: Sequence[Sequence[float]],
    width: int,
    height: int,
    cfg: DersConfig,
) -> tuple[bool, Box | None, float, str]:
    """Gates a description on the IoU of its re-grounded box with the target box.

    Args:
        target_box: the described region's box, pixels.
        boxes: the re-grounded boxes, pixels (the VLM's order).
        width: image width in pixels.
        height: image height in pixels.
        cfg: ``reground_iou_thresh`` and ``reject_ambiguous``.

    Returns:
        ``(keep, box, iou, why)``: ``box`` is the re-grounded box compared
        (the first distinct one, or None when there is none), ``iou`` its IoU
        with the target box, ``why`` a sentence when not kept.
    """
    distinct: list[Box] = []
    for b in boxes:
        c = clip_box(b, width, height)
        if c is not None and c not in distinct:
            distinct.append(c)
    if not distinct:
        return False, None, 0.0, "re-grounding found no box inside the image for the expression (IoU 0.000)"
    if cfg.reject_ambiguous and len(distinct) > 1:
        ious = [box_iou(b, target_box) for b in distinct]
        return False, distinct[0], ious[0], (
            f"re-grounding found {len(distinct)} distinct boxes (IoUs {[round(v, 3) for v in ious]}), "
            "so the expression is not discriminative"
        )
    iou = box_iou(distinct[0], target_box)
    if iou < cfg.reground_iou_thresh:
        return False, distinct[0], iou, (
            f"re-grounded box {[round(v, 1) for v in distinct[0]]} has IoU {iou:.3f} with the target box "
            f"{[round(float(v), 1) for v in target_box]}, under caption.ders.reground_iou_thresh={cfg.reground_iou_thresh}"
        )
    return True, distinct[0], iou, ""


def finalize_ders(
    ex: ImageExample,
    candidates: Sequence[DersCandidate],
    results: Mapping[str, RegroundResult | tuple[str, str]],
    cfg: DersConfig,
) -> tuple[list[Sample], list[Reject]]:
    """Builds the DeRS samples of one image from the re-grounding answers.

    Args:
        ex: the image.
        candidates: descriptions waiting for the check.
        results: per sample id, the re-grounding result, or ``(reason,
            message)`` when the request failed (a VLM error code).
        cfg: the IoU gate.

    Returns:
        ``(samples, rejects)`` sorted by id: ``description`` samples with
        ``reground_box`` and ``reground_iou`` set; ``ders_reground_failed``
        rejects carrying the IoU in their message; VLM error codes for
        failed requests; ``vlm_backend_error`` for a candidate with no answer.
    """
    w, h = ex.image.width, ex.image.height
    by_id = {i.instance_id: i for i in ex.instances}
    samples: list[Sample] = []
    rejects: list[Reject] = []
    for c in candidates:
        r = results.get(c.sample_id)
        if r is None:
            rejects.append(Reject(c.sample_id, STAGE, "vlm_backend_error",
                                  "the re-grounding request for this description got no answer.",
                                  RejectLevel.SAMPLE, ex.image.image_id))
            continue
        if isinstance(r, tuple):
            reason, msg = r
            rejects.append(Reject(c.sample_id, STAGE, reason, f"re-grounding of {c.expression!r} failed: {msg}",
                                  RejectLevel.SAMPLE, ex.image.image_id))
            continue
        keep, box, iou, why = reground_check(c.target_box, r.boxes, w, h, cfg)
        if not keep:
            rejects.append(Reject(c.sample_id, STAGE, REGROUND_FAILED, f"{c.expression!r}: {why}.",
                                  RejectLevel.SAMPLE, ex.image.image_id))
            continue
        assert box is not None
        sample = Sample(
            sample_id=c.sample_id,
            image_id=ex.image.image_id,
            expression=c.expression,
            kind=str(ExpressionKind.DESCRIPTION),
            target_ids=(c.instance_id,),
            generator="vlm",
            template=c.prompt_version,
            model=c.model,
            reground_box=tuple(round(float(v), 2) for v in box),  # type: ignore[arg-type]
            reground_iou=round(float(iou), 6),
            metadata={
                "path": "ders",
                "reground_model": r.model,
                "reground_template": r.prompt_version,
                "reground_boxes": len(r.boxes),
                "iou_thresh": cfg.reground_iou_thresh,
            },
        )
        try:
            samples.append(attach_targets(sample, by_id, w, h))
        except TargetError as err:
            rejects.append(Reject(c.sample_id, STAGE, err.reason, str(err), RejectLevel.SAMPLE, ex.image.image_id))
    return sorted(samples, key=lambda s: s.sample_id), sorted(rejects, key=lambda r: r.source_key)
