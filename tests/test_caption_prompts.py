"""Prompt templates and box conventions."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import jpeg_bytes
from orsgen.stages.caption.prompts import (
    BoxConvention,
    PromptError,
    fit_max_side,
    format_box,
    from_model_box,
    load_prompts,
    make_request,
    model_input_size,
    render,
    smart_resize,
    to_model_box,
)
from orsgen.stages.caption.types import VlmTask


def test_bundled_templates_cover_every_task():
    ps = load_prompts()
    assert set(ps.templates) == set(VlmTask)
    assert {t.value: ps.version_of(t) for t in VlmTask} == {
        "cors_ground": "cors_ground@v1",
        "cors_verify": "cors_verify@v1",
        "ders_describe": "ders_describe@v1",
        "reground": "reground@v1",
    }
    for t in VlmTask:
        schema = ps[t].json_schema_text()
        assert schema and json.loads(schema)  # every task has a constraining schema


def test_render_fills_fields_and_box_format():
    ps = load_prompts()
    system, user, schema = render(ps, "ders_describe", box=format_box((10.4, 20, 30.6, 40)))
    assert "[10, 20, 31, 40]" in user and "absolute pixel" in user and "$" not in user
    assert system and json.loads(schema)["required"] == ["expression"]
    _, user2, _ = render(ps, VlmTask.REGROUND, expression="the dog", box_convention="relative_1000")
    assert '"the dog"' in user2 and "0-1000" in user2
    _, user3, _ = render(ps, "cors_ground", hint="Categories that may be present: cat.")
    assert user3.endswith("Categories that may be present: cat.")


def test_render_errors_name_the_field():
    ps = load_prompts()
    with pytest.raises(PromptError, match=r"needs field\(s\) \['expression'\]"):
        render(ps, "reground")
    with pytest.raises(PromptError, match="no placeholder"):
        render(ps, "reground", expression="x", expresion="typo")


def test_make_request_hashes_images_and_versions():
    img = jpeg_bytes(16, 16)
    req = make_request(load_prompts(), "cors_verify", request_id="a/b", images=[img], region="r1", label="cat")
    assert req.prompt_version == "cors_verify@v1" and req.task == "cors_verify"
    assert req.image_sha256 == (hashlib.sha256(img).hexdigest(),)
    assert '"cat"' in req.user and req.json_schema


def test_load_prompts_errors(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "nope")
    (tmp_path / "a.yaml").write_text("id: reground\nversion: v2\ntask: reground\nuser: 'Find $expression'\n")
    assert load_prompts(tmp_path / "a.yaml").version_of("reground") == "reground@v2"
    (tmp_path / "b.yaml").write_text("id: reground2\nversion: v1\ntask: reground\nuser: 'x'\n")
    with pytest.raises(PromptError, match="two templates serve task reground"):
        load_prompts(tmp_path)
    (tmp_path / "b.yaml").write_text("id: Bad-Id\nversion: v1\ntask: nosuchtask\nuser: 'cost $'\n")
    with pytest.raises(PromptError) as err:
        load_prompts(tmp_path / "b.yaml")
    assert "id" in str(err.value) and "task" in str(err.value) and "user" in str(err.value)
    (tmp_path / "b.yaml").write_text("id: [unclosed\n")
    with pytest.raises(PromptError, match="not valid YAML"):
        load_prompts(tmp_path / "b.yaml")
    with pytest.raises(PromptError, match="no prompt template for task 'cors_ground'"):
        load_prompts(tmp_path / "a.yaml")["cors_ground"]


@pytest.mark.parametrize(("h", "w"), [(480, 640), (1500, 2250), (37, 1000), (28, 28), (10, 10), (4000, 3000), (999, 1)])
def test_smart_resize_matches_transformers(h, w):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    for factor, max_pixels in ((28, 12_845_056), (28, 1_003_520), (32, 16_777_216)):
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, factor=factor, max_pixels=max_pixels) == hf_smart_resize(
            h, w, factor=factor, min_pixels=3136, max_pixels=max_pixels
        )


def test_model_input_size_is_what_the_processor_sees(tiny_vlm):
    """The size box conversion assumes is the size the real processor makes."""
    import io

    from PIL import Image
    from transformers import AutoProcessor

    from orsgen.stages.caption.backends import prepare_image

    proc = AutoProcessor.from_pretrained(tiny_vlm.scripted)
    ip = proc.image_processor
    for w, h in ((200, 120), (60, 500), (33, 47)):
        prepared = prepare_image(jpeg_bytes(w, h), 96)
        with Image.open(io.BytesIO(prepared.data)) as im:
            grid = ip(images=[im.convert("RGB")], return_tensors="pt")["image_grid_thw"][0].tolist()
        seen = (grid[2] * ip.patch_size, grid[1] * ip.patch_size)
        assert seen == model_input_size(
            w, h, max_side_px=96, factor_px=28, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"]
        )


def test_fit_max_side():
    assert fit_max_side(2000, 1000, 1024) == (1024, 512)
    assert fit_max_side(500, 300, 1024) == (500, 300)
    assert fit_max_side(3000, 1, 100) == (100, 1)
    assert fit_max_side(640, 480, None) == (640, 480)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(16, 4000),
    st.integers(16, 4000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0.05, 1),
    st.floats(0.05, 1),
    st.sampled_from(list(BoxConvention)),
)
def test_box_round_trip(w, h, fx, fy, fw, fh, conv):
    x0, y0 = fx * w * 0.9, fy * h * 0.9
    box = (x0, y0, min(w, x0 + fw * w), min(h, y0 + fh * h))
    model_wh = model_input_size(w, h, max_side_px=1024)
    mb = to_model_box(box, image_wh=(w, h), convention=conv, model_wh=model_wh)
    assert all(isinstance(v, int) for v in mb)
    if conv is BoxConvention.RELATIVE_1000:
        assert all(0 <= v <= 1000 for v in mb)
    back = from_model_box(mb, image_wh=(w, h), convention=conv, model_wh=model_wh)
    # Rounding to the model grid loses at most half a model unit per side.
    tol_x = (w / (1000 if conv is BoxConvention.RELATIVE_1000 else model_wh[0])) * 0.5 + 1e-6
    tol_y = (h / (1000 if conv is BoxConvention.RELATIVE_1000 else model_wh[1])) * 0.5 + 1e-6
    for a, b, tol in zip(box, back, (tol_x, tol_y, tol_x, tol_y)):
        assert abs(a - b) <= tol


def test_from_model_box_orders_and_clips():
    assert from_model_box((900, 1100, -50, 500), image_wh=(200, 100), convention="relative_1000") == (0.0, 50.0, 180.0, 100.0)
    assert from_model_box((28, 0, 0, 28), image_wh=(100, 100), convention="absolute", model_wh=(56, 56)) == (0.0, 0.0, 50.0, 50.0)
    with pytest.raises(ValueError, match="model_wh"):
        to_model_box((0, 0, 1, 1), image_wh=(10, 10), convention="absolute")
