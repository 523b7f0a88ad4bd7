"""The caption stage end to end through Beam (FnApiRunner), against real servers.

* A scripted OpenAI-compatible HTTP server on 127.0.0.1 (a real server that
  the real client talks to over HTTP) answers with valid JSON built from the
  demo scenes' ground truth, so the happy path runs reliably: CoRS labels are
  the true categories with the true boxes, descriptions quote their box and
  re-grounding reads it back. It also answers refusals, malformed text, wrong
  boxes, negative verdicts and HTTP 500s on fixed inputs, so every failure
  path of the stage shows up in the rejects and the manifest must reconcile.
* The cache test reruns into the same output and counts the requests the
  server received: zero.
* The tiny random Qwen2.5-VL (served by ``transformers serve`` and in-process)
  answers garbage: the malformed-output path, and the run still reconciles.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from orsgen.pipelines.run import run_pipeline
from orsgen.pipelines.demo_data import _BY_ID, _jpeg, demo_sa1b_image, write_sa1b
from orsgen.schemas.arrow import sample_from_row
from orsgen.schemas.config import load_config
from orsgen.stages.common.masks import encode_mask, rle_iou

pytestmark = pytest.mark.slow

SEED = 0
N_IMAGES = 2
RUNNER = ["--runner=FnApiRunner"]


# ------------------------------------------------------------------ truth


def _truth() -> dict[str, dict[str, Any]]:
    """sha256 of each demo SA-1B JPEG -> its size and objects (label, box in px, mask)."""
    out = {}
    for image_id in range(1, N_IMAGES + 1):
        image, objects, _regions = demo_sa1b_image(SEED, image_id)
        h, w = image.shape[:2]
        objs = []
        for o in objects:
            ys, xs = np.nonzero(o.mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            objs.append({"label": _BY_ID[o.category_id].noun, "box": box, "mask": o.mask})
        out[hashlib.sha256(_jpeg(image)).hexdigest()] = {"w": w, "h": h, "objects": objs}
    return out


def _to_1000(box: tuple[int, ...], w: int, h: int) -> list[int]:
    return [round(box[0] * 1000 / w), round(box[1] * 1000 / h), round(box[2] * 1000 / w), round(box[3] * 1000 / h)]


# ------------------------------------------------------------------ scripted server

_BOX_IN_PROMPT = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")
_LABEL_IN_PROMPT = re.compile(r'labelled "([^"]+)"')
_NUMS_IN_EXPR = re.compile(r"box (\d+) (\d+) (\d+) (\d+)")


class ScriptedVlm:
    """What the scripted server answers, per task, from the request it receives.

    Failure injection (deterministic in the request, so reruns see the same):
    a description request whose box text hashes to 0 mod 6 is refused, to
    1 mod 6 answered with garbage; a re-grounding whose box's x0 + y0 is 0
    mod 3 answers a shifted box; labels in ``reject_labels`` get a negative
    verdict; labels in ``http_500_labels`` get HTTP 500.
    """

    def __init__(self, truth: dict[str, dict[str, Any]]) -> None:
        self.truth = truth
        self.lock = threading.Lock()
        self.requests = 0
        self.by_task: dict[str, int] = {}
        self.inject = True
        self.reject_labels = {"clock"}
        self.http_500_labels = {"cup"}

    def answer(self, body: dict[str, Any]) -> tuple[int, str]:
        task = body.get("response_format", {}).get("json_schema", {}).get("name", "").removeprefix("orsgen_")
        user = body["messages"][-1]["content"]
        text = next(p["text"] for p in user if p["type"] == "text")
        images = [p["image_url"]["url"] for p in user if p["type"] == "image_url"]
        with self.lock:
            self.requests += 1
            self.by_task[task] = self.by_task.get(task, 0) + 1
        if task == "cors_ground":
            sha = hashlib.sha256(base64.b64decode(images[0].split(",", 1)[1])).hexdigest()
            t = self.truth[sha]
            items = [{"bbox_2d": _to_1000(o["box"], t["w"], t["h"]), "label": o["label"]} for o in t["objects"]]
            return 200, "```json\n" + json.dumps(items) + "\n```"
        if task == "cors_verify":
            label = _LABEL_IN_PROMPT.search(text).group(1)
            if self.inject and label in self.http_500_labels:
                return 500, "scripted server error"
            ok = not (self.inject and label in self.reject_labels)
            return 200, json.dumps({"category_correct": ok, "coverage_complete": True, "missed_instances": 0, "reason": "scripted"})
        if task == "ders_describe":
            x0, y0, x1, y1 = map(int, _BOX_IN_PROMPT.search(text).groups())
            h = int(hashlib.sha256(f"{x0} {y0} {x1} {y1}".encode()).hexdigest()[:8], 16) % 6
            if self.inject and h == 0:
                return 200, "I'm sorry, I can't help with that."
            if self.inject and h == 1:
                return 200, "<|im_start|>{{{ bbox bbox"
            return 200, json.dumps({"expression": f"the object in box {x0} {y0} {x1} {y1}"})
        if task == "reground":
            x0, y0, x1, y1 = map(int, _NUMS_IN_EXPR.search(text).groups())
            if self.inject and (x0 + y0) % 3 == 0:
                x0, x1 = min(x0 + 300, 990), min(x1 + 300, 1000)
            return 200, json.dumps([{"bbox_2d": [x0, y0, x1, y1], "label": "object"}])
        return 400, f"unknown task {task!r}"


def _serve(vlm: ScriptedVlm) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, payload: dict[str, Any] | str) -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": "scripted-vl", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, text = vlm.answer(body)
            if status != 200:
                self._send(status, {"error": {"message": text}})
                return
            self._send(200, {
                "id": "x", "object": "chat.completion", "model": "scripted-vl",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            })

    class Server(ThreadingHTTPServer):
        # socketserver's default listen backlog is 5: with more requests in
        # flight than that on a loaded machine, connections were refused and
        # became vlm_server_dead rejects instead of the scripted answers
        # (the rare flakes of the two tests that count reasons and requests).
        request_queue_size = 128

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def scripted():
    vlm = ScriptedVlm(_truth())
    server, url = _serve(vlm)
    yield vlm, url
    server.shutdown()


# ------------------------------------------------------------------ inputs and config


@pytest.fixture(scope="module")
def sa1b_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("sa1b")
    return [str(p) for p in write_sa1b(root, SEED, 1, N_IMAGES)]


def _config(tmp: Path, shards: list[str], backend: dict[str, Any], **caption: Any) -> Any:
    data = {
        "name": "caption-test",
        "inputs": [{"type": "sa1b", "name": "sa1b", "shards": shards}],
        "write": {"num_buckets": 1, "formats": ["parquet"]},
        "caption": {
            "enabled": True,
            "backend": {"max_retries": 0, "timeout_s": 60, **backend},
            "ders": {"min_area_frac": 0.008, "max_regions_per_image": 8},
            **caption,
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _samples(out: Path) -> list[Any]:
    rows = []
    for f in sorted((out / "parquet").rglob("*.parquet")):
        for ex in pq.read_table(f).to_pylist():
            rows += [(ex, sample_from_row(s)) for s in ex["samples"]]
    return rows


def _rejects(out: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((out / "rejects").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def _reconciled(manifest: dict[str, Any]) -> None:
    for level, c in manifest["counts"]["levels"].items():
        assert c["reconciled"], (level, c)


# ------------------------------------------------------------------ scripted: happy path and failures


@pytest.fixture(scope="module")
def scripted_run(scripted, sa1b_shards, tmp_path_factory):
    vlm, url = scripted
    tmp = tmp_path_factory.mktemp("scripted")
    cfg = _config(tmp, sa1b_shards, {"model": "scripted-vl", "base_url": url, "box_convention": "relative_1000"})
    before = vlm.requests
    manifest = run_pipeline(cfg, str(tmp / "out"), RUNNER, show_progress=False)
    return {"out": tmp / "out", "manifest": manifest, "requests": vlm.requests - before, "cfg": cfg}


def test_happy_path_writes_category_and_description_samples(scripted_run):
    _reconciled(scripted_run["manifest"])
    samples = _samples(scripted_run["out"])
    kinds = {s.kind for _ex, s in samples}
    assert "description" in kinds and kinds & {"category_single", "category_multi"}
    truth = _truth()
    for ex, s in samples:
        assert s.union_rle is not None and s.targets, s.sample_id
        assert s.split in {"train", "val", "test"}
        if s.kind == "description":
            assert s.reground_iou is not None and s.reground_iou >= 0.8 and s.reground_box is not None
            assert s.generator == "vlm" and s.template == "ders_describe@v1" and s.model == "scripted-vl"
        if s.kind.startswith("category"):
            # The merged masks are the true objects of that label.
            t = truth[ex["sha256"]]
            objs = [o for o in t["objects"] if o["label"] == s.expression]
            assert len(objs) == len(s.target_ids)
            union = encode_mask(np.logical_or.reduce([o["mask"] for o in objs]))
            assert rle_iou(s.union_rle, union) > 0.97, s.sample_id
            assert s.metadata["verified"] is True and s.template == "cors_ground@v1"
    # Merged instances were appended, and their ids follow the documented form.
    inst_ids = [i["instance_id"] for ex, _s in samples for i in ex["instances"]]
    for _ex, s in samples:
        assert set(s.target_ids) <= set(inst_ids)


def test_every_failure_is_a_counted_reject(scripted_run):
    m = scripted_run["manifest"]
    reasons = m["counts"]["rejected_by_reason"]
    rejects = [r for r in _rejects(scripted_run["out"]) if r["stage"] == "caption"]
    got = {r["reason"] for r in rejects}
    assert {"vlm_refusal", "vlm_malformed_output", "ders_reground_failed", "cors_verify_failed", "vlm_http_error"} <= got, got
    for r in rejects:
        assert r["level"] == "sample"
        assert reasons[f"sample/{r['reason']}"] >= 1
    regrounds = [r for r in rejects if r["reason"] == "ders_reground_failed"]
    assert all("IoU" in r["message"] for r in regrounds)
    sample_ids = {s.sample_id for _ex, s in _samples(scripted_run["out"])}
    assert not sample_ids & {r["source_key"] for r in rejects}


def test_rerun_sends_zero_requests(scripted, sa1b_shards, tmp_path_factory):
    vlm, url = scripted
    tmp = tmp_path_factory.mktemp("cache")
    vlm.inject = False  # only answers, no transport errors: every request is cacheable
    try:
        cfg = _config(tmp, sa1b_shards, {"model": "scripted-vl", "base_url": url, "box_convention": "relative_1000"})
        out = tmp / "out"
        n0 = vlm.requests
        m1 = run_pipeline(cfg, str(out), RUNNER, show_progress=False)
        first = vlm.requests - n0
        assert first > 0 and any((out / "_cache" / "vlm").rglob("*"))
        # A rerun into the same output: every answer comes from OUT/_cache/vlm.
        n_again = vlm.requests
        m_again = run_pipeline(cfg, str(out), RUNNER, show_progress=False)
        assert vlm.requests - n_again == 0
        assert m_again["counts"] == m1["counts"]
        # A second build into a fresh folder, sharing the first one's cache.
        cfg2 = _config(tmp, sa1b_shards, {"model": "scripted-vl", "base_url": url, "box_convention": "relative_1000",
                                          "cache_dir": str(out / "_cache" / "vlm")})
        n1 = vlm.requests
        m2 = run_pipeline(cfg2, str(tmp / "out2"), RUNNER, show_progress=False)
        assert vlm.requests - n1 == 0
        assert m2["counts"]["levels"] == m1["counts"]["levels"]
        assert sorted(s.sample_id for _e, s in _samples(out)) == sorted(s.sample_id for _e, s in _samples(tmp / "out2"))
    finally:
        vlm.inject = True


# ------------------------------------------------------------------ tiny Qwen2.5-VL: real server and in-process

# The tiny processor's pixel budget (tests/vlm_fixtures.py), so that absolute
# boxes map back through the same smart_resize the model's processor applies.
TINY_GEOMETRY = {"box_convention": "absolute", "image_factor_px": 28, "image_min_pixels": 28 * 28 * 4,
                 "image_max_pixels": 28 * 28 * 64, "max_image_side_px": 320}


def _tiny_backend(kind: str, model: str, server_url: str | None) -> dict[str, Any]:
    if kind == "server":
        # transformers serve ignores response_format; "none" skips the probe.
        return {"backend": "openai", "base_url": server_url, "model": model, "response_format": "none",
                "max_in_flight": 4, **TINY_GEOMETRY}
    return {"backend": "transformers", "model": model, "device": "cpu", "dtype": "float32", "batch_size": 4,
            **TINY_GEOMETRY}


@pytest.mark.parametrize("kind", ["server", "inprocess"])
def test_tiny_random_model_answers_become_rejects(kind, request, tiny_vlm, sa1b_shards, tmp_path):
    url = request.getfixturevalue("tiny_vlm_server") if kind == "server" else None
    # Few regions and short answers: noise is slow to generate on CPU and proves nothing more in bulk.
    cfg = _config(tmp_path, sa1b_shards, _tiny_backend(kind, tiny_vlm.random, url),
                  sampling={"max_tokens": 16, "temperature": 0.0}, ders={"min_area_frac": 0.02, "max_regions_per_image": 2})
    m = run_pipeline(cfg, str(tmp_path / "out"), RUNNER, show_progress=False)
    _reconciled(m)
    rejects = [r for r in _rejects(tmp_path / "out") if r["stage"] == "caption"]
    # Noise does not parse: the grounding of each image and the descriptions fail as samples.
    assert rejects and all(r["reason"].startswith("vlm_") for r in rejects), {r["reason"] for r in rejects}
    assert {r["source_key"] for r in rejects if r["source_key"].endswith("-cors")} == {
        "sa1b-sa1b_1-cors", "sa1b-sa1b_2-cors"}
    assert m["counts"]["caption"]["requests_cors_ground"] == N_IMAGES


@pytest.mark.parametrize("kind", ["server", "inprocess"])
def test_tiny_scripted_model_happy_path(kind, request, tiny_vlm, sa1b_shards, tmp_path):
    """The scripted tiny model answers one valid JSON object: a grounded 'red square', a description, a yes."""
    url = request.getfixturevalue("tiny_vlm_server") if kind == "server" else None
    cfg = _config(tmp_path, sa1b_shards, _tiny_backend(kind, tiny_vlm.scripted, url),
                  sampling={"max_tokens": 24, "temperature": 0.0})
    m = run_pipeline(cfg, str(tmp_path / "out"), RUNNER, show_progress=False)
    _reconciled(m)
    samples = [s for _ex, s in _samples(tmp_path / "out")]
    cors_samples = [s for s in samples if s.kind == "category_single"]
    assert len(cors_samples) == N_IMAGES
    for s in cors_samples:
        assert s.expression == "red square" and s.metadata["verified"] is True and s.model.startswith(tiny_vlm.scripted)
        assert s.union_rle is not None and s.targets
    # The description is re-grounded to the same fixed box; the IoU gate decides, and either way it is accounted.
    reasons = {r["reason"] for r in _rejects(tmp_path / "out") if r["stage"] == "caption"}
    assert reasons <= {"ders_reground_failed"}
    n_ders = m["counts"]["caption"]["requests_ders_describe"]
    assert len([s for s in samples if s.kind == "description"]) + m["counts"]["rejected_by_reason"].get(
        "sample/ders_reground_failed", 0) == n_ders


# ------------------------------------------------------------------ dead letters through Beam


def test_inference_exceptions_become_rejects_not_a_failed_job(sa1b_shards, tmp_path):
    """A backend that raises (a bug, a crash) sends its batches to RunInference's dead letters."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from orsgen.pipelines.caption import CaptionExamples
    from orsgen.schemas.config import CaptionBackendConfig, CaptionConfig, ImageConfig
    from orsgen.stages.caption.handler import VlmModelHandler
    from orsgen.stages.ingest.sa1b import read_sa1b_shard

    class _NoModel:
        model_name = "none"

    class Exploding(VlmModelHandler):
        def load_model(self) -> Any:
            return _NoModel()

        def run_inference(self, batch, model, inference_args=None):
            raise RuntimeError("backend exploded")

    examples = [e for e in read_sa1b_shard(sa1b_shards[0], input_name="sa1b", image_cfg=ImageConfig()) if hasattr(e, "key")]
    cfg = CaptionConfig(enabled=True, backend=CaptionBackendConfig(model="m", cache=False),
                        ders={"min_area_frac": 0.05, "max_regions_per_image": 2})
    with TestPipeline(runner="FnApiRunner") as p:
        out, rejects, events = (
            p | beam.Create(examples) | CaptionExamples(cfg, {"sa1b": "sa1b"}, Exploding(cfg.backend))
        )
        assert_that(out | "Keys" >> beam.Map(lambda e: (e.key, len(e.samples), len(e.instances))),
                    equal_to([(e.key, 0, len(e.instances)) for e in examples]), label="unchanged")
        assert_that(rejects | "Reasons" >> beam.Map(lambda r: (r.reason, r.level)) | "UniqReasons" >> beam.Distinct(),
                    equal_to([("vlm_backend_error", "sample")]), label="reasons")
        # Every reject stands for a created sample, so the sample level reconciles.
        created = (events | "Created" >> beam.Filter(lambda kv: kv[0] == "created/samples")
                   | "CreatedN" >> beam.Values() | "CreatedSum" >> beam.CombineGlobally(sum))
        n_rejects = rejects | "NRejects" >> beam.combiners.Count.Globally()
        n_distinct = ((created, n_rejects) | "Both" >> beam.Flatten() | "Uniq" >> beam.Distinct()
                      | "NDistinct" >> beam.combiners.Count.Globally())
        assert_that(n_distinct, equal_to([1]), label="created_equals_rejected")
        assert_that(n_rejects | "Positive" >> beam.Map(lambda n: n > 0), equal_to([True]), label="some_rejects")
        # The message is the dead letter's exception, not a lost response.
        assert_that(rejects | "Raised" >> beam.Map(lambda r: "backend exploded" in r.message) | "UniqRaised" >> beam.Distinct(),
                    equal_to([True]), label="from_dead_letters")



def test_both_rounds_share_one_model_and_no_record_is_shuffled():
    """One DoFn runs both rounds against one model: no join moves image records.

    The captioner is acquired under the transform's tag (once per process,
    or once per worker with ``share_model_across_processes``), so a managed
    vLLM starts once per GPU machine; a second caption transform gets its own
    tag. Checked on the graph: no GroupByKey or RunInference inside the stage.
    """
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    from orsgen.pipelines.caption import CaptionBatchDoFn, CaptionExamples
    from orsgen.schemas.config import CaptionBackendConfig, CaptionConfig
    from orsgen.stages.caption.handler import VlmModelHandler

    backend = CaptionBackendConfig(backend="managed", model="m", server_command=["vllm", "serve", "{model}", "--port", "{port}"])
    handler = VlmModelHandler(backend)
    assert handler.share_model_across_processes()
    cfg = CaptionConfig(enabled=True, backend=backend)

    def inspect(t: CaptionExamples) -> tuple[list[str], list[str], list[str]]:
        p = beam.Pipeline(runner="FnApiRunner")
        _ = p | beam.Create([]) | "Caption" >> t
        dofns, shuffles, ri = [], [], []

        class Visit(beam.pipeline.PipelineVisitor):
            def enter_composite_transform(self, node):
                if isinstance(node.transform, RunInference):
                    ri.append(node.full_label)

            def visit_transform(self, node):
                if not node.full_label.startswith("Caption/"):
                    return
                if isinstance(node.transform, beam.ParDo) and isinstance(node.transform.fn, CaptionBatchDoFn):
                    dofns.append(node.transform.fn._tag)
                if isinstance(node.transform, beam.GroupByKey):
                    shuffles.append(node.full_label)

        p.visit(Visit())
        return dofns, shuffles, ri

    t1 = CaptionExamples(cfg, {"sa1b": "sa1b"}, handler)
    dofns, shuffles, ri = inspect(t1)
    assert dofns == [t1.model_identifier] and not shuffles and not ri
    t2 = CaptionExamples(cfg, {"sa1b": "sa1b"}, handler)
    assert inspect(t2)[0] == [t2.model_identifier] != [t1.model_identifier]


def test_server_down_for_the_whole_run_fails_with_one_sentence(sa1b_shards, tmp_path):
    """Nobody listens at base_url: the run fails, saying so, instead of rejecting everything."""
    from vlm_fixtures import free_port

    from orsgen.pipelines.caption import VlmUnreachableError

    port = free_port()
    cfg = _config(tmp_path, sa1b_shards, {"model": "m", "base_url": f"http://127.0.0.1:{port}/v1", "cache": False},
                  ders={"min_area_frac": 0.05, "max_regions_per_image": 1})
    with pytest.raises(VlmUnreachableError) as info:
        run_pipeline(cfg, str(tmp_path / "out"), RUNNER, show_progress=False)
    msg = str(info.value)
    assert msg.startswith("caption: 4 of 4 VLM requests could not reach the model server")
    assert f"http://127.0.0.1:{port}/v1" in msg and "caption.backend.max_unreachable_fraction" in msg
    assert "\n" not in msg and "Traceback" not in msg
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_server_down_with_the_gate_off_is_rejects_not_a_crash(sa1b_shards, tmp_path):
    """Twin: max_unreachable_fraction 1.0 accepts the outage; every caption sample is a counted reject."""
    from vlm_fixtures import free_port

    cfg = _config(tmp_path, sa1b_shards, {"model": "m", "base_url": f"http://127.0.0.1:{free_port()}/v1", "cache": False,
                                          "max_unreachable_fraction": 1.0},
                  ders={"min_area_frac": 0.05, "max_regions_per_image": 1})
    m = run_pipeline(cfg, str(tmp_path / "out"), RUNNER, show_progress=False)
    _reconciled(m)
    rejects = [r for r in _rejects(tmp_path / "out") if r["stage"] == "caption"]
    assert rejects and {r["reason"] for r in rejects} == {"vlm_server_dead"}
    assert m["counts"]["rejected_by_reason"]["sample/vlm_server_dead"] == len(rejects)
    assert not [s for _ex, s in _samples(tmp_path / "out") if s.generator == "vlm"]
