"""Benchmark: the VLM client's concurrency, and the cached rerun.

Three parts, in one run:

(a) **Concurrency ceiling of the client.** A fixed-latency OpenAI-compatible
    server (asyncio, in a separate process so it does not share the client's
    GIL) answers every request after ``--latency-ms``. The same requests
    (real prompts, 1024x768 JPEGs as base64 data URLs) are sent with
    ``max_in_flight`` 1, 8 and 64. Reported: throughput, the most requests the
    server saw at once, and the speed-up over ``max_in_flight=1`` (the
    baseline, measured in the same run) next to the ideal ``k``.
(b) **Cached rerun.** The same requests through ``CachingCaptioner`` twice
    into one cache folder: the second run's request count must be 0.
(c) **The tiny Qwen2.5-VL behind ``transformers serve``** (CPU; skipped with
    ``--no-tiny``): throughput at ``max_in_flight`` 1 and 8. That server runs
    one request at a time, so (c) shows the server's ceiling, not the client's.

Point it at a real server (vLLM, SGLang) with ``--base-url`` and ``--model``;
then (a) and (c) run against that server instead of the mock::

    python benchmarks/bench_caption.py                       # mock + tiny model, CPU
    python benchmarks/bench_caption.py --base-url http://127.0.0.1:8000/v1 \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --in-flight 1,8,64,128 --n 512
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from orsgen.stages.caption.backends import OpenAICompatibleCaptioner
from orsgen.stages.caption.cache import CachingCaptioner, ResponseCache
from orsgen.stages.caption.prompts import format_box, load_prompts, make_request
from orsgen.stages.caption.types import SamplingParams, VlmRequest

ANSWER = '{"expression": "the red mug left of the laptop"}'


# ------------------------------------------------------------------ the mock server (subprocess)


async def _mock_main(port: int, latency_s: float) -> None:
    state = {"in_flight": 0, "max_in_flight": 0, "requests": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v.strip())
                if length:
                    await reader.readexactly(length)  # read and dropped
                if method == "POST":
                    state["requests"] += 1
                    state["in_flight"] += 1
                    state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
                    try:
                        # The body is not parsed: the mock must cost less CPU
                        # than the client it measures (they share the cores).
                        model = "mock"
                        await asyncio.sleep(latency_s)
                    finally:
                        state["in_flight"] -= 1
                    payload = {
                        "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                    }
                elif path.endswith("/stats"):
                    payload = dict(state)
                    if "reset" in path:
                        state.update(max_in_flight=0, requests=0)
                else:
                    payload = {"object": "list", "data": [{"id": "mock", "object": "model"}]}
                data = json.dumps(payload).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(data)).encode()
                    + b"\r\n\r\n"
                    + data
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


class MockServer:
    """The fixed-latency server in a child process (stopped on exit)."""

    def __init__(self, latency_s: float) -> None:
        from orsgen.stages.caption.backends import free_port

        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-mock", str(self.port), "--latency-ms", str(latency_s * 1000)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self, reset: bool = False) -> dict:
        from orsgen.stages.caption.backends import http_get_json

        return http_get_json(f"{self.url}/stats{'/reset' if reset else ''}")

    def __enter__(self) -> "MockServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ------------------------------------------------------------------ workload


def _images(n: int, w: int = 1024, h: int = 768) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _requests(n: int, images: list[bytes], max_tokens: int = 64) -> list[VlmRequest]:
    prompts = load_prompts()
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [
        make_request(
            prompts,
            "ders_describe",
            request_id=f"bench{i}/ders_describe",
            images=[images[i % len(images)], images[(i + 1) % len(images)]],
            region=f"r{i}",
            sampling=sampling,
            box=format_box((10 + i % 50, 20, 300, 400)),
        )
        for i in range(n)
    ]


def _sweep(url: str, model: str, in_flight: list[int], n_for, images: list[bytes], mock: MockServer | None, **client_kw) -> list[dict]:
    rows = []
    for k in in_flight:
        n = n_for(k)
        reqs = _requests(n, images)
        client = OpenAICompatibleCaptioner(url, model, max_in_flight=k, max_image_side_px=1024, **client_kw)
        try:
            client.generate(reqs[: min(4, n)])  # warm the connection pool and the image cache
            if mock:
                mock.stats(reset=True)
            t0 = time.perf_counter()
            answers = client.generate(reqs)
            dt = time.perf_counter() - t0
        finally:
            client.close()
        errors = sum(1 for a in answers if a.error)
        server_max = mock.stats()["max_in_flight"] if mock else None
        rows.append(
            {"max_in_flight": k, "n": n, "seconds": dt, "rps": n / dt, "client_peak": client.stats.max_in_flight_seen,
             "server_peak": server_max, "errors": errors}
        )
    return rows


def _print_sweep(title: str, rows: list[dict], latency_s: float | None) -> None:
    print(f"\n{title}")
    print(f"{'max_in_flight':>13} {'requests':>8} {'seconds':>8} {'req/s':>8} {'peak in flight (client/server)':>31} {'speed-up':>9} {'ideal':>6} {'errors':>6}")
    base = rows[0]["rps"]
    for r in rows:
        ideal = f"{r['max_in_flight']}x" if latency_s else "-"
        server = r["server_peak"] if r["server_peak"] is not None else "-"
        print(
            f"{r['max_in_flight']:>13} {r['n']:>8} {r['seconds']:>8.2f} {r['rps']:>8.1f} "
            f"{str(r['client_peak']) + ' / ' + str(server):>31} {r['rps'] / base:>8.1f}x {ideal:>6} {r['errors']:>6}"
        )


def _cached_rerun(url: str, model: str, n: int, images: list[bytes]) -> None:
    reqs = _requests(n, images)
    with tempfile.TemporaryDirectory() as tmp:
        times, sent = [], []
        for _ in range(2):
            client = OpenAICompatibleCaptioner(url, model, max_in_flight=64)
            cap = CachingCaptioner(client, ResponseCache(f"{tmp}/_cache/vlm"), {"max_image_side_px": 1024})
            t0 = time.perf_counter()
            answers = cap.generate(reqs)
            times.append(time.perf_counter() - t0)
            sent.append(client.requests_sent)
            client.close()
            assert not any(a.error for a in answers)
    print(f"\n(b) cached rerun, {n} requests: first run sent {sent[0]} requests in {times[0]:.2f} s; "
          f"rerun sent {sent[1]} requests in {times[1]:.2f} s ({n / times[1]:.0f} answers/s from the cache)")
    if sent[1] != 0:
        raise SystemExit(f"FAIL: the cached rerun sent {sent[1]} requests; expected 0.")


def _tiny(in_flight: list[int], n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from vlm_fixtures import build_tiny_qwen25vl, transformers_server

    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_qwen25vl(Path(tmp) / "scripted", scripted=True))
        with transformers_server(model, Path(tmp) / "hub", Path(tmp) / "serve.log") as url:
            images = _images(4, 320, 240)
            rows = _sweep(url, model, in_flight, lambda k: n, images, None, timeout_s=120)
            _print_sweep(f"(c) tiny Qwen2.5-VL behind `transformers serve` (CPU, {n} requests each)", rows, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a real OpenAI-compatible server (e.g. vLLM); default: the mock")
    ap.add_argument("--model", default="mock", help="served model name (with --base-url)")
    ap.add_argument("--in-flight", default="1,8,64", help="max_in_flight values, comma-separated")
    ap.add_argument("--latency-ms", type=float, default=100.0, help="the mock server's latency per request")
    ap.add_argument("--n", type=int, default=0, help="requests per setting (default: 8 rounds of max_in_flight, at least 32)")
    ap.add_argument("--cache-n", type=int, default=256, help="requests of the cached-rerun part")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny transformers-serve part")
    ap.add_argument("--tiny-n", type=int, default=16)
    ap.add_argument("--serve-mock", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_mock:
        asyncio.run(_mock_main(args.serve_mock, args.latency_ms / 1000))
        return
    in_flight = [int(x) for x in args.in_flight.split(",")]
    n_for = (lambda k: args.n) if args.n else (lambda k: max(32, 8 * k))
    images = _images(16)
    print(f"images: 16 JPEGs of 1024x768 ({sum(map(len, images)) // 16 // 1024} KB each), 2 per request (ders_describe)")
    if args.base_url:
        rows = _sweep(args.base_url, args.model, in_flight, n_for, images, None, timeout_s=600)
        _print_sweep(f"(a) {args.model} at {args.base_url}", rows, None)
        _cached_rerun(args.base_url, args.model, min(args.cache_n, 64), images)
        return
    latency_s = args.latency_ms / 1000
    with MockServer(latency_s) as mock:
        rows = _sweep(mock.url, "mock", in_flight, n_for, images, mock)
        _print_sweep(f"(a) fixed-latency mock server ({args.latency_ms:g} ms per request; baseline max_in_flight={in_flight[0]})", rows, latency_s)
        _cached_rerun(mock.url, "mock", args.cache_n, images)
    if not args.no_tiny:
        _tiny([1, 8], args.tiny_n)


if __name__ == "__main__":
    main()
