"""A restricted unpickler that loads plain data and refuses everything else.

RefCOCO, RefCOCO+ and RefCOCOg ship their refs as ``refs(<splitBy>).p``: a
Python 2 pickle (protocol 2). Unpickling runs code: a pickle names any
importable callable (``os.system``, ``builtins.eval``, a class) and the
standard unpickler imports and calls it. A refs file downloaded from a mirror
is untrusted input, so orsgen never hands it to ``pickle.load``.

``restricted_loads`` refuses every global lookup (``find_class``) and every
persistent id (``persistent_load``). What is left is what the pickle opcodes
build by themselves: ``dict``, ``list``, ``tuple``, ``set``/``frozenset``
(protocol 4+), ``str``, ``bytes``, ``int``, ``float``, ``bool`` and ``None``.
That is all a refs file holds, and none of it runs code.

Python 2 ``str`` values (the ``STRING``/``BINSTRING``/``SHORT_BINSTRING``
opcodes) are 8-bit strings without an encoding. They are decoded as UTF-8,
which is what RefCOCO's sentences are; if any of them is not valid UTF-8 the
whole pickle is decoded again as Latin-1, which maps every byte to a character
and so never fails. Either way a Python 2 ``str`` comes out as ``str``.

Plain data can still be a bomb, so parsing is bounded before and after the
C unpickler runs:

* a pre-scan of the opcodes (``pickletools.genops``, which reads nothing past
  the data it is given) refuses memo indices of ``max_objects`` or more (a
  9-byte ``LONG_BINPUT 2**32-1`` would make the unpickler allocate a 32 GiB
  memo), declared lengths that exceed the data (``BINBYTES8`` claiming
  2**40 bytes), frames larger than the data, and more than ``max_objects``
  opcodes;
* after loading, a walk that counts every value as often as it is reachable
  refuses results of more than ``max_objects`` values or ``max_depth``
  levels: a 239-byte "billion laughs" pickle (lists of references to one
  list) is tiny in memory but expands to 10**9 values in any code that walks
  it, or in its ``repr``;
* messages never hold a ``repr`` of the data.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, BinaryIO, NoReturn

#: Default cap on the size of a pickle, in bytes. refs(unc).p is ~40 MB.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: Default cap on opcodes, memo indices and reachable values (refs(umd).p holds ~5M values).
DEFAULT_MAX_OBJECTS = 20_000_000
#: Default cap on the nesting of the result (a refs file nests 4 levels).
DEFAULT_MAX_DEPTH = 64

_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})

# Errors the C unpickler raises on malformed (not unsafe) input; they are
# re-raised as pickle.UnpicklingError so callers catch one type.
_MALFORMED = (EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError, RecursionError)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global or a persistent id, which may run code."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An ``Unpickler`` with no access to globals or persistent ids."""

    def find_class(self, module: str, name: str) -> NoReturn:
        # Every GLOBAL / STACK_GLOBAL / INST / OBJ / EXT* opcode lands here.
        raise UnsafePickleError(
            f"the pickle tries to load the global {module}.{name}, which could run code; "
            "only plain data (dict, list, tuple, str, int, float, bool, None) is accepted. "
            "Convert the file to JSON or re-create it from trusted data."
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise UnsafePickleError(f"the pickle refers to the persistent id {pid!r}; persistent ids are not accepted.")


def _prescan(data: bytes, max_objects: int) -> None:
    """Refuses opcodes whose arguments would make the unpickler allocate unboundedly."""
    n_ops = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            n_ops += 1
            if n_ops > max_objects:
                raise pickle.UnpicklingError(f"the pickle holds more than max_objects={max_objects} opcodes.")
            if op.name in _MEMO_OPS and isinstance(arg, int) and not 0 <= arg < max_objects:
                raise pickle.UnpicklingError(
                    f"the pickle uses memo index {arg} at byte {pos}, above max_objects={max_objects}; "
                    "it is malformed or built to exhaust memory."
                )
            if op.name == "FRAME" and isinstance(arg, int) and arg > len(data):
                raise pickle.UnpicklingError(f"the pickle declares a frame of {arg} bytes at byte {pos}, more than its size.")
    except pickle.UnpicklingError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        # genops reads each declared length from the data itself, so a
        # BINBYTES8 claiming 2**40 bytes fails here without allocating them.
        raise pickle.UnpicklingError(f"the data is not a valid pickle: {_bounded(err)}") from None


# Exact types: the restricted unpickler builds no subclasses.
_CONTAINERS = frozenset({list, tuple, set, frozenset, dict})


def _check_shape(value: Any, max_objects: int, max_depth: int) -> None:
    """Refuses a result that expands to too many values or nests too deep.

    Values are counted as often as they are reachable (a shared list counts
    once per reference), which is what any code that walks the result pays.
    Sizes and depths are memoised per container, so the check is linear in
    the number of distinct containers, even for a billion-laughs pickle. A
    container met again on its own path is a cycle (a finite structure), not
    an expansion, and is counted once.
    """
    memo: dict[int, tuple[int, int]] = {}  # id -> (expanded size, height)
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        v, done = stack.pop()
        vid = id(v)
        kids = v.values() if type(v) is dict else v
        if not done:
            if vid in memo or vid in on_path:
                continue
            on_path.add(vid)
            stack.append((v, True))
            stack.extend((c, False) for c in kids if type(c) in _CONTAINERS and id(c) not in memo)
            continue
        on_path.discard(vid)
        size, height = 1 + len(v) * (2 if type(v) is dict else 1), 0
        for c in kids:
            if type(c) in _CONTAINERS:
                csize, cheight = memo.get(id(c), (1, 0))  # absent: a cycle back to the path
                size += csize - 1
                height = max(height, cheight + 1)
        memo[vid] = (min(size, max_objects + 1), height)
        if size > max_objects:
            raise pickle.UnpicklingError(
                f"the pickle expands to more than max_objects={max_objects} values (shared references counted "
                "each time they are reachable); it is built to exhaust memory or is not a refs file."
            )
        if height > max_depth:
            raise pickle.UnpicklingError(f"the pickle nests deeper than max_depth={max_depth} levels.")


def _bounded(err: BaseException, limit: int = 200) -> str:
    text = f"{type(err).__name__}: {err}"
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load(data: bytes, encoding: str) -> Any:
    unpickler = _RestrictedUnpickler(io.BytesIO(data), fix_imports=False, encoding=encoding, errors="strict")
    return unpickler.load()


def restricted_loads(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Unpickles plain data without ever importing or calling anything.

    Args:
        data: the pickle bytes (any protocol, 0 to 5).
        max_bytes: refuse pickles larger than this many bytes.
        max_objects: refuse more opcodes, a memo index this high, or a result
            with more reachable values (counted with repetition).
        max_depth: refuse a result nested deeper than this.

    Returns:
        The unpickled value, built only from dict, list, tuple, set,
        frozenset, str, bytes, int, float, bool and None. Python 2 ``str``
        values come out as ``str`` (UTF-8, or Latin-1 if any is not UTF-8).

    Raises:
        UnsafePickleError: the pickle names a global (module.name in the
            message) or a persistent id.
        pickle.UnpicklingError: the data is larger than ``max_bytes`` or is
            not a valid pickle.
    """
    if len(data) > max_bytes:
        raise pickle.UnpicklingError(
            f"the pickle is {len(data)} bytes, above max_bytes={max_bytes}; "
            "raise max_bytes if the file is trusted to be this large."
        )
    _prescan(data, max_objects)
    try:
        try:
            value = _load(data, "utf-8")
        except UnicodeDecodeError:
            # Some Python 2 str is not UTF-8; Latin-1 decodes any byte string.
            value = _load(data, "latin1")
    except UnsafePickleError:
        raise
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(_bounded(err)) from None
    except (MemoryError, *_MALFORMED) as err:
        raise pickle.UnpicklingError(f"the data is not a valid pickle: {_bounded(err)}") from None
    _check_shape(value, max_objects, max_depth)
    return value


def restricted_load(
    fileobj: BinaryIO,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Reads a binary file object to its end and unpickles it like ``restricted_loads``.

    At most ``max_bytes + 1`` bytes are read, so an oversized file is refused
    without being loaded into memory whole.

    Args:
        fileobj: a binary file object opened for reading (e.g. from ``fsspec.open``).
        max_bytes: refuse pickles larger than this many bytes.
        max_objects: see ``restricted_loads``.
        max_depth: see ``restricted_loads``.

    Returns:
        The unpickled plain data.

    Raises:
        UnsafePickleError: the pickle names a global or a persistent id.
        pickle.UnpicklingError: the file is too large or not a valid pickle.
    """
    data = fileobj.read(max_bytes + 1)
    return restricted_loads(data, max_bytes=max_bytes, max_objects=max_objects, max_depth=max_depth)
