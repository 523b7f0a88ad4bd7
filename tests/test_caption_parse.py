"""Tolerant parsers of VLM answers: never raise; every documented style parses."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orsgen.stages.caption.parse import clean_text, json_values, parse_description, parse_grounding, parse_verification
from orsgen.stages.caption.types import VlmError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that steer random text into the JSON / fence / token code paths.
JSONISH = st.lists(
    st.sampled_from(
        list('[]{}",:\'0123456789.-eE abcxyz_\n`<|>')
        + ["bbox_2d", "label", "```json", "<|im_end|>", "<think>", "</think>", "true", "null", "NaN", "1e999"]
    ),
    max_size=120,
).map("".join)


def _check(result, ok_type):
    assert isinstance(result, VlmError) or isinstance(result, ok_type)


@FAST
@given(st.one_of(st.text(max_size=300), JSONISH))
def test_arbitrary_strings_never_raise(text):
    g = parse_grounding(text)
    _check(g, list)
    if isinstance(g, list):
        for label, box in g:
            assert isinstance(label, str) and len(box) == 4
            assert box[0] < box[2] and box[1] < box[3]
    _check(parse_description(text), str)
    _check(parse_verification(text), dict)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000,
        "{" * 5000 + "}" * 5000,
        '[{"bbox_2d": [' + "9" * 5000 + ", 1, 2, 3]}]",
        '[{"bbox_2d": [1e999, 1, 2, 3]}]',
        '[{"bbox_2d": [NaN, 1, 2, 3], "label": "x"}]',
        "```" * 1000,
        "[" + "'a', " * 20000 + "]",
        "\x00\ud800",
        None,
        12,
    ],
)
def test_hostile_inputs(text):
    assert parse_grounding(text) == VlmError.MALFORMED or isinstance(parse_grounding(text), VlmError)
    _check(parse_description(text), str)
    _check(parse_verification(text), dict)


def _no_markup(s: str) -> bool:
    """Text the parsers keep verbatim: no <think> tags and no special tokens."""
    return not any(t in s for t in ("think>", "<|", "<s>", "</s>", "<pad>", "<unk>"))


# Labels and reasons are any text except what the parsers strip by design:
# <think> tags and <|special|> tokens (a model writing them inside a value is
# not answering; clean_text removes reasoning markup before parsing).
labels = (
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)
    .map(lambda s: " ".join(s.split()) or "x")
    .filter(_no_markup)
)
coords = st.integers(min_value=0, max_value=2000)


@st.composite
def boxes(draw):
    x0, y0 = draw(coords), draw(coords)
    return [x0, y0, x0 + draw(st.integers(1, 500)), y0 + draw(st.integers(1, 500))]


def _styles(items):
    """The documented answer styles for a list of {'bbox_2d', 'label'} dicts."""
    plain = json.dumps(items)
    pretty = json.dumps(items, indent="\t", ensure_ascii=False)
    yield plain
    yield f"```json\n{pretty}\n```"
    yield f"```\n{plain}\n```<|im_end|>"
    yield f"Sure! Here are the objects:\n```json\n{pretty}\n```\nLet me know if you need more."
    yield f"The objects are {plain} as requested."
    yield f"<think>I should list [things] carefully.</think>{plain}"
    yield json.dumps({"objects": items})
    yield repr(items)  # Python literal: single quotes
    yield plain[:-1] + ",]"  # trailing comma
    if len(items) == 1:
        yield json.dumps(items[0])  # a single object
    yield "".join(
        f"<|object_ref_start|>{it['label']}<|object_ref_end|><|box_start|>({it['bbox_2d'][0]},{it['bbox_2d'][1]}),"
        f"({it['bbox_2d'][2]},{it['bbox_2d'][3]})<|box_end|>"
        for it in items
    )


@FAST
@given(st.lists(st.tuples(labels, boxes()), min_size=1, max_size=5, unique_by=lambda t: tuple(t[1])))
def test_valid_grounding_parses_in_every_style(entries):
    items = [{"bbox_2d": b, "label": lab} for lab, b in entries]
    expected = [(lab, tuple(float(v) for v in b)) for lab, b in entries]
    for text in _styles(items):
        if "<|object_ref_start|>" in text and any("<|" in lab or "|>" in lab for lab, _ in entries):
            continue
        assert parse_grounding(text) == expected, text


@FAST
@given(st.lists(st.tuples(labels, boxes()), min_size=2, max_size=5, unique_by=lambda t: tuple(t[1])))
def test_truncated_list_keeps_complete_entries(entries):
    items = [{"bbox_2d": b, "label": lab} for lab, b in entries]
    cut = json.dumps(items[:-1])[:-1] + ", " + json.dumps(items[-1])[:12]  # the last entry is cut off mid-way
    assert parse_grounding(cut) == [(lab, tuple(float(v) for v in b)) for lab, b in entries[:-1]]


def test_grounding_details():
    # Corners are ordered; aliases; numeric strings; exact duplicates dropped.
    assert parse_grounding('[{"bbox": [30, 40, 10, 20], "category": "cat"}, {"bbox": [30, 40, 10, 20], "category": "cat"}]') == [
        ("cat", (10.0, 20.0, 30.0, 40.0))
    ]
    assert parse_grounding('[{"bbox_2d": ["1", "2", "3.5", "4"], "label": 7}]') == [("7", (1.0, 2.0, 3.5, 4.0))]
    assert parse_grounding('[{"bbox_2d": [1, 2, 3, 4]}]') == [("", (1.0, 2.0, 3.0, 4.0))]
    # An empty list is an answer: nothing found.
    assert parse_grounding("```json\n[]\n```") == []
    # Invalid entries only: malformed.
    assert parse_grounding('[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": [5, 5, 5, 9]}, {"bbox_2d": [true, 1, 2, 3]}]') == VlmError.MALFORMED
    assert parse_grounding("") == VlmError.EMPTY
    assert parse_grounding("<|im_end|>  ") == VlmError.EMPTY
    assert parse_grounding("I'm sorry, but I can't identify objects in this image.") == VlmError.REFUSAL
    assert parse_grounding("There is a cat at the top left.") == VlmError.MALFORMED
    # Gemini-style box_2d (y first) is not silently misread.
    assert parse_grounding('[{"box_2d": [1, 2, 3, 4], "label": "x"}]') == VlmError.MALFORMED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"expression": "the red mug left of the laptop"}', "the red mug left of the laptop"),
        ('```json\n{"expression": "the dog on the sofa"}\n```', "the dog on the sofa"),
        ('{"description": "a man in a blue coat"}<|im_end|>', "a man in a blue coat"),
        ("Expression: \"the leftmost zebra\".", "the leftmost zebra"),
        ("the tallest tree\nIt stands behind the house.", "the tallest tree"),
        ('"the striped cat"', "the striped cat"),
        ("<think>which one? the left</think>the left cup", "the left cup"),
        ("  the   white    car  ", "the white car"),
    ],
)
def test_description_styles(text, expected):
    assert parse_description(text) == expected


def _plain_expression(e: str) -> bool:
    """What a referring expression looks like after parsing (see parse_description)."""
    from orsgen.stages.caption.parse import _LEAD_IN, _REFUSAL

    edge = " \"'`“”‘’."
    return (
        any(c.isalpha() for c in e)
        and e[0] not in edge
        and e[-1] not in edge
        and not _REFUSAL.search(e)
        and not _LEAD_IN.match(e)
    )


expressions = (
    st.lists(
        st.text(alphabet=st.characters(categories=("L", "N"), include_characters="-,'/"), min_size=1, max_size=12),
        min_size=1,
        max_size=25,
    )
    .map(" ".join)
    .filter(_plain_expression)
)


@FAST
@given(expressions, st.sampled_from(["expression", "referring_expression", "description", "caption", "answer"]))
def test_valid_description_parses_in_every_style(expr, key):
    obj = json.dumps({key: expr}, ensure_ascii=False)
    styles = [
        obj,
        f"```json\n{json.dumps({key: expr}, indent=2)}\n```",
        f"{obj}<|im_end|>",
        f"<think>which region? [maybe]</think>{obj}",
        f"Here it is: {obj}",
        json.dumps(expr, ensure_ascii=False),  # a JSON string
        f"{expr}\nIt is the only one.",  # plain text: the first line
        f"Expression: {expr}",
    ]
    for text in styles:
        assert parse_description(text) == expr, text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", VlmError.EMPTY),
        ("<|im_end|>", VlmError.EMPTY),
        ('{"expression": ""}', VlmError.EMPTY),
        ("I'm sorry, I cannot describe people.", VlmError.REFUSAL),
        ('{"expression": "I cannot help with that."}', VlmError.REFUSAL),
        ('{"label": "cat"}', VlmError.MALFORMED),
        ("word " * 100, VlmError.MALFORMED),
        ("12345 !!!", VlmError.MALFORMED),
        ('[{"bbox_2d": [1, 2, 3, 4]}]', VlmError.MALFORMED),
    ],
)
def test_description_failures(text, error):
    assert parse_description(text) == error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"category_correct": true, "coverage_complete": false, "missed_instances": 2, "reason": "one\\n is cut"}',
            {"category_correct": True, "coverage_complete": False, "missed_instances": 2, "reason": "one is cut"},
        ),
        (
            '```json\n{"correct": "yes", "complete": "no"}\n```',
            {"category_correct": True, "coverage_complete": False, "missed_instances": 0, "reason": ""},
        ),
        (
            'Verdict: {"category_correct": 1, "coverage_complete": 1, "missed_instances": "0"} done',
            {"category_correct": True, "coverage_complete": True, "missed_instances": 0, "reason": ""},
        ),
    ],
)
def test_verification_styles(text, expected):
    assert parse_verification(text) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", VlmError.EMPTY),
        ("Sorry, I can't verify that.", VlmError.REFUSAL),
        ('{"category_correct": true}', VlmError.MALFORMED),
        ('{"category_correct": "maybe", "coverage_complete": true}', VlmError.MALFORMED),
        ('{"category_correct": true, "coverage_complete": true, "missed_instances": -1}', VlmError.MALFORMED),
        ("yes", VlmError.MALFORMED),
    ],
)
def test_verification_failures(text, error):
    assert parse_verification(text) == error


@FAST
@given(st.booleans(), st.booleans(), st.integers(0, 50), st.text(max_size=40).filter(_no_markup))
def test_valid_verification_parses(cat, cov, missed, reason):
    obj = {"category_correct": cat, "coverage_complete": cov, "missed_instances": missed, "reason": reason}
    for text in (json.dumps(obj), f"```json\n{json.dumps(obj, indent=2)}\n```", f"Here: {json.dumps(obj)}<|im_end|>"):
        got = parse_verification(text)
        assert got == {**obj, "reason": " ".join(reason.split())}


def test_think_tags_inside_a_string_value_still_parse():
    obj = {"category_correct": True, "coverage_complete": False, "missed_instances": 1, "reason": "a <think> tag"}
    assert parse_verification(json.dumps(obj))["reason"] == "a <think> tag"
    assert parse_grounding('[{"bbox_2d": [1, 2, 3, 4], "label": ",]"},]') == [(",]", (1.0, 2.0, 3.0, 4.0))]
    assert parse_grounding("[{'bbox_2d': [1, 2, 3, 4], 'label': ',]'}]") == [(",]", (1.0, 2.0, 3.0, 4.0))]


def test_clean_text_and_json_values():
    assert clean_text("<think>x</think> a <|im_end|>") == "a"
    assert clean_text("answer <think> never closed") == "answer"
    assert json_values('x [1, 2] y {"a": 1} z') == [[1, 2], {"a": 1}]
    assert json_values('[{"a": [1]}, {"b": 2}]') == [[{"a": [1]}, {"b": 2}]]  # nested values are not repeated
