"""The content-addressed VLM response cache."""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import jpeg_bytes
from orsgen.stages.caption.backends import OpenAICompatibleCaptioner
from orsgen.stages.caption.cache import CachingCaptioner, ResponseCache, cache_key
from orsgen.stages.caption.prompts import load_prompts, make_request
from orsgen.stages.caption.types import SamplingParams, VlmError, VlmRequest, VlmResponse
from vlm_fixtures import MockOpenAIServer


@functools.lru_cache(maxsize=1)
def _prompts():
    return load_prompts()


def _req(i: int = 0, **changes) -> VlmRequest:
    req = make_request(
        _prompts(),
        "reground",
        request_id=f"img{i}/reground",
        images=[jpeg_bytes(32, 24, seed=i)],
        region=f"region{i}",
        sampling=SamplingParams(max_tokens=32),
        expression=f"the object number {i}",
    )
    return dataclasses.replace(req, **changes) if changes else req


def test_key_covers_everything_that_changes_an_answer():
    base = _req()
    k = cache_key(base, "model-a")
    assert k == cache_key(dataclasses.replace(base, request_id="other", metadata={"x": 1}), "model-a")
    variants = [
        cache_key(base, "model-b"),
        cache_key(dataclasses.replace(base, prompt_version="reground@v2"), "model-a"),
        cache_key(dataclasses.replace(base, images=(jpeg_bytes(32, 24, seed=9),)), "model-a"),
        cache_key(dataclasses.replace(base, region="region9"), "model-a"),
        cache_key(dataclasses.replace(base, sampling=SamplingParams(max_tokens=32, temperature=0.7)), "model-a"),
        cache_key(dataclasses.replace(base, sampling=SamplingParams(max_tokens=32, seed=1)), "model-a"),
        cache_key(dataclasses.replace(base, json_schema='{"type":"object"}'), "model-a"),
        cache_key(dataclasses.replace(base, system="Be brief."), "model-a"),
        cache_key(dataclasses.replace(base, user=base.user + " "), "model-a"),
        cache_key(dataclasses.replace(base, task="cors_ground"), "model-a"),
        cache_key(base, "model-a", {"max_image_side_px": 512}),
    ]
    assert len({k, *variants}) == len(variants) + 1


def test_key_uses_the_image_bytes_not_the_claimed_digest():
    base = _req()
    lying = dataclasses.replace(base, images=(jpeg_bytes(32, 24, seed=5),))  # same image_sha256 field
    assert cache_key(base, "m") != cache_key(lying, "m")


def test_put_get_roundtrip_and_layout(tmp_path):
    cache = ResponseCache(str(tmp_path / "_cache" / "vlm"))
    req = _req()
    key = cache_key(req, "m")
    assert cache.get(key) is None
    assert cache.put(key, req, VlmResponse(req.request_id, "[1]", "m", latency_s=0.3))
    path = tmp_path / "_cache" / "vlm" / key[:2] / f"{key[2:]}.json"
    assert path.is_file() and json.loads(path.read_text())["text"] == "[1]"
    got = cache.get(key)
    assert got == VlmResponse(req.request_id, "[1]", "m", cached=True, latency_s=0.0)
    assert (cache.hits, cache.misses, cache.writes) == (1, 1, 1)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]


def test_failures_are_not_cached(tmp_path):
    cache = ResponseCache(str(tmp_path))
    req = _req()
    key = cache_key(req, "m")
    assert not cache.put(key, req, VlmResponse(req.request_id, "", "m", error=VlmError.TIMEOUT.value))
    assert not cache.put(key, req, VlmResponse(req.request_id, "", "m"))
    assert cache.get(key) is None and len(cache) == 0


@pytest.mark.parametrize("content", [b"{not json", b'{"key": "wrong", "text": "x", "request_id": "r", "model": "m"}', b"\xff\xfe"])
def test_unreadable_entries_are_misses(tmp_path, content):
    cache = ResponseCache(str(tmp_path))
    key = cache_key(_req(), "m")
    path = Path(cache.path_of(key))
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert cache.get(key) is None and cache.corrupt == 1
    assert cache.put(key, _req(), VlmResponse("r", "fresh", "m"))
    assert cache.get(key).text == "fresh"


def test_works_on_other_fsspec_filesystems():
    cache = ResponseCache("memory://orsgen-test/_cache/vlm")
    req = _req()
    key = cache_key(req, "m")
    cache.put(key, req, VlmResponse(req.request_id, "ok", "m"))
    assert ResponseCache("memory://orsgen-test/_cache/vlm").get(key).text == "ok"


def test_rejects_non_keys(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        ResponseCache(str(tmp_path)).path_of("../../etc/passwd")


def test_second_run_sends_zero_requests(tmp_path):
    reqs = [_req(i) for i in range(5)]
    with MockOpenAIServer(answer='[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]') as srv:
        first = OpenAICompatibleCaptioner(srv.url, "mock-vl", max_retries=0)
        cached1 = CachingCaptioner(first, ResponseCache(str(tmp_path)), {"max_image_side_px": 1024})
        a1 = cached1.generate(reqs)
        cached1.close()
        # A new process would build a new client; so does the test.
        second = OpenAICompatibleCaptioner(srv.url, "mock-vl", max_retries=0)
        cached2 = CachingCaptioner(second, ResponseCache(str(tmp_path)), {"max_image_side_px": 1024})
        a2 = cached2.generate(reqs)
        assert second.requests_sent == 0 and cached2.requests_sent == 0 and srv.requests == 5
        assert [a.text for a in a2] == [a.text for a in a1] and all(a.cached for a in a2)
        assert [a.request_id for a in a2] == [r.request_id for r in reqs]
        # Another fingerprint (e.g. a new max_image_side_px) misses.
        cached3 = CachingCaptioner(second, ResponseCache(str(tmp_path)), {"max_image_side_px": 512})
        cached3.generate(reqs[:2])
        assert second.requests_sent == 2
        cached2.close()


def test_failed_answers_are_retried_next_run(tmp_path):
    calls = {"n": 0}

    def script(body, n):
        calls["n"] += 1
        return (500, "down", {}, 0) if n == 0 else (200, MockOpenAIServer.completion(body, "[]"), {}, 0)

    with MockOpenAIServer(script) as srv:
        c = CachingCaptioner(OpenAICompatibleCaptioner(srv.url, "m", max_retries=0), ResponseCache(str(tmp_path)))
        assert c.generate([_req()])[0].error == VlmError.HTTP_ERROR
        assert c.generate([_req()])[0].error == ""
        assert c.generate([_req()])[0].cached
        c.close()
    assert srv.requests == 2


def test_duplicates_in_a_batch_are_sent_once(tmp_path):
    with MockOpenAIServer(answer="[]") as srv:
        c = CachingCaptioner(OpenAICompatibleCaptioner(srv.url, "m"), ResponseCache(str(tmp_path)))
        r = _req()
        out = c.generate([r, dataclasses.replace(r, request_id="copy"), _req(1)])
        c.close()
    assert srv.requests == 2 and [o.request_id for o in out] == [r.request_id, "copy", "img1/reground"]
    assert out[1].text == "[]"


def _writer(args: tuple[str, int]) -> int:
    root, worker = args
    cache = ResponseCache(root)
    reqs = [_req(i) for i in range(8)]
    keys = [cache_key(r, "m") for r in reqs]
    written = 0
    for _round in range(30):
        for i, (req, key) in enumerate(zip(reqs, keys)):
            # Every writer writes the same answer per key, as real reruns do,
            # interleaved with reads of keys others are writing.
            cache.put(key, req, VlmResponse(req.request_id, f"answer-{i}" * 50, "m"))
            got = cache.get(key)
            assert got is not None and got.text == f"answer-{i}" * 50
            written += 1
    return written


def test_concurrent_writers_threads_and_processes(tmp_path):
    root = str(tmp_path / "cache")
    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(_writer, [(root, k) for k in range(4)])) == 4 * 240
    with mp.get_context("fork").Pool(3) as pool:
        assert sum(pool.map(_writer, [(root, k) for k in range(3)])) == 3 * 240
    cache = ResponseCache(root)
    assert len(cache) == 8
    for i in range(8):
        assert cache.get(cache_key(_req(i), "m")).text == f"answer-{i}" * 50
    assert cache.corrupt == 0
    assert not [p for p in Path(root).rglob(".tmp-*")]
    assert all(os.path.getsize(p) > 0 for p in Path(root).rglob("*.json"))
