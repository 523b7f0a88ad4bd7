"""orsgen eval: metrics against hand-computed values, no-target handling, the CLI on the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from orsgen.pipelines.cli import app
from orsgen.schemas.records import Rle
from orsgen.stages.dataset.evaluate import EvalError, GroundTruth, evaluate, load_ground_truth
from orsgen.stages.common.masks import encode_mask
from orsgen.stages.dataset.read import iter_rows


def _mask(h: int, w: int, pixels: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def _rle(m: np.ndarray) -> Rle:
    return encode_mask(m)


def _pred(sid: str, m: np.ndarray | None) -> tuple[int, dict]:
    return (0, {"sample_id": sid, "segmentation": None if m is None else _rle(m).to_json()})


@pytest.fixture
def hand_case():
    """Five samples on 4x4 images with counts small enough to check by hand.

    A (target):    GT 4 px, prediction 2 px inside it        I=2 U=4 IoU=0.5
    B (target):    GT 2 px, prediction 4 px, 1 shared         I=1 U=5 IoU=0.2
    C (no-target): empty prediction                           I=0 U=0 IoU=1   (TP)
    D (no-target): prediction 3 px                            I=0 U=3 IoU=0   (FN)
    E (target):    GT 2 px, empty prediction                  I=0 U=2 IoU=0   (FP)
    """
    h = w = 4
    ga = _mask(h, w, [(0, 0), (0, 1), (1, 0), (1, 1)])
    gb = _mask(h, w, [(3, 3), (3, 2)])
    ge = _mask(h, w, [(2, 0), (2, 1)])
    empty = np.zeros((h, w), dtype=bool)
    gt = {
        "A": GroundTruth("A", "val", "human", _rle(ga)),
        "B": GroundTruth("B", "val", "category_multi", _rle(gb)),
        "C": GroundTruth("C", "val", "no_target", _rle(empty)),
        "D": GroundTruth("D", "ood_rare", "no_target", _rle(empty)),
        "E": GroundTruth("E", "ood_rare", "human", _rle(ge)),
    }
    preds = [
        _pred("A", _mask(h, w, [(0, 0), (1, 1)])),
        _pred("B", _mask(h, w, [(3, 3), (0, 3), (1, 3), (2, 3)])),
        _pred("C", None),
        _pred("D", _mask(h, w, [(2, 2), (2, 3), (1, 2)])),
        _pred("E", empty),  # an all-zero RLE is an empty prediction too
    ]
    return gt, preds


def test_metrics_match_hand_computed_values(hand_case):
    gt, preds = hand_case
    r = evaluate(gt, preds)
    o = r["overall"]
    assert o["n"] == 5 and o["n_target"] == 3 and o["n_no_target"] == 2
    assert o["cumulative_intersection_px"] == 3 and o["cumulative_union_px"] == 14
    assert o["cIoU"] == pytest.approx(3 / 14)
    assert o["gIoU"] == pytest.approx((0.5 + 0.2 + 1 + 0 + 0) / 5)
    assert o["mIoU"] == pytest.approx((0.5 + 0.2 + 0) / 3)
    assert o["no_target_confusion"] == {"TP": 1, "FN": 1, "TN": 2, "FP": 1}
    assert o["N_acc"] == pytest.approx(1 / 2)
    assert o["T_acc"] == pytest.approx(2 / 3)
    assert o["Pr@0.5"] == pytest.approx(1 / 3)  # only A reaches 0.5
    assert o["Pr@0.9"] == 0.0
    # Breakdowns: by kind, by split, and the ood_* group against the rest.
    assert r["by_kind"]["no_target"]["gIoU"] == pytest.approx(0.5)
    assert r["by_kind"]["no_target"]["mIoU"] is None
    assert r["by_kind"]["human"]["cIoU"] == pytest.approx(2 / 6)
    assert r["by_split"]["val"]["cIoU"] == pytest.approx(3 / 9)
    assert r["by_split"]["ood_rare"]["cIoU"] == pytest.approx(0 / 5)
    assert r["ood"]["n"] == 2 and r["in_distribution"]["n"] == 3
    assert r["ood"]["N_acc"] == 0.0 and r["in_distribution"]["N_acc"] == 1.0
    assert r["counts"] == {"ground_truth": 5, "predicted": 5, "missing": 0, "unknown": 0, "invalid": 0}


def test_polygon_and_uncompressed_rle_predictions(hand_case):
    gt, _ = hand_case
    # A as a polygon covering the top-left 2x2 block exactly (pixel edges 0..2).
    poly = {"sample_id": "A", "polygons": [[0, 0, 2, 0, 2, 2, 0, 2]]}
    # B as an uncompressed RLE equal to its ground truth.
    from pycocotools import mask as mask_utils

    m = np.asfortranarray(_mask(4, 4, [(3, 3), (3, 2)]).astype(np.uint8))
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    unc = {"sample_id": "B", "segmentation": {"size": [4, 4], "counts": runs}}
    assert mask_utils.area(mask_utils.frPyObjects(unc["segmentation"], 4, 4)) == 2
    r = evaluate({k: gt[k] for k in ("A", "B")}, [(1, poly), (2, unc)])
    assert r["overall"]["gIoU"] == pytest.approx(1.0)
    assert r["overall"]["cIoU"] == pytest.approx(1.0)


def test_missing_unknown_invalid_and_duplicate_predictions(hand_case):
    gt, preds = hand_case
    bad_size = (9, {"sample_id": "A", "segmentation": _rle(np.ones((3, 3), bool)).to_json()})
    r = evaluate(gt, [bad_size, preds[1], (10, {"sample_id": "nope", "segmentation": None})])
    c = r["counts"]
    assert c["missing"] == 3 and c["unknown"] == 1 and c["invalid"] == 1
    assert r["invalid"][0]["sample_id"] == "A" and "size" in r["invalid"][0]["error"]
    # Missing and invalid are scored as empty predictions: C and D become TP, A and E FP.
    assert r["overall"]["no_target_confusion"] == {"TP": 2, "FN": 0, "TN": 1, "FP": 2}
    with pytest.raises(EvalError, match="predicted twice"):
        evaluate(gt, [preds[0], preds[0]])


def test_cli_perfect_and_empty_predictions_on_demo(demo_output, tmp_path):
    gt = load_ground_truth(str(demo_output), ["val", "testA"])
    assert gt and any(g.no_target for g in gt.values()) and any(not g.no_target for g in gt.values())
    perfect = tmp_path / "perfect.jsonl"
    with open(perfect, "w") as f:
        for split in ("val", "testA"):
            for row in iter_rows(str(demo_output), split, ["samples"]):
                for s in row["samples"]:
                    seg = None if s["kind"] == "no_target" else s["union_rle"]
                    f.write(json.dumps({"sample_id": s["sample_id"], "segmentation": seg}) + "\n")
    report = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["eval", str(perfect), "--gt", str(demo_output), "--split", "val", "--split", "testA", "--out", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    o = rep["overall"]
    assert o["n"] == len(gt)
    assert o["cIoU"] == 1.0 and o["gIoU"] == 1.0 and o["mIoU"] == 1.0 and o["N_acc"] == 1.0 and o["T_acc"] == 1.0
    assert set(rep["by_split"]) == {"val", "testA"} and "no_target" in rep["by_kind"]

    # Empty predictions everywhere: every no-target sample right, every target sample wrong.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"sample_id": sid, "segmentation": None}) + "\n" for sid in gt))
    res = CliRunner().invoke(app, ["eval", str(empty), "--gt", str(demo_output), "--split", "val", "--split", "testA"])
    assert res.exit_code == 0, res.output
    # The report must not be overwritten.
    res = CliRunner().invoke(app, ["eval", str(empty), "--gt", str(demo_output), "--out", str(report)])
    assert res.exit_code == 2 and "already exists" in res.output
    r = evaluate(gt, [(0, {"sample_id": sid, "segmentation": None}) for sid in gt])["overall"]
    assert r["N_acc"] == 1.0 and r["T_acc"] == 0.0 and r["cIoU"] == 0.0
    assert r["gIoU"] == pytest.approx(r["n_no_target"] / r["n"])


@pytest.fixture
def protocol_case():
    """Three samples on 10x20 images, the no-target conventions' worked comparison.

    A (target):    GT 100 px, prediction 50 px inside it   I=50 U=100
    B (no-target): empty prediction                        I=0  U=0
    C (no-target): prediction 20 px                        I=0  U=20
    """
    h, w = 10, 20
    ga = np.zeros((h, w), bool)
    ga[:, :10] = True
    pa = np.zeros((h, w), bool)
    pa[:5, :10] = True
    pc = np.zeros((h, w), bool)
    pc[:2, 10:] = True
    empty = np.zeros((h, w), bool)
    gt = {
        "A": GroundTruth("A", "val", "human", _rle(ga)),
        "B": GroundTruth("B", "val", "no_target", _rle(empty)),
        "C": GroundTruth("C", "val", "no_target", _rle(empty)),
    }
    return gt, [_pred("A", pa), _pred("B", None), _pred("C", pc)]


@pytest.mark.parametrize(
    ("protocol", "n", "giou", "skipped"),
    [
        # GRES: B scores 1 -> (0.5 + 1 + 0) / 3.
        ("orsgen", 3, 0.5, None),
        # Seg-Zero's evaluation.py: compute_iou returns a bare 0 for U = 0, the
        # unpacking fails and the sample is skipped -> (0.5 + 0) / 2.
        ("segzero", 2, 0.25, 1),
        # VisionReasoner's calculate_iou_with_bbox.py: I / U if U > 0 else 0 -> (0.5 + 0 + 0) / 3.
        ("visionreasoner", 3, 0.5 / 3, None),
        # Its _nonobj script: non_object (both empty) scores 1 -> as orsgen.
        ("visionreasoner-nonobj", 3, 0.5, None),
    ],
)
def test_protocols_reproduce_each_repositorys_no_target_rule(protocol_case, protocol, n, giou, skipped):
    gt, preds = protocol_case
    o = evaluate(gt, preds, protocol)["overall"]
    assert o["n"] == n
    assert o["gIoU"] == pytest.approx(giou, abs=1e-12)
    assert o["cIoU"] == pytest.approx(50 / 120, abs=1e-12)  # ΣI / ΣU: the empty pair adds nothing
    assert o.get("skipped_empty_union") == skipped
    if protocol == "visionreasoner-nonobj":
        assert o["N_acc"] == 0.5  # N-Acc = Σ non_object / Σ non_object_GT = 1 / 2


def test_protocol_edge_cases(protocol_case):
    gt, preds = protocol_case
    with pytest.raises(EvalError, match="unknown protocol"):
        evaluate(gt, preds, "lisa")
    # Only empty pairs: orsgen's cIoU is 1 (all correct), the repositories' calculate_iou give 0.
    only_b = {"B": gt["B"]}
    assert evaluate(only_b, [preds[1]])["overall"]["cIoU"] == 1.0
    assert evaluate(only_b, [preds[1]], "visionreasoner")["overall"]["cIoU"] == 0.0
    seg = evaluate(only_b, [preds[1]], "segzero")["overall"]
    assert seg["n"] == 0 and seg["gIoU"] is None and seg["skipped_empty_union"] == 1


def test_cli_protocol_option(demo_output, tmp_path):
    gt = load_ground_truth(str(demo_output), ["val"])
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"sample_id": sid, "segmentation": g.rle.to_json()}) + "\n" for sid, g in gt.items()))
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", str(preds), "--gt", str(demo_output), "--split", "val", "--protocol", "segzero", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    n_nt = sum(g.no_target for g in gt.values())
    assert r["protocol"] == "segzero" and r["overall"]["skipped_empty_union"] == n_nt > 0
    assert r["overall"]["n"] == len(gt) - n_nt and r["overall"]["gIoU"] == 1.0
    bad = CliRunner().invoke(app, ["eval", str(preds), "--gt", str(demo_output), "--protocol", "lisa"])
    assert bad.exit_code != 0 and "unknown protocol" in bad.output
