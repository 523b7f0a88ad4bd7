"""SA1B-CoRS assembly: VLM boxes + labels become category samples over SA-1B masks.

The recipe (SA1B-ORS, Qwen3-VL-Seg): a VLM lists the referable objects of an
image as ``bbox_2d`` + ``label``; each box is matched to SA-1B's class-agnostic
fragments by **intersection over fragment** (IoF = |fragment ∩ box| /
|fragment|), and the fragments that lie inside the box are merged into one
instance. IoF, not IoU: SA-1B splits an object into parts, each with a small IoU
against the object's box but an IoF near 1. Boxes are grouped by normalised
label: one instance gives a ``category_single`` sample, several a
``category_multi`` sample whose targets are all of them. A verification pass
then asks the VLM, per label, whether the highlighted masks are that category,
cover it, and miss no instance.

Everything here is pure and works in RLE space (pycocotools): the box is
rasterised as an RLE and IoF is pycocotools' crowd IoU (intersection over the
detection's area), computed on the runs for all fragments at once.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from orsgen.schemas.config import CorsConfig
from orsgen.schemas.records import ExpressionKind, ImageExample, Instance, Reject, RejectLevel, Rle, Sample, safe_key
from orsgen.stages.common.masks import instance_geometry, rle_area, rle_bbox_xywh, rle_intersection_area, rle_union, xywh_to_xyxy
from orsgen.stages.common.targets import TargetError, attach_targets

STAGE = "caption"

# Reject reasons of this path (sample level; VLM failures use VlmError values).
NO_MATCH = "cors_no_match"
TOO_MANY_BOXES = "cors_too_many_boxes"
VERIFY_FAILED = "cors_verify_failed"

# How a box's mask was obtained (sample metadata ``match``).
MERGED = "merged"  # union of >= 2 fragments with IoF >= iof_thresh
SINGLE = "single_region"  # exactly one fragment passed; the region itself
BEST_REGION = "best_region"  # fallback: region with the best mask IoU with the box
BOX = "box"  # fallback: the box rectangle itself

Box = tuple[float, float, float, float]

#: A merge whose largest fragment already holds this fraction of the union reuses
#: that fragment (SA-1B's whole-object mask beside its parts).
REUSE_FRACTION = 0.99

_ARTICLES = re.compile(r"^(?:a|an|the)\s+")
_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def normalize_label(text: str) -> str:
    """The grouping key of a VLM label: NFKC, lower case, no article, single spaces.

    ``"The  Red Car."`` and ``"red car"`` are one label; plural and singular
    stay distinct (the VLM is asked for one label per instance).

    Args:
        text: the label as the VLM wrote it.

    Returns:
        The normalised label ("" when nothing word-like is left).
    """
    t = unicodedata.normalize("NFKC", str(text)).lower().strip()
    t = _SPACES.sub(" ", t)
    t = _EDGE_PUNCT.sub("", t)
    t = _ARTICLES.sub("", t)
    return t.strip()


def clip_box(box: Sequence[float], width: int, height: int) -> Box | None:
    """Clips a pixel box ``[x0, y0, x1, y1]`` to the image; None if nothing is left.

    Swapped corners are reordered (VLMs sometimes write ``x1 < x0``).
    """
    x0, x1 = sorted((float(box[0]), float(box[2])))
    y0, y1 = sorted((float(box[1]), float(box[3])))
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return None
    return (x0, y0, x1, y1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def box_rle(box: Sequence[float], height: int, width: int) -> Rle:
    """Rasterises a pixel box ``[x0, y0, x1, y1]`` as an RLE (pycocotools ``frBbox``)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rles = mask_utils.frPyObjects(np.asarray([[x0, y0, x1 - x0, y1 - y0]], dtype=np.float64), height, width)
    return Rle.from_coco(rles[0])


def iof_scores(fragments: Sequence[Rle], box_mask: Rle) -> np.ndarray:
    """Intersection over fragment of every fragment with one box mask.

    pycocotools' IoU with ``iscrowd=1`` divides the intersection by the
    detection's area instead of the union, which is exactly IoF; it runs on
    the runs, for all fragments in one call.

    Returns:
        ``(n,)`` float64 array; 0 for empty fragments.
    """
    if not fragments:
        return np.zeros(0, dtype=np.float64)
    ious = mask_utils.iou([f.to_coco() for f in fragments], [box_mask.to_coco()], [1])
    return np.asarray(ious, dtype=np.float64).reshape(len(fragments))


@dataclass(frozen=True, slots=True)
class BoxMatch:
    """The mask found for one VLM box.

    Attributes:
        box_xyxy: the VLM box in image pixels (clipped).
        method: ``merged``, ``single_region``, ``best_region`` or ``box``.
        fragment_ids: the SA-1B regions that make the mask (empty for ``box``).
        rle: the mask.
        box_iou: IoU of the mask's tight box with the VLM box.
        coverage: fraction of the VLM box's pixels the mask fills.
    """

    box_xyxy: Box
    method: str
    fragment_ids: tuple[str, ...]
    rle: Rle
    box_iou: float
    coverage: float


def match_box(
    box: Box,
    regions: Sequence[Instance],
    height: int,
    width: int,
    cfg: CorsConfig,
) -> BoxMatch | None:
    """Finds the mask of one VLM box among the image's fragments.

    Order: IoF merging (every fragment with IoF >= ``iof_thresh``, unioned,
    accepted if its tight box has IoU >= ``min_box_iou`` with the VLM box and
    it fills >= ``min_coverage`` of the box; when one fragment already holds
    ``REUSE_FRACTION`` of the union, that fragment is used as it is); then the
    fallbacks of ``cfg.fallback`` in order.

    Args:
        box: the VLM box in image pixels, already clipped.
        regions: the image's fragments (SA-1B regions).
        height: image height in pixels.
        width: image width in pixels.
        cfg: thresholds and fallbacks.

    Returns:
        The match, or None when merging and every fallback failed.
    """
    bmask = box_rle(box, height, width)
    barea = max(rle_area(bmask), 1)
    frags = [r.rle for r in regions]
    iof = iof_scores(frags, bmask)
    chosen = [i for i in np.argsort([r.instance_id for r in regions], kind="stable") if iof[i] >= cfg.iof_thresh]
    if chosen:
        union = rle_union([frags[i] for i in chosen])
        b_iou = box_iou(xywh_to_xyxy(rle_bbox_xywh(union)), box)
        cov = rle_intersection_area(union, bmask) / barea
        if b_iou >= cfg.min_box_iou and cov >= cfg.min_coverage:
            # SA-1B is hierarchical: a whole object often comes with its parts,
            # and their union is the whole. Reuse that region rather than add a
            # near-copy of it as a new instance.
            u_area = max(rle_area(union), 1)
            whole = max(chosen, key=lambda i: (regions[i].area_px, -int(i)))
            if len(chosen) == 1 or regions[whole].area_px >= REUSE_FRACTION * u_area:
                r = regions[whole]
                return BoxMatch(box, SINGLE, (r.instance_id,), r.rle,
                                box_iou(xywh_to_xyxy(rle_bbox_xywh(r.rle)), box),
                                rle_intersection_area(r.rle, bmask) / barea)
            ids = tuple(regions[i].instance_id for i in chosen)
            return BoxMatch(box, MERGED, ids, union, b_iou, cov)
    for fb in cfg.fallback:
        if fb == BEST_REGION and regions:
            ious = np.asarray(
                mask_utils.iou([f.to_coco() for f in frags], [bmask.to_coco()], [0]), dtype=np.float64
            ).reshape(len(frags))
            # Highest IoU, ties to the smaller instance id: deterministic.
            order = sorted(range(len(regions)), key=lambda i: (-ious[i], regions[i].instance_id))
            best = order[0]
            if ious[best] >= cfg.fallback_min_iou:
                r = regions[best]
                b_iou = box_iou(xywh_to_xyxy(rle_bbox_xywh(r.rle)), box)
                cov = rle_intersection_area(r.rle, bmask) / barea
                return BoxMatch(box, BEST_REGION, (r.instance_id,), r.rle, b_iou, cov)
        elif fb == BOX:
            return BoxMatch(box, BOX, (), bmask, 1.0, 1.0)
    return None


@dataclass(frozen=True, slots=True)
class CorsCandidate:
    """One label's would-be sample between the grounding and the verification pass.

    Attributes:
        sample_id: the sample's id (also the key of its reject, if any).
        label: the normalised label, the sample's expression.
        raw_labels: the labels as the VLM wrote them, per box.
        boxes: the VLM boxes in image pixels, per box.
        matches: how each box found its mask, per box.
        target_ids: the distinct target instance ids, sorted.
        new_instances: merged / box instances this sample adds to the image.
    """

    sample_id: str
    label: str
    raw_labels: tuple[str, ...]
    boxes: tuple[Box, ...]
    matches: tuple[BoxMatch, ...]
    target_ids: tuple[str, ...]
    new_instances: tuple[Instance, ...] = ()

    @property
    def kind(self) -> str:
        """``category_single`` for one target, ``category_multi`` for several."""
        return str(ExpressionKind.CATEGORY_SINGLE if len(self.target_ids) == 1 else ExpressionKind.CATEGORY_MULTI)


@dataclass(frozen=True, slots=True)
class CorsDraft:
    """What the grounding pass produced for one image.

    Attributes:
        candidates: one per label that matched, sorted by sample id.
        rejects: sample-level rejects of labels that failed.
        events: counting events (``caption/<what>``, n).
    """

    candidates: tuple[CorsCandidate, ...] = ()
    rejects: tuple[Reject, ...] = ()
    events: tuple[tuple[str, int], ...] = field(default_factory=tuple)


def cors_group_id(key: str) -> str:
    """Reject key of an image's CoRS samples when grounding itself failed.

    The number of would-be samples is unknown then, so the image's CoRS output
    counts as one sample: created, and rejected.
    """
    return safe_key(f"{key}-cors")


def cors_sample_id(key: str, label: str) -> str:
    """Sample id of one label's CoRS sample (WebDataset-safe)."""
    return safe_key(f"{key}-cors-{label}")[:200]


def _new_instance(image_id: str, n: int, m: BoxMatch) -> Instance:
    return Instance(
        instance_id=f"{image_id}/cors:{n}",
        image_id=image_id,
        rle=m.rle,
        **instance_geometry(m.rle),
        mask_origin="cors_merged" if m.method == MERGED else "vlm_box",
    )


def assemble_grounding(
    ex: ImageExample,
    grounded: Sequence[tuple[str, Sequence[float]]],
    cfg: CorsConfig,
) -> CorsDraft:
    """Turns the grounding answer of one image into per-label candidates.

    Args:
        ex: the image with its SA-1B regions as instances.
        grounded: ``(label, box_xyxy)`` pairs in image pixels (already mapped
            from the model's box convention), in the VLM's order.
        cfg: thresholds and fallbacks.

    Returns:
        The draft: candidates sorted by sample id; rejects ``cors_no_match``
        (a box of the label found no mask: a category sample with a missing
        instance would be wrong) and ``cors_too_many_boxes``; events counting
        boxes, duplicates, unusable boxes and match methods.
    """
    w, h = ex.image.width, ex.image.height
    events: dict[str, int] = {}

    def ev(name: str, n: int = 1) -> None:
        events[f"caption/{name}"] = events.get(f"caption/{name}", 0) + n

    by_label: dict[str, list[tuple[str, Box]]] = {}
    seen: set[tuple[str, Box]] = set()
    for raw, box in grounded:
        ev("cors_boxes")
        label = normalize_label(raw)
        if not label:
            ev("cors_box_empty_label")
            continue
        clipped = clip_box(box, w, h)
        if clipped is None:
            ev("cors_box_outside_image")
            continue
        if (label, clipped) in seen:
            # Repetition is common in long grounding lists; the same box twice is one instance.
            ev("cors_box_duplicate")
            continue
        seen.add((label, clipped))
        by_label.setdefault(label, []).append((str(raw), clipped))

    regions = list(ex.instances)
    rejects: list[Reject] = []
    used_ids: set[str] = set()
    pending: list[tuple[str, str, list[tuple[str, Box]], list[BoxMatch]]] = []
    n_boxes = 0
    for label in sorted(by_label):
        items = by_label[label]
        sid = cors_sample_id(ex.key, label)
        if sid in used_ids:
            # Two labels can collapse to one safe key ("t-shirt" / "t shirt"); keep ids unique.
            k = 2
            while f"{sid}-{k}" in used_ids:
                k += 1
            sid = f"{sid}-{k}"
        used_ids.add(sid)
        if n_boxes + len(items) > cfg.max_boxes_per_image:
            rejects.append(
                Reject(sid, STAGE, TOO_MANY_BOXES,
                       f"label {label!r} has {len(items)} boxes and the image already has {n_boxes}; "
                       f"caption.cors.max_boxes_per_image is {cfg.max_boxes_per_image}.",
                       RejectLevel.SAMPLE, ex.image.image_id)
            )
            continue
        n_boxes += len(items)
        matches = [match_box(b, regions, h, w, cfg) for _raw, b in items]
        failed = [b for (_raw, b), m in zip(items, matches) if m is None]
        if failed:
            ev("cors_box_unmatched", len(failed))
            rejects.append(
                Reject(sid, STAGE, NO_MATCH,
                       f"{len(failed)} of {len(items)} boxes of label {label!r} matched no region "
                       f"(first: {[round(v, 1) for v in failed[0]]}); a category sample missing an "
                       "instance would be wrong. Lower caption.cors.iof_thresh or add 'box' to caption.cors.fallback.",
                       RejectLevel.SAMPLE, ex.image.image_id)
            )
            continue
        for m in matches:
            assert m is not None
            ev(f"cors_match_{m.method}")
        pending.append((sid, label, items, matches))  # type: ignore[arg-type]

    # New instances get ids in a deterministic order (labels sorted, then box order);
    # the same fragment set (or box) under two labels is one instance.
    existing = {i.instance_id for i in regions}
    new_ids: dict[tuple[str, ...], Instance] = {}
    candidates: list[CorsCandidate] = []
    for sid, label, items, matches in pending:
        targets: list[str] = []
        added: dict[str, Instance] = {}
        for m in matches:
            if m.method in (SINGLE, BEST_REGION):
                tid = m.fragment_ids[0]
                assert tid in existing
            else:
                key = (m.method, *m.fragment_ids) if m.method == MERGED else (m.method, *map(str, m.box_xyxy))
                inst = new_ids.get(key)
                if inst is None:
                    inst = _new_instance(ex.image.image_id, len(new_ids), m)
                    new_ids[key] = inst
                added[inst.instance_id] = inst
                tid = inst.instance_id
            if tid not in targets:
                targets.append(tid)
        candidates.append(
            CorsCandidate(
                sample_id=sid,
                label=label,
                raw_labels=tuple(r for r, _b in items),
                boxes=tuple(b for _r, b in items),
                matches=tuple(matches),
                target_ids=tuple(sorted(targets)),
                new_instances=tuple(sorted(added.values(), key=lambda i: i.instance_id)),
            )
        )
    return CorsDraft(
        candidates=tuple(sorted(candidates, key=lambda c: c.sample_id)),
        rejects=tuple(sorted(rejects, key=lambda r: r.source_key)),
        events=tuple(sorted(events.items())),
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verification pass's answer for one label.

    Attributes:
        keep: True when the category is right, the masks cover the objects and
            no instance is missed.
        detail: the reasons as the VLM gave them (for the reject message and
            metadata).
    """

    keep: bool
    detail: dict = field(default_factory=dict)


def finalize_cors(
    ex: ImageExample,
    candidates: Sequence[CorsCandidate],
    verdicts: Mapping[str, Verdict | tuple[str, str]],
    *,
    model: str,
    prompt_version: str,
    verify: bool,
) -> tuple[list[Sample], list[Instance], list[Reject]]:
    """Applies the verification verdicts and builds the CoRS samples.

    Args:
        ex: the image (its instances are the SA-1B regions).
        candidates: the grounding pass's candidates.
        verdicts: per sample id, the verdict, or ``(reason, message)`` when
            the verification request failed (a VLM error code).
        model: the model that grounded the labels.
        prompt_version: the grounding prompt's id@version.
        verify: whether verification ran (False keeps every candidate).

    Returns:
        ``(samples, new instances used by the kept samples, rejects)``, each
        sorted by id. A negative verdict is a ``cors_verify_failed`` reject; a
        failed request rejects with its VLM error code; a candidate with no
        verdict at all is a ``vlm_backend_error`` reject (it never silently
        disappears).
    """
    w, h = ex.image.width, ex.image.height
    by_id = {i.instance_id: i for i in ex.instances}
    samples: list[Sample] = []
    new: dict[str, Instance] = {}
    rejects: list[Reject] = []
    for c in candidates:
        verdict_detail: dict = {}
        if verify:
            v = verdicts.get(c.sample_id)
            if v is None:
                rejects.append(Reject(c.sample_id, STAGE, "vlm_backend_error",
                                      "the verification request for this label got no answer.",
                                      RejectLevel.SAMPLE, ex.image.image_id))
                continue
            if isinstance(v, tuple):
                reason, msg = v
                rejects.append(Reject(c.sample_id, STAGE, reason, f"verification of {c.label!r} failed: {msg}",
                                      RejectLevel.SAMPLE, ex.image.image_id))
                continue
            if not v.keep:
                rejects.append(Reject(c.sample_id, STAGE, VERIFY_FAILED,
                                      f"the verifier rejected label {c.label!r} over {len(c.target_ids)} "
                                      f"target(s): {v.detail}", RejectLevel.SAMPLE, ex.image.image_id))
                continue
            verdict_detail = dict(v.detail)
        insts = {**by_id, **{i.instance_id: i for i in c.new_instances}}
        sample = Sample(
            sample_id=c.sample_id,
            image_id=ex.image.image_id,
            expression=c.label,
            kind=c.kind,
            target_ids=c.target_ids,
            generator="vlm",
            template=prompt_version,
            model=model,
            metadata={
                "path": "cors",
                "labels_raw": list(c.raw_labels),
                "vlm_boxes": [[round(v, 2) for v in b] for b in c.boxes],
                "match": [m.method for m in c.matches],
                "fragments": [list(m.fragment_ids) for m in c.matches],
                "match_box_iou": [round(m.box_iou, 4) for m in c.matches],
                "match_coverage": [round(m.coverage, 4) for m in c.matches],
                "fallback": any(m.method in (BEST_REGION, BOX) for m in c.matches),
                "verified": bool(verify),
                "verdict": verdict_detail,
            },
        )
        try:
            samples.append(attach_targets(sample, insts, w, h))
        except TargetError as err:
            rejects.append(Reject(c.sample_id, STAGE, err.reason, str(err), RejectLevel.SAMPLE, ex.image.image_id))
            continue
        for i in c.new_instances:
            new[i.instance_id] = i
    return (
        sorted(samples, key=lambda s: s.sample_id),
        sorted(new.values(), key=lambda i: i.instance_id),
        sorted(rejects, key=lambda r: r.source_key),
    )
