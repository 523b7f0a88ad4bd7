"""Tiny files built to exhaust memory (issue 11), run under a memory cap.

Each bomb runs in one child process whose address space is capped with
``resource.setrlimit(RLIMIT_AS, MEMORY_CAP_BYTES)``; without the bounds of
``safe_pickle`` and ``schemas.config.loading`` every one of them needs many
GiB (or recurses past Python's limit). The child reports, per bomb, the
exit code of ``orsgen run`` (YAML: 2 with one sentence, no traceback) or the
type of the refusal (pickles: ``UnpicklingError``). The twin of each bomb is
a small well-formed file that loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: The cap each bomb runs under (the child imports pydantic, yaml, typer and rich).
MEMORY_CAP_BYTES = 1536 * 1024 * 1024


def _billion_laughs_pickle() -> bytes:
    # 10 levels of lists of 10 references to the level below: 239 bytes, 10**10 leaves.
    body = b"\x80\x02]q\x00K\x01a"
    for i in range(1, 10):
        body += b"]q" + bytes([i]) + b"(" + (b"h" + bytes([i - 1])) * 10 + b"e"
    return body + b"."


PICKLE_BOMBS = {
    "long_binput_4g": b"\x80\x02]r\xff\xff\xff\xff.",  # memo index 2**32-1
    "binbytes8_1tib": b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b".",
    "frame_huge": b"\x80\x04\x95" + (2**62).to_bytes(8, "little") + b"N.",
    "billion_laughs": _billion_laughs_pickle(),
    "deep_lists": b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b".",
}

_ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")
)

YAML_BOMBS: dict[str, bytes] = {
    "alias_bomb": (_ALIAS_BOMB + "inputs: *i\n").encode(),
    "alias_bomb_in_extra_body": (
        "inputs: [{name: s, type: sa1b, shards: [x.tar]}]\ncaption:\n  backend:\n    extra_body:\n"
        + "".join("      " + line + "\n" for line in _ALIAS_BOMB.splitlines())
    ).encode(),
    "python_tag": b"inputs: !!python/object/apply:os.system ['echo PWNED > pwned.txt']\n",
    "custom_tag": b"name: !secret foo\ninputs: []\n",
    "deep_50k": b"inputs: " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
    "binary_file": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd" * 10,
    "latin1_file": "name: caf\xe9\ninputs: []\n".encode("latin-1"),
}

_CHILD = textwrap.dedent(
    """
    import json, pickle, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from typer.testing import CliRunner
    from orsgen.pipelines.cli import app
    from orsgen.stages.ingest.safe_pickle import restricted_loads
    out = {{}}
    for name, path in json.loads(sys.argv[1]).items():
        data = open(path, "rb").read()
        try:
            restricted_loads(data)
            out[name] = "loaded"
        except pickle.UnpicklingError as err:
            out[name] = "refused: " + str(err)[:300]
        except MemoryError:
            out[name] = "MemoryError"
    for name, path in json.loads(sys.argv[2]).items():
        res = CliRunner().invoke(app, ["run", path, "--out", path + ".out", "--quiet"])
        exc = res.exception if not isinstance(res.exception, SystemExit) else None
        out[name] = {{"rc": res.exit_code, "output": res.output[-600:], "exception": repr(exc)[:300] if exc else None}}
    print("RESULT" + json.dumps(out))
    """
)


def test_bombs_are_refused_under_a_memory_cap(tmp_path: Path) -> None:
    pickles, yamls = {}, {}
    for name, data in PICKLE_BOMBS.items():
        (tmp_path / f"{name}.p").write_bytes(data)
        pickles[name] = str(tmp_path / f"{name}.p")
    for name, data in YAML_BOMBS.items():
        (tmp_path / f"{name}.yaml").write_bytes(data)
        yamls[name] = str(tmp_path / f"{name}.yaml")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(cap=MEMORY_CAP_BYTES), json.dumps(pickles), json.dumps(yamls)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in PICKLE_BOMBS:
        assert result[name].startswith("refused: "), (name, result[name])
    for name in YAML_BOMBS:
        r = result[name]
        assert r["rc"] == 2 and r["exception"] is None, (name, r)
        assert "Traceback" not in r["output"] and r["output"].startswith("error: "), (name, r)
    assert not (tmp_path / "pwned.txt").exists()
    assert "alias" in result["alias_bomb"]["output"] and "alias" in result["alias_bomb_in_extra_body"]["output"]
    assert "tag" in result["python_tag"]["output"] and "UTF-8" in result["binary_file"]["output"]
    assert "levels deep" in result["deep_50k"]["output"]


def test_bounds_let_ordinary_files_through(tmp_path: Path) -> None:
    import pickle

    from orsgen.schemas.config.loading import safe_load_yaml
    from orsgen.stages.ingest.safe_pickle import restricted_loads

    refs = [{"ref_id": i, "split": "train", "sentences": [{"raw": "a cat", "sent_id": i, "tokens": ["a", "cat"]}]} for i in range(2000)]
    assert restricted_loads(pickle.dumps(refs, protocol=2)) == refs
    shared = [1, 2]
    assert restricted_loads(pickle.dumps([shared] * 100, protocol=2)) == [[1, 2]] * 100
    # Anchors and aliases within the bound, merge keys and timestamps are fine.
    doc = safe_load_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  y: [*b, *b]\nwhen: 2024-01-01\n")
    assert doc["other"] == {"x": 1, "y": [{"x": 1}, {"x": 1}]}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"a: !!python/name:os.system x\n", "tag"),
        (b"a: [" * 100 + b"]" * 100, "levels deep"),
        ("a: caf\xe9".encode("latin-1"), "UTF-8"),
        (b"a: [1, 2", "not valid YAML"),
    ],
)
def test_yaml_refusals_are_config_errors(text: bytes, needle: str) -> None:
    from orsgen.schemas.config import ConfigError
    from orsgen.schemas.config.loading import safe_load_yaml

    with pytest.raises(ConfigError, match=needle):
        safe_load_yaml(text)
