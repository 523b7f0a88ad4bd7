"""Word coverage: negatives never name a present object, category words never name two.

The shipped ``configs/vocabulary/coverage.yaml`` maps short names and synonyms to the
categories they cover. These tests build hand-made images with COCO's 80
categories and LVIS-style names, and check the rules against a re-reading of
the YAML file done here (word equality, listed coverage, head nouns,
supercategories), not against the module's own answer.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import yaml

from orsgen.schemas.config import ExpressionConfig, load_config
from orsgen.schemas.records import Category, ImageExample, ImageRecord, Instance, Presence
from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, xywh_to_xyxy
from orsgen.stages.expressions.categories import category_candidates
from orsgen.stages.expressions.context import ImageContext
from orsgen.stages.expressions.negatives import absent_categories
from orsgen.stages.expressions.stage import add_expressions, margins_for
from orsgen.stages.expressions.templates import display_name, load_templates, noun_forms
from orsgen.stages.expressions.vocabulary import VocabularyError, load_vocabulary, parse_vocabulary

from conftest import jpeg_bytes

TEMPLATES = load_templates()
COVERAGE = load_vocabulary()
H, W = 80, 160

# COCO 2017's 80 categories (id, name, supercategory).
COCO80 = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"), (34, "frisbee", "sports"),
    (35, "skis", "sports"), (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
]
# LVIS-style names (no supercategories), some of which collide with COCO words.
LVIS = [
    (1001, "table", ""), (1002, "coffee_table", ""), (1003, "glass_(drink_container)", ""), (1004, "phone", ""),
    (1005, "telephone", ""), (1006, "ball", ""), (1007, "tennis_ball", ""), (1008, "mug", ""), (1009, "sofa", ""),
    (1010, "desk", ""), (1011, "bow_(weapon)", ""), (1012, "bow_(decorative_ribbons)", ""), (1013, "duck", ""),
    (1014, "bear", ""), (1015, "kitchen_table", ""), (1016, "bag", ""), (1017, "cellular_telephone", ""),
]
VOCAB = tuple(Category(i, n, s) for i, n, s in COCO80 + LVIS)
BY_NAME = {c.name: c for c in VOCAB}


# ---------------------------------------------------------------- an independent re-reading of the file


def _norm(name: str) -> str:
    name = name.replace("_", " ").strip()
    if name.endswith(")") and "(" in name:
        name = name[: name.rindex("(")]
    return " ".join(name.lower().split())


def _raw_table() -> dict[str, set[str]]:
    raw = yaml.safe_load(resources.files("orsgen.configs").joinpath("vocabulary", "coverage.yaml").read_text(encoding="utf-8"))
    return {_norm(k): {_norm(n) for n in (v or [])} for k, v in raw["covers"].items()}


RAW = _raw_table()


def _written(name: str) -> set[str]:
    f = noun_forms(name, TEMPLATES.nouns)
    return {_norm(name), f.singular.lower(), f.plural.lower()}


def _covers(word_of: str, cat: Category) -> bool:
    """Does a written word of category ``word_of`` name category ``cat``?"""
    words, target = _written(word_of), _written(cat.name)
    if words & target:
        return True
    for w in words:
        if RAW.get(w, set()) & target or (cat.supercategory and w == cat.supercategory):
            return True
        if any(t.split(" ")[-1] == w and " " in t for t in target) or any(t.endswith("-" + w) for t in target):
            return True
    return False


# ---------------------------------------------------------------- scenes


def _inst(i: int, cat: Category, box: tuple[int, int, int, int], crowd: bool = False) -> Instance:
    m = np.zeros((H, W), dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    rle = encode_mask(m)
    xywh = rle_bbox_xywh(rle)
    return Instance(
        instance_id=f"img/ann:{i}", image_id="img", rle=rle, bbox_xywh=xywh, bbox_xyxy=xywh_to_xyxy(xywh),
        area_px=rle_area(rle), category_id=cat.id, category_name=cat.name, supercategory=cat.supercategory,
        iscrowd=crowd, source_ann_id=i,
    )


def _present(*names: str) -> list[Instance]:
    return [_inst(k, BY_NAME[n], (5 + 12 * k, 10, 15 + 12 * k, 30)) for k, n in enumerate(names)]


def _ctx(insts: list[Instance], presence: tuple[Presence, ...] = ()) -> ImageContext:
    return ImageContext.build(
        "img", W, H, insts, margins_for(ExpressionConfig(), W, H), seed=0,
        presence=presence, coverage=COVERAGE, nouns=TEMPLATES.nouns,
    )


def _negatives(insts: list[Instance], presence: tuple[Presence, ...] = ()) -> set[str]:
    return {c.name for c, _ in absent_categories(_ctx(insts, presence), VOCAB, TEMPLATES)}


# ---------------------------------------------------------------- tests


def test_lvis_style_names_are_written_plainly():
    assert display_name("glass_(drink_container)") == "glass"
    assert display_name("coffee_table") == "coffee table"
    assert display_name("dining table") == "dining table"
    assert noun_forms("tennis_ball").plural == "tennis balls"


@pytest.mark.parametrize(
    ("present", "refused"),
    [
        ("dining table", ["table", "desk", "coffee_table", "kitchen_table"]),  # "table" is how it is written
        ("coffee_table", ["table", "dining table"]),  # a coffee table in plain view: "the table" is false
        ("wine glass", ["glass_(drink_container)"]),
        ("glass_(drink_container)", ["wine glass"]),  # that glass may be a wine glass
        ("cell phone", ["phone", "telephone", "cellular_telephone"]),
        ("tennis_ball", ["sports ball", "ball"]),
        ("teddy bear", ["bear"]),
        ("couch", ["sofa"]),
        ("bow_(weapon)", ["bow_(decorative_ribbons)"]),  # both are written "bow"
        ("handbag", ["bag"]),
    ],
)
def test_synonym_and_short_name_negatives_are_refused(present, refused):
    negs = _negatives(_present(present))
    for name in refused:
        assert name not in negs, f'"{name}" was offered as absent on an image with a {present}'
    # The rule refuses words, not everything: an unrelated category is still a negative.
    assert "giraffe" in negs or present == "giraffe"


def test_no_negative_covers_a_present_category_on_random_coco_and_lvis_images():
    rng = np.random.default_rng(5)
    n_checked = 0
    for _ in range(60):
        names = list(rng.choice([c.name for c in VOCAB], size=int(rng.integers(1, 6)), replace=False))
        present = [BY_NAME[n] for n in names]
        for neg in _negatives(_present(*names)):
            for p in present:
                assert not _covers(neg, p), f"negative {neg!r} covers present {p.name!r}"
                assert not _covers(p.name, BY_NAME[neg]), f"present {p.name!r} covers negative {neg!r}"
            n_checked += 1
    assert n_checked > 1000


def test_a_category_word_that_covers_another_present_category_is_not_used():
    # COCO's dining table is written "the table": with a coffee table there too it names both.
    insts = _present("dining table", "coffee_table", "cup")
    cands, skipped = category_candidates(_ctx(insts), TEMPLATES)
    cats = {c.metadata["category"] for c in cands}
    assert "dining table" not in cats and skipped["word_covers_other"] == 1
    assert {"coffee_table", "cup"} <= cats  # "the coffee table" names only it
    # Alone, the dining table is "the table".
    cands, _ = category_candidates(_ctx(_present("dining table", "cup")), TEMPLATES)
    assert "dining table" in {c.metadata["category"] for c in cands}


def test_a_rejected_annotation_still_counts_as_presence():
    """A malformed crowd of people was rejected at ingest; one person remains as an instance."""
    person = BY_NAME["person"]
    insts = _present("person", "cup")
    presence = (Presence(person.id, "person", "person", True, "ann:99"),)
    cands, skipped = category_candidates(_ctx(insts, presence), TEMPLATES)
    assert "person" not in {c.metadata["category"] for c in cands}  # not "the person": others are there
    assert skipped["rejected_annotation"] == 1
    # Without the presence record the lone instance would be called "the person".
    cands, _ = category_candidates(_ctx(insts), TEMPLATES)
    assert "person" in {c.metadata["category"] for c in cands}
    # A rejected annotation alone keeps its category (and what covers it) out of the negatives.
    presence = (Presence(BY_NAME["dog"].id, "dog", "animal", False, "ann:98"),)
    negs = _negatives(_present("cup"), presence)
    assert "dog" not in negs and "animal" not in negs
    assert "dog" in _negatives(_present("cup"))


def test_the_stage_reads_presence_from_the_example():
    insts = _present("person", "cup")
    ex = ImageExample(
        key="k", image=ImageRecord("img", "coco", "u", W, H, "0" * 64, "f.jpg"), image_bytes=jpeg_bytes(W, H),
        instances=tuple(insts), presence=(Presence(1, "person", "person", True, "ann:99"),),
    )
    for seed in range(3):
        out, _, counts = add_expressions(ex, VOCAB, TEMPLATES, ExpressionConfig(negative_ratio=2.0), seed=seed)
        assert not [s for s in out.samples if s.metadata.get("category") == "person"]
        assert all(s.metadata["vocabulary_version"] == COVERAGE.version for s in out.samples)


def test_vocabulary_file_errors_name_the_key(tmp_path):
    with pytest.raises(VocabularyError, match="covers.table"):
        parse_vocabulary({"version": 1, "covers": {"table": "dining table"}})
    with pytest.raises(VocabularyError, match="unknown keys"):
        parse_vocabulary({"version": 1, "covers": {}, "extra": 1})
    with pytest.raises(VocabularyError, match="version"):
        parse_vocabulary({"version": 0, "covers": {}})
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("covers: [unclosed")
    with pytest.raises(VocabularyError, match="not valid YAML"):
        load_vocabulary(str(tmp_path / "bad.yaml"))
    assert parse_vocabulary({"version": 2, "covers": {"Sofa": ["Couch"]}}).table == {"sofa": frozenset({"couch"})}


def test_config_resolves_the_vocabulary_path(tmp_path):
    (tmp_path / "words.yaml").write_text("version: 3\ncovers:\n  thing: [cup]\n")
    (tmp_path / "c.yaml").write_text(
        "name: t\ninputs: [{name: c, type: coco, annotations: a.json, images: imgs}]\n"
        "expressions: {vocabulary: words.yaml}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.expressions.vocabulary == str(tmp_path / "words.yaml")
    cov = load_vocabulary(cfg.expressions.vocabulary)
    assert cov.version == 3 and cov.word_covers(frozenset({"thing"}), "cup")


def test_present_index_agrees_with_the_pairwise_rule():
    """The per-image index is an optimisation: it must say exactly what ``related`` says."""
    rng = np.random.default_rng(11)
    names = [(c.name, c.supercategory) for c in VOCAB]
    for _ in range(40):
        present = [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 6)), replace=False)]
        idx = COVERAGE.index(present, TEMPLATES.nouns)
        for cand in names:
            want = any(COVERAGE.related(cand, p, TEMPLATES.nouns) for p in present)
            assert idx.touches(*cand) == want, (cand, present)


def test_memoised_covers_another_gives_the_direct_answer_every_time():
    # Asked twice per name (category and descriptive generators): the memo
    # must answer like the scan over the present categories, a None included.
    insts = _present("dining table", "coffee_table", "cup", "dog")
    ctx = _ctx(insts)

    def direct(name: str) -> str | None:
        words = COVERAGE.words(name, TEMPLATES.nouns)
        hits = [o for o, sup in ctx.present_categories if o != name and COVERAGE.word_covers(words, o, sup, TEMPLATES.nouns)]
        return hits[0] if hits else None

    for name in ("dining table", "coffee_table", "cup", "dog", "table", "animal", "zebra"):
        assert ctx.covers_another(name) == direct(name)
        assert ctx.covers_another(name) == direct(name)
    assert ctx.covers_another("dining table") == "coffee_table" and ctx.covers_another("cup") is None
    # Another image is another context: its own answer, not the first one's.
    assert _ctx(_present("dining table", "cup")).covers_another("dining table") is None
