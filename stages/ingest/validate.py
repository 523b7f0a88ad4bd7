"""Checks of untrusted values at ingest: integers, text, split names, nesting.

Everything a COCO / RefCOCO / SA-1B file holds is untrusted. A value that
would break a later stage (an id above int64 overflows the Arrow encoder, a
lone surrogate cannot be written as UTF-8, a NUL or a ``/`` in a split name
becomes a path) is caught here and becomes a reject with one of the reason
codes below, never an exception further down the pipeline.

Stated limits (characters of ``str`` values, after JSON / pickle decoding):

* category names and supercategories: ``MAX_NAME_CHARS`` (256);
* image ``file_name`` and ref sentences: ``MAX_TEXT_CHARS`` (4,096);
* any other string (RLE counts included): ``MAX_STRING_CHARS`` (4,000,000);
* integers: signed 64-bit (``INT64_MIN`` .. ``INT64_MAX``);
* nesting of one record (an image entry, annotation, category or ref):
  ``MAX_DEPTH`` (32) levels; values visited per record: ``MAX_NODES``.
* split names: ``SPLIT_NAME_PATTERN``, letters, digits and ``_``, 1 to 64
  characters (a Hugging Face split name, and safe as a file-name part).
"""

from __future__ import annotations

import itertools
import re
import reprlib
from typing import Any

#: An integer outside signed 64-bit.
INT_OUT_OF_RANGE = "int_out_of_range"
#: A string holds a lone surrogate, a NUL or another control character.
INVALID_TEXT = "invalid_text"
#: A string is longer than its stated limit.
TEXT_TOO_LONG = "text_too_long"
#: A record nests deeper than ``MAX_DEPTH`` or holds more than ``MAX_NODES`` values.
VALUE_TOO_DEEP = "value_too_deep"
#: A split name from the data is not letters, digits and ``_`` (it would become a path).
UNSAFE_SPLIT = "unsafe_split"

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 4096
MAX_STRING_CHARS = 4_000_000
MAX_DEPTH = 32
MAX_NODES = 1_000_000
SPLIT_NAME_PATTERN = r"[A-Za-z0-9_]{1,64}"

_SPLIT_RE = re.compile(SPLIT_NAME_PATTERN)
# C0 controls except tab, newline and carriage return; DEL; C1 controls; lone
# surrogates (JSON "\ud800" and Python 2 pickles can hold them; UTF-8 cannot).
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2
_repr.maxlong = 40


def show(value: Any, limit: int = 80) -> str:
    """A bounded, ASCII-only repr of an untrusted value for a reject message.

    ``reprlib`` stops at a few items per container and two levels, so a
    hostile value (a billion-laughs list, a 10 MB string) costs a few hundred
    characters, never its full ``repr``.
    """
    try:
        text = _repr.repr(value)
    except (RecursionError, ValueError, MemoryError):
        return f"<{type(value).__name__}>"
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_problem(value: int, what: str) -> tuple[str, str] | None:
    """``(reason, message)`` when an int is outside int64, else None."""
    if INT64_MIN <= value <= INT64_MAX:
        return None
    digits = len(str(abs(value))) if value.bit_length() < 10_000 else "thousands of"
    return INT_OUT_OF_RANGE, f"{what} is an integer of {digits} digits, outside the signed 64-bit range."


def text_problem(value: str, what: str, max_chars: int = MAX_STRING_CHARS) -> tuple[str, str] | None:
    """``(reason, message)`` when a string is too long or holds invalid characters, else None."""
    if len(value) > max_chars:
        return TEXT_TOO_LONG, f"{what} is {len(value)} characters long, above the limit of {max_chars}."
    bad = _BAD_CHARS.search(value)
    if bad is not None:
        ch = bad.group()
        kind = "a lone surrogate" if "\ud800" <= ch <= "\udfff" else "a NUL" if ch == "\x00" else "a control character"
        return INVALID_TEXT, f"{what} holds {kind} (U+{ord(ch):04X}) at position {bad.start()}, which cannot be written."
    return None


#: The plain number types (``type(x)``, so no bool and no subclass) the clean-value shortcuts accept.
PLAIN_NUMBERS = frozenset((int, float))
_LISTS = frozenset((list,))
_STRS = frozenset((str,))
_search_bad = _BAD_CHARS.search


def _ints_in_range(items: Any, types: set[type]) -> bool:
    """Whether the ints among ``items`` (of the item ``types``, ints and floats only) are all within int64."""
    if int not in types:
        return True
    ints = items if float not in types else [x for x in items if type(x) is int]
    return INT64_MIN <= min(ints) and max(ints) <= INT64_MAX


def _clean_count(v: dict[Any, Any] | list[Any], limits: dict[str, int], depth: int, budget: int) -> int:
    """The values ``value_problem`` visits inside ``v`` when it finds no problem there, or -1.

    A sound shortcut for ``value_problem``: a count (>= 0) is returned only
    where its scan of ``v`` (a container at ``depth``) finds nothing, with
    the same depth, key, string and integer rules; -1 means "not shown
    clean" (a problem, more than ``budget`` values, or a shape this shortcut
    does not follow: other types, subclasses, tuples, non-str keys, a key
    with a ``.``, a string in a list when a limit key ends with ``]``), and
    the scan decides. Every value inside a container is visited once by the
    scan (a flat list of numbers is counted by its length), so the count is
    the number of values below ``v``; the budget stops the walk as soon as
    it passes the scan's own node limit, so a record that repeats one list
    many times costs no more here than in the scan. The type, key and range
    checks run as C-level passes over whole lists (``set(map(type, ...))``,
    ``min``/``max``, one regex search over the joined keys).
    """
    if depth >= MAX_DEPTH:
        return -1
    if type(v) is dict:
        if not v:
            return 0
        keys = list(v)
        # Keys: each checked as text_problem(key, MAX_NAME_CHARS) would be
        # (a bad character is in the joined keys iff it is in one of them).
        if set(map(type, keys)) != {str} or max(map(len, keys)) > MAX_NAME_CHARS or _search_bad("".join(keys)):
            return -1
        n = len(keys)
        if n > budget:
            return -1
        for k, x in v.items():
            # A string's limit key is the text after the last "." of the
            # scan's path: a dotted key is left to the scan.
            m = _clean_item(x, -1 if "." in k else limits.get(k, MAX_STRING_CHARS), limits, depth, budget - n)
            if m < 0:
                return -1
            n += m
        return n
    if type(v) is not list:
        return -1
    n = len(v)
    if n > budget:
        return -1
    types = set(map(type, v))
    if types <= PLAIN_NUMBERS:
        return n if not v or _ints_in_range(v, types) else -1
    if types == _LISTS and depth + 1 < MAX_DEPTH:
        # Polygons: a list of flat number lists, checked as one chain.
        n += sum(map(len, v))
        if n > budget:
            return -1
        inner = set(map(type, itertools.chain.from_iterable(v)))
        if inner <= PLAIN_NUMBERS:
            if not _ints_in_range(list(itertools.chain.from_iterable(v)) if int in inner else (), inner):
                return -1
            return n
        n = len(v)
    # A string item's limit key ends with "]" (the path is "...[i]").
    str_ok = not any(key.endswith("]") for key in limits)
    if types == _STRS and str_ok and sum(map(len, v)) <= MAX_STRING_CHARS:
        # Words (ref tokens): one search over them joined; each is within the limit.
        return -1 if _search_bad("".join(v)) else n
    str_limit = MAX_STRING_CHARS if str_ok else -1
    for x in v:
        m = _clean_item(x, str_limit, limits, depth, budget - n)
        if m < 0:
            return -1
        n += m
    return n


def _clean_item(x: Any, str_limit: int, limits: dict[str, int], depth: int, budget: int) -> int:
    """``_clean_count`` of one value inside a container at ``depth``: 0 for a clean scalar, -1 if not shown clean.

    ``str_limit`` is the character limit of a string here (-1: leave any
    string to the scan).
    """
    c = type(x)
    if c is float or c is bool or x is None:
        return 0
    if c is int:
        return 0 if INT64_MIN <= x <= INT64_MAX else -1
    if c is str:
        return 0 if len(x) <= str_limit and not _search_bad(x) else -1
    if c is dict or c is list:
        return _clean_count(x, limits, depth + 1, budget)
    return -1


def value_problem(value: Any, what: str, limits: dict[str, int] | None = None) -> tuple[str, str] | None:
    """Scans one raw record (dicts, lists, str, int, float...) for unsafe values.

    Args:
        value: the record as parsed from JSON or a pickle.
        what: how messages name it, e.g. ``"annotation 7"``.
        limits: per-key character limits of string fields at any depth
            (e.g. ``{"name": MAX_NAME_CHARS}``); other strings get
            ``MAX_STRING_CHARS``.

    Returns:
        ``(reason, message)`` for the first problem found, or None.
    """
    limits = limits or {}
    if type(value) is dict or type(value) is list:
        # Most records are clean: prove it in C-level passes, and scan in
        # full (below, which names the first problem) only when that fails.
        below = _clean_count(value, limits, 0, MAX_NODES - 1)
        if below >= 0:  # the scan would visit 1 + below <= MAX_NODES values
            return None
    stack: list[tuple[Any, str, int]] = [(value, what, 0)]
    nodes = 0
    while stack:
        v, where, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return VALUE_TOO_DEEP, f"{what} holds more than {MAX_NODES} values."
        if isinstance(v, bool) or v is None or isinstance(v, float):
            continue
        if isinstance(v, int):
            problem = int_problem(v, where)
        elif isinstance(v, str):
            key = where.rsplit(".", 1)[-1]
            problem = text_problem(v, where, limits.get(key, MAX_STRING_CHARS))
        elif isinstance(v, bytes):
            problem = (
                (TEXT_TOO_LONG, f"{where} is {len(v)} bytes long, above the limit of {MAX_STRING_CHARS}.")
                if len(v) > MAX_STRING_CHARS
                else None
            )
        elif isinstance(v, (dict, list, tuple, set, frozenset)):
            if depth >= MAX_DEPTH:
                return VALUE_TOO_DEEP, f"{what} nests more than {MAX_DEPTH} levels deep."
            if isinstance(v, dict):
                for k, item in v.items():
                    if isinstance(k, str):
                        kp = text_problem(k, f"a key of {where}", MAX_NAME_CHARS)
                    elif isinstance(k, int) and not isinstance(k, bool):
                        kp = int_problem(k, f"a key of {where}")
                    else:
                        kp = None
                    if kp is not None:
                        return kp
                    stack.append((item, f"{where}.{k if isinstance(k, str) else show(k, 40)}", depth + 1))
            elif all(type(x) is float or (type(x) is int and INT64_MIN <= x <= INT64_MAX) for x in v):
                # Fast path: polygon and box coordinates are long flat lists of numbers.
                nodes += len(v)
            else:
                stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(v))
            continue
        else:
            continue
        if problem is not None:
            return problem
    return None


def split_problem(split: str) -> tuple[str, str] | None:
    """``(reason, message)`` when a split name from the data is not a safe name, else None.

    The empty string means "no source split" and is accepted.
    """
    if split == "" or _SPLIT_RE.fullmatch(split):
        return None
    return (
        UNSAFE_SPLIT,
        f"split {show(split)} is not 1 to 64 letters, digits and '_'; split names become file names, "
        "so other characters are refused.",
    )
