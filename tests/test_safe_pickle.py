"""Tests of stages.ingest.safe_pickle: plain data loads, anything that could run code is refused."""

from __future__ import annotations

import builtins
import copyreg
import io
import os
import pickle
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orsgen.stages.ingest.safe_pickle import UnsafePickleError, restricted_load, restricted_loads


def py2_dumps(obj: Any) -> bytes:
    """Writes plain data as Python 2's ``cPickle.dumps(obj, 2)`` does.

    ``str`` is written as a Python 2 8-bit string (``SHORT_BINSTRING`` /
    ``BINSTRING`` of its UTF-8 bytes, ``bytes`` as given), and every string and
    container is memoised with ``BINPUT``, as Python 2 did.
    """
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put() -> None:
        i = memo[0]
        memo[0] += 1
        out.extend(b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i))

    def w(o: Any) -> None:
        if o is None:
            out.extend(b"N")
        elif o is True or o is False:
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif -(2**31) <= o < 2**31:
                out.extend(b"J" + struct.pack("<i", o))
            else:  # a Python 2 long
                raw = o.to_bytes((o.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, (str, bytes)):
            b = o.encode("utf-8") if isinstance(o, str) else o
            out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)
            put()
        elif isinstance(o, list):
            out.extend(b"]")
            put()
            if o:
                out.extend(b"(")
                for v in o:
                    w(v)
                out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}")
            put()
            if o:
                out.extend(b"(")
                for k, v in o.items():
                    w(k)
                    w(v)
                out.extend(b"u")
        elif isinstance(o, tuple):
            out.extend(b"(")
            for v in o:
                w(v)
            out.extend(b"t")
            put()
        else:
            raise TypeError(type(o))

    w(obj)
    out.extend(b".")
    return bytes(out)


REF = {
    "ref_id": 0,
    "ann_id": 1709,
    "image_id": 581857,
    "split": "train",
    "category_id": 1,
    "sent_ids": [0, 1],
    "file_name": "COCO_train2014_000000581857_16.jpg",
    "sentences": [
        {
            "raw": "woman in gray shirt",
            "sent": "woman in gray shirt",
            "sent_id": 0,
            "tokens": ["woman", "in", "gray", "shirt"],
        },
        {"raw": "Café  lady, left", "sent": "cafe lady left", "sent_id": 1, "tokens": ["cafe", "lady", "left"]},
    ],
    "score": 0.5,
    "big": 3_000_000_000,
    "neg": -7,
    "flag": True,
    "none": None,
    "pair": (1, "a"),
}


# ---------------------------------------------------------------- plain data


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_loads_at_every_protocol(protocol: int) -> None:
    assert restricted_loads(pickle.dumps([REF, REF], protocol=protocol)) == [REF, REF]


def test_protocol5_bytes_and_sets_load() -> None:
    obj = {"b": b"\x00\xff", "s": {1, 2}, "f": frozenset({"x"})}
    assert restricted_loads(pickle.dumps(obj, protocol=5)) == obj


def test_shared_and_recursive_references_load() -> None:
    inner = [1, 2]
    cyc: list[Any] = [inner, inner]
    cyc.append(cyc)
    got = restricted_loads(pickle.dumps(cyc, protocol=2))
    assert got[0] is got[1] and got[2] is got


def test_hand_made_py2_pickle_gives_str() -> None:
    # cPickle.dumps({'raw': 'caf\xc3\xa9', 'sent_id': 1}, 2) under Python 2.7.
    data = b"\x80\x02}q\x01(U\x03rawq\x02U\x05caf\xc3\xa9q\x03U\x07sent_idq\x04K\x01u."
    got = restricted_loads(data)
    assert got == {"raw": "café", "sent_id": 1}
    assert all(isinstance(k, str) for k in got)


def test_py2_writer_round_trip_of_refcoco_like_refs() -> None:
    data = py2_dumps([REF])
    assert b"U\x03raw" in data and b"X" not in data[:3]  # 8-bit strings, not unicode
    assert restricted_loads(data) == [REF]


def test_py2_str_that_is_not_utf8_falls_back_to_latin1() -> None:
    data = py2_dumps({"raw": b"na\xefve", "sent": "ok"})
    assert restricted_loads(data) == {"raw": "na\u00efve", "sent": "ok"}


def test_restricted_load_reads_a_file_object(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(py2_dumps([REF]))
    with path.open("rb") as f:
        assert restricted_load(f) == [REF]


# ---------------------------------------------------------------- refused


class _System:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.path}",))


class _Eval:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (builtins.eval, (f"open({str(self.path)!r}, 'w').close()",))


class _Exec(_Eval):
    def __reduce__(self) -> Any:
        return (builtins.exec, (f"open({str(self.path)!r}, 'w').close()",))


class _Popen(_Eval):
    def __reduce__(self) -> Any:
        return (subprocess.Popen, (["touch", str(self.path)],))


@dataclass
class PlainRecord:
    x: int = 1


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize(
    ("payload", "global_name"),
    [(_System, "system"), (_Eval, "eval"), (_Exec, "exec"), (_Popen, "Popen")],
)
def test_code_running_pickles_are_refused(tmp_path: Path, protocol: int, payload: type, global_name: str) -> None:
    pwned = tmp_path / "pwned"
    data = pickle.dumps([1, {"a": payload(pwned)}], protocol=protocol)
    with pytest.raises(UnsafePickleError, match=global_name):
        restricted_loads(data)
    assert not pwned.exists()


def test_error_names_module_and_name(tmp_path: Path) -> None:
    with pytest.raises(UnsafePickleError) as info:
        restricted_loads(pickle.dumps(_System(tmp_path / "pwned"), protocol=2))
    assert f"{os.system.__module__}.system" in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError)


def test_class_instances_are_refused() -> None:
    with pytest.raises(UnsafePickleError, match="PlainRecord"):
        restricted_loads(pickle.dumps(PlainRecord(), protocol=2))


def test_py3_bytes_under_protocol2_need_a_global_and_are_refused() -> None:
    # Python 3 writes bytes at protocol <= 2 as a call to _codecs.encode.
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        restricted_loads(pickle.dumps(b"abc", protocol=2))


def test_inst_opcode_is_refused(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    data = b"(S'touch " + str(pwned).encode() + b"'\nios\nsystem\n."
    with pytest.raises(UnsafePickleError, match="os.system"):
        restricted_loads(data)
    assert not pwned.exists()


def test_extension_registry_opcode_is_refused(tmp_path: Path) -> None:
    code, module = 0x7FFFFFF0, os.system.__module__
    copyreg.add_extension(module, "system", code)
    try:
        data = pickle.dumps(_System(tmp_path / "pwned"), protocol=2)
        assert b"\x84" in data  # EXT4
        with pytest.raises(UnsafePickleError, match=f"{module}.system"):
            restricted_loads(data)
    finally:
        copyreg.remove_extension(module, "system", code)
    assert not (tmp_path / "pwned").exists()


def test_persistent_ids_are_refused() -> None:
    class P(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return "ext-1" if obj == "secret" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(["secret"])
    with pytest.raises(UnsafePickleError, match="persistent id"):
        restricted_loads(buf.getvalue())


# ---------------------------------------------------------------- malformed


@pytest.mark.parametrize("data", [b"", b"not a pickle", pickle.dumps([1, 2, 3], protocol=2)[:-3], b"\x80\x02h\x05."])
def test_malformed_pickles_raise_unpickling_error(data: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError) as info:
        restricted_loads(data)
    assert not isinstance(info.value, UnsafePickleError)


def test_max_bytes_is_enforced() -> None:
    data = pickle.dumps(list(range(1000)), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="max_bytes"):
        restricted_loads(data, max_bytes=100)
    with pytest.raises(pickle.UnpicklingError, match="max_bytes"):
        restricted_load(io.BytesIO(data), max_bytes=100)
    assert restricted_loads(data, max_bytes=len(data)) == list(range(1000))
