"""Referring-segmentation metrics, computed in RLE space.

Definitions (those of gRefCOCO / GRES, Liu et al. CVPR 2023, which reduce to
the RefCOCO ones when there is no no-target sample). For every sample ``i``
with ground-truth union mask ``G_i`` (empty for ``no_target``) and predicted
mask ``P_i`` (empty when the model says "nothing"):

* ``I_i = |P_i ∩ G_i|``, ``U_i = |P_i ∪ G_i|`` (pixel counts, on the runs);
* **cIoU** = ``Σ I_i / Σ U_i`` (cumulative; a no-target sample adds its false
  positive pixels to the union only);
* **gIoU** = mean over all samples of ``IoU_i``, where ``IoU_i = I_i / U_i``
  and an empty prediction on a no-target sample (``U_i = 0``) scores 1, a
  non-empty one 0;
* **mIoU** = mean ``IoU_i`` over the samples that have targets (RefCOCO's
  mIoU; equal to gIoU on a dataset without no-target samples);
* no-target detection treats "no target" as the positive class: on
  no-target samples an empty prediction is a TP and a non-empty one an FN; on
  target samples a non-empty prediction is a TN and an empty one an FP.
  **N-acc** = ``TP / (TP + FN)`` (no-target samples recognised as such) and
  **T-acc** = ``TN / (TN + FP)`` (target samples not mistaken for no-target);
* **Pr@τ** = fraction of target samples with ``IoU_i >= τ`` (τ = 0.5 ... 0.9, as LAVT /
  CRIS count it).

``protocol`` reproduces other repositories' handling of samples whose
prediction and ground truth are both empty (``U_i = 0``); every other sample
scores the same under all of them:

* ``orsgen`` (default): the GRES definitions above (``IoU_i = 1``);
* ``segzero``: Seg-Zero's ``evaluation_scripts/evaluation.py`` skips the
  sample (its ``compute_iou`` returns a bare ``0`` that fails to unpack); it
  is counted in ``skipped_empty_union`` and nowhere else;
* ``visionreasoner``: VisionReasoner's ``calculate_iou_with_bbox.py`` keeps it
  and scores ``IoU_i = 0`` (``I / U if U > 0 else 0``);
* ``visionreasoner-nonobj``: its ``calculate_iou_with_bbox_nonobj.py`` scores
  it 1 (``non_object``), which equals ``orsgen``'s gIoU; N-acc is its N-Acc.

cIoU is ``ΣI / ΣU`` under all protocols (``ΣU = 0``: 1 for ``orsgen``, 0 for
the others, as their ``calculate_iou`` returns).

Predictions are JSONL, one object per sample: ``{"sample_id": ..., and one of
"segmentation" | "mask" | "rle" | "polygons"}``; the value is a COCO RLE
(compressed ``counts`` string or uncompressed list, ``size`` = [h, w]), COCO
polygons ``[[x0, y0, x1, y1, ...], ...]`` in pixels, or ``null`` / ``[]`` /
an all-zero RLE for "no target".
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from orsgen.schemas.records import ExpressionKind, Rle
from orsgen.stages.common.masks import MaskError, empty_rle, polygons_to_rle, rle_area, validate_rle
from orsgen.stages.dataset.read import iter_rows, resolve_splits

PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
PROTOCOLS = ("orsgen", "segzero", "visionreasoner", "visionreasoner-nonobj")
MASK_KEYS = ("segmentation", "mask", "rle", "polygons")


class EvalError(ValueError):
    """The predictions or ground truth cannot be evaluated."""


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """One sample's ground truth."""

    sample_id: str
    split: str
    kind: str
    rle: Rle  # union of the targets; empty for no-target

    @property
    def no_target(self) -> bool:
        return self.kind == ExpressionKind.NO_TARGET or rle_area(self.rle) == 0


@dataclass(frozen=True, slots=True)
class SampleScore:
    """Intersection and union of one sample, in pixels."""

    sample_id: str
    split: str
    kind: str
    gt_empty: bool
    pred_empty: bool
    intersection: int
    union: int

    @property
    def iou(self) -> float:
        """``I / U``; 1 when both masks are empty (a correct no-target answer)."""
        return 1.0 if self.union == 0 else self.intersection / self.union

    def iou_under(self, protocol: str) -> float:
        """``I / U`` with ``protocol``'s value for ``U = 0`` (``segzero`` skips those before)."""
        if self.union == 0:
            return 0.0 if protocol == "visionreasoner" else 1.0
        return self.intersection / self.union


@dataclass(slots=True)
class Metrics:
    """Accumulates ``SampleScore`` values into the standard metrics."""

    protocol: str = "orsgen"
    n: int = 0
    skipped_empty_union: int = 0
    cum_i: int = 0
    cum_u: int = 0
    sum_iou: float = 0.0
    n_target: int = 0
    sum_iou_target: float = 0.0
    tp: int = 0  # no-target sample, empty prediction
    fn: int = 0  # no-target sample, non-empty prediction
    tn: int = 0  # target sample, non-empty prediction
    fp: int = 0  # target sample, empty prediction
    pr_hits: Counter[float] = field(default_factory=Counter)

    def add(self, s: SampleScore) -> None:
        if self.protocol == "segzero" and s.union == 0:
            self.skipped_empty_union += 1
            return
        iou = s.iou_under(self.protocol)
        self.n += 1
        self.cum_i += s.intersection
        self.cum_u += s.union
        self.sum_iou += iou
        if s.gt_empty:
            if s.pred_empty:
                self.tp += 1
            else:
                self.fn += 1
        else:
            self.n_target += 1
            self.sum_iou_target += iou
            if s.pred_empty:
                self.fp += 1
            else:
                self.tn += 1
            for t in PR_THRESHOLDS:
                if iou >= t:
                    self.pr_hits[t] += 1

    def to_json(self) -> dict[str, Any]:
        """The metrics as a dict; a metric with no sample to average over is None."""
        def ratio(a: float, b: float) -> float | None:
            return None if b == 0 else a / b

        n_nt = self.tp + self.fn
        out: dict[str, Any] = {
            "n": self.n,
            "n_target": self.n_target,
            "n_no_target": n_nt,
            "cIoU": ratio(self.cum_i, self.cum_u) if self.cum_u else ((1.0 if self.protocol == "orsgen" else 0.0) if self.n else None),
            "gIoU": ratio(self.sum_iou, self.n),
            "mIoU": ratio(self.sum_iou_target, self.n_target),
            "N_acc": ratio(self.tp, n_nt),
            "T_acc": ratio(self.tn, self.tn + self.fp),
            "cumulative_intersection_px": self.cum_i,
            "cumulative_union_px": self.cum_u,
            "no_target_confusion": {"TP": self.tp, "FN": self.fn, "TN": self.tn, "FP": self.fp},
        }
        if self.protocol == "segzero":
            out["skipped_empty_union"] = self.skipped_empty_union
        for t in PR_THRESHOLDS:
            out[f"Pr@{t:.1f}"] = ratio(self.pr_hits[t], self.n_target)
        return out


def score_sample(gt: GroundTruth, pred: Rle | None) -> SampleScore:
    """Intersection and union of one prediction with its ground truth, on the runs.

    Args:
        gt: the ground truth.
        pred: the predicted mask (same size), or None for "no target".

    Raises:
        EvalError: the prediction's size differs from the image's.
    """
    g = gt.rle
    if pred is None:
        pred = empty_rle(*g.size)
    if tuple(pred.size) != tuple(g.size):
        raise EvalError(f"prediction for {gt.sample_id} has size {list(pred.size)} but the image is {list(g.size)} (h, w).")
    pa_, ga = rle_area(pred), rle_area(g)
    inter = int(mask_utils.area(mask_utils.merge([pred.to_coco(), g.to_coco()], intersect=True))) if pa_ and ga else 0
    return SampleScore(
        sample_id=gt.sample_id,
        split=gt.split,
        kind=gt.kind,
        gt_empty=gt.no_target,
        pred_empty=pa_ == 0,
        intersection=inter,
        union=pa_ + ga - inter,
    )


def parse_prediction(obj: dict[str, Any], size: tuple[int, int]) -> Rle | None:
    """The predicted mask of one JSONL object, or None for an empty prediction.

    Args:
        obj: the JSON object (``sample_id`` plus one mask key).
        size: ``(h, w)`` of the sample's image (polygons are rasterised at it).

    Raises:
        EvalError: malformed mask.
    """
    keys = [k for k in MASK_KEYS if k in obj]
    if len(keys) > 1:
        raise EvalError(f"prediction for {obj.get('sample_id')!r} has several mask keys {keys}; give one.")
    value = obj[keys[0]] if keys else None
    h, w = size
    try:
        if value is None or value == [] or value == {}:
            return None
        if isinstance(value, dict):
            if "counts" not in value or "size" not in value:
                raise EvalError(f"prediction for {obj.get('sample_id')!r}: an RLE needs 'size' and 'counts'.")
            if isinstance(value["counts"], list):
                rle = Rle.from_coco(mask_utils.frPyObjects(value, int(value["size"][0]), int(value["size"][1])))
            else:
                rle = Rle.from_coco(value)
                validate_rle(rle)
        elif isinstance(value, list):
            rle = polygons_to_rle(value, h, w)
        else:
            raise EvalError(f"prediction for {obj.get('sample_id')!r}: mask must be an RLE dict, polygons or null.")
    except MaskError as err:
        raise EvalError(f"prediction for {obj.get('sample_id')!r}: {err}") from err
    return None if rle_area(rle) == 0 and tuple(rle.size) == (h, w) else rle


def load_ground_truth(root: str, splits: Sequence[str] | None = None) -> dict[str, GroundTruth]:
    """Every sample's union mask and kind, read without image bytes.

    Raises:
        EvalError: a sample with targets has no union mask (rebuild the data).
    """
    out: dict[str, GroundTruth] = {}
    for split in resolve_splits(root, splits):
        for row in iter_rows(root, split, ["width", "height", "samples"]):
            h, w = int(row["height"]), int(row["width"])
            for s in row["samples"] or ():
                u = s.get("union_rle")
                if u is None:
                    if s["target_ids"]:
                        raise EvalError(f"sample {s['sample_id']} has targets but no union mask; rebuild the dataset.")
                    rle = empty_rle(h, w)
                else:
                    rle = Rle.from_coco(u)
                out[s["sample_id"]] = GroundTruth(s["sample_id"], split, s["kind"], rle)
    return out


def read_predictions(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank JSONL line.

    Raises:
        EvalError: a line is not a JSON object with a string ``sample_id``.
    """
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{n} is not JSON ({err.msg}).") from err
            if not isinstance(obj, dict) or not isinstance(obj.get("sample_id"), str):
                raise EvalError(f"{path}:{n} must be a JSON object with a string 'sample_id'.")
            yield n, obj


def evaluate(
    gt: dict[str, GroundTruth],
    predictions: Iterable[tuple[int, dict[str, Any]]],
    protocol: str = "orsgen",
) -> dict[str, Any]:
    """Scores predictions against ground truth; the report of ``orsgen eval``.

    A ground-truth sample without a prediction is scored as an empty
    prediction and counted in ``missing``; a prediction for a sample outside
    the evaluated splits is counted in ``unknown`` and ignored; a malformed
    or wrongly sized prediction is scored as empty and listed in ``invalid``.
    Nothing is dropped without a count.

    Args:
        gt: ground truth by sample id.
        predictions: ``(line, object)`` pairs (``read_predictions``).
        protocol: one of ``PROTOCOLS`` (see the module docstring).

    Returns:
        ``{"overall", "by_split", "by_kind", "by_split_kind", "ood",
        "in_distribution", "counts", "invalid"}``; ``ood`` aggregates the
        ``ood_*`` splits, ``in_distribution`` the others (both only when
        ``ood_*`` splits are evaluated).

    Raises:
        EvalError: a sample id is predicted twice, or the protocol is unknown.
    """
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    seen: set[str] = set()
    unknown = 0
    invalid: list[dict[str, Any]] = []
    scores: dict[str, SampleScore] = {}
    for line, obj in predictions:
        sid = obj["sample_id"]
        if sid in seen:
            raise EvalError(f"sample {sid!r} is predicted twice (second time on line {line}); keep one prediction per sample.")
        seen.add(sid)
        g = gt.get(sid)
        if g is None:
            unknown += 1
            continue
        try:
            scores[sid] = score_sample(g, parse_prediction(obj, g.rle.size))
        except EvalError as err:
            invalid.append({"line": line, "sample_id": sid, "error": str(err)})
            scores[sid] = score_sample(g, None)
    missing = 0
    for sid, g in gt.items():
        if sid not in scores:
            missing += 1
            scores[sid] = score_sample(g, None)

    def m() -> Metrics:
        return Metrics(protocol=protocol)

    overall, ood, ind = m(), m(), m()
    by_split: dict[str, Metrics] = {}
    by_kind: dict[str, Metrics] = {}
    by_split_kind: dict[str, dict[str, Metrics]] = {}
    for sid in sorted(scores):
        s = scores[sid]
        overall.add(s)
        by_split.setdefault(s.split, m()).add(s)
        by_kind.setdefault(s.kind, m()).add(s)
        by_split_kind.setdefault(s.split, {}).setdefault(s.kind, m()).add(s)
        (ood if s.split.startswith("ood") else ind).add(s)
    report: dict[str, Any] = {
        "protocol": protocol,
        "overall": overall.to_json(),
        "by_split": {k: v.to_json() for k, v in sorted(by_split.items())},
        "by_kind": {k: v.to_json() for k, v in sorted(by_kind.items())},
        "by_split_kind": {k: {kk: vv.to_json() for kk, vv in sorted(v.items())} for k, v in sorted(by_split_kind.items())},
        "counts": {"ground_truth": len(gt), "predicted": len(seen) - unknown, "missing": missing, "unknown": unknown, "invalid": len(invalid)},
        "invalid": invalid[:100],
    }
    if ood.n or ood.skipped_empty_union:
        report["ood"] = ood.to_json()
        report["in_distribution"] = ind.to_json()
    return report


def evaluate_files(
    predictions: str | Path, root: str, splits: Sequence[str] | None = None, protocol: str = "orsgen"
) -> dict[str, Any]:
    """``evaluate`` on a predictions JSONL and an orsgen output folder."""
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    gt = load_ground_truth(root, splits)
    if not gt:
        raise EvalError(f"the split(s) {list(splits or [])} of {root} hold no referring sample to evaluate.")
    report = evaluate(gt, read_predictions(predictions), protocol)
    report["splits"] = sorted({g.split for g in gt.values()})
    return report
