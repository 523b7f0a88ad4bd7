"""VLM backends against real servers on 127.0.0.1.

* ``transformers serve`` with the tiny Qwen2.5-VLs (``tiny_vlm_server``): the
  OpenAI client and the in-process transformers backend on the same requests.
* A scripted HTTP server (``MockOpenAIServer``) for what a tiny model cannot be
  made to do on demand: 429s, 5xx, slow answers, rejected ``response_format``,
  refusals, and a count of concurrent requests.
* ``ManagedServerCaptioner`` starting ``transformers serve``, surviving a
  SIGKILL of the server, and stopping it.
* ``VlmModelHandler`` through Beam ``RunInference`` (FnApiRunner).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import sys
import time

import pytest
from PIL import Image

from conftest import jpeg_bytes
from orsgen.schemas.config import CaptionBackendConfig
from orsgen.stages.caption.backends import (
    Captioner,
    ManagedServerCaptioner,
    OpenAICompatibleCaptioner,
    ServerStartError,
    prepare_image,
)
from orsgen.stages.caption.parse import parse_description, parse_grounding, parse_verification
from orsgen.stages.caption.prompts import load_prompts, make_request
from orsgen.stages.caption.types import SamplingParams, VlmError, VlmRequest, VlmTask
from vlm_fixtures import SCRIPTED_ANSWER, MockOpenAIServer

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, seed=0)
HOT = SamplingParams(max_tokens=12, temperature=1.0, seed=1)


def _requests(n: int, sampling: SamplingParams = GREEDY, size=(96, 64), schema: str = "") -> list[VlmRequest]:
    prompts = load_prompts()
    out = []
    for i in range(n):
        task = list(VlmTask)[i % 4]
        fields = {
            VlmTask.CORS_GROUND: {},
            VlmTask.CORS_VERIFY: {"label": "cat"},
            VlmTask.DERS_DESCRIBE: {"box": "[1, 2, 30, 40]"},
            VlmTask.REGROUND: {"expression": "the cat"},
        }[task]
        n_images = 2 if task is VlmTask.DERS_DESCRIBE else 1
        req = make_request(
            prompts,
            task,
            request_id=f"img{i}/{task.value}",
            images=[jpeg_bytes(size[0], size[1], seed=i + k) for k in range(n_images)],
            region=f"r{i}",
            sampling=sampling,
            **fields,
        )
        out.append(req if not schema else _with_schema(req, schema))
    return out


def _with_schema(req: VlmRequest, schema: str) -> VlmRequest:
    import dataclasses

    return dataclasses.replace(req, json_schema=schema)


PARSERS = {
    VlmTask.CORS_GROUND.value: parse_grounding,
    VlmTask.REGROUND.value: parse_grounding,
    VlmTask.DERS_DESCRIBE.value: parse_description,
    VlmTask.CORS_VERIFY.value: parse_verification,
}


# ------------------------------------------------------------------ transformers serve


@pytest.mark.slow
def test_openai_client_against_transformers_serve(tiny_vlm, tiny_vlm_server):
    reqs = _requests(4)
    client = OpenAICompatibleCaptioner(tiny_vlm_server, tiny_vlm.scripted, max_image_side_px=64, max_retries=1, timeout_s=60)
    try:
        assert isinstance(client, Captioner)
        answers = client.generate(reqs)
        # The scripted model answers its one JSON object (greedy) to each
        # request, images attached as base64 data URLs: the happy path.
        assert [a.request_id for a in answers] == [r.request_id for r in reqs]
        assert all(a.error == "" and a.text.strip() == SCRIPTED_ANSWER for a in answers), answers
        for r, a in zip(reqs, answers):
            parsed = PARSERS[r.task](a.text)
            assert not isinstance(parsed, VlmError), (r.task, parsed)
        assert client.requests_sent == 4

        # The random model answers noise: parsers turn it into reason codes, never exceptions.
        noisy = OpenAICompatibleCaptioner(tiny_vlm_server, tiny_vlm.random, max_image_side_px=64, max_retries=1, timeout_s=60)
        try:
            for r, a in zip(_requests(4, HOT), noisy.generate(_requests(4, HOT))):
                assert a.error in ("", VlmError.EMPTY)
                PARSERS[r.task](a.text)
        finally:
            noisy.close()
    finally:
        client.close()


@pytest.mark.slow
def test_transformers_backend_answers_the_same_requests(tiny_vlm, tiny_vlm_server):
    from orsgen.stages.caption.backends import TransformersCaptioner

    reqs = _requests(4)
    local = TransformersCaptioner(tiny_vlm.scripted, device="cpu", batch_size=3, max_image_side_px=64)
    answers = local.generate(reqs)
    assert [a.request_id for a in answers] == [r.request_id for r in reqs]
    assert all(a.error == "" and a.text.strip() == SCRIPTED_ANSWER for a in answers), answers
    # Same greedy answers as the served model.
    client = OpenAICompatibleCaptioner(tiny_vlm_server, tiny_vlm.scripted, max_image_side_px=64, timeout_s=60)
    try:
        served = client.generate(reqs[:2])
    finally:
        client.close()
    assert [a.text.strip() for a in served] == [a.text.strip() for a in answers[:2]]

    noisy = TransformersCaptioner(tiny_vlm.random, device="cpu", batch_size=4, max_image_side_px=64)
    for r, a in zip(reqs, noisy.generate(_requests(4, HOT))):
        assert a.error in ("", VlmError.EMPTY)
        PARSERS[r.task](a.text)
    # An undecodable image fails that request only.
    bad = _with_images(reqs[0], (b"not an image",))
    out = local.generate([bad, reqs[1]])
    assert out[0].error == VlmError.BACKEND and "not decodable" in out[0].message
    assert out[1].error == ""


def _with_images(req: VlmRequest, images: tuple[bytes, ...]) -> VlmRequest:
    import dataclasses

    return dataclasses.replace(req, images=images)


def test_transformers_backend_names_the_extra_when_missing(monkeypatch):
    import builtins

    from orsgen.stages.caption import backends

    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"orsgen\[vlm\]"):
        backends.TransformersCaptioner("some/model")


# ------------------------------------------------------------------ scripted HTTP server: the client


def test_request_payload_base64_resized_image_and_no_stop():
    with MockOpenAIServer(answer='{"expression": "a cat"}') as srv:
        c = OpenAICompatibleCaptioner(srv.url, "mock-vl", max_image_side_px=48, max_retries=0)
        try:
            req = _requests(1, size=(200, 100), schema='{"type":"object"}')[0]
            (ans,) = c.generate([req])
        finally:
            c.close()
    assert ans.error == "" and ans.text == '{"expression": "a cat"}' and ans.model == "mock-vl"
    body = srv.bodies[0]
    assert "stop" not in body and body["seed"] == 0 and body["max_tokens"] == GREEDY.max_tokens
    assert body["messages"][0] == {"role": "system", "content": req.system}
    parts = body["messages"][1]["content"]
    assert parts[-1] == {"type": "text", "text": req.user}
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (48, 24)  # 200x100 fitted to a 48 px longest side
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_prompt_containing_the_image_slot_text_still_encodes():
    from orsgen.stages.caption.backends import _IMAGE_SLOT

    with MockOpenAIServer(answer="[]") as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_image_side_px=32)
        try:
            req = _with_user(_requests(1)[0], "say " + _IMAGE_SLOT.decode())
            assert c.generate([req])[0].error == ""
        finally:
            c.close()
    body = srv.bodies[0]
    assert body["messages"][1]["content"][-1]["text"] == "say " + _IMAGE_SLOT.decode()
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def _with_user(req: VlmRequest, user: str) -> VlmRequest:
    import dataclasses

    return dataclasses.replace(req, user=user)


def test_small_images_are_sent_unchanged():
    data = jpeg_bytes(40, 30)
    p = prepare_image(data, 64)
    assert p.data == data and p.mime == "image/jpeg" and p.size == (40, 30)
    png = io.BytesIO()
    Image.new("RGBA", (300, 100), (1, 2, 3, 4)).save(png, format="PNG")
    p = prepare_image(png.getvalue(), 60)
    assert p.mime == "image/png" and p.size == (60, 20)


def test_retries_429_and_5xx_then_succeeds():
    def script(body, n):
        if n == 0:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}, 0
        if n == 1:
            return 503, "overloaded", {}, 0
        return 200, MockOpenAIServer.completion(body, "[]"), {}, 0

    with MockOpenAIServer(script) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05)
        try:
            (ans,) = c.generate(_requests(1))
        finally:
            c.close()
    assert ans.error == "" and ans.text == "[]"
    assert srv.requests == 3 and c.stats.retries == 2 and c.requests_sent == 3


def test_gives_up_after_max_retries_with_http_error():
    with MockOpenAIServer(lambda body, n: (500, "boom", {}, 0)) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.02)
        try:
            (ans,) = c.generate(_requests(1))
        finally:
            c.close()
    assert ans.error == VlmError.HTTP_ERROR and "HTTP 500" in ans.message and "3 attempts" in ans.message
    assert srv.requests == 3 and c.stats.errors == {VlmError.HTTP_ERROR.value: 1}


def test_timeout_is_retried_then_reported():
    with MockOpenAIServer(lambda body, n: (200, MockOpenAIServer.completion(body, "late"), {}, 1.0), max_delay_s=1.0) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", timeout_s=0.2, max_retries=1, backoff_initial_s=0.01)
        try:
            t0 = time.monotonic()
            (ans,) = c.generate(_requests(1))
            elapsed = time.monotonic() - t0
        finally:
            c.close()
    assert ans.error == VlmError.TIMEOUT and srv.requests == 2
    assert elapsed < 2.0  # two 0.2 s timeouts, not two 1 s answers


def test_non_retryable_4xx_is_not_retried():
    with MockOpenAIServer(lambda body, n: (404, {"error": "no such model"}, {}, 0)) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_retries=3, backoff_initial_s=0.01)
        try:
            (ans,) = c.generate(_requests(1, schema='{"type":"object"}'))
        finally:
            c.close()
    assert ans.error == VlmError.HTTP_ERROR and "404" in ans.message and srv.requests == 1


def test_rejected_response_format_falls_back_and_is_remembered():
    def script(body, n):
        if "response_format" in body:
            return 400, {"error": {"message": "response_format json_schema is not supported"}}, {}, 0
        return 200, MockOpenAIServer.completion(body, '[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]'), {}, 0

    with MockOpenAIServer(script) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_retries=0)
        try:
            first = c.generate(_requests(1, schema='{"type":"array"}'))
            assert c.response_format_supported is False
            second = c.generate(_requests(3, schema='{"type":"array"}'))
        finally:
            c.close()
    assert all(a.error == "" for a in first + second)
    # 2 for the first request (with, then without), then 1 each: never sent again.
    assert srv.requests == 5 and sum("response_format" in b for b in srv.bodies) == 1


def test_accepted_response_format_keeps_being_sent():
    with MockOpenAIServer(answer="{}") as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m")
        try:
            c.generate(_requests(3, schema='{"type":"object"}'))
        finally:
            c.close()
    assert c.response_format_supported is True and all("response_format" in b for b in srv.bodies)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "assistant", "content": ""}, VlmError.EMPTY),
        ({"role": "assistant", "content": None, "refusal": "I can't help with that."}, VlmError.REFUSAL),
    ],
)
def test_empty_and_refused_answers(message, error):
    def script(body, n):
        return 200, {"model": "m", "choices": [{"message": message, "finish_reason": "stop"}]}, {}, 0

    with MockOpenAIServer(script) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_retries=0)
        try:
            (ans,) = c.generate(_requests(1))
        finally:
            c.close()
    assert ans.error == error and ans.text == ""


def test_non_json_body_is_a_backend_error():
    with MockOpenAIServer(lambda body, n: (200, "<html>proxy error</html>", {}, 0)) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_retries=0)
        try:
            (ans,) = c.generate(_requests(1))
        finally:
            c.close()
    assert ans.error == VlmError.BACKEND and "proxy error" in ans.message


def test_unreachable_server_is_server_dead():
    from vlm_fixtures import free_port

    c = OpenAICompatibleCaptioner(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1, backoff_initial_s=0.01)
    try:
        (ans,) = c.generate(_requests(1))
    finally:
        c.close()
    assert ans.error == VlmError.SERVER_DEAD and "2 attempts" in ans.message


def test_concurrency_is_bounded_by_max_in_flight():
    with MockOpenAIServer(answer="[]", latency_s=0.1) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_in_flight=4)
        try:
            t0 = time.monotonic()
            answers = c.generate(_requests(16))
            elapsed = time.monotonic() - t0
        finally:
            c.close()
    assert all(a.error == "" for a in answers)
    assert srv.max_in_flight == 4 and c.stats.max_in_flight_seen == 4
    assert elapsed >= 0.35  # 16 requests, 4 at a time, 0.1 s each: at least 4 rounds


def test_default_concurrency_is_at_least_64():
    # Enough to keep a vLLM server's batch full; benchmarks/bench_caption.py shows 64 in flight at the server.
    assert CaptionBackendConfig().max_in_flight >= 64
    c = OpenAICompatibleCaptioner("http://127.0.0.1:1/v1", "m")
    try:
        assert c.max_in_flight >= 64
    finally:
        c.close()


def test_concurrent_generate_calls_share_one_budget():
    from concurrent.futures import ThreadPoolExecutor

    with MockOpenAIServer(answer="[]", latency_s=0.05) as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", max_in_flight=3)
        try:
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda k: c.generate(_requests(6)), range(4)))
        finally:
            c.close()
    assert all(a.error == "" for batch in results for a in batch)
    assert srv.max_in_flight <= 3 and srv.requests == 24


def test_api_key_from_env_is_sent_and_never_shown(monkeypatch):
    monkeypatch.setenv("ORSGEN_TEST_KEY", "sk-secret-123")
    with MockOpenAIServer(answer="[]") as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m", api_key_env="ORSGEN_TEST_KEY")
        try:
            c.generate(_requests(1))
        finally:
            c.close()
    assert srv.headers[0].get("Authorization") == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(c) and "sk-secret" not in str(vars(c).get("stats"))
    monkeypatch.delenv("ORSGEN_TEST_KEY")
    with pytest.raises(ValueError, match="ORSGEN_TEST_KEY"):
        OpenAICompatibleCaptioner(srv.url, "m", api_key_env="ORSGEN_TEST_KEY")


def test_bad_constructor_arguments_say_what_to_fix():
    with pytest.raises(ValueError, match="http"):
        OpenAICompatibleCaptioner("localhost:8000", "m")
    with pytest.raises(ValueError, match="model"):
        OpenAICompatibleCaptioner("http://127.0.0.1:1/v1", "")
    c = OpenAICompatibleCaptioner("http://127.0.0.1:1", "m")
    assert c.base_url == "http://127.0.0.1:1/v1"
    c.close()


def test_undecodable_image_fails_only_its_request():
    with MockOpenAIServer(answer="[]") as srv:
        c = OpenAICompatibleCaptioner(srv.url, "m")
        try:
            reqs = _requests(2)
            out = c.generate([_with_images(reqs[0], (b"\x89PNG garbage",)), reqs[1]])
        finally:
            c.close()
    assert out[0].error == VlmError.BACKEND and out[1].error == "" and srv.requests == 1


# ------------------------------------------------------------------ managed server


@pytest.mark.slow
def test_managed_transformers_serve_restarts_after_kill(tiny_vlm_managed):
    """The session server is a ManagedServerCaptioner; its teardown checks the clean stop."""
    cap = tiny_vlm_managed
    reqs = _requests(2)
    assert [a.text.strip() for a in cap.generate(reqs)] == [SCRIPTED_ANSWER] * 2
    first_pid, restarts = cap.pid, cap.restarts
    os.kill(first_pid, signal.SIGKILL)  # the server the fixture started
    cap._proc.wait(timeout=10)
    answers = cap.generate(reqs)
    assert [a.error for a in answers] == ["", ""], answers
    assert cap.restarts == restarts + 1 and cap.pid != first_pid and cap.alive()
    assert "starting" in cap.log_tail(100_000)


def test_managed_server_that_exits_reports_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('bad flag --port {port}'); sys.exit(3)"]
    with pytest.raises(ServerStartError, match=r"exited with code 3[\s\S]*bad flag --port \d+"):
        ManagedServerCaptioner(cmd, "m", startup_timeout_s=30, log_path=str(tmp_path / "s.log"))


def test_managed_server_never_logs_a_key_in_its_command(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.exit(3)", "--api-key", "sk-secret-1", "--hf-token=hf_secret_2", "{port}"]
    with pytest.raises(ServerStartError) as info:
        ManagedServerCaptioner(cmd, "m", startup_timeout_s=30, log_path=str(tmp_path / "s.log"))
    text = str(info.value) + (tmp_path / "s.log").read_text()
    assert "--api-key ***" in text and "--hf-token=***" in text
    assert "sk-secret-1" not in text and "hf_secret_2" not in text


def test_managed_server_restarts_a_scripted_server(tmp_path):
    """Restart path without a model: the command runs a tiny OpenAI server script."""
    script = tmp_path / "srv.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from http.server import ThreadingHTTPServer\n"
        "from vlm_fixtures import MockOpenAIServer\n"
        "import time\n"
        "s = MockOpenAIServer(answer='[]')\n"
        "port = int(sys.argv[1])\n"
        "s._server = ThreadingHTTPServer(('127.0.0.1', port), s._server.RequestHandlerClass)\n"
        "s._server.serve_forever()\n"
    )
    cap = ManagedServerCaptioner(
        [sys.executable, str(script), "{port}"], "m", startup_timeout_s=30, max_restarts=2, max_retries=1,
        backoff_initial_s=0.01, log_path=str(tmp_path / "s.log"),
    )
    try:
        assert cap.generate(_requests(1))[0].error == ""
        for _k in range(2):
            os.kill(cap.pid, signal.SIGKILL)
            cap._proc.wait(timeout=10)
            assert cap.generate(_requests(2))[0].error == ""
        assert cap.restarts == 2
        os.kill(cap.pid, signal.SIGKILL)
        cap._proc.wait(timeout=10)
        assert {a.error for a in cap.generate(_requests(3))} == {VlmError.SERVER_DEAD.value}
    finally:
        cap.close()
    assert not cap.alive()


# ------------------------------------------------------------------ Beam handler


def _run_beam(handler, reqs, expected):
    """Runs RunInference over ``reqs``; asserts ``(request_id, error, cached)`` and no dead letters."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to, is_empty

    from orsgen.stages.caption.handler import METRICS_NAMESPACE

    p = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([]))
    main, other = p | beam.Create(reqs) | RunInference(handler).with_exception_handling()
    assert_that(main | beam.Map(lambda r: (r.request_id, r.error, r.cached)), equal_to(expected), label="Answers")
    assert_that(other.failed_inferences, is_empty(), label="NoDeadLetters")
    result = p.run()
    result.wait_until_finish()
    return {
        c.key.metric.name: c.committed
        for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    }


def test_model_handler_runs_in_beam_and_reruns_from_cache(tmp_path):
    from orsgen.stages.caption.handler import VlmModelHandler

    reqs = _requests(6)
    with MockOpenAIServer(answer='{"expression": "a cat"}') as srv:
        cfg = CaptionBackendConfig(backend="openai", base_url=srv.url, model="mock-vl", max_batch_size=4)
        handler = VlmModelHandler(cfg, cache_dir=str(tmp_path / "_cache" / "vlm"))
        assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 4}
        assert handler.share_model_across_processes() is False
        counters = _run_beam(handler, reqs, [(r.request_id, "", False) for r in reqs])
        assert srv.requests == 6 and counters.get("vlm_answered") == 6
        # The rerun is answered from the cache where the answer parsed for its
        # task (only the description request: '{"expression": ...}' is no box
        # list or verdict); the other five were not cached and are asked again.
        parsed = {r.request_id for r in reqs if r.task == "ders_describe"}
        assert len(parsed) == 1
        counters2 = _run_beam(handler, reqs, [(r.request_id, "", r.request_id in parsed) for r in reqs])
        assert srv.requests == 11 and counters2.get("vlm_cached") == 1 and counters2.get("vlm_answered") == 5


def test_model_handler_failures_are_responses_not_dead_letters(tmp_path):
    from orsgen.stages.caption.handler import VlmModelHandler

    reqs = _requests(3)
    with MockOpenAIServer(lambda body, n: (500, "down", {}, 0)) as srv:
        cfg = CaptionBackendConfig(base_url=srv.url, model="m", max_retries=0, cache=False)
        counters = _run_beam(VlmModelHandler(cfg), reqs, [(r.request_id, VlmError.HTTP_ERROR.value, False) for r in reqs])
    assert counters.get(f"vlm_error_{VlmError.HTTP_ERROR.value}") == 3 and srv.requests == 3


def test_model_handler_needs_a_model():
    with pytest.raises(ValueError, match="needs a model"):
        from orsgen.stages.caption.handler import VlmModelHandler

        VlmModelHandler(CaptionBackendConfig())


def test_backend_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="server_command"):
        CaptionBackendConfig(backend="managed", model="m")
    with pytest.raises(ValueError, match="stop"):
        CaptionBackendConfig(model="m", extra_body={"stop": ["\n"]})
    with pytest.raises(ValueError, match="port"):
        CaptionBackendConfig(backend="managed", model="m", server_command=["vllm", "serve", "m"])
    assert CaptionBackendConfig(backend="managed", model="m", server_command=["x", "{port}"]).shares_model
