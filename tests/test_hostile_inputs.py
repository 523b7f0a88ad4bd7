"""Hostile inputs (issue 11): every case is a reject with a reason, nothing escapes ``--out``.

One pipeline run over the demo inputs with a corpus of hostile values
injected into every input kind (SA-1B JSON, COCO instances, a RefCOCO
pickle, a gRefCOCO JSON): path-escaping and odd split names, integers above
int64, lone surrogates, NUL and control characters, overlong names. The run
must finish, reconcile, reject each case with its reason code, and write
nothing outside the output folder. The unit tests below pin the reasons of
each check one by one (they are cheap); the twin of each is a value that
passes.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from orsgen.pipelines.demo_data import generate_demo_inputs
from orsgen.pipelines.run import run_pipeline
from orsgen.schemas.config import load_config
from orsgen.schemas.records import Reject
from orsgen.stages.ingest import validate as V

pytestmark = pytest.mark.slow

ESCAPE = "../../../../ESCAPE"


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _hostile_refs(base: dict[str, Any], start_id: int) -> list[tuple[dict[str, Any], str]]:
    """(ref, expected reason) pairs derived from one good ref."""

    def ref(i: int, **changes: Any) -> dict[str, Any]:
        r = json.loads(json.dumps(base))
        r.update(ref_id=start_id + i, **changes)
        return r

    sent = base["sentences"][0]
    return [
        (ref(0, split=ESCAPE), V.UNSAFE_SPLIT),
        (ref(1, split="a b/c"), V.UNSAFE_SPLIT),
        (ref(2, split="tr\x00ain"), V.INVALID_TEXT),  # NUL: caught by the text check first
        (ref(3, sentences=[dict(sent, raw="the \ud800 kite", sent="the \ud800 kite")]), V.INVALID_TEXT),
        (ref(4, sentences=[dict(sent, raw="x" * (V.MAX_TEXT_CHARS + 1), sent="x")]), V.TEXT_TOO_LONG),
        (ref(5, image_id=2**70), V.INT_OUT_OF_RANGE),
        (ref(6, split="val\x1b[31m"), V.INVALID_TEXT),
    ]


def _inject(inputs: Path) -> dict[str, str]:
    """Adds hostile records to the demo inputs; returns {source_key suffix: expected reason}."""
    expected: dict[str, str] = {}
    # gRefCOCO JSON (ensure_ascii keeps lone surrogates as \ud800 escapes, as a hostile file would).
    gpath = inputs / "grefcoco" / "grefs(unc).json"
    grefs = json.loads(gpath.read_text())
    for r, reason in _hostile_refs(grefs[0], 90_000):
        grefs.append(r)
        rid = r["ref_id"]
        expected[f"grefs(unc).json#ref:{rid}"] = reason
    gpath.write_text(json.dumps(grefs, ensure_ascii=True))
    # RefCOCO pickle (protocol 2, as the originals).
    ppath = inputs / "refcoco" / "refs(unc).p"
    refs = pickle.loads(ppath.read_bytes())
    for r, reason in _hostile_refs(refs[0], 80_000):
        refs.append(r)
        expected[f"refs(unc).p#ref:{r['ref_id']}"] = reason
    ppath.write_bytes(pickle.dumps(refs, protocol=2))
    # COCO instances.
    cpath = inputs / "coco" / "annotations" / "instances_demo.json"
    doc = json.loads(cpath.read_text())
    img0, ann0 = doc["images"][0], doc["annotations"][0]
    doc["categories"] += [
        {"id": 2**63, "name": "big", "supercategory": "x"},
        {"id": 901, "name": "bad \ud800", "supercategory": "x"},
        {"id": 902, "name": "n" * (V.MAX_NAME_CHARS + 1), "supercategory": "x"},
    ]
    expected["instances_demo.json#category_index:" + str(len(doc["categories"]) - 3)] = V.INT_OUT_OF_RANGE
    expected["instances_demo.json#category:901"] = V.INVALID_TEXT
    expected["instances_demo.json#category:902"] = V.TEXT_TOO_LONG
    doc["images"] += [dict(img0, id=2**64), dict(img0, id=990_001, file_name="a\ud800.jpg")]
    expected[f"instances_demo.json#image_index:{len(doc['images']) - 2}"] = V.INT_OUT_OF_RANGE
    expected["instances_demo.json#image:990001"] = V.INVALID_TEXT
    doc["annotations"] += [dict(ann0, id=2**64), dict(ann0, id=990_002, category_id=2**70)]
    expected[f"instances_demo.json#ann_index:{len(doc['annotations']) - 2}"] = V.INT_OUT_OF_RANGE
    expected["instances_demo.json#ann:990002"] = V.INT_OUT_OF_RANGE
    cpath.write_text(json.dumps(doc, ensure_ascii=True))
    # SA-1B: two more pairs in a new shard, built from the first pair of shard 0.
    with tarfile.open(inputs / "sa1b" / "sa_000000.tar") as tf:
        jpg = tf.extractfile("sa_1.jpg").read()  # type: ignore[union-attr]
        meta = json.loads(tf.extractfile("sa_1.json").read())  # type: ignore[union-attr]
    pairs = []
    m1 = json.loads(json.dumps(meta))
    m1["image"].update(image_id=700, file_name="sa_700\ud800.jpg")
    pairs.append((700, m1))
    m2 = json.loads(json.dumps(meta))
    m2["image"].update(image_id=701)
    m2["annotations"][0]["id"] = 2**64
    pairs.append((701, m2))
    with tarfile.open(inputs / "sa1b" / "sa_000009.tar", "w") as tf:
        for stem, m in pairs:
            for name, data in ((f"sa_{stem}.jpg", jpg), (f"sa_{stem}.json", json.dumps(m, ensure_ascii=True).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    expected["sa_000009.tar#sa_700.json"] = V.INVALID_TEXT
    expected[f"sa_000009.tar#sa_701.json/ann:index0"] = V.INT_OUT_OF_RANGE
    text = (inputs / "demo.yaml").read_text().replace("  - sa1b/sa_000001.tar\n", "  - sa1b/sa_000001.tar\n  - sa1b/sa_000009.tar\n")
    text = text.replace("write:\n", "write:\n  parquet_compression: gzip\n")  # the rejects follow it too
    (inputs / "demo.yaml").write_text(text + SECRET_CONFIG)
    # Secrets inside data that reject messages quote.
    doc = json.loads(cpath.read_text())
    doc["categories"].append({"id": 903, "note": f"{SECRETS['env']} {SECRETS['hf']}"})
    expected["instances_demo.json#category:903"] = "bad_category"
    # A blank name: the expressions stage (which says every category's name,
    # present or absent) raised on it and failed the run.
    doc["categories"].append({"id": 904, "name": " \t", "supercategory": "x"})
    expected["instances_demo.json#category:904"] = "bad_category"
    cpath.write_text(json.dumps(doc, ensure_ascii=True))
    grefs = json.loads(gpath.read_text())
    bad = json.loads(json.dumps(grefs[0]))
    bad.update(ref_id=90_100, sentences=[{"raw": f"key {SECRETS['env']}", "tokens": [SECRETS["hf"]]}])
    grefs.append(bad)
    expected["grefs(unc).json#ref:90100"] = "bad_ref"
    gpath.write_text(json.dumps(grefs, ensure_ascii=True))
    return expected


SECRETS = {
    "env": "sk-ORSGENSECRET-1111",
    "hf": "hf_ORSGENSECRET2222xyz",
    "body": "ORSGENSECRET-3333",
    "header": "ORSGENSECRET-4444",
    "url": "ORSGENSECRET-5555",
    "flag": "ORSGENSECRET-6666",
    "flag_one_arg": "ORSGENSECRET-7777",
}
SECRET_CONFIG = f"""caption:
  enabled: false
  backend:
    model: m
    api_key_env: MY_VLM_KEY
    base_url: http://user:{SECRETS['url']}@127.0.0.1:8000/v1
    extra_body: {{api_key: {SECRETS['body']}, headers: {{Authorization: Bearer {SECRETS['header']}}}}}
    server_command: [vllm, serve, "{{model}}", -k, {SECRETS['flag']}, "--api-key {SECRETS['flag_one_arg']}", --port, "{{port}}"]
"""


def test_hostile_corpus_becomes_rejects_and_nothing_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MY_VLM_KEY", SECRETS["env"])
    monkeypatch.setenv("HF_TOKEN", SECRETS["hf"])
    monkeypatch.setenv("ORSGEN_SECRET_ENV", "")
    caplog.set_level("INFO")
    inputs = tmp_path / "inputs"
    generate_demo_inputs(inputs, seed=0)
    expected = _inject(inputs)
    before = _snapshot(tmp_path)
    out = tmp_path / "work" / "a" / "b" / "dataset"
    cfg = load_config(inputs / "demo.yaml")
    manifest = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)

    # Nothing new outside --out (the escape split would have gone 4 levels up).
    new = _snapshot(tmp_path) - before
    parents = {"work", "work/a", "work/a/b"}
    assert sorted(p for p in new if p not in parents and not (tmp_path / p).is_relative_to(out)) == []
    assert not list(tmp_path.rglob("*ESCAPE*"))
    splits = {p.name.split("-")[0] for p in (out / "webdataset" / "data").iterdir()}
    assert splits and all(V.split_problem(s) is None for s in splits), splits

    # Every hostile record is a reject with its reason; the funnel reconciles.
    rows = pq.read_table(out / "rejects").to_pylist()
    for f in (out / "rejects").iterdir():
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "GZIP"
    got = {}
    for r in rows:
        for suffix in expected:
            if r["source_key"].endswith(suffix):
                got[suffix] = r["reason"]
    assert got == expected
    assert all(level["reconciled"] for level in manifest["counts"]["levels"].values()), manifest["counts"]["levels"]
    for r in rows:  # every message is writable text, bounded
        r["message"].encode("utf-8")
        assert len(r["message"]) <= 2000

    # No secret (by value or by key name) in any output file, log or message.
    leaks = [p for p in out.rglob("*") if p.is_file() and b"ORSGENSECRET" in p.read_bytes()]
    assert leaks == []
    captured = capfd.readouterr()
    assert "ORSGENSECRET" not in caplog.text + captured.out + captured.err
    backend = manifest["config"]["caption"]["backend"]
    assert backend["api_key_env"] == "MY_VLM_KEY" and backend["extra_body"]["api_key"] == "***"
    assert manifest["config"]["inputs"][0]["shards"][0] == "sa1b/sa_000000.tar"  # as written, not absolute


# ---------------------------------------------------------------- unit checks (cheap)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"id": 2**63}, V.INT_OUT_OF_RANGE),
        ({"id": -(2**63) - 1}, V.INT_OUT_OF_RANGE),
        ({"name": "a\ud800"}, V.INVALID_TEXT),
        ({"name": "a\x00b"}, V.INVALID_TEXT),
        ({"name": "a\x85b"}, V.INVALID_TEXT),
        ({"name": "n" * 257}, V.TEXT_TOO_LONG),
        ({"bad\ud800key": 1}, V.INVALID_TEXT),
        ({"segmentation": [[1.0, 2.0, 2**80]]}, V.INT_OUT_OF_RANGE),
    ],
)
def test_value_problem_reasons(value: Any, reason: str) -> None:
    got = V.value_problem(value, "record", {"name": V.MAX_NAME_CHARS})
    assert got is not None and got[0] == reason
    got[1].encode("utf-8")  # the message itself is writable


@pytest.mark.parametrize(
    "value",
    [{"id": 2**63 - 1, "name": "n" * 256, "raw": "tab\tand newline\n", "segmentation": [[1.0, 2, 3.5]]}, {"x": None}],
)
def test_value_problem_accepts_good_values(value: Any) -> None:
    assert V.value_problem(value, "record", {"name": V.MAX_NAME_CHARS}) is None


def test_value_problem_bounds_deep_and_self_similar_values() -> None:
    deep: Any = 1
    for _ in range(V.MAX_DEPTH + 5):
        deep = [deep]
    assert V.value_problem(deep, "r")[0] == V.VALUE_TOO_DEEP  # type: ignore[index]
    laughs: Any = ["lol"] * 10
    for _ in range(9):
        laughs = [laughs] * 10  # 10**10 leaves through shared references
    assert V.value_problem(laughs, "r")[0] == V.VALUE_TOO_DEEP  # type: ignore[index]
    assert len(V.show(laughs)) <= 80


@pytest.mark.parametrize("split", [ESCAPE, "a b/c", "tr\x00ain", "", "x" * 65, "train.", "ood/x"])
def test_split_names(split: str) -> None:
    ok = split == ""
    assert (V.split_problem(split) is None) == ok


@pytest.mark.parametrize("split", ["train", "testA", "val_2", "ood_rare"])
def test_split_names_good(split: str) -> None:
    assert V.split_problem(split) is None


def test_reject_messages_are_bounded_and_writable() -> None:
    r = Reject("k\ud800", "s", "r", "m" * 10_000 + "\udcff")
    assert len(r.message) <= 2000
    r.message.encode("utf-8")
    r.source_key.encode("utf-8")


def test_inside_root_refuses_escapes() -> None:
    from orsgen.stages.write.files import inside_root
    from orsgen.stages.write.plan import OutputConflictError

    assert inside_root("/o", "webdataset/data/train-00000.tar") == "/o/webdataset/data/train-00000.tar"
    for rel in ("../x", "a/../../x", "/etc/passwd", "a//b", "a/\x00", "a\\b", ""):
        with pytest.raises(OutputConflictError):
            inside_root("/o", rel)


# ---------------------------------------------------------------- secrets (cheap twins of the run above)


def test_config_errors_never_show_secret_values(tmp_path: Path) -> None:
    from orsgen.schemas.config import ConfigError

    head = "inputs: [{name: s, type: sa1b, shards: [x.tar]}]\ncaption:\n  backend:\n"
    for body, key, secret in (
        ("    api_key: hf_SECRET123abc\n", "caption.backend.api_key", "SECRET123"),
        ("    base_url: ftp://user:PWSECRET99@h/v1\n", "base_url", "PWSECRET99"),
        ("    max_in_flight: sk-PWSECRET77\n", "caption.backend.max_in_flight", "PWSECRET77"),
    ):
        p = tmp_path / "c.yaml"
        p.write_text(head + body)
        with pytest.raises(ConfigError) as err:
            load_config(p)
        text = str(err.value)
        assert key in text, text  # the key is named
        assert secret not in text, text


def test_reject_messages_scrub_the_api_key_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from orsgen.schemas.config.redact import register_secret_env

    monkeypatch.setenv("ORSGEN_SECRET_ENV", "")
    monkeypatch.setenv("MY_SERVER_CRED", "s3cr3t-value-42")  # a name that does not look secret
    r1 = Reject("k", "caption", "vlm_http_error", "HTTP 401: invalid key s3cr3t-value-42")
    register_secret_env("MY_SERVER_CRED")
    r2 = Reject("k", "caption", "vlm_http_error", "HTTP 401: invalid key s3cr3t-value-42")
    assert "s3cr3t-value-42" in r1.message  # the twin: not registered, not a secret-looking name
    assert "s3cr3t-value-42" not in r2.message and "***" in r2.message


def test_manifest_config_masks_secrets_by_name_and_value() -> None:
    from orsgen.schemas.config import config_from_dict, redacted_config

    cfg = config_from_dict(
        {
            "inputs": [{"name": "s", "type": "sa1b", "shards": ["x.tar"]}],
            "caption": {
                "backend": {
                    "model": "m",
                    "api_key_env": "MY_KEY",
                    "base_url": "http://u:pw-secret@h/v1",
                    "extra_body": {"api_key": "k-secret", "headers": {"Authorization": "Bearer b-secret"}, "top_k": 20},
                    "server_command": ["serve", "-k", "f-secret", "--api-key one-secret", "--port", "{port}"],
                }
            },
        }
    )
    text = json.dumps(redacted_config(cfg))
    assert "secret" not in text
    assert '"api_key_env": "MY_KEY"' in text and '"top_k": 20' in text


# ---------------------------------------------------------------- the VLM cache keeps only answers that parse


def test_garbage_answers_are_not_cached_and_are_asked_again(tmp_path: Path) -> None:
    from orsgen.stages.caption.cache import CachingCaptioner, ResponseCache
    from orsgen.stages.caption.types import VlmRequest, VlmResponse

    class Server:
        """Answers with an HTML error page / truncated JSON until it recovers."""

        model_name = "m"

        def __init__(self, answers: list[str]) -> None:
            self.answers, self.sent = answers, 0

        def generate(self, requests: list[VlmRequest]) -> list[VlmResponse]:
            self.sent += len(requests)
            return [VlmResponse(request_id=r.request_id, text=self.answers[i % len(self.answers)], model="m") for i, r in enumerate(requests)]

    reqs = [
        VlmRequest(request_id=f"r{i}", task="reground", prompt_version="reground@v1", system="", user=f"find object {i}", images=(), image_sha256=())
        for i in range(2)
    ]
    cache = ResponseCache(str(tmp_path / "cache"))
    sick = Server(["<html><body>502 Bad Gateway</body></html>", '[{"bbox_2d": [1, 2'])
    CachingCaptioner(sick, cache).generate(reqs)
    assert sick.sent == 2 and len(cache) == 0  # nothing cached
    healthy = Server(['[{"bbox_2d": [1, 2, 10, 12], "label": "cat"}]'])
    CachingCaptioner(healthy, cache).generate(reqs)
    assert healthy.sent == 2 and len(cache) == 2  # asked again, now cached
    again = Server(["unused"])
    CachingCaptioner(again, cache).generate(reqs)
    assert again.sent == 0  # the twin: good answers replay from the cache
