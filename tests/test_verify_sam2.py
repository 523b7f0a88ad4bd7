"""SAM2 filter and cleaner: the real transformers Sam2Model at tiny random weights.

The backend tests run transformers' SAM2 code on CPU with a ~0.1 M-parameter
model built from a config and saved with ``save_pretrained``; the decision
logic is tested on constructed masks and predictions, where the IoUs are
known exactly; the Beam tests run the stage inside the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")

from orsgen.pipelines.demo_data import demo_scene  # noqa: E402
from orsgen.schemas.config import ConfigError, VerifySam2Config, config_from_dict  # noqa: E402
from orsgen.schemas.records import (  # noqa: E402
    ExpressionKind,
    ImageExample,
    ImageRecord,
    Instance,
    Ref,
    RefSentence,
    RejectLevel,
    Sample,
)
from orsgen.stages.verify import sam2 as v  # noqa: E402
from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, rle_iou, xywh_to_xyxy  # noqa: E402
from orsgen.stages.verify.backend import (  # noqa: E402
    MetaSam2Backend,
    Sam2Prediction,
    TransformersSam2Backend,
)
from sam2_random import save_random_sam2  # noqa: E402  (tests/ helper)
from orsgen.stages.dataset.sam2_report import ReportAccumulator, histogram_png, summarize, write_report  # noqa: E402
from orsgen.stages.common.targets import attach_targets  # noqa: E402

H, W = 60, 80


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory) -> Path:
    """A random tiny SAM2 checkpoint (model + processor) in save_pretrained layout."""
    return save_random_sam2(tmp_path_factory.mktemp("sam2") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def backend(tiny_sam2) -> TransformersSam2Backend:
    return TransformersSam2Backend(str(tiny_sam2), device="cpu", prompts_per_batch=4)


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _instance(iid: str, mask: np.ndarray, origin: str = "polygon", ann_id: int | None = None, image_id: str = "coco:1") -> Instance:
    rle = encode_mask(mask)
    box = rle_bbox_xywh(rle)
    return Instance(iid, image_id, rle, box, xywh_to_xyxy(box), rle_area(rle), category_id=1, source_ann_id=ann_id,
                    mask_origin=origin)


def _scene_example(seed: int = 0, image_id: int = 100_001, key: str = "t-coco_1") -> ImageExample:
    """A demo scene as an ImageExample with polygon instances and one sample per object."""
    image, objects = demo_scene(seed, "coco", image_id)
    h, w = image.shape[:2]
    insts = tuple(_instance(f"coco:{image_id}/ann:{i}", o.mask, ann_id=i, image_id=f"coco:{image_id}")
                  for i, o in enumerate(objects))
    by_id = {i.instance_id: i for i in insts}
    samples = tuple(
        attach_targets(Sample(f"{key}-s{i}", f"coco:{image_id}", f"object {i}", str(ExpressionKind.HUMAN), (inst.instance_id,)),
                       by_id, w, h)
        for i, inst in enumerate(insts)
    )
    data = _jpeg(image)
    rec = ImageRecord(f"coco:{image_id}", "coco", "mem://x.jpg", w, h, "0" * 64, "x.jpg")
    return ImageExample(key, rec, data, insts, (), samples, input_name="coco")


def _box(mask_slice: tuple[slice, slice]) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[mask_slice] = True
    return m


def _example(instances, samples=(), refs=()) -> ImageExample:
    rec = ImageRecord("coco:1", "coco", "mem://1.jpg", W, H, "0" * 64, "1.jpg")
    return ImageExample("in-coco_1", rec, b"", tuple(instances), tuple(refs), tuple(samples), input_name="in")


def _pred(iid: str, masks: list[np.ndarray], scores: list[float], multimask: bool) -> Sam2Prediction:
    return Sam2Prediction(iid, multimask, tuple(encode_mask(m) for m in masks), tuple(scores))


def _cfg(**kw) -> VerifySam2Config:
    return VerifySam2Config.model_validate(kw)


# ------------------------------------------------------------------ backend (real model)


def test_batched_prompts_match_one_prompt_per_call(backend):
    ex = _scene_example()
    prompts = [v.instance_prompt(i, multimask_output=mm) for i in ex.instances for mm in (True, False)]
    assert len(prompts) >= 6  # more prompts than prompts_per_batch=4: several decoder chunks
    batched = backend.predict_images([(ex.image_bytes, prompts)])[0]
    single = backend.predict_one_prompt_per_call(ex.image_bytes, prompts)
    assert [p.instance_id for p in batched] == [p.instance_id for p in prompts]
    for b, s, p in zip(batched, single, prompts):
        assert len(b.masks) == (3 if p.multimask_output else 1) == len(b.pred_ious)
        assert all(m.size == (ex.image.height, ex.image.width) for m in b.masks)
        # Identical up to pixels whose logit sits on the threshold, where batched
        # and single matmuls may round differently (random weights have many).
        assert all(rle_iou(x, y) >= 0.99 for x, y in zip(b.masks, s.masks))
        np.testing.assert_allclose(b.pred_ious, s.pred_ious, atol=1e-4)
    identical = sum(b.masks == s.masks for b, s in zip(batched, single))
    assert identical >= 0.8 * len(prompts)
    # The comparison has power: different prompts give different masks.
    assert len({b.masks[0] for b in batched}) > len(prompts) // 2


def test_encoder_batch_across_images_matches_per_image(backend):
    a, b = _scene_example(0, 100_001), _scene_example(0, 100_002)
    pa = [v.instance_prompt(i, False) for i in a.instances]
    pb = [v.instance_prompt(i, True) for i in b.instances]
    together = backend.predict_images([(a.image_bytes, pa), (b"not an image: never decoded", ()), (b.image_bytes, pb)])
    assert together[1] == []
    assert together[0] == backend.predict_images([(a.image_bytes, pa)])[0]
    assert together[2] == backend.predict_images([(b.image_bytes, pb)])[0]


def test_image_encoder_runs_once_per_batch_and_decoder_in_prompt_chunks(backend):
    # The point of the backend: the encoder once per image (here one call for a
    # batch of two images), never once per prompt; the decoder in chunks of
    # prompts_per_batch (4) per image and mode.
    a, b = _scene_example(0, 100_001), _scene_example(0, 100_002)
    pa = [v.instance_prompt(i, False) for i in a.instances]
    pb = [v.instance_prompt(i, mm) for i in b.instances for mm in (False, True)]
    calls = {"encoder": 0, "decoder": 0}
    model = backend._model  # counting calls of the real modules
    hooks = [
        model.vision_encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1)),
        model.mask_decoder.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1)),
    ]
    try:
        preds = backend.predict_images([(a.image_bytes, pa), (b.image_bytes, pb)])
    finally:
        for h in hooks:
            h.remove()
    assert [len(p) for p in preds] == [len(pa), len(pb)]
    assert calls["encoder"] == 1
    assert calls["decoder"] == math.ceil(len(pa) / 4) + 2 * math.ceil(len(b.instances) / 4)


def test_bfloat16_runs_and_describes_itself(tiny_sam2):
    be = TransformersSam2Backend(str(tiny_sam2), device="cpu", dtype="bfloat16")
    assert be.describe() == {"backend": "transformers", "model": str(tiny_sam2), "device": "cpu", "dtype": "bfloat16"}
    ex = _scene_example()
    preds = be.predict_images([(ex.image_bytes, [v.instance_prompt(ex.instances[0], True)])])[0]
    assert len(preds[0].masks) == 3 and all(math.isfinite(s) for s in preds[0].pred_ious)


def test_missing_model_and_bad_device_say_what_to_do(tmp_path):
    with pytest.raises(OSError):
        TransformersSam2Backend(str(tmp_path / "no-such-model"), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="verify_sam2.device=cpu"):
            TransformersSam2Backend(str(tmp_path), device="cuda")


def test_meta_backend_import_error_names_github_install():
    try:
        import sam2.sam2_image_predictor  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="github.com/facebookresearch/sam2"):
            MetaSam2Backend("facebook/sam2.1-hiera-large", device="cpu")
    else:  # pragma: no cover - Meta's package is not installed in CI
        pytest.skip("Meta's sam2 is importable here")


# ------------------------------------------------------------------ decisions (constructed IoUs)


def test_choose_candidate_takes_highest_predicted_iou_first_on_ties():
    a, b, c = _box(np.s_[0:10, 0:10]), _box(np.s_[0:20, 0:20]), _box(np.s_[0:30, 0:30])
    mask, score = v.choose_candidate(_pred("i", [a, b, c], [0.2, 0.9, 0.9], True))
    assert mask == encode_mask(b) and score == 0.9
    with pytest.raises(ValueError, match="one score per candidate"):
        v.choose_candidate(Sam2Prediction("i", True, (encode_mask(a),), ()))


@pytest.mark.parametrize(
    "iou,pred_iou,area,accepted,reason",
    [
        (0.80, 0.90, 10, True, ""),
        (0.70, 0.85, 10, True, ""),  # both bounds inclusive
        (0.69, 0.99, 10, False, "iou_below_band"),
        (0.99, 0.99, 10, False, "iou_above_band"),
        (0.80, 0.84, 10, False, "low_pred_iou"),
        (0.80, 0.99, 0, False, "empty_prediction"),
    ],
)
def test_clean_decision(iou, pred_iou, area, accepted, reason):
    cfg = _cfg(clean={"enabled": True, "iou_band": [0.7, 0.95], "pred_iou_thresh": 0.85}).clean
    assert v.clean_decision(iou, pred_iou, area, cfg) == (accepted, reason)


def test_consistent_is_every_target_at_threshold():
    assert v.consistent([0.6, 0.9], 0.6)
    assert not v.consistent([0.59, 0.9], 0.6)
    assert v.consistent([], 0.6)


def _two_target_image():
    a = _instance("coco:1/ann:1", _box(np.s_[10:30, 10:30]), "rle", 1)
    b = _instance("coco:1/ann:2", _box(np.s_[10:30, 40:60]), "polygon", 2)
    by_id = {a.instance_id: a, b.instance_id: b}
    s_ab = attach_targets(Sample("s-ab", "coco:1", "both", "human", (a.instance_id, b.instance_id)), by_id, W, H)
    s_b = attach_targets(Sample("s-b", "coco:1", "right one", "human", (b.instance_id,)), by_id, W, H)
    s_none = attach_targets(Sample("s-none", "coco:1", "the giraffe", "no_target", ()), by_id, W, H)
    ref = Ref(7, "coco:1", (2,), (1,), "val", (RefSentence(1, "right one", "right one"),), "refcoco_unc")
    return a, b, _example([a, b], [s_ab, s_b, s_none], [ref])


def test_plan_prompts_dedupes_shared_targets_and_skips_no_target():
    a, b, ex = _two_target_image()
    cfg = _cfg(filter={"enabled": True})
    prompts = v.plan_prompts(ex, cfg, "coco")
    assert [(p.instance_id, p.multimask_output) for p in prompts] == [(a.instance_id, False), (b.instance_id, False)]
    t = ex.samples[0].targets[0]
    assert prompts[0].box_xyxy == t.bbox_xyxy
    assert prompts[0].points_xy == ((t.point_1[0] + 0.5, t.point_1[1] + 0.5), (t.point_2[0] + 0.5, t.point_2[1] + 0.5))
    # The cleaner adds the polygon instance in its own mode; the same mode would share the prompt.
    both = v.plan_prompts(ex, _cfg(filter={"enabled": True}, clean={"enabled": True}), "coco")
    assert [(p.instance_id, p.multimask_output) for p in both] == [
        (a.instance_id, False), (b.instance_id, False), (b.instance_id, True)]
    same = v.plan_prompts(ex, _cfg(filter={"enabled": True, "multimask_output": True}, clean={"enabled": True}), "coco")
    assert len(same) == 2
    assert v.plan_prompts(ex, cfg, "sa1b") != ()
    assert v.plan_prompts(ex, _cfg(filter={"enabled": True}, apply_to=["sa1b"]), "coco") == ()
    assert v.plan_prompts(ex, _cfg(filter={"enabled": True, "kinds": ["category_single"]}), "coco") == ()
    assert v.plan_prompts(ex, _cfg(), "coco") == ()


def test_clean_scope_referred_only_cleans_instances_samples_refer_to():
    a, b, ex = _two_target_image()
    lone = _instance("coco:1/ann:3", _box(np.s_[40:55, 5:20]), "polygon", 3)
    ex = ex.replace(instances=ex.instances + (lone,))
    ids = lambda cfg: [p.instance_id for p in v.plan_prompts(ex, cfg, "coco")]  # noqa: E731
    assert ids(_cfg(clean={"enabled": True})) == [b.instance_id, lone.instance_id]
    assert ids(_cfg(clean={"enabled": True, "scope": "referred"})) == [b.instance_id]


def test_filter_keeps_consistent_samples_and_rejects_the_rest_with_ious():
    a, b, ex = _two_target_image()
    cfg = _cfg(filter={"enabled": True, "iou_thresh": 0.6}, model="tiny")
    # a: exact (IoU 1); b: shifted by 6 of 20 columns -> IoU 14/26 = 0.538
    preds = [
        _pred(a.instance_id, [_box(np.s_[10:30, 10:30])], [0.9], False),
        _pred(b.instance_id, [_box(np.s_[10:30, 46:66])], [0.9], False),
    ]
    res = v.apply_predictions(ex, preds, cfg, input_type="coco")
    kept = {s.sample_id: s for s in res.example.samples}
    assert set(kept) == {"s-none"}  # both samples involve b; no_target passes untouched
    assert kept["s-none"] == ex.samples[2]
    rej = {r.source_key: r for r in res.rejects}
    assert set(rej) == {"s-ab", "s-b"}
    assert all(r.reason == "sam2_inconsistent" and r.level == RejectLevel.SAMPLE for r in rej.values())
    assert "[1.000, 0.538]" in rej["s-ab"].message and b.instance_id in rej["s-ab"].message
    # With a lower threshold both pass, and the IoUs are recorded per target.
    res = v.apply_predictions(ex, preds, _cfg(filter={"enabled": True, "iou_thresh": 0.5}, model="tiny"), input_type="coco")
    s_ab = next(s for s in res.example.samples if s.sample_id == "s-ab")
    assert s_ab.sam2_ious == pytest.approx((1.0, 14 / 26), abs=1e-6)
    assert s_ab.metadata["sam2"]["model"] == "tiny"
    assert res.rejects == ()
    kinds = {(o.kind, o.item_id, o.action) for o in res.outcomes}
    assert ("filter", b.instance_id, "passed") in kinds and ("sample", "s-ab", "passed") in kinds


def _clean_cfg(on_reject: str) -> VerifySam2Config:
    return _cfg(clean={"enabled": True, "iou_band": [0.7, 1.0], "pred_iou_thresh": 0.8, "on_reject": on_reject})


def test_cleaner_refines_and_recomputes_sample_targets():
    a, b, ex = _two_target_image()
    # Three candidates; the chosen one (best predicted IoU) trims 2 columns: IoU 18/20 = 0.9.
    refined = _box(np.s_[10:30, 40:58])
    preds = [_pred(b.instance_id, [_box(np.s_[0:5, 0:5]), refined, _box(np.s_[10:30, 40:60])], [0.5, 0.95, 0.9], True)]
    plan = v.plan_prompts(ex, _clean_cfg("drop"), "coco")
    res = v.apply_predictions(ex, preds, _clean_cfg("drop"), prompts=plan, input_type="coco")
    assert res.rejects == ()
    nb = next(i for i in res.example.instances if i.instance_id == b.instance_id)
    assert nb.mask_origin == "sam2_refined" and nb.rle == encode_mask(refined)
    assert nb.area_px == 18 * 20 and nb.bbox_xyxy == (40.0, 10.0, 58.0, 30.0)
    assert nb.predicted_iou == pytest.approx(0.95) and nb.point_coords == plan[0].points_xy
    assert next(i for i in res.example.instances if i.instance_id == a.instance_id) == a  # not a polygon: untouched
    s_b = next(s for s in res.example.samples if s.sample_id == "s-b")
    assert s_b.union_rle == encode_mask(refined) and s_b.targets[0].bbox_xyxy == (40.0, 10.0, 58.0, 30.0)
    assert s_b.metadata["sam2"]["clean"][b.instance_id]["action"] == "refined"
    s_ab = next(s for s in res.example.samples if s.sample_id == "s-ab")
    assert s_ab.union_rle == encode_mask(refined | _box(np.s_[10:30, 10:30]))
    [o] = res.outcomes
    assert (o.kind, o.action, o.iou, o.original, o.predicted) == ("clean", "refined", pytest.approx(0.9), b.rle, encode_mask(refined))


@pytest.mark.parametrize("on_reject", ["keep", "flag", "drop"])
def test_cleaner_on_reject_keep_flag_drop(on_reject):
    a, b, ex = _two_target_image()
    far = _box(np.s_[40:60, 0:20])  # IoU 0 with b: SAM2 segmented something else
    res = v.apply_predictions(ex, [_pred(b.instance_id, [far], [0.99], True)], _clean_cfg(on_reject), input_type="coco")
    ids = {i.instance_id for i in res.example.instances}
    [o] = res.outcomes
    assert o.reason == "iou_below_band"
    if on_reject in ("keep", "flag"):
        assert ids == {a.instance_id, b.instance_id} and res.rejects == ()
        assert res.example.instances == ex.instances and res.example.refs == ex.refs
        assert o.action == {"keep": "kept", "flag": "flagged"}[on_reject]
        s_b = next(s for s in res.example.samples if s.sample_id == "s-b")
        assert s_b.union_rle == ex.samples[1].union_rle
        assert ("flagged" in s_b.metadata["sam2"]) == (on_reject == "flag")
        return
    assert ids == {a.instance_id} and o.action == "dropped"
    by_level = {(r.level, r.source_key): r.reason for r in res.rejects}
    assert by_level == {
        (RejectLevel.INSTANCE, b.instance_id): "sam2_unrecoverable_mask",
        (RejectLevel.REF, "in#ref:7"): "sam2_target_dropped",
        (RejectLevel.SAMPLE, "s-ab"): "sam2_target_dropped",
        (RejectLevel.SAMPLE, "s-b"): "sam2_target_dropped",
    }
    assert [s.sample_id for s in res.example.samples] == ["s-none"] and res.example.refs == ()


def test_missing_prediction_is_a_bug_not_a_silent_pass():
    a, b, ex = _two_target_image()
    with pytest.raises(KeyError, match="no SAM2 prediction"):
        v.apply_predictions(ex, [], _cfg(filter={"enabled": True}), input_type="coco")


# ------------------------------------------------------------------ report


def _outcome(kind, iid, action, iou, key="k"):
    m = encode_mask(_box(np.s_[0:10, 0:10]))
    return v.Sam2Outcome(kind, key, "coco:1", iid, action, iou, 0.9, "", (0, 0, 10, 10), m, m)


def test_report_accumulator_merge_equals_sequential_and_keeps_worst():
    outs = [_outcome("clean", f"i{i}", "refined" if i % 3 else "dropped", (i * 37 % 100) / 100) for i in range(50)]
    seq = ReportAccumulator(bins=10, worst_n=5)
    for o in outs:
        seq.add(o)
    left, right = ReportAccumulator(bins=10, worst_n=5), ReportAccumulator(bins=10, worst_n=5)
    for o in outs[:20]:
        left.add(o)
    for o in outs[20:]:
        right.add(o)
    merged = left.merge(right).finish()
    seq.finish()
    assert merged.counts == seq.counts and merged.hists == seq.hists and merged.worst == seq.worst
    assert [o.iou for o in merged.worst["clean"]] == sorted(o.iou for o in outs)[:5]
    summary = summarize(merged, _cfg(clean={"enabled": True}))
    assert summary["cleaner"]["dropped"] == 17 and summary["cleaner"]["refined"] == 33
    assert sum(summary["histograms"]["clean"]) == 50
    png = histogram_png(summary)
    assert png.startswith(b"\x89PNG") and png == histogram_png(summary)  # deterministic bytes


def test_write_report_is_atomic_and_never_overwrites(tmp_path):
    files = {"report.json": b"{}\n", "a.png": b"\x89PNG..."}
    paths = write_report(str(tmp_path), files)
    assert sorted(Path(p).name for p in paths) == ["a.png", "report.json"]
    assert write_report(str(tmp_path), files) == paths  # same bytes: a rerun is fine
    with pytest.raises(FileExistsError, match="never overwrites"):
        write_report(str(tmp_path), {"report.json": b"{\"other\": 1}\n"})
    folder = tmp_path / "reports" / "verify_sam2"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "report.json"]  # no temp files left


# ------------------------------------------------------------------ config


def test_config_is_off_by_default_and_errors_name_the_key():
    cfg = config_from_dict({"inputs": [{"type": "coco", "name": "c", "annotations": "a", "images": "i"}]})
    assert not cfg.verify_sam2.active and cfg.verify_sam2.filter.iou_thresh == 0.6
    with pytest.raises(ConfigError, match=r"verify_sam2.clean.on_reject = \"delete\""):
        config_from_dict({"inputs": [{"type": "coco", "name": "c", "annotations": "a", "images": "i"}],
                          "verify_sam2": {"clean": {"on_reject": "delete"}}})
    with pytest.raises(ConfigError, match="iou_band"):
        config_from_dict({"inputs": [{"type": "coco", "name": "c", "annotations": "a", "images": "i"}],
                          "verify_sam2": {"clean": {"iou_band": [0.9, 0.5]}}})
    # A misspelt kind would silently verify nothing: it is an error instead.
    with pytest.raises(ConfigError, match=r"verify_sam2.filter.kinds.0 = \"humman\""):
        config_from_dict({"inputs": [{"type": "coco", "name": "c", "annotations": "a", "images": "i"}],
                          "verify_sam2": {"filter": {"kinds": ["humman"]}}})


def test_refcoco_m_config_loads():
    from orsgen.schemas.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "refcoco_m.yaml")
    vs = cfg.verify_sam2
    assert vs.clean.enabled and vs.clean.on_reject == "drop" and vs.clean.scope == "referred"
    assert [i.type for i in cfg.inputs] == ["refcoco"] and cfg.inputs[0].splits == ["val"]


# ------------------------------------------------------------------ Beam


def test_model_handler_batches_by_image_and_shares_big_models():
    from orsgen.pipelines.verify_sam2 import Sam2ModelHandler

    h = Sam2ModelHandler(_cfg(images_per_batch=3))
    assert h.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 3}
    # One model per GPU machine by default, not one per SDK process.
    assert h.share_model_across_processes()
    assert not Sam2ModelHandler(_cfg(share_model_across_processes=False)).share_model_across_processes()
    shared = Sam2ModelHandler(_cfg(share_model_across_processes=True, model_copies=2))
    assert shared.share_model_across_processes() and shared.model_copies() == 2


def test_beam_stage_refines_and_turns_failed_inference_into_image_rejects(tiny_sam2, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from orsgen.pipelines.verify_sam2 import VerifySam2

    good = _scene_example(0, 100_001, key="coco-coco_100001")
    bad = dataclasses.replace(_scene_example(0, 100_002, key="coco-coco_100002"), image_bytes=b"\xff\xd8 truncated")
    cfg = config_from_dict({
        "inputs": [{"type": "coco", "name": "coco", "annotations": "a", "images": "i"}],
        "verify_sam2": {"model": str(tiny_sam2), "device": "cpu", "images_per_batch": 1,
                        "clean": {"enabled": True, "iou_band": [0.0, 1.0], "pred_iou_thresh": 0.0}},
    })
    with TestPipeline(runner="FnApiRunner") as p:
        examples, rejects, events = p | beam.Create([good, bad]) | VerifySam2(cfg, str(tmp_path))
        assert_that(examples | "Key" >> beam.Map(lambda e: e.key), equal_to([good.key]), label="OnlyGood")
        assert_that(examples | "Origins" >> beam.FlatMap(lambda e: sorted({i.mask_origin for i in e.instances})),
                    equal_to(["sam2_refined"]), label="Refined")

        def union_is_refined(e):
            by = {i.instance_id: i.rle for i in e.instances}
            return all(s.union_rle == by[s.target_ids[0]] for s in e.samples)

        assert_that(examples | "Unions" >> beam.Map(union_is_refined), equal_to([True]), label="Targets")
        assert_that(rejects | "R" >> beam.Map(lambda r: (r.source_key, r.reason, str(r.level))),
                    equal_to([(bad.key, "sam2_inference_failed", "image")]), label="DeadLetter")
        assert_that(events | "E" >> beam.Filter(lambda e: e[0] == "dropped_with_image/samples"),
                    equal_to([("dropped_with_image/samples", len(bad.samples))]), label="Events")
    report = json.loads((tmp_path / "reports" / "verify_sam2" / "report.json").read_text())
    assert report["cleaner"]["refined"] == len(good.instances)
    assert (tmp_path / "reports" / "verify_sam2" / "worst_clean.png").read_bytes().startswith(b"\x89PNG")


def test_pipeline_end_to_end_reconciles_with_filter_and_cleaner(tiny_sam2, tmp_path):
    from orsgen.pipelines.run import run_pipeline
    from orsgen.pipelines.demo_data import generate_demo_inputs
    from orsgen.schemas.config import load_config

    cfg_path = generate_demo_inputs(tmp_path / "in", seed=0, n_sa1b_shards=1, sa1b_images_per_shard=1,
                                    n_coco_images=2, n_ref_images=3)
    # A random model agrees with no polygon (IoU ~0.01): with a narrow band every
    # polygon instance is dropped, exercising instance, ref and sample rejects;
    # the filter at threshold 0 keeps the rest and records their IoUs.
    cfg = load_config(cfg_path, [
        f"verify_sam2.model={tiny_sam2}", "verify_sam2.device=cpu",
        "verify_sam2.filter.enabled=true", "verify_sam2.filter.iou_thresh=0.0",
        "verify_sam2.clean.enabled=true", "verify_sam2.clean.iou_band=[0.99, 1.0]",
        "verify_sam2.clean.on_reject=drop",
    ])
    out = tmp_path / "dataset"
    manifest = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    levels = manifest["counts"]["levels"]
    assert all(lv["reconciled"] for lv in levels.values()), levels
    reasons = manifest["counts"]["rejected_by_reason"]
    assert reasons.get("instance/sam2_unrecoverable_mask", 0) > 0
    assert reasons.get("sample/sam2_target_dropped", 0) > 0 and reasons.get("ref/sam2_target_dropped", 0) > 0
    assert "sample/sam2_inconsistent" not in reasons

    rows = pq.read_table(out / "parquet").to_pylist()
    instances = [i for r in rows for i in r["instances"]]
    assert instances and not any(i["mask_origin"] == "polygon" for i in instances)
    verified = [s for r in rows for s in r["samples"] if s["kind"] != "no_target"]
    assert verified and all(len(s["sam2_ious"]) == len(s["target_ids"]) for s in verified)
    assert all(s["sam2_ious"] == [] for r in rows for s in r["samples"] if s["kind"] == "no_target")

    report = json.loads((out / "reports" / "verify_sam2" / "report.json").read_text())
    assert report["cleaner"]["dropped"] == reasons["instance/sam2_unrecoverable_mask"]
    assert report["filter"]["samples_passed"] == len(verified)
    names = sorted(p.name for p in (out / "reports" / "verify_sam2").iterdir())
    assert names == ["iou_histogram.png", "report.json", "worst_clean.png", "worst_filter.png"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_is_cuda_bfloat16_with_scores_close_to_float32(tiny_sam2):
    # Random weights put many mask logits on the threshold, so bf16 masks can
    # differ a lot from fp32 ones; the predicted IoUs (a smooth head) must not.
    ex = _scene_example()
    prompts = [v.instance_prompt(i, mm) for i in ex.instances for mm in (False, True)]
    bf16 = TransformersSam2Backend(str(tiny_sam2))
    assert bf16.describe()["device"] == "cuda" and bf16.describe()["dtype"] == "bfloat16"
    got = bf16.predict_images([(ex.image_bytes, prompts)])[0]
    ref = TransformersSam2Backend(str(tiny_sam2), device="cuda", dtype="float32").predict_images([(ex.image_bytes, prompts)])[0]
    for g, r, p in zip(got, ref, prompts):
        assert len(g.masks) == (3 if p.multimask_output else 1)
        assert all(m.size == (ex.image.height, ex.image.width) for m in g.masks)
        np.testing.assert_allclose(g.pred_ious, r.pred_ious, atol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batched_prompts_match_one_prompt_per_call(tiny_sam2):
    be = TransformersSam2Backend(str(tiny_sam2), device="cuda", dtype="float32", prompts_per_batch=4)
    ex = _scene_example()
    prompts = [v.instance_prompt(i, False) for i in ex.instances]
    batched = be.predict_images([(ex.image_bytes, prompts)])[0]
    single = be.predict_one_prompt_per_call(ex.image_bytes, prompts)
    ious = [rle_iou(b.masks[0], s.masks[0]) for b, s in zip(batched, single)]
    assert np.mean(ious) >= 0.95, ious
