"""The VLM caption stage in Beam: SA1B-CoRS and SA1B-DeRS samples in two rounds.

    examples ─► BatchElements(window_images) ─► CaptionBatchDoFn ─► examples with new
                                                    │                 samples (+ merged
      per window:  plan round 1 ─► backend ─► assemble round 1        instances),
                   plan round 2 ─► backend ─► assemble round 2        rejects, events
                   (cors_ground per image, ders_describe per salient region;
                    cors_verify per label, reground per description)

No image record crosses a shuffle here: a window of images from one bundle
sends its requests together (the backend's client bounds them by
``max_in_flight``), and the answers are joined to their images by request id
in memory. The only shuffle of whole records in a build stays the one before
writing. The model is the ``ModelHandler``'s (``VlmModelHandler``), loaded the
way ``RunInference`` loads it: once per process, or once per worker machine
with ``share_model_across_processes``.

The per-example work (request planning, response assembly) is pure and lives in
the plain functions of this module and in ``stages/caption/{cors,ders}``;
the DoFn only moves records and counts. Every request that fails (an error in
its response, an answer that does not parse, an exception of the handler)
becomes a sample-level reject with its reason code, keyed by the sample it was
for, so ``inputs = written + rejected`` keeps holding for samples. A server
that cannot be reached at all fails the run (``UnreachableGate``) instead.
Images of input types the stage does not apply to bypass both rounds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from PIL import Image

from orsgen.pipelines.transforms import EVENTS, NAMESPACE, REJECTS
from orsgen.schemas.config import CaptionConfig
from orsgen.schemas.records import ImageExample, Reject, RejectLevel
from orsgen.stages.caption import cors, ders
from orsgen.stages.caption.overlay import OverlayError, OverlayStyle, decode_rgb, draw_targets, encode_rgb
from orsgen.stages.caption.parse import parse_description, parse_grounding, parse_verification
from orsgen.stages.caption.prompts import (
    BoxConvention,
    PromptSet,
    fit_max_side,
    format_box,
    from_model_box,
    load_prompts,
    make_request,
    model_input_size,
    to_model_box,
)
from orsgen.stages.caption.types import SamplingParams, VlmError, VlmRequest, VlmResponse, VlmTask

STAGE = "caption"

Answer = Any  # a parsed answer, or (reason, message) when the request failed


# ------------------------------------------------------------------ context


@dataclass(frozen=True)
class CaptionContext:
    """What planning and assembly need, built once per worker from the config.

    Attributes:
        cfg: the caption config.
        prompts: the loaded prompt templates.
        convention: the model's box convention.
        max_side_px: the backend's max image side (images are resized to it
            here, so that requests carry no more bytes than the model uses).
        factor_px: the processor's patch factor (absolute convention).
        min_pixels: the processor's ``min_pixels`` (absolute convention).
        max_pixels: the processor's ``max_pixels`` (absolute convention).
        sampling: generation parameters of every request.
    """

    cfg: CaptionConfig
    prompts: PromptSet
    convention: BoxConvention
    max_side_px: int | None
    factor_px: int
    min_pixels: int
    max_pixels: int
    sampling: SamplingParams

    @classmethod
    def from_config(cls, cfg: CaptionConfig) -> "CaptionContext":
        """Loads the prompts and resolves the model geometry."""
        b = cfg.backend
        s = cfg.sampling
        return cls(
            cfg=cfg,
            prompts=load_prompts(cfg.prompts or None),
            convention=BoxConvention(b.box_convention),
            max_side_px=b.max_image_side_px,
            factor_px=b.image_factor_px,
            min_pixels=b.image_min_pixels,
            max_pixels=b.image_max_pixels,
            sampling=SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed),
        )

    def model_wh(self, width: int, height: int) -> tuple[int, int] | None:
        """The image size the model sees (None for the 0..1000 convention, which needs none)."""
        if self.convention is BoxConvention.RELATIVE_1000:
            return None
        return model_input_size(
            width, height, max_side_px=self.max_side_px, factor_px=self.factor_px,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels,
        )

    def to_model(self, box: Sequence[float], width: int, height: int) -> str:
        """A pixel box written in the model's convention, for a prompt."""
        return format_box(
            to_model_box(box, image_wh=(width, height), convention=self.convention, model_wh=self.model_wh(width, height))
        )

    def from_model(self, box: Sequence[float], width: int, height: int) -> cors.Box:
        """A model box mapped back to image pixels."""
        return from_model_box(box, image_wh=(width, height), convention=self.convention, model_wh=self.model_wh(width, height))

    def style(self, scale: float = 1.0) -> OverlayStyle:
        """The overlay style; line widths scaled so they survive the resize to ``max_side_px``."""
        o = self.cfg.overlay
        return OverlayStyle(
            fill_rgb=tuple(o.fill_rgb), fill_alpha=o.fill_alpha,  # type: ignore[arg-type]
            contour_px=max(1, round(o.contour_px * scale)) if o.contour_px else 0,
            box_rgb=tuple(o.box_rgb), box_px=max(1, round(o.box_px * scale)) if o.box_px else 0,  # type: ignore[arg-type]
        )


# ------------------------------------------------------------------ images


class _Images:
    """An example's image, decoded at most once, resized to what the model sees."""

    def __init__(self, ex: ImageExample, ctx: CaptionContext) -> None:
        self._ex = ex
        self._ctx = ctx
        self._rgb: np.ndarray | None = None
        w, h = ex.image.width, ex.image.height
        self.size = fit_max_side(w, h, ctx.max_side_px)
        # Lines drawn at full resolution are thinned by the downscale; thicken them to match.
        self.scale = max(w, h) / max(self.size) if max(self.size) else 1.0
        self._original: bytes | None = None

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            self._rgb = decode_rgb(self._ex.image_bytes)
        return self._rgb

    def _fit(self, rgb: np.ndarray) -> bytes:
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = np.asarray(Image.fromarray(rgb).resize(self.size, Image.Resampling.BICUBIC))
        return encode_rgb(rgb)

    def original(self) -> bytes:
        """The source bytes when no resize is needed (no re-encoding), else a resized JPEG."""
        if self._original is None:
            w, h = self._ex.image.width, self._ex.image.height
            self._original = self._ex.image_bytes if self.size == (w, h) else self._fit(self.rgb())
        return self._original

    def overlay(self, targets: Sequence[tuple[Any, Sequence[float]]]) -> bytes:
        return self._fit(draw_targets(self.rgb(), targets, self._ctx.style(self.scale)))


# ------------------------------------------------------------------ planning and assembly (pure)


def _event(events: dict[str, int], name: str, n: int = 1) -> None:
    events[name] = events.get(name, 0) + n


def _answer(resp: VlmResponse | None, parser: Callable[[str], Any]) -> Answer:
    """A response parsed, or ``(reason, message)`` for a failed request or an unusable answer."""
    if resp is None:
        return (VlmError.BACKEND.value, "no response came back for this request.")
    if resp.error:
        return (str(resp.error), resp.message or str(resp.error))
    parsed = parser(resp.text)
    if isinstance(parsed, VlmError):
        snippet = resp.text if len(resp.text) <= 160 else resp.text[:157] + "..."
        return (parsed.value, f"the answer could not be used: {snippet!r}")
    return parsed


def _reject(ex: ImageExample, key: str, reason: str, message: str) -> Reject:
    return Reject(key, STAGE, reason, message, RejectLevel.SAMPLE, ex.image.image_id)


def ground_request_id(ex: ImageExample) -> str:
    """Request id of an image's CoRS grounding request."""
    return f"{cors.cors_group_id(ex.key)}/{VlmTask.CORS_GROUND.value}"


def plan_round1(ex: ImageExample, ctx: CaptionContext) -> tuple[list[VlmRequest], list[Reject], dict[str, int]]:
    """The first-round requests of one image: grounding (CoRS) and descriptions (DeRS).

    Returns:
        ``(requests sorted by id, rejects, events)``. A region whose overlay
        cannot be drawn (undecodable image; ingest verified it, so this is
        rare) is rejected here as ``overlay_failed`` and gets no request.
    """
    events: dict[str, int] = {}
    rejects: list[Reject] = []
    reqs: list[VlmRequest] = []
    images = _Images(ex, ctx)
    paths = set(ctx.cfg.paths)
    w, h = ex.image.width, ex.image.height
    if "cors" in paths:
        try:
            reqs.append(make_request(
                ctx.prompts, VlmTask.CORS_GROUND, request_id=ground_request_id(ex), images=[images.original()],
                region="", sampling=ctx.sampling, box_convention=ctx.convention,
            ))
        except OverlayError as err:
            rejects.append(_reject(ex, cors.cors_group_id(ex.key), OverlayError.reason, f"CoRS grounding image: {err}"))
    if "ders" in paths:
        chosen, gate_events = ders.select_salient(ex, ctx.cfg.ders)
        for name, n in gate_events:
            _event(events, name, n)
        for inst in chosen:
            sid = ders.ders_sample_id(ex.key, inst.instance_id)
            try:
                overlay = images.overlay([(inst.rle, inst.bbox_xyxy)])
            except OverlayError as err:
                rejects.append(_reject(ex, sid, OverlayError.reason, f"DeRS overlay: {err}"))
                continue
            if ctx.cfg.ders.send_original:
                imgs, fields = [images.original(), overlay], {}
            else:
                imgs, fields = [overlay], {"image_note": "The image is a photo with one target highlighted."}
            reqs.append(make_request(
                ctx.prompts, VlmTask.DERS_DESCRIBE, request_id=f"{sid}/{VlmTask.DERS_DESCRIBE.value}", images=imgs,
                region=inst.instance_id, sampling=ctx.sampling, box_convention=ctx.convention,
                box=ctx.to_model(inst.bbox_xyxy, w, h), **fields,
            ))
    for r in reqs:
        _event(events, f"caption/requests_{r.task}")
    return sorted(reqs, key=lambda r: r.request_id), rejects, events


@dataclass(frozen=True)
class CaptionState:
    """One image between the two rounds.

    Attributes:
        example: the image, unchanged so far.
        cors_candidates: label candidates waiting for verification.
        ground_model: the model that grounded them.
        ground_template: the grounding prompt's id@version.
        ders_candidates: descriptions waiting for re-grounding.
    """

    example: ImageExample
    cors_candidates: tuple[cors.CorsCandidate, ...] = ()
    ground_model: str = ""
    ground_template: str = ""
    ders_candidates: tuple[ders.DersCandidate, ...] = ()


def assemble_round1(
    ex: ImageExample,
    planned: set[str],
    responses: Mapping[str, VlmResponse],
    ctx: CaptionContext,
) -> tuple[CaptionState, list[Reject], dict[str, int]]:
    """Turns the first round's answers into candidates.

    Args:
        ex: the image.
        planned: ids of the requests ``plan_round1`` made (a region without
            one was rejected while planning).
        responses: answers by request id (a planned request without one
            counts as a backend error).
        ctx: the context.

    Returns:
        ``(state, rejects, events)``. A failed grounding request rejects the
        image's CoRS output as one sample (``<key>-cors``); a failed or unusable
        description rejects that region's would-be DeRS sample.
    """
    events: dict[str, int] = {}
    rejects: list[Reject] = []
    w, h = ex.image.width, ex.image.height
    paths = set(ctx.cfg.paths)
    cands: tuple[cors.CorsCandidate, ...] = ()
    ground_model = ""
    if "cors" in paths and ground_request_id(ex) in planned:
        resp = responses.get(ground_request_id(ex))
        ans = _answer(resp, parse_grounding)
        if isinstance(ans, tuple):
            rejects.append(_reject(ex, cors.cors_group_id(ex.key), ans[0], f"CoRS grounding failed: {ans[1]}"))
        else:
            ground_model = resp.model if resp else ""
            if not ans:
                _event(events, "caption/cors_nothing_found")
            grounded = [(label, ctx.from_model(box, w, h)) for label, box in ans]
            draft = cors.assemble_grounding(ex, grounded, ctx.cfg.cors)
            cands = draft.candidates
            rejects.extend(draft.rejects)
            for name, n in draft.events:
                _event(events, name, n)
    dcands: list[ders.DersCandidate] = []
    if "ders" in paths:
        chosen, _ = ders.select_salient(ex, ctx.cfg.ders)
        template = ctx.prompts.version_of(VlmTask.DERS_DESCRIBE)
        for inst in chosen:
            sid = ders.ders_sample_id(ex.key, inst.instance_id)
            rid = f"{sid}/{VlmTask.DERS_DESCRIBE.value}"
            if rid not in planned:
                continue  # rejected while planning
            resp = responses.get(rid)
            ans = _answer(resp, parse_description)
            if isinstance(ans, tuple):
                rejects.append(_reject(ex, sid, ans[0], f"DeRS description failed: {ans[1]}"))
                continue
            dcands.append(ders.DersCandidate(sid, inst.instance_id, tuple(inst.bbox_xyxy), ans,  # type: ignore[arg-type]
                                             resp.model if resp else "", template))
    state = CaptionState(
        example=ex,
        cors_candidates=cands,
        ground_model=ground_model,
        ground_template=ctx.prompts.version_of(VlmTask.CORS_GROUND) if "cors" in paths else "",
        ders_candidates=tuple(dcands),
    )
    return state, sorted(rejects, key=lambda r: r.source_key), events


def plan_round2(state: CaptionState, ctx: CaptionContext) -> tuple[list[VlmRequest], list[Reject], dict[str, int]]:
    """Verification (per CoRS label) and re-grounding (per DeRS description) requests.

    Returns:
        ``(requests sorted by id, rejects, events)``; a label whose overlay
        cannot be drawn is rejected here (``overlay_failed``).
    """
    ex = state.example
    images = _Images(ex, ctx)
    reqs: list[VlmRequest] = []
    rejects: list[Reject] = []
    events: dict[str, int] = {}
    by_id = {i.instance_id: i for i in ex.instances}
    if ctx.cfg.cors.verify:
        for c in state.cors_candidates:
            insts = {**by_id, **{i.instance_id: i for i in c.new_instances}}
            targets = [(insts[t].rle, insts[t].bbox_xyxy) for t in c.target_ids]
            try:
                overlay = images.overlay(targets)
            except OverlayError as err:
                rejects.append(_reject(ex, c.sample_id, OverlayError.reason, f"CoRS verification overlay: {err}"))
                continue
            reqs.append(make_request(
                ctx.prompts, VlmTask.CORS_VERIFY, request_id=f"{c.sample_id}/{VlmTask.CORS_VERIFY.value}",
                images=[overlay], region=c.sample_id, sampling=ctx.sampling, box_convention=ctx.convention,
                label=c.label,
            ))
    for d in state.ders_candidates:
        try:
            original = images.original()
        except OverlayError as err:
            rejects.append(_reject(ex, d.sample_id, OverlayError.reason, f"re-grounding image: {err}"))
            continue
        reqs.append(make_request(
            ctx.prompts, VlmTask.REGROUND, request_id=f"{d.sample_id}/{VlmTask.REGROUND.value}",
            images=[original], region=d.instance_id, sampling=ctx.sampling,
            box_convention=ctx.convention, expression=d.expression,
        ))
    for r in reqs:
        _event(events, f"caption/requests_{r.task}")
    return sorted(reqs, key=lambda r: r.request_id), rejects, events


def _verdict(ans: Answer, max_missed: int) -> cors.Verdict | tuple[str, str]:
    if isinstance(ans, tuple):
        return ans
    keep = bool(ans["category_correct"]) and bool(ans["coverage_complete"]) and ans["missed_instances"] <= max_missed
    return cors.Verdict(keep, dict(ans))


def assemble_round2(
    state: CaptionState,
    planned: set[str],
    responses: Mapping[str, VlmResponse],
    ctx: CaptionContext,
) -> tuple[ImageExample, list[Reject], dict[str, int]]:
    """Final assembly: verdicts, the re-grounding gate, trainer targets.

    Args:
        state: the image and its candidates.
        planned: ids of the requests ``plan_round2`` made (a candidate
            without one was rejected while planning).
        responses: answers by request id.
        ctx: the context.

    Returns:
        ``(example with the new samples and merged instances appended,
        rejects, events)``. Existing instances and samples are kept as they were.
    """
    ex = state.example
    w, h = ex.image.width, ex.image.height
    events: dict[str, int] = {}
    verdicts: dict[str, cors.Verdict | tuple[str, str]] = {}
    candidates = list(state.cors_candidates)
    if ctx.cfg.cors.verify:
        candidates = [c for c in candidates if f"{c.sample_id}/{VlmTask.CORS_VERIFY.value}" in planned]
        for c in candidates:
            ans = _answer(responses.get(f"{c.sample_id}/{VlmTask.CORS_VERIFY.value}"), parse_verification)
            verdicts[c.sample_id] = _verdict(ans, ctx.cfg.cors.verify_max_missed)
    cors_samples, new_insts, cors_rejects = cors.finalize_cors(
        ex, candidates, verdicts, model=state.ground_model, prompt_version=state.ground_template,
        verify=ctx.cfg.cors.verify,
    )
    results: dict[str, ders.RegroundResult | tuple[str, str]] = {}
    template = ctx.prompts.version_of(VlmTask.REGROUND)
    dcands = [d for d in state.ders_candidates if f"{d.sample_id}/{VlmTask.REGROUND.value}" in planned]
    for d in dcands:
        resp = responses.get(f"{d.sample_id}/{VlmTask.REGROUND.value}")
        ans = _answer(resp, parse_grounding)
        if isinstance(ans, tuple):
            results[d.sample_id] = ans
        else:
            boxes = tuple(ctx.from_model(b, w, h) for _label, b in ans)
            results[d.sample_id] = ders.RegroundResult(boxes, resp.model if resp else "", template)
    ders_samples, ders_rejects = ders.finalize_ders(ex, dcands, results, ctx.cfg.ders)
    new_samples = sorted([*cors_samples, *ders_samples], key=lambda s: s.sample_id)
    for s in new_samples:
        _event(events, f"caption/samples_{s.kind}")
    if new_insts:
        _event(events, "created/instances", len(new_insts))
    out = ex.replace(
        instances=ex.instances + tuple(new_insts),
        samples=ex.samples + tuple(new_samples),
    )
    return out, sorted([*cors_rejects, *ders_rejects], key=lambda r: r.source_key), events


# ------------------------------------------------------------------ Beam wrappers


def _emit(rejects: Iterable[Reject], events: Mapping[str, int]) -> Iterator[Any]:
    n_rejects = 0
    for r in rejects:
        n_rejects += 1
        Metrics.counter(NAMESPACE, f"dropped_{r.reason}").inc()
        yield TaggedOutput(REJECTS, r)
    if n_rejects:
        # Every caption reject stands for a sample this stage set out to make.
        yield TaggedOutput(EVENTS, ("created/samples", n_rejects))
    for name, n in sorted(events.items()):
        if n:
            yield TaggedOutput(EVENTS, (name, n))


def _check_nothing_vanished(before: ImageExample, after: ImageExample) -> None:
    lost_i = {i.instance_id for i in before.instances} - {i.instance_id for i in after.instances}
    lost_s = {s.sample_id for s in before.samples} - {s.sample_id for s in after.samples}
    if lost_i or lost_s:
        raise RuntimeError(f"caption removed {sorted(lost_i | lost_s)[:5]} of {before.image.image_id}; this is a bug.")


def _by_request(responses: Iterable[VlmResponse]) -> dict[str, VlmResponse]:
    # Sorted so that a duplicate id resolves the same way on every run.
    out: dict[str, VlmResponse] = {}
    for r in sorted(responses, key=lambda r: (r.request_id, r.error, r.text)):
        out.setdefault(r.request_id, r)
    return out


def raised_to_responses(requests: Sequence[VlmRequest], err: BaseException) -> list[VlmResponse]:
    """Turns an exception of the handler (a bug, a crashed backend) into one error response per request.

    Each becomes a ``vlm_backend_error`` response carrying the exception's
    message, so that its sample is rejected, not lost, and the job goes on.
    """
    msg = f"{type(err).__name__}: {err}"
    return [
        VlmResponse(request_id=r.request_id, text="", model="", error=VlmError.BACKEND.value,
                    message=f"inference raised: {msg[:300]}")
        for r in requests
    ]


#: Answers that mean the server could not be reached (after the client's retries).
UNREACHABLE = frozenset({VlmError.SERVER_DEAD.value, VlmError.TIMEOUT.value})


class VlmUnreachableError(RuntimeError):
    """Too many caption requests could not reach the VLM server: the bundle (and the run) fails."""


def _where(backend: Any) -> str:
    """Where the server is, for a message: the URL without credentials, or the managed command."""
    if backend.backend == "openai":
        parts = urlsplit(backend.base_url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"at {parts.scheme}://{host}{port}{parts.path} (caption.backend.base_url)"
    if backend.backend == "managed":
        return "started by caption.backend.server_command (see the worker logs for its output)"
    return "(in-process transformers model)"


@dataclass
class UnreachableGate:
    """Fails the run when the VLM server is unreachable instead of rejecting every sample.

    Counts, per SDK process, the answers whose error means the server could
    not be reached (``vlm_server_dead``, ``vlm_timeout``: the client has
    already retried each one). Once at least ``min_requests`` answers are in
    and more than ``max_fraction`` of them are unreachable, ``check`` raises
    one sentence. The counts restart after a failure, so a bundle the runner
    retries after a short outage is judged afresh.

    Attributes:
        max_fraction: ``caption.backend.max_unreachable_fraction`` (1.0: never fail).
        min_requests: ``caption.backend.unreachable_min_requests``.
        where: where the server is, for the message.
    """

    max_fraction: float
    min_requests: int
    where: str
    seen: int = 0
    unreachable: int = 0

    def check(self, responses: Iterable[VlmResponse]) -> None:
        for r in responses:
            self.seen += 1
            if r.error in UNREACHABLE:
                self.unreachable += 1
        if self.max_fraction >= 1.0 or self.seen < self.min_requests:
            return
        if self.unreachable > self.max_fraction * self.seen:
            seen, bad = self.seen, self.unreachable
            self.seen = self.unreachable = 0
            raise VlmUnreachableError(
                f"caption: {bad} of {seen} VLM requests could not reach the model server {self.where} "
                "(vlm_server_dead / vlm_timeout after retries); start the server or make it reachable from "
                "the workers, or raise caption.backend.max_unreachable_fraction to finish with these samples rejected."
            )


def acquire_model(handler: Any, tag: str, shared_handle: Any) -> Any:
    """The handler's model, loaded once per process, or once per machine when it is shared.

    The same rule as ``RunInference``: with ``share_model_across_processes``
    one copy per worker VM serves every SDK process through a proxy (one
    managed vLLM server per GPU machine); otherwise one copy per process,
    shared by its threads.
    """
    if handler.share_model_across_processes():
        from apache_beam.utils import multi_process_shared

        return multi_process_shared.MultiProcessShared(handler.load_model, tag=tag, always_proxy=True).acquire()
    return shared_handle.acquire(handler.load_model, tag=tag)


class CaptionBatchDoFn(beam.DoFn):
    """A window of images -> captioned images, rejects, events; both rounds in one place.

    Requests of every image of the window go to the backend together (its
    client bounds them by ``max_in_flight``), round 1 then round 2, and the
    answers are joined to their image here, by request id, in memory. No
    image record crosses a shuffle: the window is the bundle-level in-flight
    window of ``caption.window_images`` images, built by ``BatchElements``.

    Args:
        cfg: the caption config.
        handler: the ``ModelHandler`` answering ``VlmRequest`` batches.
        model_tag: the shared-model tag (unique per transform).
    """

    def __init__(self, cfg: CaptionConfig, handler: Any, model_tag: str) -> None:
        from apache_beam.utils import shared

        self._cfg = cfg
        self._handler = handler
        self._tag = model_tag
        self._shared = shared.Shared()
        self._ctx: CaptionContext | None = None
        self._model: Any = None
        self._gate: UnreachableGate | None = None

    def setup(self) -> None:
        # Prompts load on the worker, from the installed package or the configured path;
        # the model (a client, a managed server, an in-process model) too.
        self._ctx = CaptionContext.from_config(self._cfg)
        self._model = acquire_model(self._handler, self._tag, self._shared)
        b = self._cfg.backend
        self._gate = UnreachableGate(b.max_unreachable_fraction, b.unreachable_min_requests, _where(b))

    def _context(self) -> CaptionContext:
        # A method, not a property: Beam inspects DoFn attributes while the
        # graph is built, and a property would load the model on the launcher.
        if self._ctx is None:
            self.setup()
        assert self._ctx is not None
        return self._ctx

    def _infer(self, requests: list[VlmRequest]) -> dict[str, VlmResponse]:
        if not requests:
            return {}
        try:
            responses = list(self._handler.run_inference(requests, self._model))
        except VlmUnreachableError:
            raise
        except Exception as err:  # noqa: BLE001 - a failed batch is rejects, never a lost image
            Metrics.counter(NAMESPACE, "caption_inference_raised").inc()
            responses = raised_to_responses(requests, err)
        assert self._gate is not None
        self._gate.check(responses)
        return _by_request(responses)

    def process(self, batch: list[ImageExample]) -> Iterator[Any]:
        ctx = self._context()
        keys = [ex.key for ex in batch]
        if len(set(keys)) != len(keys):
            raise RuntimeError(
                "caption: two examples share a key in one window; example keys must be unique "
                "(the dedupe stage guarantees it)."
            )
        plans1 = [plan_round1(ex, ctx) for ex in batch]
        answers1 = self._infer([r for reqs, _, _ in plans1 for r in reqs])
        states = []
        for ex, (reqs, rejects, events) in zip(batch, plans1):
            yield from _emit(rejects, events)
            state, rejects, events = assemble_round1(ex, {r.request_id for r in reqs}, answers1, ctx)
            yield from _emit(rejects, events)
            states.append(state)
        del answers1, plans1
        plans2 = [plan_round2(state, ctx) for state in states]
        answers2 = self._infer([r for reqs, _, _ in plans2 for r in reqs])
        for state, (reqs, rejects, events) in zip(states, plans2):
            yield from _emit(rejects, events)
            out, rejects, events = assemble_round2(state, {r.request_id for r in reqs}, answers2, ctx)
            before = state.example
            _check_nothing_vanished(before, out)
            samples_made = len(out.samples) - len(before.samples)
            yield from _emit(rejects, events)
            if samples_made:
                yield TaggedOutput(EVENTS, ("created/samples", samples_made))
            yield out


class CaptionExamples(beam.PTransform):
    """Adds SA1B-CoRS and SA1B-DeRS samples to examples through a VLM.

    Args:
        cfg: the caption config (``caption`` section).
        input_types: input name -> input type; only ``cfg.apply_to`` types are
            captioned, the rest pass through untouched.
        model_handler: the ``ModelHandler[VlmRequest, VlmResponse, ...]``
            answering requests (``VlmModelHandler`` from the config's backend).

    The result is ``(examples, rejects, events)``. The stage has no shuffle:
    examples are batched within a bundle and both rounds run in one DoFn.
    """

    def __init__(self, cfg: CaptionConfig, input_types: Mapping[str, str], model_handler: Any) -> None:
        super().__init__()
        self._cfg = cfg
        self._types = dict(input_types)
        self._handler = model_handler
        # The shared-model tag: one captioner per process (or per worker when
        # shared) for this transform; another caption transform gets its own.
        self._model_identifier = f"orsgen-vlm-{uuid.uuid4().hex}"

    @property
    def model_identifier(self) -> str:
        """The tag under which the captioner is shared."""
        return self._model_identifier

    def expand(self, examples: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
        apply_to = set(self._cfg.apply_to)
        types = self._types

        def route(ex: ImageExample, _n: int) -> int:
            return 0 if types.get(ex.input_name, "") in apply_to else 1

        todo, skip = examples | "Route" >> beam.Partition(route, 2)
        n = self._cfg.window_images
        res = (
            todo
            # A fixed window (min = max): a bundle's images are sent together,
            # up to n at a time; the last window of a bundle may be smaller.
            | "Window" >> beam.BatchElements(min_batch_size=n, max_batch_size=n)
            | "Caption" >> beam.ParDo(CaptionBatchDoFn(self._cfg, self._handler, self._model_identifier)).with_outputs(
                REJECTS, EVENTS, main="examples"
            )
        )
        out = (res.examples, skip) | "Merge" >> beam.Flatten()
        return out, res[REJECTS], res[EVENTS]


def caption_model_handler(cfg: CaptionConfig, out: str) -> Any:
    """The ``VlmModelHandler`` of the configured backend, caching under ``OUT/_cache/vlm``.

    Nothing is loaded here; the captioner is built in ``load_model`` on the worker.
    """
    from orsgen.stages.caption.handler import VlmModelHandler

    return VlmModelHandler(cfg.backend, cache_dir=f"{out.rstrip('/')}/_cache/vlm")
