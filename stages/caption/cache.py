"""A persistent, content-addressed cache of VLM answers.

The key is the sha256 of everything that determines an answer: the model,
the prompt version, the sha256 of every attached image, the region, the
sampling parameters, the JSON schema, the system and user text, and a
backend fingerprint (e.g. the image resize). A rerun into the same output
directory therefore sends no request for an answer it already has, and any
change to a prompt, a parameter or an image misses.

Entries live under the output directory, ``OUT/_cache/vlm/ab/cdef....json``
(fsspec: local, ``gs://``, ``s3://``). Writes are atomic: a local entry is
written to a unique temp name and renamed; on object stores an object
appears whole when its upload completes. Concurrent writers of one key write
the same answer, so the last rename wins harmlessly. Only answers that parse
are cached: transport errors, empty answers and garbage (an HTML error page,
truncated JSON, a refusal) are not stored, so a later run with a healthy
server asks again instead of replaying a reject forever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from orsgen.stages.caption.backends import Captioner
from orsgen.stages.caption.types import VlmRequest, VlmResponse
from orsgen.stages.common.cache_files import KeyedFileCache, publish_entry

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def cache_key(request: VlmRequest, model: str, fingerprint: Mapping[str, Any] | None = None) -> str:
    """The content address of a request's answer.

    The image digests are computed from the attached bytes (not taken from
    ``request.image_sha256``), so a stage that passes a wrong digest cannot
    make two different images share an answer.

    Args:
        request: the request.
        model: the model that answers.
        fingerprint: backend settings that change what the model sees
            (e.g. ``{"max_image_side_px": 1024}``).

    Returns:
        64 hex characters.
    """
    material = {
        "format": CACHE_FORMAT,
        "model": model,
        "task": request.task,
        "prompt_version": request.prompt_version,
        "images": [hashlib.sha256(b).hexdigest() for b in request.images],
        "region": request.region,
        "sampling": dataclasses.asdict(request.sampling),
        "json_schema": request.json_schema,
        "system": request.system,
        "user": request.user,
        "backend": dict(fingerprint or {}),
    }
    data = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


class ResponseCache(KeyedFileCache):
    """Answers stored as one small JSON file per key.

    Args:
        root: folder or fsspec URL, e.g. ``OUT/_cache/vlm``.

    Attributes:
        hits, misses, writes, corrupt: counters of this instance.
    """

    SUFFIX = ".json"
    WHAT = "cache"

    def get(self, key: str) -> VlmResponse | None:
        """The cached answer, or None (a missing or unreadable entry is a miss).

        Returns:
            A response with ``cached=True`` and ``latency_s=0``; its
            ``request_id`` is the one stored, callers set their own.
        """
        path = self.path_of(key)
        try:
            with self._fs.open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
            resp = VlmResponse(
                request_id=str(data["request_id"]), text=str(data["text"]), model=str(data["model"]), cached=True
            )
            if data.get("key") != key or not resp.text:
                raise ValueError("entry does not match its key")
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            # A torn or foreign file: treat as a miss; the next put replaces it.
            log.warning("ignoring unreadable VLM cache entry %s: %s", path, err)
            self._count(corrupt=1, misses=1)
            return None
        self._count(hits=1)
        return resp

    def put(self, key: str, request: VlmRequest, response: VlmResponse) -> bool:
        """Stores a successful answer atomically.

        Args:
            key: ``cache_key(request, ...)``.
            request: the request (its id and prompt version are stored for humans).
            response: the answer; failed or empty answers are not stored.

        Returns:
            True when written.
        """
        if response.error or not response.text:
            return False
        entry = {
            "key": key,
            "format": CACHE_FORMAT,
            "request_id": request.request_id,
            "task": request.task,
            "prompt_version": request.prompt_version,
            "region": request.region,
            "model": response.model,
            "text": response.text,
        }
        data = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode("utf-8")
        path = self.path_of(key)
        publish_entry(self._fs, path, data, local=self._local)
        self._count(writes=1)
        return True


def answer_parses(request: VlmRequest, response: VlmResponse) -> bool:
    """Whether an answer is worth caching: no error, and its task's parser accepts it.

    The parsers are the ones the caption stage applies (``stages.caption.parse``),
    so a cached answer never turns into ``vlm_malformed_output`` later.
    Requests of an unknown task are cached when they carry text.
    """
    from orsgen.stages.caption.parse import parse_description, parse_grounding, parse_verification
    from orsgen.stages.caption.types import VlmError, VlmTask

    if response.error or not response.text:
        return False
    parser = {
        VlmTask.CORS_GROUND.value: parse_grounding,
        VlmTask.REGROUND.value: parse_grounding,
        VlmTask.DERS_DESCRIBE.value: parse_description,
        VlmTask.CORS_VERIFY.value: parse_verification,
    }.get(str(request.task))
    if parser is None:
        return True
    return not isinstance(parser(response.text), VlmError)


class CachingCaptioner:
    """Wraps a captioner: cached answers are returned without a request.

    Identical requests within one batch are sent once. Answers of the inner
    captioner that parse (``answer_parses``) are stored; errors and garbage
    are returned to the stage (which rejects them) but never cached.

    Args:
        inner: the captioner that answers misses.
        cache: the store.
        fingerprint: backend settings that change answers (part of the key).

    Attributes:
        model_name: the inner captioner's.
    """

    def __init__(self, inner: Captioner, cache: ResponseCache, fingerprint: Mapping[str, Any] | None = None) -> None:
        self.inner = inner
        self.cache = cache
        self.model_name = inner.model_name
        self.fingerprint = dict(fingerprint or {})

    def __repr__(self) -> str:
        return f"CachingCaptioner({self.inner!r}, root={self.cache.root!r})"

    @property
    def requests_sent(self) -> int:
        """Requests the inner captioner sent (HTTP backends)."""
        return int(getattr(self.inner, "requests_sent", 0))

    def generate(self, requests: Sequence[VlmRequest]) -> list[VlmResponse]:
        """Answers from the cache where possible, the rest from ``inner``."""
        requests = list(requests)
        out: list[VlmResponse | None] = [None] * len(requests)
        keys = [cache_key(r, self.model_name, self.fingerprint) for r in requests]
        first_of: dict[str, int] = {}
        to_send: list[int] = []
        for i, (r, k) in enumerate(zip(requests, keys)):
            if k in first_of:
                continue
            hit = self.cache.get(k)
            if hit is not None:
                out[i] = dataclasses.replace(hit, request_id=r.request_id)
            else:
                first_of[k] = i
                to_send.append(i)
        answers = self.inner.generate([requests[i] for i in to_send]) if to_send else []
        for i, a in zip(to_send, answers):
            out[i] = a
            if answer_parses(requests[i], a):
                self.cache.put(keys[i], requests[i], a)
        for i, (r, k) in enumerate(zip(requests, keys)):
            if out[i] is None:  # a repeat of a request sent earlier in this batch
                out[i] = dataclasses.replace(out[first_of[k]], request_id=r.request_id)
        return [o for o in out if o is not None]

    def close(self) -> None:
        """Closes the inner captioner."""
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()
