"""SAM2 consistency filter and RefCOCO-M-style mask cleaner: the pure core.

Two uses of one SAM2 pass per image:

* **Filter** (Seg-Zero): every target of a sample is re-predicted from its box
  and two interior points; the sample is kept when every target's mask IoU
  with SAM2's mask is at least ``filter.iou_thresh`` (IoUs recorded in
  ``Sample.sam2_ious``), and rejected ``sam2_inconsistent`` otherwise.
* **Cleaner** (RefCOCO-M): polygon-annotated instances are re-segmented from
  the same kind of prompt; the best candidate (by SAM2's predicted IoU)
  replaces the polygon mask when it agrees with it (IoU inside
  ``clean.iou_band``) and SAM2 is confident (predicted IoU at least
  ``clean.pred_iou_thresh``). Otherwise the instance is kept, flagged or
  dropped, as configured.

Prompts are planned once per image from the masks as they arrive
(``plan_prompts``), so that the image encoder runs once even with both uses
on; a sample whose target was refined is then checked against the refined
mask. Everything here is a pure function over records; the Beam wiring is
``pipelines/verify_sam2.py`` and the model code ``stages/verify/backend.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orsgen.schemas.config import Sam2CleanConfig, VerifySam2Config
from orsgen.schemas.records import (
    ExpressionKind,
    ImageExample,
    Instance,
    Reject,
    RejectLevel,
    Rle,
    Sample,
    TargetGeometry,
)
from orsgen.stages.common.masks import instance_geometry, interior_points, rle_area, rle_iou
from orsgen.stages.verify.backend import Sam2Prediction, Sam2Prompt
from orsgen.stages.common.targets import TargetError, attach_targets

STAGE = "verify_sam2"

# Reject reasons of this stage.
SAM2_INCONSISTENT = "sam2_inconsistent"
SAM2_UNRECOVERABLE = "sam2_unrecoverable_mask"
SAM2_TARGET_DROPPED = "sam2_target_dropped"
SAM2_INFERENCE_FAILED = "sam2_inference_failed"

REFINED_ORIGIN = "sam2_refined"

# Outcome kinds and actions (the report counts these).
CLEAN, FILTER, SAMPLE = "clean", "filter", "sample"
REFINED, KEPT, FLAGGED, DROPPED = "refined", "kept", "flagged", "dropped"
PASSED, FAILED = "passed", "failed"
_ON_REJECT_ACTION = {"keep": KEPT, "flag": FLAGGED, "drop": DROPPED}


@dataclass(frozen=True, slots=True)
class Sam2Outcome:
    """What the stage decided for one instance or sample (report material).

    Attributes:
        kind: ``clean`` (an instance the cleaner looked at), ``filter`` (a
            target instance the filter re-predicted) or ``sample``.
        image_key: the image's output key.
        image_id: the image id.
        item_id: the instance id (``clean``/``filter``) or sample id.
        action: ``refined``/``kept``/``flagged``/``dropped`` for ``clean``;
            ``passed``/``failed`` for ``filter`` and ``sample``.
        iou: IoU of SAM2's chosen mask with the mask it was checked against
            (for ``sample``: the lowest target IoU).
        pred_iou: SAM2's predicted IoU of the chosen mask (NaN for ``sample``).
        reason: why a refinement was not accepted (``iou_below_band``,
            ``iou_above_band``, ``low_pred_iou``, ``empty_prediction``), or "".
        box_xyxy: the prompt box in pixels, for previews.
        original: the mask before (or the mask checked), for previews.
        predicted: SAM2's chosen mask, for previews.
    """

    kind: str
    image_key: str
    image_id: str
    item_id: str
    action: str
    iou: float
    pred_iou: float
    reason: str = ""
    box_xyxy: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    original: Rle | None = None
    predicted: Rle | None = None


@dataclass(frozen=True, slots=True)
class Sam2StageResult:
    """The stage's answer for one image."""

    example: ImageExample
    rejects: tuple[Reject, ...]
    outcomes: tuple[Sam2Outcome, ...]


# ------------------------------------------------------------------ decisions


def choose_candidate(pred: Sam2Prediction) -> tuple[Rle, float]:
    """SAM2's candidate with the highest predicted IoU (first one on ties).

    Args:
        pred: a prediction with at least one candidate.

    Returns:
        ``(mask, predicted IoU)``.

    Raises:
        ValueError: the prediction holds no candidate.
    """
    if not pred.masks or len(pred.masks) != len(pred.pred_ious):
        raise ValueError(
            f"prediction for {pred.instance_id} has {len(pred.masks)} masks and {len(pred.pred_ious)} scores; "
            "a backend must return one score per candidate mask."
        )
    best = max(range(len(pred.masks)), key=lambda i: (pred.pred_ious[i], -i))
    return pred.masks[best], float(pred.pred_ious[best])


def clean_decision(iou: float, pred_iou: float, refined_area_px: int, cfg: Sam2CleanConfig) -> tuple[bool, str]:
    """Whether a refined mask replaces the original.

    Args:
        iou: IoU of the refined mask with the original.
        pred_iou: SAM2's predicted IoU of the refined mask.
        refined_area_px: area of the refined mask.
        cfg: the cleaner config (``iou_band``, ``pred_iou_thresh``).

    Returns:
        ``(accepted, reason)``; reason is "" when accepted, else
        ``empty_prediction``, ``iou_below_band``, ``iou_above_band`` or
        ``low_pred_iou`` (checked in that order).
    """
    lo, hi = cfg.iou_band
    if refined_area_px <= 0:
        return False, "empty_prediction"
    if iou < lo:
        return False, "iou_below_band"
    if iou > hi:
        return False, "iou_above_band"
    if pred_iou < cfg.pred_iou_thresh:
        return False, "low_pred_iou"
    return True, ""


def consistent(ious: Sequence[float], iou_thresh: float) -> bool:
    """The filter's rule: every target IoU is at least ``iou_thresh``."""
    return all(v >= iou_thresh for v in ious)


# ------------------------------------------------------------------ planning


def _point_centres(points: Sequence[tuple[int, int]]) -> tuple[tuple[float, float], ...]:
    # Interior points are integer pixel indices; SAM2 coordinates are
    # continuous, with pixel (i, j) covering [i, i + 1) x [j, j + 1).
    return tuple((float(x) + 0.5, float(y) + 0.5) for x, y in points)


def instance_prompt(inst: Instance, multimask_output: bool) -> Sam2Prompt:
    """The SAM2 prompt of an instance: its box and two Seg-Zero interior points."""
    p1, p2 = interior_points(inst.rle)
    return Sam2Prompt(inst.instance_id, tuple(float(v) for v in inst.bbox_xyxy), _point_centres((p1, p2)), multimask_output)  # type: ignore[arg-type]


def target_prompt(t: TargetGeometry, multimask_output: bool) -> Sam2Prompt:
    """The SAM2 prompt of a sample target: its trainer box and interior points."""
    return Sam2Prompt(t.instance_id, tuple(float(v) for v in t.bbox_xyxy), _point_centres((t.point_1, t.point_2)), multimask_output)  # type: ignore[arg-type]


def _filtered(sample: Sample, cfg: VerifySam2Config) -> bool:
    """Whether the filter verifies this sample."""
    if not cfg.filter.enabled or sample.kind == ExpressionKind.NO_TARGET or not sample.target_ids:
        return False
    return cfg.filter.kinds is None or sample.kind in cfg.filter.kinds


def _to_clean(ex: ImageExample, cfg: VerifySam2Config) -> list[Instance]:
    """The instances the cleaner re-segments, in image order."""
    if not cfg.clean.enabled:
        return []
    origins = set(cfg.clean.mask_origins)
    referred = {t for s in ex.samples for t in s.target_ids} if cfg.clean.scope == "referred" else None
    return [
        i
        for i in ex.instances
        if i.mask_origin in origins and i.area_px > 0 and (referred is None or i.instance_id in referred)
    ]


def _targets_of(sample: Sample, instances: Mapping[str, Instance]) -> list[TargetGeometry | Instance]:
    """A sample's targets: its trainer geometry when complete, else the instances."""
    if len(sample.targets) == len(sample.target_ids) and all(
        t.instance_id == i for t, i in zip(sample.targets, sample.target_ids)
    ):
        return list(sample.targets)
    return [instances[i] for i in sample.target_ids if i in instances]


def plan_prompts(ex: ImageExample, cfg: VerifySam2Config, input_type: str) -> tuple[Sam2Prompt, ...]:
    """Every SAM2 prompt one image needs, deduplicated per instance and mode.

    A sample target already carries its box and interior points (its trainer
    geometry), so those are reused; instances the cleaner looks at get theirs
    computed here. Samples sharing a target (the sentences of one RefCOCO ref)
    share one prompt.

    Args:
        ex: the image with its instances and samples.
        cfg: the stage config.
        input_type: the type of the input the image came from.

    Returns:
        The prompts sorted by (instance id, mode); empty when the image needs
        no SAM2 work (then it bypasses the model).
    """
    if input_type not in cfg.apply_to:
        return ()
    instances = {i.instance_id: i for i in ex.instances}
    prompts: dict[tuple[str, bool], Sam2Prompt] = {}
    for inst in _to_clean(ex, cfg):
        key = (inst.instance_id, cfg.clean.multimask_output)
        prompts[key] = instance_prompt(inst, cfg.clean.multimask_output)
    mm = cfg.filter.multimask_output
    for s in ex.samples:
        if not _filtered(s, cfg):
            continue
        for t in _targets_of(s, instances):
            key = (t.instance_id, mm)
            if key in prompts:
                continue
            prompts[key] = target_prompt(t, mm) if isinstance(t, TargetGeometry) else instance_prompt(t, mm)
    return tuple(prompts[k] for k in sorted(prompts))


# ------------------------------------------------------------------ applying


def refine_instance(inst: Instance, mask: Rle, pred_iou: float, prompt: Sam2Prompt | None = None) -> Instance:
    """The instance with SAM2's mask: geometry recomputed, origin ``sam2_refined``.

    ``predicted_iou`` becomes SAM2's predicted IoU and ``point_coords`` the
    prompt points, as for SAM-generated (SA-1B) regions.
    """
    return dataclasses.replace(
        inst,
        rle=mask,
        **instance_geometry(mask),
        predicted_iou=round(float(pred_iou), 6),
        point_coords=prompt.points_xy if prompt is not None else inst.point_coords,
        mask_origin=REFINED_ORIGIN,
    )


def _lookup(preds: Mapping[tuple[str, bool], Sam2Prediction], instance_id: str, multimask: bool) -> Sam2Prediction:
    try:
        return preds[(instance_id, multimask)]
    except KeyError:
        raise KeyError(
            f"no SAM2 prediction for instance {instance_id} (multimask_output={multimask}); "
            "plan_prompts and apply_predictions disagree, which is a bug."
        ) from None


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def apply_predictions(
    ex: ImageExample,
    predictions: Sequence[Sam2Prediction],
    cfg: VerifySam2Config,
    *,
    prompts: Sequence[Sam2Prompt] = (),
    input_type: str = "",
) -> Sam2StageResult:
    """Applies SAM2's predictions to one image: cleaning first, then the filter.

    Args:
        ex: the image as planned (``plan_prompts`` saw this example).
        predictions: one prediction per planned prompt.
        cfg: the stage config.
        prompts: the planned prompts (their points become the refined
            instances' ``point_coords``); optional.
        input_type: the image's input type; images outside
            ``cfg.apply_to`` come back untouched.

    Returns:
        The updated example, the rejects (instance ``sam2_unrecoverable_mask``,
        ref and sample ``sam2_target_dropped``, sample ``sam2_inconsistent``,
        or a ``targets`` reason when a refined target's geometry fails) and
        the outcomes for the report.
    """
    if input_type and input_type not in cfg.apply_to:
        return Sam2StageResult(ex, (), ())
    preds = {(p.instance_id, p.multimask_output): p for p in predictions}
    prompt_of = {(p.instance_id, p.multimask_output): p for p in prompts}
    image_id, key = ex.image.image_id, ex.key
    w, h = ex.image.width, ex.image.height
    rejects: list[Reject] = []
    outcomes: list[Sam2Outcome] = []

    # ---- cleaner
    refined: dict[str, Instance] = {}
    clean_info: dict[str, dict[str, Any]] = {}
    dropped: set[str] = set()
    flagged: set[str] = set()
    mm_clean = cfg.clean.multimask_output
    for inst in _to_clean(ex, cfg):
        pred = _lookup(preds, inst.instance_id, mm_clean)
        mask, score = choose_candidate(pred)
        iou = rle_iou(mask, inst.rle)
        ok, why = clean_decision(iou, score, rle_area(mask), cfg.clean)
        action = REFINED if ok else _ON_REJECT_ACTION[cfg.clean.on_reject]
        if action == REFINED:
            refined[inst.instance_id] = refine_instance(inst, mask, score, prompt_of.get((inst.instance_id, mm_clean)))
        elif action == DROPPED:
            dropped.add(inst.instance_id)
            rejects.append(
                Reject(
                    inst.instance_id,
                    STAGE,
                    SAM2_UNRECOVERABLE,
                    f"SAM2's re-segmentation was not accepted ({why}): IoU with the original {iou:.3f} "
                    f"(band {list(cfg.clean.iou_band)}), predicted IoU {score:.3f} (min {cfg.clean.pred_iou_thresh}).",
                    RejectLevel.INSTANCE,
                    image_id,
                )
            )
        elif action == FLAGGED:
            flagged.add(inst.instance_id)
        clean_info[inst.instance_id] = {"action": action, "iou": round(iou, 6), "pred_iou": round(score, 6), "reason": why}
        outcomes.append(
            Sam2Outcome(CLEAN, key, image_id, inst.instance_id, action, iou, score, why, tuple(inst.bbox_xyxy), inst.rle, mask)  # type: ignore[arg-type]
        )

    instances = tuple(refined.get(i.instance_id, i) for i in ex.instances if i.instance_id not in dropped)
    by_id = {i.instance_id: i for i in instances}

    # ---- refs that lost a target go with it, as at ingest
    refs = ex.refs
    if dropped:
        dropped_ann = {i.source_ann_id: i.instance_id for i in ex.instances if i.instance_id in dropped}
        kept_refs = []
        for ref in ex.refs:
            lost = [dropped_ann[a] for a in ref.ann_ids if a in dropped_ann]
            if lost:
                rejects.append(
                    Reject(
                        f"{ex.input_name or key}#ref:{ref.ref_id}",
                        STAGE,
                        SAM2_TARGET_DROPPED,
                        f"ref {ref.ref_id} refers to {lost}, dropped by the SAM2 cleaner.",
                        RejectLevel.REF,
                        image_id,
                    )
                )
            else:
                kept_refs.append(ref)
        refs = tuple(kept_refs)

    # ---- samples: dropped targets, refined targets, then the filter
    mm_filter = cfg.filter.multimask_output
    filter_iou: dict[str, tuple[float, float, Rle]] = {}
    samples: list[Sample] = []
    for s in ex.samples:
        lost = [t for t in s.target_ids if t in dropped]
        if lost:
            rejects.append(
                Reject(s.sample_id, STAGE, SAM2_TARGET_DROPPED,
                       f"targets {lost} were dropped by the SAM2 cleaner.", RejectLevel.SAMPLE, image_id)
            )
            continue
        touched = [t for t in s.target_ids if t in clean_info]
        if any(t in refined for t in s.target_ids):
            try:
                s = attach_targets(s, by_id, w, h)
            except TargetError as err:
                rejects.append(Reject(s.sample_id, STAGE, err.reason, str(err), RejectLevel.SAMPLE, image_id))
                continue
        meta: dict[str, Any] = {}
        if touched:
            meta["clean"] = {t: clean_info[t] for t in touched}
            marked = [t for t in touched if t in flagged]
            if marked:
                meta["flagged"] = marked
        if _filtered(s, cfg):
            ious = []
            for t in s.target_ids:
                if t not in filter_iou:
                    mask, score = choose_candidate(_lookup(preds, t, mm_filter))
                    filter_iou[t] = (rle_iou(mask, by_id[t].rle), score, mask)
                ious.append(filter_iou[t][0])
            ok = consistent(ious, cfg.filter.iou_thresh)
            outcomes.append(Sam2Outcome(SAMPLE, key, image_id, s.sample_id, PASSED if ok else FAILED, min(ious), float("nan")))
            if not ok:
                bad = [t for t, v in zip(s.target_ids, ious) if v < cfg.filter.iou_thresh]
                rejects.append(
                    Reject(
                        s.sample_id,
                        STAGE,
                        SAM2_INCONSISTENT,
                        f"SAM2 does not reproduce targets {bad}: IoUs {_fmt(ious)} for targets {list(s.target_ids)}, "
                        f"threshold {cfg.filter.iou_thresh}.",
                        RejectLevel.SAMPLE,
                        image_id,
                    )
                )
                continue
            s = dataclasses.replace(s, sam2_ious=tuple(round(v, 6) for v in ious))
            meta["filter_iou_thresh"] = cfg.filter.iou_thresh
        if meta:
            meta["model"] = cfg.model
            s = dataclasses.replace(s, metadata={**s.metadata, "sam2": meta})
        samples.append(s)

    for t in sorted(filter_iou):
        iou, score, mask = filter_iou[t]
        inst = by_id[t]
        outcomes.append(
            Sam2Outcome(FILTER, key, image_id, t, PASSED if iou >= cfg.filter.iou_thresh else FAILED, iou, score, "",
                        tuple(inst.bbox_xyxy), inst.rle, mask)  # type: ignore[arg-type]
        )
    out = ex.replace(instances=instances, refs=refs, samples=tuple(samples))
    return Sam2StageResult(out, tuple(rejects), tuple(outcomes))


def inference_failed_reject(ex: ImageExample, error: str) -> Reject:
    """The image-level reject of an image whose SAM2 inference failed.

    Args:
        ex: the image.
        error: the exception text from RunInference's dead-letter output.
    """
    short = error if len(error) <= 300 else error[:297] + "..."
    return Reject(
        ex.key,
        STAGE,
        SAM2_INFERENCE_FAILED,
        f"SAM2 inference failed for this image's batch: {short}",
        RejectLevel.IMAGE,
        ex.image.image_id,
    )
