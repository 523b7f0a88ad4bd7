"""Tolerant parsers of VLM answers.

Each parser takes the raw answer text and returns a typed result, or a
``VlmError`` reason code (``vlm_empty_answer``, ``vlm_refusal``,
``vlm_malformed_output``) that the stage turns into a reject. They never raise,
whatever the string: servers that ignore ``response_format`` (``transformers
serve``, the in-process backend) return free text, small models wrap JSON in
prose or fences, and random weights emit special tokens.

Accepted grounding styles (Qwen's JSON grounding and its common variants):

* a JSON list ``[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, ...]``;
* the same inside a fenced block, with or without ``json`` after the fence;
* a single object ``{"bbox_2d": [...], "label": ...}``;
* an object wrapping the list (``{"objects": [...]}``);
* ``bbox`` for ``bbox_2d``; ``category`` / ``name`` for ``label``;
* prose before or after the JSON, ``<think>`` blocks, special tokens such as
  ``<|im_end|>``, a list cut off by the token limit (the complete entries count);
* Python-style literals (single quotes, trailing commas);
* Qwen2-VL's box tokens ``<|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``.

Boxes are returned in the model's own convention (see ``prompts.from_model_box``).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator
from typing import Any

from orsgen.stages.caption.types import VlmError

#: Answers longer than this are cut before parsing (bounds the work per answer).
MAX_TEXT_CHARS = 32_000
#: At most this many JSON start positions are tried per answer.
MAX_JSON_STARTS = 512
#: At most this many Python-literal fallbacks are tried per answer (each is bounded too).
MAX_LITERAL_TRIES = 32
MAX_LITERAL_CHARS = 8_000
#: A description longer than this is not a referring expression.
MAX_DESCRIPTION_CHARS = 400
MAX_DESCRIPTION_WORDS = 60

Box = tuple[float, float, float, float]

_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|</?s>|<pad>|<unk>")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_QWEN2_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.{0,200}?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>\s*\(\s*(?P<x0>-?\d+(?:\.\d+)?)\s*,\s*(?P<y0>-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(?P<x1>-?\d+(?:\.\d+)?)\s*,\s*(?P<y1>-?\d+(?:\.\d+)?)\s*\)\s*<\|box_end\|>",
    re.S,
)
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry[,.]|i apologi[sz]e|i can(?:'|no)t|i am (?:unable|not able)|i'm (?:unable|not able)"
    r"|as an ai|unfortunately,? i)",
    re.I,
)


def _strip_trailing_commas(text: str) -> str:
    """Drops commas that directly precede ``]`` or ``}``, outside string literals.

    A regex would also rewrite a label such as ``",]"``; this scanner tracks
    single- and double-quoted strings (with backslash escapes) so only the
    structure is repaired.
    """
    out: list[str] = []
    quote = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
            out.append(c)
        elif c == ",":
            k = i + 1
            while k < n and text[k] in " \t\r\n":
                k += 1
            if k < n and text[k] in "]}":
                i += 1
                continue  # a trailing comma: drop it
            out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)
_BOX_KEYS = ("bbox_2d", "bbox")
_LABEL_KEYS = ("label", "category", "name")
_DESCRIPTION_KEYS = ("expression", "referring_expression", "description", "caption", "answer", "text")
_LEAD_IN = re.compile(r"^\s*(?:referring\s+)?(?:expression|description|answer|caption)\s*[:\-]\s*", re.I)

_json_decoder = json.JSONDecoder()
# Every failure json/ast can raise on hostile input (deep nesting, huge numbers).
_DECODE_ERRORS = (ValueError, RecursionError, MemoryError, TypeError, SyntaxError, OverflowError)


def clean_text(text: str, strip_think: bool = True) -> str:
    """Removes special tokens and ``<think>`` blocks, and trims.

    Args:
        text: a raw answer.
        strip_think: remove reasoning blocks; the parsers retry with False
            when an answer only parses that way (a string value that itself
            contains ``<think>``).

    Returns:
        The visible answer ("" for a non-string).
    """
    if not isinstance(text, str):
        return ""
    text = text[:MAX_TEXT_CHARS]
    if not strip_think:
        return _SPECIAL_TOKEN.sub("", text).strip()
    text = _THINK_BLOCK.sub(" ", text)
    if "</think>" in text:  # an unopened close: the reasoning came before it
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:  # an unclosed open: the answer, if any, came before it
        text = text.split("<think>", 1)[0]
    return _SPECIAL_TOKEN.sub("", text).strip()


def json_values(text: str) -> list[Any]:
    """Every top-level JSON (or Python-literal) value found in ``text``, in order.

    Fenced blocks are read first when each decodes as a whole; otherwise the
    text is scanned for ``[`` / ``{`` starts, skipping starts inside a value
    already found, so a list cut off by the token limit still yields its
    complete entries.

    Args:
        text: cleaned answer text.

    Returns:
        Decoded values (possibly empty). Never raises.
    """
    values: list[Any] = []
    for m in _FENCE.finditer(text):
        body = m.group(2).strip()
        if not body:
            continue
        v = _decode_whole(body)
        if v is _NOTHING:
            # Prose or a cut-off list in the fence, or a fence mark inside a
            # string that split the block: scan the whole text instead.
            values = []
            break
        values.append(v)
    if values:
        return values
    starts = 0
    literal_budget = MAX_LITERAL_TRIES
    i, n = 0, len(text)
    while i < n and starts < MAX_JSON_STARTS:
        j = _next_start(text, i)
        if j < 0:
            break
        starts += 1
        try:
            v, end = _json_decoder.raw_decode(text, j)
        except _DECODE_ERRORS:
            v, end = _NOTHING, j + 1
            if literal_budget > 0:
                literal_budget -= 1
                v, end = _literal_at(text, j)
        if v is _NOTHING or not isinstance(v, (list, dict)):
            i = j + 1
            continue
        values.append(v)
        i = end
    return values


class _Nothing:
    pass


_NOTHING: Any = _Nothing()


def _next_start(text: str, i: int) -> int:
    a = text.find("[", i)
    b = text.find("{", i)
    if a < 0:
        return b
    if b < 0:
        return a
    return min(a, b)


def _decode_whole(body: str) -> Any:
    """A fenced body as one value: strict JSON, repaired JSON, then a Python literal."""
    if len(body) > MAX_LITERAL_CHARS * 4:
        return _NOTHING
    for candidate in (body, _strip_trailing_commas(body)):
        try:
            return json.loads(candidate)
        except _DECODE_ERRORS:
            pass
    try:
        return ast.literal_eval(body)
    except _DECODE_ERRORS:
        return _NOTHING


def _literal_at(text: str, j: int) -> tuple[Any, int]:
    """A repaired JSON or Python-style literal (single quotes, trailing commas) starting at ``j``."""
    close = {"[": "]", "{": "}"}[text[j]]
    end = text.find(close, j)
    # Try the shortest balanced-looking spans first; bounded tries.
    tries = 0
    while 0 <= end < j + MAX_LITERAL_CHARS and tries < 8:
        tries += 1
        raw = text[j : end + 1]
        try:
            return json.loads(_strip_trailing_commas(raw)), end + 1  # JSON with a trailing comma
        except _DECODE_ERRORS:
            pass
        try:
            # Python literals allow trailing commas themselves: parse the text as written.
            return ast.literal_eval(raw), end + 1  # single quotes, True/None
        except _DECODE_ERRORS:
            end = text.find(close, end + 1)
    return _NOTHING, j + 1


# ------------------------------------------------------------------ grounding


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        try:
            f = float(v)
        except OverflowError:
            return None
        return f if math.isfinite(f) else None
    if isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def _box(v: Any) -> Box | None:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    nums = [_number(x) for x in v]
    if any(x is None for x in nums):
        return None
    x0, x1 = sorted((nums[0], nums[2]))  # type: ignore[type-var]
    y0, y1 = sorted((nums[1], nums[3]))  # type: ignore[type-var]
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def _label(d: dict) -> str:
    for k in _LABEL_KEYS:
        v = d.get(k)
        if isinstance(v, str):
            return " ".join(v.split())[:200]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    return ""


def _grounding_items(value: Any, depth: int = 0) -> Iterator[Any]:
    """Candidate entries: dicts carrying a box key, from lists / wrappers."""
    if depth > 3:
        return
    if isinstance(value, dict):
        if any(k in value for k in _BOX_KEYS):
            yield value
            return
        for v in value.values():
            if isinstance(v, (list, dict)):
                yield from _grounding_items(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict):
                yield from _grounding_items(v, depth + 1)
            elif isinstance(v, list) and depth < 2:
                yield from _grounding_items(v, depth + 1)


def _with_think_fallback(parse: Any, text: str) -> Any:
    """Runs ``parse(text)``; if that is malformed and the answer has think tags,
    retries with them kept, since they may sit inside a string value."""
    try:
        result = parse(text)
        if result is VlmError.MALFORMED and isinstance(text, str) and "think>" in text:
            retry = parse(text, strip_think=False)
            if not isinstance(retry, VlmError):
                return retry
        return result
    except RecursionError:  # pathological nesting past the parsers' own checks
        return VlmError.MALFORMED


def parse_grounding(text: str) -> list[tuple[str, Box]] | VlmError:
    """Parses a grounding answer into ``[(label, box)]``.

    Args:
        text: the raw answer.

    Returns:
        ``[(label, (x1, y1, x2, y2))]`` in the model's box convention with the
        corners ordered, in answer order, exact duplicates removed. ``[]`` when
        the model answered an empty list (nothing found). Otherwise a
        ``VlmError``: ``EMPTY`` (no visible text), ``REFUSAL``, or
        ``MALFORMED`` (no JSON, or entries without a usable 4-number box).
    """
    return _with_think_fallback(_parse_grounding, text)


def _parse_grounding(text: str, strip_think: bool = True) -> list[tuple[str, Box]] | VlmError:
    if not isinstance(text, str):
        return VlmError.MALFORMED
    raw = text[:MAX_TEXT_CHARS]
    tokens = [
        (" ".join((m.group("label") or "").split()), _box([m.group("x0"), m.group("y0"), m.group("x1"), m.group("y1")]))
        for m in _QWEN2_BOX.finditer(raw)
    ]
    token_items = [(lab, b) for lab, b in tokens if b is not None]
    cleaned = clean_text(raw, strip_think)
    if not cleaned and not token_items:
        return VlmError.EMPTY
    values = json_values(cleaned)
    out: list[tuple[str, Box]] = []
    seen: set[tuple[str, Box]] = set()
    saw_entries = False
    saw_empty_list = False
    for v in values:
        if isinstance(v, list) and not v:
            saw_empty_list = True
        for item in _grounding_items(v):
            saw_entries = True
            b = next((bb for k in _BOX_KEYS if (bb := _box(item.get(k))) is not None), None)
            if b is None:
                continue
            entry = (_label(item), b)
            if entry not in seen:
                seen.add(entry)
                out.append(entry)
    for entry in token_items:
        if entry not in seen:
            seen.add(entry)
            out.append(entry)
    if out:
        return out
    if saw_empty_list and not saw_entries:
        return []
    if not values and _REFUSAL.search(cleaned):
        return VlmError.REFUSAL
    return VlmError.MALFORMED


# ------------------------------------------------------------------ description


def parse_description(text: str) -> str | VlmError:
    """Parses a description answer into one referring expression.

    Accepts ``{"expression": "..."}`` (or ``description`` / ``caption`` /
    ``answer``), a JSON string, or plain text (its first non-empty line, with
    a lead-in such as ``Expression:`` and surrounding quotes removed).

    Args:
        text: the raw answer.

    Returns:
        The expression with whitespace collapsed, or ``EMPTY``, ``REFUSAL``,
        or ``MALFORMED`` (JSON without an expression, leftover JSON or box
        syntax, no letters, or longer than ``MAX_DESCRIPTION_CHARS`` /
        ``MAX_DESCRIPTION_WORDS``).
    """
    return _with_think_fallback(_parse_description, text)


def _parse_description(text: str, strip_think: bool = True) -> str | VlmError:
    cleaned = clean_text(text, strip_think)
    if not cleaned:
        return VlmError.EMPTY
    candidate: str | None = None
    values = json_values(cleaned)
    for v in values:
        if isinstance(v, dict):
            for k in _DESCRIPTION_KEYS:
                if isinstance(v.get(k), str):
                    candidate = v[k]
                    break
        if candidate is not None:
            break
    if candidate is None:
        if values:
            return VlmError.MALFORMED  # JSON, but not a description
        stripped = cleaned
        m = _FENCE.search(stripped)
        if m and m.group(2).strip():
            stripped = m.group(2).strip()
        if stripped.startswith('"'):
            try:
                s = json.loads(stripped)
                if isinstance(s, str):
                    stripped = s
            except _DECODE_ERRORS:
                pass
        lines = [ln.strip() for ln in stripped.splitlines() if ln.strip()]
        candidate = lines[0] if lines else ""
    if _REFUSAL.search(candidate):
        return VlmError.REFUSAL
    expr = " ".join(_LEAD_IN.sub("", candidate).split())
    # Quotes around the expression and a closing full stop are not part of it.
    expr = expr.strip(" \"'`“”‘’.")
    if not expr:
        return VlmError.EMPTY
    if (
        not any(ch.isalpha() for ch in expr)
        or len(expr) > MAX_DESCRIPTION_CHARS
        or len(expr.split()) > MAX_DESCRIPTION_WORDS
        or "bbox_2d" in expr
        or "{" in expr
        or "```" in expr
    ):
        return VlmError.MALFORMED
    return expr


# ------------------------------------------------------------------ verification

_TRUE = {"true", "yes", "y", "1", "correct", "complete"}
_FALSE = {"false", "no", "n", "0", "incorrect", "incomplete", "partial"}
_VERIFY_ALIASES = {
    "category_correct": ("category_correct", "correct", "is_correct", "category"),
    "coverage_complete": ("coverage_complete", "complete", "coverage", "mask_complete"),
    "missed_instances": ("missed_instances", "missed", "num_missed", "missing_instances"),
    "reason": ("reason", "explanation", "rationale"),
}


def _as_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    return None


def _as_count(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    n = _number(v)
    if n is None or n < 0 or n != int(n) or n > 1_000_000:
        return None
    return int(n)


def parse_verification(text: str) -> dict | VlmError:
    """Parses a CoRS verification answer.

    Args:
        text: the raw answer.

    Returns:
        ``{"category_correct": bool, "coverage_complete": bool,
        "missed_instances": int, "reason": str}`` (``missed_instances``
        defaults to 0 and ``reason`` to "" when absent; yes/no strings are
        accepted as booleans), or ``EMPTY``, ``REFUSAL`` or ``MALFORMED``
        (no object with both booleans).
    """
    return _with_think_fallback(_parse_verification, text)


def _pick(d: dict, key: str) -> Any:
    for alias in _VERIFY_ALIASES[key]:
        if alias in d:
            return d[alias]
    return None


def _parse_verification(text: str, strip_think: bool = True) -> dict | VlmError:
    cleaned = clean_text(text, strip_think)
    if not cleaned:
        return VlmError.EMPTY
    values = json_values(cleaned)
    dicts = [v for v in values if isinstance(v, dict)]
    dicts += [d for v in values if isinstance(v, list) for d in v[:8] if isinstance(d, dict)]
    for d in dicts:
        cat = _as_bool(_pick(d, "category_correct"))
        cov = _as_bool(_pick(d, "coverage_complete"))
        if cat is None or cov is None:
            continue
        missed_raw = _pick(d, "missed_instances")
        missed = 0 if missed_raw is None else _as_count(missed_raw)
        if missed is None:
            continue
        reason = _pick(d, "reason")
        return {
            "category_correct": cat,
            "coverage_complete": cov,
            "missed_instances": missed,
            "reason": " ".join(reason.split())[:500] if isinstance(reason, str) else "",
        }
    if not values and _REFUSAL.search(cleaned):
        return VlmError.REFUSAL
    return VlmError.MALFORMED
