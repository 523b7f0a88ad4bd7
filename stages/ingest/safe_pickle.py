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
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO, NoReturn

#: Default cap on the size of a pickle, in bytes. refs(unc).p is ~40 MB.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

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


def _load(data: bytes, encoding: str) -> Any:
    unpickler = _RestrictedUnpickler(io.BytesIO(data), fix_imports=False, encoding=encoding, errors="strict")
    return unpickler.load()


def restricted_loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Unpickles plain data without ever importing or calling anything.

    Args:
        data: the pickle bytes (any protocol, 0 to 5).
        max_bytes: refuse pickles larger than this many bytes.

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
    try:
        try:
            return _load(data, "utf-8")
        except UnicodeDecodeError:
            # Some Python 2 str is not UTF-8; Latin-1 decodes any byte string.
            return _load(data, "latin1")
    except UnsafePickleError:
        raise
    except pickle.UnpicklingError:
        raise
    except _MALFORMED as err:
        raise pickle.UnpicklingError(f"the data is not a valid pickle: {type(err).__name__}: {err}") from None


def restricted_load(fileobj: BinaryIO, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Reads a binary file object to its end and unpickles it like ``restricted_loads``.

    At most ``max_bytes + 1`` bytes are read, so an oversized file is refused
    without being loaded into memory whole.

    Args:
        fileobj: a binary file object opened for reading (e.g. from ``fsspec.open``).
        max_bytes: refuse pickles larger than this many bytes.

    Returns:
        The unpickled plain data.

    Raises:
        UnsafePickleError: the pickle names a global or a persistent id.
        pickle.UnpicklingError: the file is too large or not a valid pickle.
    """
    data = fileobj.read(max_bytes + 1)
    return restricted_loads(data, max_bytes=max_bytes)
