"""The expressions stage, piece by piece: templates, categories, negatives, balance, stage, OOD splits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from conftest import jpeg_bytes
from orsgen.pipelines.build import regions_stage
from orsgen.schemas.config import ConfigError, ExpressionConfig, OrsgenConfig, SplitConfig, load_config
from orsgen.schemas.records import Category, ImageExample, ImageRecord, Instance, Sample
from orsgen.stages.expressions.balance import balance, merge_identical, stochastic_round
from orsgen.stages.expressions.categories import category_candidates
from orsgen.stages.expressions.context import Candidate, ImageContext
from orsgen.stages.expressions.negatives import absent_categories, negative_candidates
from orsgen.stages.expressions.stage import add_expressions, expressions_stage, margins_for
from orsgen.stages.expressions.templates import TemplateError, load_templates, noun_forms, parse_templates
from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, rle_union, xywh_to_xyxy
from orsgen.stages.splits import assign_split, example_ood_split, ood_split

from expression_oracle import bundled_templates

H, W = 90, 120
TEMPLATES = load_templates()
VOCAB = (
    Category(47, "cup", "kitchen"),
    Category(51, "bowl", "kitchen"),
    Category(44, "bottle", "kitchen"),
    Category(37, "sports ball", "sports"),
    Category(38, "kite", "sports"),
    Category(84, "book", "indoor"),
    Category(1, "person", "person"),
)
SUPER = {c.name: c.supercategory for c in VOCAB}
CAT_ID = {c.name: c.id for c in VOCAB}


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _inst(i: int, cat: str, m: np.ndarray, crowd: bool = False, image_id: str = "coco:1") -> Instance:
    rle = encode_mask(m)
    xywh = rle_bbox_xywh(rle)
    return Instance(
        instance_id=f"{image_id}/ann:{i}",
        image_id=image_id,
        rle=rle,
        bbox_xywh=xywh,
        bbox_xyxy=xywh_to_xyxy(xywh),
        area_px=rle_area(rle),
        category_id=CAT_ID[cat],
        category_name=cat,
        supercategory=SUPER[cat],
        iscrowd=crowd,
        source_ann_id=i,
    )


def _scene() -> list[Instance]:
    """Two cups (left, right), one ball between them, a crowd of books plus one book."""
    return [
        _inst(1, "cup", _box(40, 60, 5, 25)),
        _inst(2, "cup", _box(40, 70, 90, 115)),
        _inst(3, "sports ball", _box(45, 55, 50, 62)),
        _inst(4, "book", _box(5, 15, 40, 60)),
        _inst(5, "book", _box(5, 20, 70, 100), crowd=True),
    ]


def _ctx(insts: list[Instance], kept: set[str] | None = None, seed: int = 0) -> ImageContext:
    return ImageContext.build("coco:1", W, H, insts, margins_for(ExpressionConfig(), W, H), seed=seed, kept_ids=kept)


def _example(insts: list[Instance], key: str = "coco-coco_1", input_name: str = "coco") -> ImageExample:
    img = ImageRecord("coco:1", "coco", "mem://1.jpg", W, H, "0" * 64, "1.jpg")
    return ImageExample(key=key, image=img, image_bytes=jpeg_bytes(W, H), instances=tuple(insts), input_name=input_name)


# ---------------------------------------------------------------- templates


def test_bundled_templates_load_and_cover_every_family():
    assert TEMPLATES.version >= 1
    fams = {t.family for t in TEMPLATES.enabled()}
    assert fams == {"absolute", "ordinal", "size", "relation"}
    assert {t.relation for t in TEMPLATES.templates if t.family == "relation"} >= {
        "left_of", "right_of", "above", "below", "next_to", "on", "holding",
    }
    holding = next(t for t in TEMPLATES.templates if t.id == "relation.holding")
    assert not holding.enabled and holding.categories == ["person"]


def _bad(mutate) -> str:
    raw = copy.deepcopy(bundled_templates())
    mutate(raw)
    with pytest.raises(TemplateError) as err:
        parse_templates(raw, "t.yaml")
    return str(err.value)


def test_template_errors_name_the_key_and_value():
    msg = _bad(lambda r: r["templates"][0]["description"].append("the {nou} on the left"))
    assert "templates.0" in msg and "unknown placeholders ['nou']" in msg
    msg = _bad(lambda r: r["templates"][-2].update(description=["the {noun} left of it"]))
    assert "must name the {anchor}" in msg
    msg = _bad(lambda r: r["templates"][-2].update(relation=True))  # YAML's bare `on`
    assert "templates.26.relation = True" in msg
    msg = _bad(lambda r: r["templates"].append(copy.deepcopy(r["templates"][0])))
    assert "unique" in msg and "absolute.left" in msg
    msg = _bad(lambda r: r["templates"][9].update(description_plural=["the {plural} on the far left"]))
    assert "ordinal picks one instance" in msg
    msg = _bad(lambda r: r["templates"][0].update(colour="red"))
    assert "templates.0.colour" in msg and "Extra inputs" in msg
    msg = _bad(lambda r: r["category"].update(single=["all {plural}"]))
    assert "category.single" in msg


def test_templates_file_errors(tmp_path):
    with pytest.raises(TemplateError, match="does not exist"):
        load_templates(str(tmp_path / "missing.yaml"))
    p = tmp_path / "t.yaml"
    p.write_text("version: [unclosed")
    with pytest.raises(TemplateError, match="not valid YAML"):
        load_templates(str(p))


def test_config_resolves_templates_path_and_uses_it(tmp_path):
    raw = copy.deepcopy(bundled_templates())
    raw["category"]["multi"] = ["the {plural} here"]
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(raw))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "inputs: [{type: coco, name: co, annotations: a.json, images: i}]\nexpressions: {templates: my.yaml}\n"
    )
    cfg = load_config(cfg_path)
    assert cfg.expressions.templates == str(tmp_path / "my.yaml")
    tpl = load_templates(cfg.expressions.templates)
    cands, _ = category_candidates(_ctx(_scene()), tpl)
    assert {c.expression for c in cands if c.kind == "category_multi"} == {"the cups here"}


def test_expression_config_errors_name_key_and_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inputs: [{type: coco, name: co, annotations: a.json, images: i}]\n")
    for override, needle in [
        ("expressions.margin_px=-1", "expressions.margin_px = -1"),
        ("expressions.crowd_policy=keep", "expressions.crowd_policy = \"keep\""),
        ("expressions.families=[colour]", "expressions.families.0"),
        ("expressions.max_per_kind.phrase=-2", "expressions.max_per_kind.phrase = -2"),
        ("expressions.typo=1", "expressions.typo = 1"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(p, [override])
        assert needle in str(err.value), (override, str(err.value))


def test_noun_forms():
    assert noun_forms("person").plural == "people"
    assert noun_forms("knife").plural == "knives"
    assert noun_forms("wine glass").plural == "wine glasses"
    f = noun_forms("sports ball", TEMPLATES.nouns)
    assert (f.singular, f.plural) == ("ball", "balls")


# ---------------------------------------------------------------- categories


def test_category_single_multi_and_crowd_skip():
    cands, skipped = category_candidates(_ctx(_scene()), TEMPLATES)
    by_cat = {c.metadata["category"]: c for c in cands}
    assert set(by_cat) == {"cup", "sports ball"}  # book has a crowd: skipped
    assert skipped["crowd"] == 1
    cup, ball = by_cat["cup"], by_cat["sports ball"]
    assert cup.kind == "category_multi" and cup.target_ids == ("coco:1/ann:1", "coco:1/ann:2")
    assert "cups" in cup.expression or cup.expression == "every cup"
    assert ball.kind == "category_single" and ball.target_ids == ("coco:1/ann:3",)
    assert ball.expression in {"ball", "the ball"}


def test_category_non_crowd_policy_targets_non_crowd_instances():
    cands, _ = category_candidates(_ctx(_scene()), TEMPLATES, crowd_policy="non_crowd")
    book = next(c for c in cands if c.metadata["category"] == "book")
    assert book.kind == "category_single" and book.target_ids == ("coco:1/ann:4",)
    assert book.metadata["crowd_excluded"] is True


def test_category_with_a_dropped_instance_is_not_written():
    kept = {i.instance_id for i in _scene()} - {"coco:1/ann:2"}
    cands, skipped = category_candidates(_ctx(_scene(), kept), TEMPLATES)
    assert {c.metadata["category"] for c in cands} == {"sports ball"}
    assert skipped["target_dropped"] == 1


# ---------------------------------------------------------------- negatives


def test_negatives_absent_only_crowd_counts_hard_first_held_out_never():
    ctx = _ctx(_scene())
    order = absent_categories(ctx, VOCAB, TEMPLATES)
    names = [c.name for c, _ in order]
    assert set(names) == {"bowl", "bottle", "kite", "person"}  # book (crowd) counts as present
    hard = [c.name for c, h in order if h]
    assert set(hard) == {"bowl", "bottle", "kite"} and names[: len(hard)] == hard
    assert "kite" not in [c.name for c, _ in absent_categories(ctx, VOCAB, TEMPLATES, held_out={"kite"})]
    negs = negative_candidates(ctx, VOCAB, TEMPLATES)
    assert all(n.kind == "no_target" and n.target_ids == () for n in negs)
    assert [n.metadata["category"] for n in negs] == names


def test_a_category_annotated_only_as_a_crowd_is_present():
    """A crowd of kites and no single kite: no kite sample of any kind, and "kite" is never a negative."""
    insts = _scene() + [_inst(6, "kite", _box(60, 85, 30, 80), crowd=True)]
    ctx = _ctx(insts)
    assert "kite" not in [c.name for c, _ in absent_categories(ctx, VOCAB, TEMPLATES)]
    for policy in ("skip", "non_crowd"):
        cands, _ = category_candidates(ctx, TEMPLATES, crowd_policy=policy)
        assert "kite" not in {c.metadata["category"] for c in cands}
    for seed in range(4):
        out, _, _ = add_expressions(_example(insts), VOCAB, TEMPLATES, ExpressionConfig(negative_ratio=2.0), seed=seed)
        assert not [s for s in out.samples if s.metadata.get("category") == "kite"]
        assert any(s.kind == "no_target" for s in out.samples)


def test_negatives_skip_categories_written_like_a_present_one():
    vocab = VOCAB + (Category(200, "ball", "toys"),)  # written "ball", like "sports ball"
    names = [c.name for c, _ in absent_categories(_ctx(_scene()), vocab, TEMPLATES)]
    assert "ball" not in names


def test_negative_order_is_seeded():
    orders = {tuple(c.name for c, _ in absent_categories(_ctx(_scene(), seed=s), VOCAB, TEMPLATES)) for s in range(12)}
    assert len(orders) > 1
    assert absent_categories(_ctx(_scene(), seed=3), VOCAB, TEMPLATES) == absent_categories(
        _ctx(_scene(), seed=3), VOCAB, TEMPLATES
    )


# ---------------------------------------------------------------- balance


def _cand(kind: str, text: str, targets: tuple[str, ...], template: str = "t") -> Candidate:
    return Candidate(kind, text, targets, template, {})


def test_identical_texts_merge_and_conflicts_drop():
    cands = [
        _cand("description", "the cup on the left", ("a",), "absolute.left"),
        _cand("description", "The cup  on the left", ("a",), "ordinal.leftmost"),
        _cand("phrase", "left cup", ("a",), "absolute.left"),
        _cand("phrase", "left cup", ("b",), "other"),
    ]
    kept, counts = merge_identical(cands)
    assert [c.expression for c in kept] == ["the cup on the left"]
    assert kept[0].metadata["merged_templates"] == ["ordinal.leftmost"]
    assert counts == {"merged": 1, "conflict": 2}


def test_caps_and_negative_ratio():
    ctx = _ctx(_scene())
    pos = [_cand("description", f"d{i}", (f"t{i % 5}",)) for i in range(30)]
    pos += [_cand("phrase", f"p{i}", (f"t{i % 5}",)) for i in range(30)]
    pos += [_cand("category_multi", "all cups", ("t0", "t1"))]
    negs = [_cand("no_target", f"n{i}", ()) for i in range(10)]
    cfg = ExpressionConfig(max_per_target=2, negative_ratio=0.5)
    sel, counts = balance(ctx, pos, negs, cfg)
    desc = [c for c in sel if c.kind in ("description", "phrase")]
    per_target = {}
    for c in desc:
        per_target[c.target_ids] = per_target.get(c.target_ids, 0) + 1
    assert max(per_target.values()) <= 2
    n_pos = sum(c.kind != "no_target" for c in sel)
    n_neg = sum(c.kind == "no_target" for c in sel)
    assert n_neg == min(4, stochastic_round(0.5 * n_pos, ctx.unit("negative_count")))
    assert len(sel) <= cfg.max_per_image and counts["over_target_cap"] > 0
    assert any(c.kind == "category_multi" for c in sel)
    # A tight image cap keeps every kind (round-robin) and still draws negatives.
    sel2, _ = balance(ctx, pos, negs, ExpressionConfig(max_per_image=5, negative_ratio=0.5))
    assert len(sel2) == 5 and {c.kind for c in sel2} >= {"category_multi", "description", "phrase", "no_target"}
    # Deterministic for one seed; another seed samples differently.
    assert balance(ctx, pos, negs, cfg)[0] == sel
    other = [balance(_ctx(_scene(), seed=s), pos, negs, cfg)[0] for s in range(1, 6)]
    assert any([c.expression for c in o] != [c.expression for c in sel] for o in other)


def test_negative_ratio_holds_on_average():
    negs = [_cand("no_target", f"n{i}", ()) for i in range(10)]
    pos = [_cand("description", f"d{i}", (f"t{i}",)) for i in range(3)]
    cfg = ExpressionConfig(negative_ratio=0.5)
    total = sum(sum(c.kind == "no_target" for c in balance(_ctx(_scene(), seed=s), pos, negs, cfg)[0]) for s in range(400))
    assert abs(total / (400 * 3) - 0.5) < 0.05


# ---------------------------------------------------------------- the stage


def test_add_expressions_attaches_trainer_targets_deterministically():
    ex = _example(_scene())
    out, rejects, _ = add_expressions(ex, VOCAB, TEMPLATES, ExpressionConfig(), seed=0)
    assert rejects == []
    kinds = {s.kind for s in out.samples}
    assert {"category_single", "category_multi", "description", "phrase", "no_target"} <= kinds
    insts = {i.instance_id: i for i in ex.instances}
    ids = [s.sample_id for s in out.samples]
    assert len(ids) == len(set(ids)) and all("." not in i for i in ids)
    for s in out.samples:
        assert s.generator == "template" and s.template and s.metadata["templates_version"] == TEMPLATES.version
        if s.kind == "no_target":
            assert s.target_ids == () and rle_area(s.union_rle) == 0 and s.union_svg == ""
            continue
        assert s.union_rle == rle_union([insts[t].rle for t in s.target_ids])
        assert [t.instance_id for t in s.targets] == list(s.target_ids)
        for t in s.targets:
            assert all(0 <= v <= 1000 for v in t.qwen_box)
            crop = insts[t.instance_id]
            assert tuple(t.bbox_xyxy) == tuple(crop.bbox_xyxy)
        assert s.union_svg.startswith("M ")
    again, _, _ = add_expressions(ex, VOCAB, TEMPLATES, ExpressionConfig(), seed=0)
    assert again == out
    # Rerunning the stage on its own output adds nothing twice.
    twice, _, _ = add_expressions(out, VOCAB, TEMPLATES, ExpressionConfig(), seed=0)
    assert [s.sample_id for s in twice.samples] == ids


def test_qwen_box_is_the_pixel_box_on_a_0_1000_grid():
    from orsgen.stages.common.targets import qwen_box

    # 120 x 90 image: x / 120 * 1000 and y / 90 * 1000, rounded half up, clamped.
    assert qwen_box((5, 40, 25, 60), W, H) == (42, 444, 208, 667)
    assert qwen_box((0, 0, W, H), W, H) == (0, 0, 1000, 1000)
    assert qwen_box((3, 0, 9, 9), W, H) == (25, 0, 75, 100)  # 25.0 and 75.0 exactly; 100.0
    out, _, _ = add_expressions(_example(_scene()), VOCAB, TEMPLATES, ExpressionConfig(), seed=0)
    ball = next(s for s in out.samples if s.target_ids == ("coco:1/ann:3",))
    t = ball.targets[0]
    assert t.bbox_xyxy == (50.0, 45.0, 62.0, 55.0) and t.qwen_box == (417, 500, 517, 611)


def test_kind_switches_turn_kinds_off():
    cfg = ExpressionConfig(kinds={"phrase": False, "no_target": False})
    out, _, _ = add_expressions(_example(_scene()), VOCAB, TEMPLATES, cfg, seed=0)
    kinds = {s.kind for s in out.samples}
    assert "phrase" not in kinds and "no_target" not in kinds and "description" in kinds


def test_bad_target_becomes_a_sample_reject():
    insts = _scene()
    bad = insts[2]
    insts[2] = Instance(**{**{f: getattr(bad, f) for f in bad.__slots__}, "area_px": 0})
    out, rejects, _ = add_expressions(_example(insts), VOCAB, TEMPLATES, ExpressionConfig(), seed=0)
    assert rejects and all(r.level == "sample" and r.reason == "empty_mask" and r.stage == "expressions" for r in rejects)
    assert not any("coco:1/ann:3" in s.target_ids for s in out.samples)


def _cfg(**kw) -> OrsgenConfig:
    return OrsgenConfig(inputs=[{"type": "coco", "name": "coco", "annotations": "a", "images": "i"}], **kw)


def test_stage_skips_other_input_types_and_respects_enabled():
    ex = _example(_scene(), input_name="sa")
    out, _, _ = expressions_stage(ex, {}, cfg=_cfg(), input_types={"sa": "sa1b"}, templates=TEMPLATES)
    assert out is ex
    ex = _example(_scene())
    out, _, _ = expressions_stage(ex, {}, cfg=_cfg(expressions={"enabled": False}), input_types={"coco": "coco"}, templates=TEMPLATES)
    assert out is ex


def test_instances_region_selection_drops_count_for_uniqueness_but_are_never_targets():
    """A tiny cup far left: "the leftmost cup" must not name the bigger cup next to it."""
    insts = [
        _inst(1, "cup", _box(40, 42, 2, 4)),  # 4 px: region selection drops it (min_area_px 16)
        _inst(2, "cup", _box(40, 60, 30, 50)),
        _inst(3, "cup", _box(40, 60, 90, 110)),
        _inst(4, "bowl", _box(70, 85, 50, 70)),
    ]
    # No caps, so that every verified candidate is visible.
    cfg = _cfg(expressions={"max_per_target": 99, "max_per_image": 999,
                            "max_per_kind": {"description": 99, "phrase": 99}})
    out, rejects, events = expressions_stage(
        _example(insts), {"coco": VOCAB}, cfg=cfg, input_types={"coco": "coco"}, templates=TEMPLATES
    )
    assert rejects == []
    for s in out.samples:
        assert "coco:1/ann:1" not in s.target_ids, s
        if s.template == "ordinal.leftmost":
            raise AssertionError(f"{s.expression!r} would point at the second cup from the left")
    assert not [s for s in out.samples if s.kind == "category_multi" and s.metadata["category"] == "cup"]
    assert dict(events)["expressions/category/target_dropped"] == 1  # counted for the manifest
    assert any(s.template == "ordinal.rightmost" and s.target_ids == ("coco:1/ann:3",) for s in out.samples)
    # The Regions stage then drops the tiny cup; nothing points at it, so no sample goes.
    after, rej = regions_stage(out, cfg, {"coco": "coco"})
    assert [r.reason for r in rej] == ["dropped_small"] and after.samples == out.samples


def test_regions_stage_rejects_samples_whose_targets_it_drops():
    insts = [_inst(1, "cup", _box(40, 42, 2, 4)), _inst(2, "cup", _box(40, 60, 30, 50))]
    s = Sample("s1", "coco:1", "all cups", "category_multi", ("coco:1/ann:1", "coco:1/ann:2"))
    ex = _example(insts).replace(samples=(s,))
    out, rejects = regions_stage(ex, _cfg(), {"coco": "coco"})
    assert out.samples == ()
    assert {(r.reason, r.level, r.source_key) for r in rejects} >= {("target_dropped", "sample", "s1")}


# ---------------------------------------------------------------- OOD splits


def test_ood_rules_by_category_and_target_area():
    cfg = SplitConfig(
        ood=[
            {"name": "ood_categories", "categories": ["kite", "person"]},
            {"name": "ood_tiny", "max_area_frac": 0.001},
            {"name": "ood_huge", "min_area_frac": 0.5},
        ]
    )
    assert ood_split(cfg.ood, ["cup", "kite"], [0.2]) == "ood_categories"
    assert ood_split(cfg.ood, ["cup"], [0.2, 0.0005]) == "ood_tiny"
    assert ood_split(cfg.ood, ["cup"], [0.7]) == "ood_huge"
    assert ood_split(cfg.ood, ["cup"], [0.2]) == ""
    # OOD wins over the hash and over a source split.
    assert assign_split("coco:1", cfg, "train", "ood_tiny") == "ood_tiny"
    assert assign_split("coco:1", cfg, "train", "") == "train"


def test_example_ood_split_reads_instances_and_sample_areas():
    ex = _example(_scene())
    out, _, _ = add_expressions(ex, VOCAB, TEMPLATES, ExpressionConfig(), seed=0)
    assert example_ood_split(out, SplitConfig(ood=[{"name": "ood_books", "categories": ["book"]}])) == "ood_books"
    assert example_ood_split(out, SplitConfig(ood=[{"name": "ood_big", "min_area_frac": 0.5}])) == ""
    assert example_ood_split(out, SplitConfig(ood=[{"name": "ood_small", "max_area_frac": 0.02}])) == "ood_small"
    assert example_ood_split(out, SplitConfig()) == ""


def test_held_out_categories_are_never_negatives():
    cfg = _cfg(splits={"ood": [{"name": "ood_kitchen", "categories": ["bowl", "bottle"]}]})
    for seed in range(5):
        out, _, _ = expressions_stage(
            _example(_scene()), {"coco": VOCAB}, cfg=cfg.model_copy(update={"seed": seed}),
            input_types={"coco": "coco"}, templates=TEMPLATES,
        )
        negs = {s.metadata["category"] for s in out.samples if s.kind == "no_target"}
        assert negs and not negs & {"bowl", "bottle"}


@pytest.mark.parametrize(
    "ood,needle",
    [
        ([{"name": "heldout", "categories": ["dog"]}], "ood.0.name"),
        ([{"name": "ood_x"}], "holds nothing out"),
        ([{"name": "ood_x", "min_area_frac": 0.5, "max_area_frac": 0.1}], "above max_area_frac"),
        ([{"name": "ood_x", "categories": ["a"]}, {"name": "ood_x", "categories": ["b"]}], "repeat"),
    ],
)
def test_ood_config_errors(ood, needle):
    with pytest.raises(ConfigError) as err:
        from orsgen.schemas.config import config_from_dict

        config_from_dict({"inputs": [{"type": "coco", "name": "c", "annotations": "a", "images": "i"}], "splits": {"ood": ood}})
    assert needle in str(err.value)


def test_interior_points_are_the_same_on_every_thread():
    """Beam calls stages from several threads; trainer targets must not depend on which."""
    import threading

    from orsgen.stages.common.masks import interior_points

    yy, xx = np.mgrid[0:90, 0:120]
    rles = [encode_mask((xx - 60) ** 2 + (yy - 45) ** 2 <= r * r) for r in range(8, 40, 3)]
    ref = [interior_points(r) for r in rles]
    for _ in range(3):
        out: list = []
        t = threading.Thread(target=lambda: out.extend(interior_points(r) for r in rles))
        t.start()
        t.join()
        assert out == ref
