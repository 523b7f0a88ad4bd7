"""CoRS / DeRS assembly and overlays, on constructed regions, boxes and answers.

Pure functions only (no model, no Beam): IoF merging, its fallbacks, label
grouping, the verification verdicts, the re-grounding IoU gate, the overlay's
pixels, and every reject reason these paths produce.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from orsgen.schemas.config import CorsConfig, DersConfig
from orsgen.schemas.records import ImageExample, ImageRecord, Instance, RejectLevel, Sample
from orsgen.stages.caption import cors, ders
from orsgen.stages.caption.overlay import OverlayError, OverlayStyle, decode_rgb, draw_targets, render_overlay
from orsgen.stages.common.masks import decode_crop, encode_mask, rle_area, rle_bbox_xywh, rle_iou, xywh_to_xyxy

H, W = 80, 100
IMG = "sa1b:7"


def _inst(n: int, mask: np.ndarray) -> Instance:
    rle = encode_mask(mask)
    b = rle_bbox_xywh(rle)
    return Instance(f"{IMG}/ann:{n}", IMG, rle, b, xywh_to_xyxy(b), rle_area(rle))


def _mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def scene() -> dict:
    """A dog split by SA-1B into two fragments, a second dog in one piece, a ball, a background."""
    dog_a_left = _mask(10, 30, 10, 25)
    dog_a_right = _mask(10, 30, 25, 40)
    dog_b = _mask(50, 70, 60, 90)
    ball = np.zeros((H, W), dtype=bool)
    yy, xx = np.mgrid[0:H, 0:W]
    ball |= (xx - 20) ** 2 + (yy - 60) ** 2 <= 8**2
    bg = ~(dog_a_left | dog_a_right | dog_b | ball)
    insts = (_inst(1, dog_a_left), _inst(2, dog_a_right), _inst(3, dog_b), _inst(4, ball), _inst(5, bg))
    rgb = np.full((H, W, 3), 90, dtype=np.uint8)
    ex = ImageExample(
        key="sa1b-sa_7",
        image=ImageRecord(IMG, "sa1b", "mem://7", W, H, "0" * 64),
        image_bytes=_png(rgb),
        instances=insts,
        input_name="sa1b",
    )
    return {"ex": ex, "dog_a": dog_a_left | dog_a_right, "dog_b": dog_b, "ball": ball, "insts": insts}


# ------------------------------------------------------------------ geometry


def test_iof_is_intersection_over_fragment(scene):
    box = (10.0, 10.0, 30.0, 30.0)  # covers all of the left half, a third of the right half
    bm = cors.box_rle(box, H, W)
    assert rle_area(bm) == 20 * 20
    iof = cors.iof_scores([i.rle for i in scene["insts"][:2]], bm)
    assert iof[0] == pytest.approx(1.0)
    assert iof[1] == pytest.approx(5 / 15)


def test_normalize_label_groups_variants():
    assert cors.normalize_label("The  Dog.") == cors.normalize_label("dog") == "dog"
    assert cors.normalize_label("an Apple") == "apple"
    assert cors.normalize_label("dogs") != "dog"
    assert cors.normalize_label("  ...  ") == ""


def test_clip_box_and_box_iou():
    assert cors.clip_box((-5, -5, 20, 10), W, H) == (0.0, 0.0, 20.0, 10.0)
    assert cors.clip_box((30, 10, 10, 20), W, H) == (10.0, 10.0, 30.0, 20.0)  # swapped corners
    assert cors.clip_box((200, 200, 300, 300), W, H) is None
    assert cors.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert cors.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert cors.box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


# ------------------------------------------------------------------ IoF merging and fallbacks


def test_fragments_inside_the_box_merge(scene):
    m = cors.match_box((9.0, 9.0, 41.0, 31.0), list(scene["insts"]), H, W, CorsConfig())
    assert m is not None and m.method == cors.MERGED
    assert m.fragment_ids == (f"{IMG}/ann:1", f"{IMG}/ann:2")
    assert rle_iou(m.rle, encode_mask(scene["dog_a"])) == 1.0
    assert m.box_iou > 0.85 and m.coverage > 0.85


def test_one_fragment_is_the_region_itself(scene):
    m = cors.match_box((59.0, 49.0, 91.0, 71.0), list(scene["insts"]), H, W, CorsConfig())
    assert m is not None and m.method == cors.SINGLE and m.fragment_ids == (f"{IMG}/ann:3",)


def test_partial_fragments_are_not_merged(scene):
    # The box holds the left half and a third of the right half: IoF 1.0 and 0.33.
    m = cors.match_box((10.0, 10.0, 30.0, 30.0), list(scene["insts"]), H, W, CorsConfig(fallback=[]))
    assert m is not None and m.fragment_ids == (f"{IMG}/ann:1",)
    # A low IoF threshold takes the right half too.
    m2 = cors.match_box((10.0, 10.0, 30.0, 30.0), list(scene["insts"]), H, W, CorsConfig(iof_thresh=0.3, fallback=[]))
    assert m2 is not None and m2.fragment_ids == (f"{IMG}/ann:1", f"{IMG}/ann:2")


def test_poor_coverage_fails_the_merge_then_best_region_fallback(scene):
    # A box far larger than the ball: the ball is inside (IoF 1) but fills little of it.
    box = (5.0, 45.0, 45.0, 78.0)
    regions = list(scene["insts"][:4])  # without the background, which would win on IoU
    strict = CorsConfig(fallback=[])
    assert cors.match_box(box, regions, H, W, strict) is None
    # best_region: the best mask IoU with the box is the ball's, but below 0.5 -> nothing.
    assert cors.match_box(box, regions, H, W, CorsConfig(fallback=["best_region"])) is None
    low = CorsConfig(fallback=["best_region"], fallback_min_iou=0.1)
    m = cors.match_box(box, regions, H, W, low)
    assert m is not None and m.method == cors.BEST_REGION and m.fragment_ids == (f"{IMG}/ann:4",)


def test_best_region_fallback_when_no_fragment_is_inside(scene):
    # The box cuts the second dog: IoF 0.73 < 0.8, but the dog has IoU 0.73 with the box.
    box = (60.0, 50.0, 82.0, 70.0)
    m = cors.match_box(box, list(scene["insts"]), H, W, CorsConfig(fallback=["best_region"]))
    assert m is not None and m.method == cors.BEST_REGION and m.fragment_ids == (f"{IMG}/ann:3",)


def test_box_fallback_uses_the_rectangle(scene):
    box = (0.0, 0.0, 6.0, 5.0)  # background corner: no fragment inside, no region like it
    m = cors.match_box(box, list(scene["insts"]), H, W, CorsConfig())
    assert m is not None and m.method == cors.BOX and m.fragment_ids == ()
    assert rle_area(m.rle) == 30
    assert cors.match_box(box, list(scene["insts"]), H, W, CorsConfig(fallback=["best_region"])) is None


# ------------------------------------------------------------------ label grouping


def test_grounding_groups_labels_into_single_and_multi(scene):
    ex = scene["ex"]
    grounded = [
        ("Dog", (9, 9, 41, 31)),
        ("the dog.", (59, 49, 91, 71)),
        ("dog", (59, 49, 91, 71)),  # a repeat of the box above
        ("ball", (11, 51, 30, 70)),
        ("", (1, 1, 3, 3)),
        ("cloud", (200, 200, 300, 300)),
    ]
    draft = cors.assemble_grounding(ex, grounded, CorsConfig())
    assert not draft.rejects
    by_label = {c.label: c for c in draft.candidates}
    assert set(by_label) == {"dog", "ball"}
    dog = by_label["dog"]
    assert dog.kind == "category_multi" and len(dog.target_ids) == 2
    assert f"{IMG}/ann:3" in dog.target_ids  # the whole second dog is an existing region
    merged = [i for i in dog.new_instances]
    assert [i.instance_id for i in merged] == [f"{IMG}/cors:0"] or [i.instance_id for i in merged] == [f"{IMG}/cors:1"]
    assert merged[0].mask_origin == "cors_merged"
    assert rle_iou(merged[0].rle, encode_mask(scene["dog_a"])) == 1.0
    assert by_label["ball"].kind == "category_single" and by_label["ball"].target_ids == (f"{IMG}/ann:4",)
    ev = dict(draft.events)
    assert ev["caption/cors_boxes"] == 6
    assert ev["caption/cors_box_duplicate"] == 1
    assert ev["caption/cors_box_empty_label"] == 1
    assert ev["caption/cors_box_outside_image"] == 1


def test_unmatched_box_rejects_its_whole_label(scene):
    cfg = CorsConfig(fallback=[])
    draft = cors.assemble_grounding(scene["ex"], [("dog", (9, 9, 41, 31)), ("dog", (0, 0, 6, 5))], cfg)
    assert not draft.candidates
    (r,) = draft.rejects
    assert r.reason == cors.NO_MATCH and r.level == RejectLevel.SAMPLE
    assert r.source_key == cors.cors_sample_id(scene["ex"].key, "dog")
    assert "1 of 2 boxes" in r.message


def test_too_many_boxes_rejects_whole_labels(scene):
    grounded = [("ball", (11, 51, 30, 70)), ("dog", (9, 9, 41, 31)), ("dog", (59, 49, 91, 71))]
    draft = cors.assemble_grounding(scene["ex"], grounded, CorsConfig(max_boxes_per_image=2))
    assert [c.label for c in draft.candidates] == ["ball"]
    assert [r.reason for r in draft.rejects] == [cors.TOO_MANY_BOXES]


def test_same_fragments_under_two_labels_share_one_instance(scene):
    grounded = [("dog", (9, 9, 41, 31)), ("animal", (9, 9, 41, 31))]
    draft = cors.assemble_grounding(scene["ex"], grounded, CorsConfig())
    ids = {c.target_ids for c in draft.candidates}
    assert ids == {(f"{IMG}/cors:0",)}


# ------------------------------------------------------------------ verification


def _draft(scene):
    grounded = [("dog", (9, 9, 41, 31)), ("dog", (59, 49, 91, 71)), ("ball", (11, 51, 30, 70)), ("sky", (0, 0, 6, 5))]
    return cors.assemble_grounding(scene["ex"], grounded, CorsConfig())


def test_verdicts_keep_drop_and_fail(scene):
    ex = scene["ex"]
    d = _draft(scene)
    sid = {c.label: c.sample_id for c in d.candidates}
    verdicts = {
        sid["dog"]: cors.Verdict(True, {"reason": "ok"}),
        sid["ball"]: cors.Verdict(False, {"missed_instances": 2}),
        sid["sky"]: ("vlm_malformed_output", "no JSON"),
    }
    samples, new, rejects = cors.finalize_cors(ex, d.candidates, verdicts, model="m", prompt_version="cors_ground@v1", verify=True)
    assert [s.sample_id for s in samples] == [sid["dog"]]
    s = samples[0]
    assert s.kind == "category_multi" and s.expression == "dog" and s.generator == "vlm" and s.model == "m"
    assert s.union_rle is not None and rle_area(s.union_rle) == int((scene["dog_a"] | scene["dog_b"]).sum())
    assert len(s.targets) == 2 and s.union_svg
    assert s.metadata["match"] == ["merged", "single_region"] and s.metadata["fallback"] is False
    # Only the instances of kept samples are added (the sky's box instance is not).
    assert [i.instance_id for i in new] == [t for t in s.target_ids if "/cors:" in t]
    reasons = {r.source_key: r.reason for r in rejects}
    assert reasons == {sid["ball"]: cors.VERIFY_FAILED, sid["sky"]: "vlm_malformed_output"}
    assert all(r.level == RejectLevel.SAMPLE for r in rejects)


def test_missing_verdict_is_a_reject_and_no_verify_keeps_all(scene):
    ex, d = scene["ex"], _draft(scene)
    samples, _new, rejects = cors.finalize_cors(ex, d.candidates, {}, model="m", prompt_version="p", verify=True)
    assert not samples and {r.reason for r in rejects} == {"vlm_backend_error"}
    samples, new, rejects = cors.finalize_cors(ex, d.candidates, {}, model="m", prompt_version="p", verify=False)
    assert len(samples) == 3 and not rejects
    sky = next(s for s in samples if s.expression == "sky")
    assert sky.metadata["fallback"] is True and sky.metadata["match"] == ["box"]
    assert any(i.mask_origin == "vlm_box" for i in new)


# ------------------------------------------------------------------ DeRS


def test_saliency_gate_and_cap(scene):
    ex = scene["ex"]
    chosen, events = ders.select_salient(ex, DersConfig(min_area_frac=0.05, max_regions_per_image=2))
    # 8000 px image: the halves (300 px) and the ball (~200 px) are under 400 px.
    assert [i.instance_id for i in chosen] == [f"{IMG}/ann:3", f"{IMG}/ann:5"]
    assert dict(events) == {"caption/ders_not_salient": 3}
    chosen, events = ders.select_salient(ex, DersConfig(min_area_frac=0.0, max_regions_per_image=2))
    assert dict(events) == {"caption/ders_over_cap": 3}


def test_reground_gate_keeps_at_threshold_and_rejects_below():
    cfg = DersConfig()
    target = (10.0, 10.0, 60.0, 60.0)
    keep, box, iou, why = ders.reground_check(target, [(10, 10, 60, 60)], W, H, cfg)
    assert keep and iou == 1.0 and not why
    keep, box, iou, why = ders.reground_check(target, [(10, 10, 60, 50)], W, H, cfg)  # IoU 0.8 exactly
    assert keep and iou == pytest.approx(0.8)
    keep, box, iou, why = ders.reground_check(target, [(10, 10, 60, 45)], W, H, cfg)
    assert not keep and iou == pytest.approx(0.7) and "0.700" in why
    keep, box, iou, why = ders.reground_check(target, [], W, H, cfg)
    assert not keep and box is None and iou == 0.0
    keep, box, iou, why = ders.reground_check(target, [(10, 10, 60, 60), (0, 0, 5, 5)], W, H, cfg)
    assert not keep and "2 distinct boxes" in why
    keep, *_ = ders.reground_check(target, [(10, 10, 60, 60), (0, 0, 5, 5)], W, H, DersConfig(reject_ambiguous=False))
    assert keep


def test_finalize_ders_samples_and_every_reject(scene):
    ex = scene["ex"]
    dog_b = scene["insts"][2]
    ball = scene["insts"][3]
    bg = scene["insts"][4]
    cands = [
        ders.DersCandidate(ders.ders_sample_id(ex.key, i.instance_id), i.instance_id, i.bbox_xyxy, f"thing {n}", "m", "ders_describe@v1")
        for n, i in enumerate((dog_b, ball, bg, scene["insts"][0]))
    ]
    results = {
        cands[0].sample_id: ders.RegroundResult((dog_b.bbox_xyxy,), "m", "reground@v1"),
        cands[1].sample_id: ders.RegroundResult(((0.0, 0.0, 10.0, 10.0),), "m", "reground@v1"),
        cands[2].sample_id: ("vlm_timeout", "no answer after 3 tries"),
    }
    samples, rejects = ders.finalize_ders(ex, cands, results, DersConfig())
    (s,) = samples
    assert isinstance(s, Sample) and s.kind == "description" and s.target_ids == (dog_b.instance_id,)
    assert s.reground_iou == 1.0 and s.reground_box == tuple(dog_b.bbox_xyxy)
    assert s.union_rle is not None and s.targets[0].qwen_box
    reasons = {r.source_key: (r.reason, r.message) for r in rejects}
    assert reasons[cands[1].sample_id][0] == ders.REGROUND_FAILED and "IoU 0.000" in reasons[cands[1].sample_id][1]
    assert reasons[cands[2].sample_id][0] == "vlm_timeout"
    assert reasons[cands[3].sample_id][0] == "vlm_backend_error"
    assert len(samples) + len(rejects) == len(cands)


# ------------------------------------------------------------------ overlay


def test_overlay_tints_the_mask_and_draws_contour_and_box(scene):
    ball = scene["insts"][3]
    rgb = np.full((H, W, 3), 90, dtype=np.uint8)
    style = OverlayStyle(image_format="PNG")
    out = decode_rgb(render_overlay(_png(rgb), [(ball.rle, ball.bbox_xyxy)], style))
    crop, (ox, oy) = decode_crop(ball.rle)
    inside = np.zeros((H, W), dtype=bool)
    inside[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    # The fill: every mask pixel away from the contour and box lines moved toward red.
    core = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=3).astype(bool)
    assert core.sum() > 40
    assert (out[core][:, 0] > 150).all() and (out[core][:, 1] < 90).all()
    # The contour: pure red on the mask's border (drawn without the box, which would cover part of it).
    no_box = decode_rgb(render_overlay(_png(rgb), [(ball.rle, ball.bbox_xyxy)], OverlayStyle(image_format="PNG", box_px=0)))
    border = inside & ~np.roll(inside, 1, 0) | inside & ~np.roll(inside, -1, 0)
    assert (no_box[border] == (255, 0, 0)).all(axis=1).mean() > 0.9
    # The box: green on its top edge row, inside the box's columns.
    x0, y0, x1, _y1 = (int(v) for v in ball.bbox_xyxy)
    assert (out[y0, x0 + 1 : x1 - 1, 1] == 255).all()
    # Far away: untouched.
    assert (out[0:5, 90:100] == 90).all()


def test_overlay_of_several_targets_and_errors(scene):
    rgb = np.full((H, W, 3), 90, dtype=np.uint8)
    targets = [(i.rle, i.bbox_xyxy) for i in scene["insts"][:3]]
    out = draw_targets(rgb, targets, OverlayStyle(box_px=0, contour_px=0))
    for i in scene["insts"][:3]:
        crop, (ox, oy) = decode_crop(i.rle)
        assert (out[oy : oy + crop.shape[0], ox : ox + crop.shape[1]][crop][:, 0] > 150).all()
    assert (rgb == 90).all()  # the input array is not modified
    with pytest.raises(OverlayError, match="disagrees"):
        draw_targets(np.zeros((10, 10, 3), dtype=np.uint8), targets)
    with pytest.raises(OverlayError, match="cannot decode"):
        render_overlay(b"not an image", targets)


def test_whole_region_beside_its_parts_is_reused(scene):
    whole = _inst(9, scene["dog_a"])
    regions = [*scene["insts"], whole]
    m = cors.match_box((9.0, 9.0, 41.0, 31.0), regions, H, W, CorsConfig())
    assert m is not None and m.method == cors.SINGLE and m.fragment_ids == (whole.instance_id,)


# ------------------------------------------------------------------ rounds: planning, answers, failures

from orsgen.pipelines import caption as cap  # noqa: E402
from orsgen.schemas.config import CaptionBackendConfig, CaptionConfig  # noqa: E402
from orsgen.stages.caption.types import VlmRequest, VlmResponse, VlmTask  # noqa: E402


def _ctx(**caption) -> "cap.CaptionContext":
    backend = CaptionBackendConfig(model="m", box_convention="relative_1000", max_image_side_px=1024)
    return cap.CaptionContext.from_config(CaptionConfig(enabled=True, backend=backend, **caption))


def _resp(req_id: str, text: str = "", error: str = "", message: str = "") -> VlmResponse:
    return VlmResponse(request_id=req_id, text=text, model="m", error=error, message=message)


def test_plan_round1_requests(scene):
    ex = scene["ex"]
    ctx = _ctx(ders=DersConfig(min_area_frac=0.05))
    reqs, rejects, events = cap.plan_round1(ex, ctx)
    assert not rejects
    tasks = [r.task for r in reqs]
    assert tasks.count("cors_ground") == 1 and tasks.count("ders_describe") == 2  # dog_b and background
    ground = next(r for r in reqs if r.task == "cors_ground")
    assert ground.request_id == f"{cors.cors_group_id(ex.key)}/cors_ground" and ground.images == (ex.image_bytes,)
    describe = next(r for r in reqs if r.region == f"{IMG}/ann:3")
    assert len(describe.images) == 2 and describe.images[0] == ex.image_bytes and describe.images[1] != ex.image_bytes
    # The target box [60, 50, 90, 70] in Qwen3-VL's 0..1000 convention on a 100 x 80 image.
    assert "[600, 625, 900, 875]" in describe.user
    assert events["caption/ders_not_salient"] == 3 and events["caption/requests_ders_describe"] == 2
    only_overlay = cap.plan_round1(ex, _ctx(paths=["ders"], ders=DersConfig(min_area_frac=0.05, send_original=False)))[0]
    assert [len(r.images) for r in only_overlay] == [1, 1]


def test_undrawable_image_is_rejected_while_planning(scene):
    ex = scene["ex"].replace(image_bytes=b"\xff\xd8 broken")
    ctx = _ctx(ders=DersConfig(min_area_frac=0.05))
    reqs, rejects, _ = cap.plan_round1(ex, ctx)
    # Grounding sends the bytes as they are (the client refuses them later); overlays need pixels.
    assert [r.task for r in reqs] == ["cors_ground"]
    assert {r.reason for r in rejects} == {"caption_image_failed"} and len(rejects) == 2
    state, rejects1, _ = cap.assemble_round1(ex, {r.request_id for r in reqs}, {}, ctx)
    assert [r.source_key for r in rejects1] == [cors.cors_group_id(ex.key)] and not state.ders_candidates


@pytest.mark.parametrize(
    ("text", "error", "reason"),
    [
        ("", "vlm_timeout", "vlm_timeout"),
        ("", "vlm_server_dead", "vlm_server_dead"),
        ("", "vlm_http_error", "vlm_http_error"),
        ("I'm sorry, I cannot help with that.", "", "vlm_refusal"),
        ("<|im_end|>", "", "vlm_empty_answer"),
        ("bbox bbox {{ [", "", "vlm_malformed_output"),
    ],
)
def test_round1_failures_are_sample_rejects(scene, text, error, reason):
    ex = scene["ex"]
    ctx = _ctx(ders=DersConfig(min_area_frac=0.05))
    reqs, _, _ = cap.plan_round1(ex, ctx)
    responses = {r.request_id: _resp(r.request_id, text, error, "details") for r in reqs}
    state, rejects, _ = cap.assemble_round1(ex, {r.request_id for r in reqs}, responses, ctx)
    assert not state.cors_candidates and not state.ders_candidates
    assert {r.reason for r in rejects} == {reason}
    assert sorted(r.source_key for r in rejects) == sorted(
        [cors.cors_group_id(ex.key), *(ders.ders_sample_id(ex.key, f"{IMG}/ann:{n}") for n in (3, 5))]
    )
    assert all(r.level == RejectLevel.SAMPLE and r.stage == "caption" for r in rejects)


def test_missing_response_is_a_backend_error_and_empty_grounding_is_nothing_found(scene):
    ex = scene["ex"]
    ctx = _ctx(paths=["cors"])
    reqs, _, _ = cap.plan_round1(ex, ctx)
    _state, rejects, _ = cap.assemble_round1(ex, {r.request_id for r in reqs}, {}, ctx)
    assert [r.reason for r in rejects] == ["vlm_backend_error"]
    rid = reqs[0].request_id
    state, rejects, events = cap.assemble_round1(ex, {rid}, {rid: _resp(rid, "[]")}, ctx)
    assert not rejects and not state.cors_candidates and events["caption/cors_nothing_found"] == 1


def _two_rounds(ex, ctx, answer_round1, answer_round2):
    reqs, rej0, _ = cap.plan_round1(ex, ctx)
    r1 = {r.request_id: _resp(r.request_id, answer_round1(r)) for r in reqs}
    state, rej1, _ = cap.assemble_round1(ex, {r.request_id for r in reqs}, r1, ctx)
    reqs2, rej2, _ = cap.plan_round2(state, ctx)
    r2 = {r.request_id: answer_round2(r) for r in reqs2}
    out, rej3, events = cap.assemble_round2(state, {r.request_id for r in reqs2}, r2, ctx)
    return out, [*rej0, *rej1, *rej2, *rej3], events, reqs2


def test_two_rounds_happy_path_and_round2_failures(scene):
    ex = scene["ex"]
    ctx = _ctx(ders=DersConfig(min_area_frac=0.05))

    def round1(r: VlmRequest) -> str:
        if r.task == "cors_ground":
            # 0..1000 boxes of the first dog (two fragments) and the ball, in Qwen's style.
            return '[{"bbox_2d": [90, 112, 410, 388], "label": "dog"}, {"bbox_2d": [110, 637, 300, 875], "label": "ball"}]'
        return '{"expression": "the big thing"}' if r.region.endswith("ann:3") else "The whole background."

    def round2(r: VlmRequest) -> VlmResponse:
        if r.task == "cors_verify":
            ok = "dog" in r.user
            return _resp(r.request_id, f'{{"category_correct": {str(ok).lower()}, "coverage_complete": true, "missed_instances": 0}}')
        if r.region.endswith("ann:3"):
            return _resp(r.request_id, '[{"bbox_2d": [600, 625, 900, 875], "label": "thing"}]')
        return _resp(r.request_id, "", "vlm_timeout", "no answer within 120 s (after 5 attempts)")

    out, rejects, events, reqs2 = _two_rounds(ex, ctx, round1, round2)
    assert sorted(r.task for r in reqs2) == ["cors_verify", "cors_verify", "reground", "reground"]
    verify = next(r for r in reqs2 if r.task == "cors_verify" and "dog" in r.user)
    assert len(verify.images) == 1 and verify.images[0] != ex.image_bytes  # the overlay of the label's masks
    new = {s.sample_id: s for s in out.samples}
    dog = new[cors.cors_sample_id(ex.key, "dog")]
    assert dog.kind == "category_single" and dog.metadata["match"] == ["merged"]
    desc = new[ders.ders_sample_id(ex.key, f"{IMG}/ann:3")]
    assert desc.kind == "description" and desc.reground_iou == pytest.approx(1.0) and desc.expression == "the big thing"
    # The merged dog is a new instance; the existing ones are untouched and first.
    assert out.instances[: len(ex.instances)] == ex.instances
    assert [i.instance_id for i in out.instances[len(ex.instances):]] == [f"{IMG}/cors:0"]
    assert events["created/instances"] == 1
    assert {r.source_key: r.reason for r in rejects} == {
        cors.cors_sample_id(ex.key, "ball"): "cors_verify_failed",
        ders.ders_sample_id(ex.key, f"{IMG}/ann:5"): "vlm_timeout",
    }


def test_absolute_boxes_map_back_through_the_model_input_size(scene):
    ex = scene["ex"]
    backend = CaptionBackendConfig(model="m", box_convention="absolute", max_image_side_px=50)
    ctx = cap.CaptionContext.from_config(CaptionConfig(enabled=True, backend=backend))
    mw, mh = ctx.model_wh(W, H)  # 100 x 80 -> 50 x 40 (client) -> 56 x 56 (min pixels) -> processor grid
    assert (mw % 28, mh % 28) == (0, 0)
    model_box = (60 * mw / W, 50 * mh / H, 90 * mw / W, 70 * mh / H)
    assert ctx.from_model(model_box, W, H) == pytest.approx((60.0, 50.0, 90.0, 70.0))
    reqs, _, _ = cap.plan_round1(ex, ctx)
    assert all(max(Image.open(io.BytesIO(b)).size) <= 50 for r in reqs for b in r.images)


def test_handler_exceptions_become_backend_error_responses():
    req = VlmRequest("k-ders-x/ders_describe", VlmTask.DERS_DESCRIBE.value, "v", "", "u", (), ())
    req2 = VlmRequest("k-ders-y/ders_describe", VlmTask.DERS_DESCRIBE.value, "v", "", "u", (), ())
    out = cap.raised_to_responses([req, req2], RuntimeError("boom"))
    assert [r.request_id for r in out] == [req.request_id, req2.request_id]
    assert all(r.error == "vlm_backend_error" and "boom" in r.message for r in out)


def _gate_resp(error: str = "") -> VlmResponse:
    return VlmResponse(request_id="r", text="" if error else "{}", model="m", error=error, message=error)


def test_unreachable_gate_fails_with_one_sentence_naming_the_key():
    gate = cap.UnreachableGate(max_fraction=0.5, min_requests=4, where="at http://h:8000/v1 (caption.backend.base_url)")
    gate.check([_gate_resp("vlm_server_dead")] * 3)  # fewer than min_requests: no verdict yet
    with pytest.raises(cap.VlmUnreachableError, match=r"4 of 4 .*caption.backend.max_unreachable_fraction"):
        gate.check([_gate_resp("vlm_timeout")])
    # The counts restart: a retried bundle after a short outage is judged afresh.
    gate.check([_gate_resp()] * 4)


def test_unreachable_gate_lets_bad_answers_and_a_healthy_majority_through():
    # Twin: refusals and malformed answers are rejects, not an unreachable server.
    gate = cap.UnreachableGate(max_fraction=0.5, min_requests=4, where="x")
    gate.check([_gate_resp("vlm_refusal"), _gate_resp("vlm_malformed_output"), _gate_resp("vlm_http_error"), _gate_resp()] * 5)
    gate.check([_gate_resp("vlm_server_dead")] * 5)  # 5 of 25
    never = cap.UnreachableGate(max_fraction=1.0, min_requests=1, where="x")
    never.check([_gate_resp("vlm_server_dead")] * 50)
