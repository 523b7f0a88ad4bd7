"""The Beam ``ModelHandler`` of the VLM backends.

Use with ``RunInference``::

    handler = VlmModelHandler(cfg.caption.backend, cache_dir=f"{out}/_cache/vlm")
    responses = (
        requests
        | RunInference(handler).with_exception_handling()  # failures become dead letters
    )

The captioner is built in ``load_model`` on the worker (never at import or
pipeline construction), with lazy imports of aiohttp / torch / transformers.
``run_inference`` never raises for a bad answer: the response carries a
``VlmError`` code. Counters ``orsgen_vlm/vlm_answered``, ``vlm_cached`` and
``vlm_error_<reason>`` are reported per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from orsgen.schemas.config import CaptionBackendConfig
from orsgen.stages.caption.types import VlmRequest, VlmResponse

METRICS_NAMESPACE = "orsgen_vlm"


def build_captioner(cfg: CaptionBackendConfig, cache_dir: str | None = None) -> Any:
    """Builds the configured captioner, wrapped in a response cache when enabled.

    Args:
        cfg: the backend config.
        cache_dir: cache root (``cfg.cache_dir`` wins when set); None with
            ``cfg.cache_dir`` None disables caching.

    Returns:
        A ``Captioner``.

    Raises:
        ValueError: the config lacks what the backend needs.
        ImportError: the backend's extra is not installed.
        ServerStartError: a managed server did not start.
    """
    from orsgen.stages.caption import backends

    client_kwargs: dict[str, Any] = dict(
        api_key_env=cfg.api_key_env,
        max_in_flight=cfg.max_in_flight,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff_initial_s=cfg.backoff_initial_s,
        backoff_max_s=cfg.backoff_max_s,
        max_image_side_px=cfg.max_image_side_px,
        response_format=cfg.response_format,
        extra_body=cfg.extra_body,
        send_seed=cfg.send_seed,
    )
    captioner: Any
    if cfg.backend == "openai":
        captioner = backends.OpenAICompatibleCaptioner(cfg.base_url, cfg.model, **client_kwargs)
    elif cfg.backend == "managed":
        captioner = backends.ManagedServerCaptioner(
            cfg.server_command,
            cfg.model,
            host=cfg.server_host,
            port=cfg.server_port,
            env=cfg.server_env,
            startup_timeout_s=cfg.server_startup_timeout_s,
            max_restarts=cfg.server_max_restarts,
            **client_kwargs,
        )
    else:
        captioner = backends.TransformersCaptioner(
            cfg.model,
            device=cfg.device,
            dtype=cfg.dtype,
            batch_size=cfg.batch_size,
            max_image_side_px=cfg.max_image_side_px,
        )
    root = cfg.cache_dir or cache_dir
    if cfg.cache and root:
        from orsgen.stages.caption.cache import CachingCaptioner, ResponseCache

        captioner = CachingCaptioner(captioner, ResponseCache(root), fingerprint=backend_fingerprint(cfg))
    return captioner


def backend_fingerprint(cfg: CaptionBackendConfig) -> dict[str, Any]:
    """Backend settings that change what the model sees or how it decodes (cache key).

    Whether JSON-schema constraints are used changes answers, so it is
    included; transport settings (timeouts, concurrency) are not.
    """
    return {
        "backend": "transformers" if cfg.backend == "transformers" else "http",
        "max_image_side_px": cfg.max_image_side_px,
        "response_format": cfg.response_format,
        "extra_body": cfg.extra_body,
    }


class VlmModelHandler(ModelHandler[VlmRequest, VlmResponse, Any]):
    """RunInference handler: ``VlmRequest`` -> ``VlmResponse`` through a ``Captioner``.

    Args:
        config: the backend config.
        cache_dir: response cache root, normally ``OUT/_cache/vlm`` (None:
            ``config.cache_dir``, or no cache).
    """

    def __init__(self, config: CaptionBackendConfig, cache_dir: str | None = None) -> None:
        super().__init__()
        if not config.model:
            raise ValueError(
                f"caption backend {config.backend!r} needs a model: set the served model name "
                "(or a local path for backend 'transformers')."
            )
        self._config = config
        self._cache_dir = cache_dir

    @property
    def config(self) -> CaptionBackendConfig:
        """The backend config."""
        return self._config

    def load_model(self) -> Any:
        """Builds the captioner on the worker (starts a managed server)."""
        return build_captioner(self._config, self._cache_dir)

    def run_inference(
        self,
        batch: Sequence[VlmRequest],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[VlmResponse]:
        """Answers a batch (only methods of ``model`` are used: with
        ``share_model_across_processes`` it is a proxy to another process).

        Returns:
            One response per request, in order.
        """
        responses = model.generate(list(batch))
        if len(responses) != len(batch):
            raise RuntimeError(f"captioner returned {len(responses)} answers for {len(batch)} requests; this is a backend bug.")
        answered = cached = 0
        for r in responses:
            if r.error:
                Metrics.counter(METRICS_NAMESPACE, f"vlm_error_{r.error}").inc()
            elif r.cached:
                cached += 1
            else:
                answered += 1
        if answered:
            Metrics.counter(METRICS_NAMESPACE, "vlm_answered").inc(answered)
        if cached:
            Metrics.counter(METRICS_NAMESPACE, "vlm_cached").inc(cached)
        return responses

    def get_num_bytes(self, batch: Sequence[VlmRequest]) -> int:
        """Bytes of images and text in a batch (Beam's byte metrics)."""
        return sum(sum(len(b) for b in r.images) + len(r.user) + len(r.system) for r in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self._config.min_batch_size, "max_batch_size": self._config.max_batch_size}

    def share_model_across_processes(self) -> bool:
        return self._config.shares_model

    def model_copies(self) -> int:
        return 1
