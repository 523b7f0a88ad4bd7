"""VLM backends behind one ``Captioner`` interface.

* ``OpenAICompatibleCaptioner``: any ``/v1/chat/completions`` server (vLLM,
  SGLang, ``transformers serve``, a hosted API). An asyncio + aiohttp client
  on its own event-loop thread, with a semaphore bounding requests in flight,
  per-request timeouts, retries with exponential backoff and jitter on 429,
  5xx, timeouts and dropped connections, images as base64 data URLs resized
  to a max side, and ``response_format`` JSON-schema constraints with a
  per-server fallback when a server rejects them.
* ``ManagedServerCaptioner``: starts a server command (vLLM in its own
  virtualenv or container, ``transformers serve``, ...), waits for
  ``/v1/models``, restarts the server when it dies (bounded) and stops it on
  ``close()``; requests go through an ``OpenAICompatibleCaptioner``.
* ``TransformersCaptioner``: in-process ``AutoModelForImageTextToText`` +
  ``AutoProcessor`` with batched ``generate`` (torch imported lazily).

A backend never raises for a failed answer: the ``VlmResponse`` carries a
``VlmError`` reason code and a message, which the stage turns into a reject.
Constructor arguments that are bad (no model, bad URL) do raise, with a
sentence that says what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from PIL import Image

from orsgen.schemas.config import redact_argv  # re-exported: one list of secret flags
from orsgen.stages.common.torch_device import resolve_device, resolve_dtype
from orsgen.stages.caption.prompts import fit_max_side
from orsgen.stages.caption.types import SamplingParams, VlmError, VlmRequest, VlmResponse

log = logging.getLogger(__name__)

#: Refuse images whose header claims more pixels than this before decoding.
MAX_DECODE_PIXELS = 200_000_000

VLM_EXTRA_HINT = "pip install 'orsgen[vlm]'"


@runtime_checkable
class Captioner(Protocol):
    """Answers ``VlmRequest`` batches; never raises for a bad answer.

    Attributes:
        model_name: the model that answers (stored on samples and in the cache key).
    """

    model_name: str

    def generate(self, requests: Sequence[VlmRequest]) -> list[VlmResponse]:
        """Answers every request, in order (errors as ``VlmResponse.error``)."""
        ...


def _import_aiohttp() -> Any:
    # aiohttp rather than httpx: against a local server httpx's AsyncClient
    # tops out near 75 requests/s at 64 in flight, aiohttp near 550
    # (benchmarks/bench_caption.py); the client must not be the bottleneck.
    try:
        import aiohttp
    except ImportError as err:  # pragma: no cover - the vlm extra installs it
        raise ImportError(f"the OpenAI-compatible VLM client needs aiohttp: {VLM_EXTRA_HINT}") from err
    return aiohttp


def http_get_json(url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 5.0) -> Any:
    """A blocking GET returning parsed JSON (health checks; stdlib only).

    Raises:
        OSError: no connection, timeout, or a non-2xx status (``urllib.error.HTTPError``).
        ValueError: the body is not JSON.
    """
    import urllib.request

    req = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - http(s) URLs checked by normalize_base_url
        return json.loads(resp.read().decode("utf-8"))


def error_response(request: VlmRequest, model: str, error: VlmError, message: str, latency_s: float = 0.0) -> VlmResponse:
    """A failed answer."""
    return VlmResponse(
        request_id=request.request_id, text="", model=model, error=error.value, message=message[:1000], latency_s=latency_s
    )


# ------------------------------------------------------------------ images


class ImageError(ValueError):
    """An attached image cannot be decoded or is too large."""


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An image ready to send.

    Attributes:
        data: encoded bytes (the original when no resize was needed).
        mime: ``image/jpeg``, ``image/png`` or ``image/webp``.
        size: ``(width, height)`` in px after the resize.
    """

    data: bytes
    mime: str
    size: tuple[int, int]

    def data_url(self) -> str:
        """``data:<mime>;base64,...``."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def prepare_image(data: bytes, max_side_px: int | None, jpeg_quality: int = 90) -> PreparedImage:
    """Resizes an encoded image to at most ``max_side_px`` on its longest side.

    Images already small enough, in a format servers accept, are sent as they
    are; others are re-encoded (JPEG, or PNG when they have transparency). The
    size rule is ``prompts.fit_max_side``, so box conversion can reproduce it.

    Args:
        data: encoded image bytes.
        max_side_px: longest side in px (None or 0: keep the size).
        jpeg_quality: quality of re-encoded JPEGs.

    Returns:
        The prepared image.

    Raises:
        ImageError: undecodable, or larger than ``MAX_DECODE_PIXELS``.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_DECODE_PIXELS:
                raise ImageError(f"image of {w}x{h} px is above the {MAX_DECODE_PIXELS} px decode cap.")
            fmt = im.format or ""
            tw, th = fit_max_side(w, h, max_side_px)
            if (tw, th) == (w, h) and fmt in _MIME:
                return PreparedImage(data, _MIME[fmt], (w, h))
            im.load()
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            out = im.convert("RGBA" if has_alpha else "RGB")
            if (tw, th) != (w, h):
                out = out.resize((tw, th), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            if has_alpha:
                out.save(buf, format="PNG")
                return PreparedImage(buf.getvalue(), "image/png", (tw, th))
            out.save(buf, format="JPEG", quality=jpeg_quality)
            return PreparedImage(buf.getvalue(), "image/jpeg", (tw, th))
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise ImageError(f"image is not decodable: {err}") from None


def load_pil_image(data: bytes, max_side_px: int | None) -> Image.Image:
    """Decodes and resizes an image exactly as ``prepare_image`` would (RGB)."""
    prepared = prepare_image(data, max_side_px)
    with Image.open(io.BytesIO(prepared.data)) as im:
        return im.convert("RGB")


class _ImageLru:
    """Data URLs (as UTF-8 bytes) of prepared images by sha256.

    DeRS sends one image with many regions, and CoRS verification one image
    per label: decoding, resizing and base64 happen once per image.
    """

    def __init__(self, capacity: int = 128) -> None:
        self._items: OrderedDict[tuple[str, int | None], bytes] = OrderedDict()
        self._cap = capacity
        self._lock = threading.Lock()

    def get(self, data: bytes, max_side_px: int | None, jpeg_quality: int) -> bytes:
        key = (hashlib.sha256(data).hexdigest(), max_side_px)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        url = prepare_image(data, max_side_px, jpeg_quality).data_url().encode("ascii")
        with self._lock:
            self._items[key] = url
            while len(self._items) > self._cap:
                self._items.popitem(last=False)
        return url


# ------------------------------------------------------------------ OpenAI-compatible client


class _LoopThread:
    """An asyncio event loop on a daemon thread; sync callers submit coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


def normalize_base_url(base_url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept.

    Raises:
        ValueError: not an http(s) URL.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url {base_url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8000/v1.")
    url = base_url.rstrip("/")
    if parts.path in ("", "/"):
        url += "/v1"
    return url


@dataclass
class ClientStats:
    """Counters of an ``OpenAICompatibleCaptioner`` (for tests and benchmarks).

    Attributes:
        requests_sent: HTTP requests sent, retries included.
        answered: requests that got an answer (HTTP 200 with a message).
        retries: resends after a 429, 5xx, timeout or dropped connection.
        failed: requests that ended with an error response.
        in_flight: requests holding a concurrency slot now.
        max_in_flight_seen: the most slots ever held at once.
        response_format_fallbacks: resends without ``response_format``.
    """

    requests_sent: int = 0
    answered: int = 0
    retries: int = 0
    failed: int = 0
    in_flight: int = 0
    max_in_flight_seen: int = 0
    response_format_fallbacks: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class OpenAICompatibleCaptioner:
    """Client of an OpenAI-compatible ``/v1/chat/completions`` server.

    ``generate`` may be called from several threads at once; all calls share
    one event loop, one connection pool and one ``max_in_flight`` budget.

    Args:
        base_url: server URL, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is
            added to a bare host).
        model: the served model name (vLLM's ``--served-model-name`` or the
            path it serves).
        api_key_env: NAME of the environment variable holding the API key
            (never the key itself; the key is never logged); None: no key.
        max_in_flight: most requests in flight at once.
        timeout_s: per-request timeout (connect, write and read).
        max_retries: resends after a retryable failure (0: none).
        backoff_initial_s: first backoff; doubled per retry, with jitter.
        backoff_max_s: backoff cap (also caps a server's ``Retry-After``).
        max_image_side_px: images are resized to at most this longest side.
        jpeg_quality: quality of re-encoded images.
        response_format: ``auto`` sends a request's JSON schema as
            ``response_format`` and stops sending it to a server that rejects
            it; ``json_schema`` always sends it; ``none`` never does.
        extra_body: extra JSON fields of every request (e.g. vLLM's
            ``{"chat_template_kwargs": {"enable_thinking": false}}`` or
            ``{"top_k": 20}``).
        send_seed: send ``SamplingParams.seed`` as ``seed``.
        abort_retries: a callable that returns True when resending is
            pointless (used by ``ManagedServerCaptioner`` when its server died).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_in_flight: int = 64,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_image_side_px: int | None = 1024,
        jpeg_quality: int = 90,
        response_format: Literal["auto", "json_schema", "none"] = "auto",
        extra_body: Mapping[str, Any] | None = None,
        send_seed: bool = True,
        abort_retries: Callable[[], bool] | None = None,
    ) -> None:
        self._aiohttp = _import_aiohttp()
        if not model:
            raise ValueError("OpenAICompatibleCaptioner needs the served model name (model=...).")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}.")
        self.base_url = normalize_base_url(base_url)
        self.model_name = model
        self.max_in_flight = max_in_flight
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_image_side_px = max_image_side_px
        self.jpeg_quality = jpeg_quality
        self.response_format = response_format
        self.extra_body = dict(extra_body or {})
        if "stop" in self.extra_body:
            log.warning("extra_body sets 'stop'; some servers (transformers serve with VLMs) answer HTTP 500 to it.")
        self.send_seed = send_seed
        self._abort_retries = abort_retries
        self._headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"api_key_env names ${api_key_env}, which is not set; export it (the key is read from the "
                    "environment and never stored in configs or logs)."
                )
            self._headers["Authorization"] = f"Bearer {key}"
        # None: unknown yet; False: this server rejected response_format.
        self.response_format_supported: bool | None = None
        self.stats = ClientStats()
        self._images = _ImageLru()
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="vlm-img")
        self._loop = _LoopThread("vlm-client")
        # The session lives in a holder so that the finalizer (which must not
        # reference self) can close it when a captioner is dropped unclosed.
        self._holder: dict[str, Any] = {"session": None}
        self._sem: asyncio.Semaphore | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_loop, self._loop, self._pool, self._holder)

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatibleCaptioner(base_url={self.base_url!r}, model={self.model_name!r}, max_in_flight={self.max_in_flight})"

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent so far, retries included."""
        return self.stats.requests_sent

    # -- public

    def generate(self, requests: Sequence[VlmRequest]) -> list[VlmResponse]:
        """Answers every request concurrently (at most ``max_in_flight`` at once).

        Args:
            requests: the requests.

        Returns:
            One response per request, in order; failures carry ``error``.
        """
        if not requests:
            return []
        if self._closed:
            raise RuntimeError("this captioner was closed; build a new one.")
        return self._loop.run(self._generate(list(requests)))

    def list_models(self, timeout_s: float = 5.0) -> list[str]:
        """Model ids from ``GET /v1/models``.

        Raises:
            OSError: the server did not answer (or not with 2xx).
            ValueError: the answer is not JSON.
        """
        data = http_get_json(f"{self.base_url}/models", self._headers, timeout_s)
        return [str(m.get("id", "")) for m in data.get("data", [])]

    def wait_until_ready(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> None:
        """Polls ``/v1/models`` until it answers 200.

        Raises:
            TimeoutError: no answer within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                self.list_models(timeout_s=min(5.0, timeout_s))
                return
            except (OSError, ValueError, AttributeError) as err:
                last = str(err)
            time.sleep(poll_s)
        raise TimeoutError(f"no OpenAI-compatible server answered at {self.base_url}/models within {timeout_s:.0f} s ({last}).")

    def close(self) -> None:
        """Closes the connection pool and stops the loop thread."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    # -- internals

    async def _generate(self, requests: list[VlmRequest]) -> list[VlmResponse]:
        aiohttp = self._aiohttp
        if self._holder["session"] is None:
            connector = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=self.max_in_flight)
            self._holder["session"] = aiohttp.ClientSession(connector=connector, headers=self._headers)
            self._sem = asyncio.Semaphore(self.max_in_flight)
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def _payload(self, r: VlmRequest, response_format: bool) -> bytes:
        """The request body as JSON bytes (CPU work: runs on the image thread pool).

        The JSON is encoded with a short placeholder per image and the cached
        data URLs are spliced in as bytes: base64 needs no JSON escaping, and
        a 1024 px image is ~300 KB of it, too much to re-encode per request.
        """
        urls = [self._images.get(img, self.max_image_side_px, self.jpeg_quality) for img in r.images]
        body = json.dumps(self._body(r, self._messages(r), response_format), ensure_ascii=False).encode("utf-8")
        if not urls:
            return body
        pieces = body.split(_IMAGE_SLOT)
        if len(pieces) != len(urls) + 1:  # the slot text also occurs in the prompt: encode plainly
            messages = self._messages(r, [u.decode("ascii") for u in urls])
            return json.dumps(self._body(r, messages, response_format), ensure_ascii=False).encode("utf-8")
        out = [pieces[0]]
        for url, piece in zip(urls, pieces[1:]):
            out += [url, piece]
        return b"".join(out)

    def _messages(self, r: VlmRequest, urls: Sequence[str] | None = None) -> list[dict[str, Any]]:
        slot = _IMAGE_SLOT.decode("ascii")
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": urls[k] if urls is not None else slot}} for k in range(len(r.images))
        ]
        parts.append({"type": "text", "text": r.user})
        messages: list[dict[str, Any]] = []
        if r.system:
            messages.append({"role": "system", "content": r.system})
        messages.append({"role": "user", "content": parts})
        return messages

    def _body(self, r: VlmRequest, messages: list[dict[str, Any]], response_format: bool = True) -> dict[str, Any]:
        s: SamplingParams = r.sampling
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if self.send_seed:
            body["seed"] = s.seed
        body.update(self.extra_body)
        if response_format and r.json_schema and self._send_response_format():
            try:
                schema = json.loads(r.json_schema)
            except ValueError:
                schema = None
            if schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": f"orsgen_{r.task or 'answer'}", "schema": schema, "strict": True},
                }
        return body

    def _send_response_format(self) -> bool:
        if self.response_format == "none":
            return False
        if self.response_format == "json_schema":
            return True
        return self.response_format_supported is not False

    async def _one(self, r: VlmRequest) -> VlmResponse:
        assert self._sem is not None
        async with self._sem:
            self.stats.in_flight += 1
            self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, self.stats.in_flight)
            try:
                resp = await self._send(r)
            finally:
                self.stats.in_flight -= 1
        if resp.error:
            self.stats.failed += 1
            self.stats.errors[resp.error] = self.stats.errors.get(resp.error, 0) + 1
        else:
            self.stats.answered += 1
        return resp

    async def _send(self, r: VlmRequest) -> VlmResponse:
        aiohttp = self._aiohttp
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        with_rf = bool(r.json_schema) and self._send_response_format()
        try:
            payload = await loop.run_in_executor(self._pool, self._payload, r, with_rf)
        except ImageError as err:
            return error_response(r, self.model_name, VlmError.BACKEND, f"request {r.request_id}: {err}")
        url = f"{self.base_url}/chat/completions"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        attempt = 0
        rf_rejected = ""
        while True:
            error: VlmError
            message: str
            retry_after: float | None = None
            self.stats.requests_sent += 1
            try:
                async with self._holder["session"].post(url, data=payload, timeout=timeout) as http:
                    status = http.status
                    text = await http.text(errors="replace")
                    retry_header = http.headers.get("Retry-After")
            except (asyncio.TimeoutError, TimeoutError) as err:
                error, message = VlmError.TIMEOUT, f"no answer within {self.timeout_s:g} s ({type(err).__name__})"
            except aiohttp.ClientConnectorError as err:
                error, message = VlmError.SERVER_DEAD, f"cannot connect to {self.base_url}: {err}"
            except aiohttp.ClientError as err:  # connection dropped mid-request, bad framing
                error, message = VlmError.HTTP_ERROR, f"{type(err).__name__}: {err}"
            else:
                if status == 200:
                    if with_rf and self.response_format_supported is None:
                        self.response_format_supported = True
                    return self._answer(r, text, time.monotonic() - t0, rf_rejected)
                if status in (400, 422) and with_rf and _mentions_response_format(text):
                    # The server does not take response_format / this schema:
                    # resend without it at once (not a retry); if that works
                    # and the server never accepted a schema, stop sending it.
                    self.stats.response_format_fallbacks += 1
                    rf_rejected = f"HTTP {status}: {text[:200]}"
                    with_rf = False
                    payload = await loop.run_in_executor(self._pool, self._payload, r, False)
                    continue
                if status == 429 or 500 <= status < 600:
                    error, message = VlmError.HTTP_ERROR, f"HTTP {status}: {text[:500]}"
                    retry_after = _retry_after_s(retry_header)
                else:
                    return error_response(
                        r, self.model_name, VlmError.HTTP_ERROR, f"HTTP {status}: {text[:500]}", time.monotonic() - t0
                    )
            if attempt >= self.max_retries or (self._abort_retries is not None and self._abort_retries()):
                tries = attempt + 1
                return error_response(
                    r, self.model_name, error, f"{message} (after {tries} attempt{'s' if tries > 1 else ''})", time.monotonic() - t0
                )
            delay = min(self.backoff_max_s, self.backoff_initial_s * (2**attempt)) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = min(self.backoff_max_s, max(delay, retry_after))
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(delay)

    def _answer(self, r: VlmRequest, body: str, latency_s: float, rf_rejected: str = "") -> VlmResponse:
        if rf_rejected and self.response_format_supported is None:
            self.response_format_supported = False
            log.warning(
                "the server at %s rejected response_format (%s); sending requests without it and parsing answers tolerantly.",
                self.base_url,
                rf_rejected,
            )
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            msg = choice.get("message") or {}
            content = msg.get("content")
            model = str(data.get("model") or self.model_name)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            return error_response(r, self.model_name, VlmError.BACKEND, f"unexpected response body ({err}): {body[:300]}", latency_s)
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            if msg.get("refusal"):
                return error_response(r, model, VlmError.REFUSAL, str(msg["refusal"])[:300], latency_s)
            return error_response(r, model, VlmError.EMPTY, f"empty answer (finish_reason={choice.get('finish_reason')})", latency_s)
        return VlmResponse(request_id=r.request_id, text=content, model=model, latency_s=latency_s)


_IMAGE_SLOT = b"@@orsgen-image-slot@@"
_RF_WORDS = ("response_format", "json_schema", "schema", "guided", "grammar", "structured")


def _mentions_response_format(error_text: str) -> bool:
    low = error_text.lower()
    return any(w in low for w in _RF_WORDS)


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _close_loop(loop: _LoopThread, pool: ThreadPoolExecutor, holder: dict[str, Any]) -> None:
    session = holder.get("session")
    if session is not None and loop.loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(session.close(), loop.loop).result(timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
    holder["session"] = None
    loop.stop()
    pool.shutdown(wait=False)


# ------------------------------------------------------------------ managed server


class ServerStartError(RuntimeError):
    """The managed server did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _fill(arg: str, values: Mapping[str, str]) -> str:
    for k, v in values.items():
        arg = arg.replace("{" + k + "}", v)
    return arg


class ManagedServerCaptioner:
    """Runs an OpenAI-compatible server as a child process and talks to it.

    The command is configurable so the server can live in its own virtualenv
    or container (vLLM's pins conflict with Beam's), e.g.
    ``["/opt/vllm-venv/bin/vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}"]``
    or ``["transformers", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--device", "cpu"]``.
    ``{model}``, ``{host}`` and ``{port}`` are filled in. One instance runs one
    server; the Beam handler shares it across the worker's processes.

    Args:
        command: argv of the server with placeholders.
        model: served model name (what requests name and ``{model}`` fills).
        host: interface the server binds and the client calls.
        port: port (0: a free one).
        env: extra environment of the server (e.g. ``CUDA_VISIBLE_DEVICES``,
            ``HF_HUB_OFFLINE``).
        startup_timeout_s: how long to wait for ``/v1/models``.
        max_restarts: restarts allowed over this captioner's life after the
            server dies; past them answers fail with ``vlm_server_dead``.
        log_path: file for the server's stdout/stderr (default: a temp file).
        **client_kwargs: passed to ``OpenAICompatibleCaptioner``.

    Raises:
        ServerStartError: the first start failed (the message holds the
            server log's tail).
    """

    def __init__(
        self,
        command: Sequence[str],
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 900.0,
        max_restarts: int = 3,
        log_path: str | None = None,
        **client_kwargs: Any,
    ) -> None:
        if not command:
            raise ValueError("ManagedServerCaptioner needs a server command, e.g. ['vllm', 'serve', '{model}', '--port', '{port}'].")
        self.model_name = model
        self.host = host
        self.port = port or free_port(host)
        self.command = [_fill(a, {"model": model, "host": host, "port": str(self.port)}) for a in command]
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="orsgen-vlm-server-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self._dead_for_good = ""
        self._client = OpenAICompatibleCaptioner(
            f"http://{host}:{self.port}/v1", model, abort_retries=self._server_gone, **client_kwargs
        )
        self._finalizer = weakref.finalize(self, _stop_process, None)
        self._start()

    def __repr__(self) -> str:
        return f"ManagedServerCaptioner(command={redact_argv(self.command)[:3]}..., port={self.port}, model={self.model_name!r})"

    @property
    def client(self) -> OpenAICompatibleCaptioner:
        """The HTTP client (its ``stats`` count requests)."""
        return self._client

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent so far."""
        return self._client.requests_sent

    @property
    def pid(self) -> int | None:
        """The server's process id (None when not running)."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        """Whether the server process is running."""
        return self._proc is not None and self._proc.poll() is None

    def _server_gone(self) -> bool:
        return not self.alive()

    def _start(self) -> None:
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== orsgen: starting {' '.join(redact_argv(self.command))}\n".encode())
            logf.flush()
            try:
                # Own session: stop() signals the server's whole process group
                # (vLLM forks engine workers) and nothing else.
                self._proc = subprocess.Popen(
                    self.command, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
                )
            except OSError as err:
                raise ServerStartError(f"cannot run the server command {self.command[0]!r}: {err}; check server_command.") from None
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop_process, self._proc)
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}/v1/models"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerStartError(
                    f"the server exited with code {self._proc.returncode} before it was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                http_get_json(url, timeout_s=2.0)
                log.info("VLM server ready at %s (pid %s)", url, self._proc.pid)
                return
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(
            f"the server did not answer {url} within {self.startup_timeout_s:.0f} s; raise startup_timeout_s or check the "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, n_chars: int = 3000) -> str:
        """The end of the server log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - n_chars))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def ensure_running(self) -> bool:
        """Restarts the server if it died and restarts remain.

        Returns:
            True when the server is running.
        """
        with self._lock:
            if self.alive():
                return True
            if self._dead_for_good:
                return False
            while self.restarts < self.max_restarts:
                self.restarts += 1
                code = self._proc.returncode if self._proc is not None else None
                log.warning("VLM server died (exit code %s); restart %d of %d", code, self.restarts, self.max_restarts)
                try:
                    self._start()
                    return True
                except ServerStartError as err:
                    log.warning("VLM server restart failed: %s", str(err).splitlines()[0])
            self._dead_for_good = (
                f"the server died and {self.max_restarts} restart(s) did not bring it back; log {self.log_path}"
            )
            return False

    def generate(self, requests: Sequence[VlmRequest]) -> list[VlmResponse]:
        """Answers requests; restarts a dead server and resends what it lost.

        Returns:
            One response per request; ``vlm_server_dead`` when the server is
            gone for good.
        """
        requests = list(requests)
        if not requests:
            return []
        out: list[VlmResponse | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        while todo:
            if not self.ensure_running():
                for i in todo:
                    out[i] = error_response(requests[i], self.model_name, VlmError.SERVER_DEAD, self._dead_for_good)
                break
            answers = self._client.generate([requests[i] for i in todo])
            lost = []
            for i, a in zip(todo, answers):
                out[i] = a
                if a.error in (VlmError.SERVER_DEAD, VlmError.HTTP_ERROR, VlmError.TIMEOUT) and not self.alive():
                    lost.append(i)
            todo = lost
        return [o for o in out if o is not None]

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stops the server (SIGTERM to its process group, then SIGKILL)."""
        with self._lock:
            _stop_process(self._proc, timeout_s)

    def close(self) -> None:
        """Stops the server and closes the client."""
        self.stop()
        self._finalizer.detach()
        self._client.close()


def _stop_process(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this captioner created
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        proc.wait(timeout=timeout_s)


# ------------------------------------------------------------------ in-process transformers


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ImportError(f"the in-process VLM backend needs torch and transformers: {VLM_EXTRA_HINT}") from err
    return torch, transformers




class TransformersCaptioner:
    """In-process ``AutoModelForImageTextToText`` + ``AutoProcessor``, batched.

    No constrained decoding: answers are free text for the tolerant parsers.

    Args:
        model: local path or hub id (hub ids need network or a warm cache).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU) or a torch dtype name.
        batch_size: requests per ``generate`` call.
        max_image_side_px: images are resized like the HTTP client does.
        attn_implementation: e.g. ``sdpa`` or ``flash_attention_2`` (None: default).
        local_files_only: never touch the network.

    Raises:
        ImportError: torch / transformers missing (names the extra).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_image_side_px: int | None = 1024,
        attn_implementation: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        torch, transformers = _import_torch_transformers()
        self._torch = torch
        if not model:
            raise ValueError("TransformersCaptioner needs a model path or hub id.")
        device = resolve_device(torch, device, "caption.backend.device")
        torch_dtype = resolve_dtype(torch, dtype, device, "caption.backend.dtype")
        self.model_name = model
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.max_image_side_px = max_image_side_px
        self.requests_done = 0
        self.processor = transformers.AutoProcessor.from_pretrained(model, local_files_only=local_files_only)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only batching pads on the left
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local_files_only}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(model, **kwargs).to(device).eval()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TransformersCaptioner(model={self.model_name!r}, device={self.device!r}, batch_size={self.batch_size})"

    def generate(self, requests: Sequence[VlmRequest]) -> list[VlmResponse]:
        """Answers requests in batches of ``batch_size`` (same sampling params per batch).

        Returns:
            One response per request, in order.
        """
        requests = list(requests)
        out: list[VlmResponse | None] = [None] * len(requests)
        ready: dict[SamplingParams, list[tuple[int, list[Image.Image]]]] = {}
        for i, r in enumerate(requests):
            try:
                imgs = [load_pil_image(b, self.max_image_side_px) for b in r.images]
            except ImageError as err:
                out[i] = error_response(r, self.model_name, VlmError.BACKEND, f"request {r.request_id}: {err}")
                continue
            ready.setdefault(r.sampling, []).append((i, imgs))
        with self._lock:
            for sampling, items in ready.items():
                for k in range(0, len(items), self.batch_size):
                    chunk = items[k : k + self.batch_size]
                    for i, resp in self._run_chunk([requests[i] for i, _ in chunk], [im for _, im in chunk], sampling):
                        out[chunk[i][0]] = resp
        self.requests_done += len(requests)
        return [o for o in out if o is not None]

    def _run_chunk(
        self, reqs: list[VlmRequest], images: list[list[Image.Image]], sampling: SamplingParams
    ) -> list[tuple[int, VlmResponse]]:
        torch = self._torch
        t0 = time.monotonic()
        try:
            texts = self._generate_texts(reqs, images, sampling)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            if len(reqs) > 1:  # e.g. CUDA OOM: halve the batch
                mid = len(reqs) // 2
                a = self._run_chunk(reqs[:mid], images[:mid], sampling)
                b = self._run_chunk(reqs[mid:], images[mid:], sampling)
                return a + [(i + mid, r) for i, r in b]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return [(0, error_response(reqs[0], self.model_name, VlmError.BACKEND, f"{type(err).__name__}: {err}"))]
        dt = (time.monotonic() - t0) / max(1, len(reqs))
        out = []
        for i, (r, text) in enumerate(zip(reqs, texts)):
            if not text.strip():
                out.append((i, error_response(r, self.model_name, VlmError.EMPTY, "empty answer", dt)))
            else:
                out.append((i, VlmResponse(request_id=r.request_id, text=text, model=self.model_name, latency_s=dt)))
        return out

    def _generate_texts(self, reqs: list[VlmRequest], images: list[list[Image.Image]], sampling: SamplingParams) -> list[str]:
        torch = self._torch
        prompts = []
        flat_images: list[Image.Image] = []
        for r, imgs in zip(reqs, images):
            messages: list[dict[str, Any]] = []
            if r.system:
                messages.append({"role": "system", "content": [{"type": "text", "text": r.system}]})
            content: list[dict[str, Any]] = [{"type": "image"} for _ in imgs]
            content.append({"type": "text", "text": r.user})
            messages.append({"role": "user", "content": content})
            prompts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            flat_images.extend(imgs)
        inputs = self.processor(
            text=prompts, images=flat_images or None, padding=True, return_tensors="pt"
        ).to(self.model.device)
        gen: dict[str, Any] = {"max_new_tokens": sampling.max_tokens}
        if sampling.temperature > 0:
            gen.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **gen)
        new = ids[:, inputs["input_ids"].shape[1] :]
        return list(self.processor.batch_decode(new, skip_special_tokens=True))

    def close(self) -> None:
        """Frees the model (and CUDA memory)."""
        self.model = None
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
