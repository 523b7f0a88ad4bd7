"""Config of the caption stage (SA1B-CoRS / SA1B-DeRS with a VLM)."""

from __future__ import annotations

from typing import Any, Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field, model_validator


class CorsConfig(ConfigModel):
    """SA1B-CoRS: VLM boxes + labels matched to SA-1B fragments, then verified.

    Attributes:
        iof_thresh: a fragment joins a box's instance when at least this
            fraction of the fragment lies inside the box (intersection over
            fragment, IoF). IoF rather than IoU, because SA-1B splits one
            object into many parts, each with a low IoU against the box.
        min_box_iou: the merged mask's tight box must have at least this IoU
            with the VLM box, or the merge failed (fragments cover only a corner).
        min_coverage: the merged mask must fill at least this fraction of the
            VLM box's pixels, or the merge failed (a few scattered slivers).
        fallback: what to try, in order, when merging fails: ``best_region``
            takes the single region with the highest mask IoU with the box
            rectangle (at least ``fallback_min_iou``); ``box`` uses the box
            rectangle itself as the mask (``mask_origin: vlm_box``, marked in the
            sample's metadata). A box that nothing matches rejects its label's
            sample (``cors_no_match``).
        fallback_min_iou: least mask IoU of the ``best_region`` fallback.
        max_boxes_per_image: grounded boxes kept per image (whole labels are
            kept or rejected, ``cors_too_many_boxes``), a guard against
            repetition loops.
        verify: run the verification pass (one ``cors_verify`` request per
            label); a negative verdict rejects the sample (``cors_verify_failed``).
            A verdict is positive when the category is correct, the coverage
            complete and at most ``verify_max_missed`` instances are missed.
        verify_max_missed: missed instances the verifier may report for a
            label to be kept (0: a category sample must name every instance).
    """

    iof_thresh: float = Field(default=0.8, gt=0.0, le=1.0)
    min_box_iou: float = Field(default=0.5, ge=0.0, le=1.0)
    min_coverage: float = Field(default=0.2, ge=0.0, le=1.0)
    fallback: list[Literal["best_region", "box"]] = Field(default_factory=lambda: ["best_region", "box"])
    fallback_min_iou: float = Field(default=0.5, ge=0.0, le=1.0)
    max_boxes_per_image: int = Field(default=64, ge=1)
    verify: bool = True
    verify_max_missed: int = Field(default=0, ge=0)


class DersConfig(ConfigModel):
    """SA1B-DeRS: one discriminative description per salient region, re-grounded.

    Attributes:
        min_area_frac: saliency gate; only regions covering at least this
            fraction of the image are described (smaller ones are counted as
            ``caption/ders_not_salient`` events, not rejected: they stay in
            the dataset, just without a description).
        max_regions_per_image: describe at most this many regions per image,
            largest first (the rest count as ``caption/ders_over_cap``).
        reground_iou_thresh: keep a description only if the box the VLM finds
            for it on the original image has at least this IoU with the target
            box (the recipe's 0.8).
        reject_ambiguous: reject a description whose re-grounding returns more
            than one distinct box (it is not discriminative).
        send_original: send the original image beside the overlay (two images
            per describe request; better descriptions, about twice the image tokens).
    """

    min_area_frac: float = Field(default=0.01, ge=0.0, le=1.0)
    max_regions_per_image: int = Field(default=8, ge=1)
    reground_iou_thresh: float = Field(default=0.8, ge=0.0, le=1.0)
    reject_ambiguous: bool = True
    send_original: bool = True


class OverlayConfig(ConfigModel):
    """How targets are drawn for the VLM (DeRS describe, CoRS verify).

    Attributes:
        fill_rgb: fill and contour colour.
        fill_alpha: fill opacity, 0..1.
        contour_px: contour thickness in pixels.
        box_rgb: box colour.
        box_px: box line thickness in pixels.
    """

    fill_rgb: tuple[int, int, int] = (255, 0, 0)
    fill_alpha: float = Field(default=0.45, ge=0.0, le=1.0)
    contour_px: int = Field(default=2, ge=0)
    box_rgb: tuple[int, int, int] = (0, 255, 0)
    box_px: int = Field(default=2, ge=0)


class CaptionSamplingConfig(ConfigModel):
    """Generation parameters of every caption request (part of the cache key).

    Attributes:
        max_tokens: most tokens per answer. Grounding lists need the most:
            about 25 tokens per box, so 64 boxes take ~1600; a list cut off by
            the limit keeps only its complete entries.
        temperature: 0 is greedy.
        top_p: nucleus mass.
        seed: sampling seed, where the server honours it.
    """

    max_tokens: int = Field(default=2048, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0


class CaptionBackendConfig(ConfigModel):
    """The VLM backend of the caption stages (``stages/caption/backends.py``).

    Attributes:
        backend: ``openai`` (any OpenAI-compatible server: vLLM, SGLang,
            ``transformers serve``), ``managed`` (orsgen starts
            ``server_command`` on each worker) or ``transformers`` (in-process).
        model: served model name (``openai`` / ``managed``; vLLM serves the
            path or hub id it was given unless ``--served-model-name``) or a
            local path / hub id (``transformers``).
        base_url: ``openai``: server URL, e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: NAME of the environment variable holding the API key
            (the key itself never goes in a config); None: no key.
        server_command: ``managed``: argv with ``{model}``, ``{host}``,
            ``{port}`` placeholders, e.g. ``[/opt/vllm-venv/bin/vllm, serve,
            "{model}", --host, "{host}", --port, "{port}"]``.
        server_env: ``managed``: extra environment of the server.
        server_host: ``managed``: interface the server binds.
        server_port: ``managed``: port (0: a free one).
        server_startup_timeout_s: ``managed``: wait for ``/v1/models`` this long.
        server_max_restarts: ``managed``: restarts after the server dies.
        max_in_flight: most concurrent requests per client: one client per Beam
            SDK process and round for ``openai``, one per worker when shared.
        timeout_s: per-request timeout.
        max_retries: resends after 429, 5xx, timeouts and dropped connections.
        backoff_initial_s: first backoff, doubled per retry (with jitter).
        backoff_max_s: backoff cap.
        max_image_side_px: images are resized to at most this longest side
            before sending (part of the cache key; box conversion uses it).
        response_format: ``auto`` sends each prompt's JSON schema as
            ``response_format`` and stops when a server rejects it;
            ``json_schema`` always; ``none`` never.
        extra_body: extra fields of every request, e.g. ``{top_k: 20}`` or
            ``{chat_template_kwargs: {enable_thinking: false}}``.
        send_seed: send the sampling seed.
        box_convention: how the model writes boxes: ``absolute`` (Qwen2.5-VL,
            pixels of the resized input) or ``relative_1000`` (Qwen3-VL).
        image_factor_px: the processor's resize factor (28 Qwen2.5-VL, 32 Qwen3-VL).
        image_min_pixels: the processor's ``min_pixels``.
        image_max_pixels: the processor's ``max_pixels`` (as the server runs it).
        device: ``transformers``: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``transformers``: ``auto`` (bfloat16 on CUDA, float32 on CPU) or a dtype.
        batch_size: ``transformers``: requests per ``generate`` call.
        min_batch_size: Beam ``RunInference`` batching (``batch_elements_kwargs``).
        max_batch_size: same; for HTTP backends keep it near ``max_in_flight``
            so one bundle fills the concurrency budget.
        share_model_across_processes: one captioner (one managed server, one
            model copy) per worker machine instead of per process; None: on for
            ``managed`` and ``transformers``, off for ``openai``.
        cache: keep a response cache under ``OUT/_cache/vlm`` (or ``cache_dir``).
        cache_dir: where the cache lives (None: under the output directory).
        max_unreachable_fraction: the run fails (one sentence naming this
            key) once more than this fraction of a worker process's requests
            could not reach the server (``vlm_server_dead`` / ``vlm_timeout``
            after retries); 1.0: never, every sample becomes a reject instead.
        unreachable_min_requests: answers a process must have before that
            fraction is judged.
    """

    backend: Literal["openai", "managed", "transformers"] = "openai"
    model: str = ""
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    server_command: list[str] = Field(default_factory=list)
    server_env: dict[str, str] = Field(default_factory=dict)
    server_host: str = "127.0.0.1"
    server_port: int = Field(default=0, ge=0, le=65535)
    server_startup_timeout_s: float = Field(default=900.0, gt=0)
    server_max_restarts: int = Field(default=3, ge=0)
    max_in_flight: int = Field(default=64, ge=1, le=4096)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    max_image_side_px: int = Field(default=1024, ge=32)
    response_format: Literal["auto", "json_schema", "none"] = "auto"
    extra_body: dict[str, Any] = Field(default_factory=dict)
    send_seed: bool = True
    box_convention: Literal["absolute", "relative_1000"] = "absolute"
    image_factor_px: int = Field(default=28, ge=1)
    image_min_pixels: int = Field(default=3136, ge=1)
    image_max_pixels: int = Field(default=12_845_056, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    batch_size: int = Field(default=8, ge=1)
    min_batch_size: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=64, ge=1)
    share_model_across_processes: bool | None = None
    cache: bool = True
    cache_dir: str | None = None
    max_unreachable_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    unreachable_min_requests: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _check_backend(self) -> "CaptionBackendConfig":
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1.")
        if self.backend == "managed" and not self.server_command:
            raise ValueError(
                "backend 'managed' needs server_command, e.g. [vllm, serve, '{model}', --host, '{host}', --port, '{port}']."
            )
        if self.backend == "managed" and not any("{port}" in a for a in self.server_command) and self.server_port == 0:
            raise ValueError("server_command has no '{port}' placeholder; add one or set server_port to the port it listens on.")
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(f"min_batch_size ({self.min_batch_size}) is above max_batch_size ({self.max_batch_size}).")
        if "stop" in self.extra_body:
            raise ValueError("extra_body must not set 'stop': transformers serve answers HTTP 500 to it for VLMs, and the prompts ask for JSON instead.")
        return self

    @property
    def shares_model(self) -> bool:
        """Whether one captioner serves all processes of a worker."""
        if self.share_model_across_processes is not None:
            return self.share_model_across_processes
        return self.backend in ("managed", "transformers")


class CaptionConfig(ConfigModel):
    """VLM captioning: SA1B-CoRS category samples and SA1B-DeRS descriptions.

    Off by default: it needs a VLM (a vLLM / OpenAI-compatible server, a
    managed server, or an in-process transformers model).

    Attributes:
        enabled: run the caption stage (after region selection, before splits).
        apply_to: input types whose images are captioned.
        paths: ``cors`` (category-oriented: grounding, IoF merging,
            verification) and / or ``ders`` (descriptive: overlay, description,
            re-grounding).
        backend: the VLM backend (server URL, model, box convention, retries,
            cache).
        prompts: a prompt template file or folder (None: the bundled
            ``configs/prompts/``); relative paths are resolved against the
            config file's folder.
        sampling: generation parameters of every request.
        cors: CoRS thresholds.
        ders: DeRS thresholds.
        overlay: how targets are highlighted for the VLM.
        window_images: images whose requests are sent together by one SDK
            process (the bundle-level in-flight window); each holds its
            decoded image while its requests are out (~10 MB for SA-1B), and
            it should give the backend enough requests to fill
            ``backend.max_in_flight`` (an SA-1B image makes ~1 + 8 requests a round).
    """

    enabled: bool = False
    apply_to: list[Literal["sa1b", "coco"]] = Field(default_factory=lambda: ["sa1b"], min_length=1)
    paths: list[Literal["cors", "ders"]] = Field(default_factory=lambda: ["cors", "ders"], min_length=1)
    backend: CaptionBackendConfig = CaptionBackendConfig()
    prompts: str | None = None
    sampling: CaptionSamplingConfig = CaptionSamplingConfig()
    cors: CorsConfig = CorsConfig()
    ders: DersConfig = DersConfig()
    overlay: OverlayConfig = OverlayConfig()
    window_images: int = Field(default=32, ge=1, le=4096)

    @model_validator(mode="after")
    def _check_enabled(self) -> "CaptionConfig":
        if self.enabled and not self.backend.model:
            raise ValueError(
                "caption is enabled but caption.backend.model is empty; set the served model name "
                "(e.g. Qwen/Qwen2.5-VL-72B-Instruct) or a local path for backend 'transformers'."
            )
        return self
