"""The contract between the caption stages and the VLM backends.

A caption stage renders prompts into ``VlmRequest`` records; a backend
(OpenAI-compatible server, managed server, in-process transformers) answers
each with a ``VlmResponse``. Backends never raise for a bad answer: the
response carries an ``error`` reason code instead, which the stage turns into
a reject. Both records are frozen and picklable so that they cross Beam
boundaries (``RunInference``) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class VlmTask(StrEnum):
    """What a request asks the VLM to do."""

    CORS_GROUND = "cors_ground"  # list referable objects as bbox_2d + label
    CORS_VERIFY = "cors_verify"  # verify category, coverage and missed instances
    DERS_DESCRIBE = "ders_describe"  # one discriminative expression for a highlighted target
    REGROUND = "reground"  # box of the object an expression refers to


class VlmError(StrEnum):
    """Reason codes of failed answers (they become reject reasons)."""

    TIMEOUT = "vlm_timeout"  # no answer after all retries
    HTTP_ERROR = "vlm_http_error"  # non-retryable HTTP status, or retries exhausted on 429/5xx
    SERVER_DEAD = "vlm_server_dead"  # managed server died and could not be restarted
    EMPTY = "vlm_empty_answer"
    REFUSAL = "vlm_refusal"
    MALFORMED = "vlm_malformed_output"  # could not be parsed into the expected structure
    BACKEND = "vlm_backend_error"  # any other backend failure, with the message


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Generation parameters; part of the cache key.

    Attributes:
        max_tokens: most tokens to generate.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass.
        seed: sampling seed, where the backend honours it.
    """

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True, slots=True)
class VlmRequest:
    """One chat request: a system + user prompt with images.

    Attributes:
        request_id: stable id, unique in a run (e.g. ``<sample or region id>/<task>``).
        task: a ``VlmTask`` value.
        prompt_version: id and version of the template, e.g. ``ders_describe@v1``.
        system: the system prompt text ("" for none).
        user: the user prompt text; images are attached before it, in order.
        images: encoded images (JPEG/PNG bytes) to attach.
        image_sha256: sha256 of each image, in order (cache key material).
        region: the region/instance id the request is about, or "".
        json_schema: a JSON Schema (as canonical JSON text) to constrain the
            answer with ``response_format`` where the server supports it, or "".
        sampling: generation parameters.
        metadata: opaque context the stage needs to assemble the answer
            (JSON-serialisable; never sent to the model).
    """

    request_id: str
    task: str
    prompt_version: str
    system: str
    user: str
    images: tuple[bytes, ...]
    image_sha256: tuple[str, ...]
    region: str = ""
    json_schema: str = ""
    sampling: SamplingParams = SamplingParams()
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VlmResponse:
    """The answer to one ``VlmRequest``.

    Attributes:
        request_id: the request's id.
        text: the raw answer text ("" on error).
        model: the model that answered.
        cached: True when served from the response cache (no request sent).
        error: a ``VlmError`` value, or "" on success.
        message: details of the error, or "".
        latency_s: wall time of the request (0 when cached).
    """

    request_id: str
    text: str
    model: str
    cached: bool = False
    error: str = ""
    message: str = ""
    latency_s: float = 0.0
