"""Beam wiring of the SAM2 filter / cleaner: a ModelHandler and one PTransform.

    examples ─► Plan ──(no prompts)─────────────────────────────────────────────┐
                 ├──(cached)──────────────────────────── Sam2Result ─┐          │
                 └─► Sam2Request ─► RunInference(Sam2ModelHandler)   │          │
                        ├─► Sam2Result ─► CacheStore ────────────────┴► Apply ─► examples ─┴─► out
                        │                                               ├─► rejects, events
                        │                                               └─► outcomes ─► report
                        └─► dead letters ─► image rejects ``sam2_inference_failed``

With ``verify_sam2.cache`` (on by default) Plan looks each image's
predictions up in ``OUT/_cache/sam2`` (``stages/verify/cache.py``): a hit goes
straight to Apply and never reaches RunInference, so a rerun after a crash
sends no image through SAM2 twice. CacheStore stores what RunInference
answered; dead letters are never stored.

Each RunInference element is one image with all of its prompts; a batch is
``images_per_batch`` images, whose encoder pass is one call. Failed batches
become dead letters (``with_exception_handling``), and each of their images an
image-level reject, so the manifest still reconciles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.pvalue import TaggedOutput

from orsgen.pipelines.transforms import EVENTS, NAMESPACE, REJECTS, StageDoFn
from orsgen.schemas.config import OrsgenConfig, VerifySam2Config
from orsgen.schemas.records import ImageExample, Reject
from orsgen.stages.verify.backend import Sam2Backend, Sam2Request, Sam2Result, load_backend
from orsgen.stages.verify.cache import Sam2ResultCache, fingerprint_of, sam2_cache_key
from orsgen.stages.dataset.sam2_report import ReportAccumulator, render_tiles, report_files, summarize, write_report
from orsgen.stages.verify.sam2 import Sam2Outcome, apply_predictions, inference_failed_reject, plan_prompts

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

BYPASS = "bypass"
CACHED = "cached"
OUTCOMES = "outcomes"


class Sam2ModelHandler(ModelHandler[Sam2Request, Sam2Result, Sam2Backend]):
    """Beam ModelHandler for SAM2: batches of images, all prompts of each image.

    The model is loaded in ``load_model`` (on the worker), never at
    construction, so the handler pickles small. With
    ``share_model_across_processes`` Beam loads one copy per machine (or
    ``model_copies``) and proxies calls to it.

    Args:
        cfg: the ``verify_sam2`` config.
    """

    def __init__(self, cfg: VerifySam2Config) -> None:
        share = cfg.share_model_across_processes
        super().__init__(
            min_batch_size=1,
            max_batch_size=cfg.images_per_batch,
            large_model=share,
            model_copies=cfg.model_copies if share else None,
        )
        self._cfg = cfg

    def load_model(self) -> Sam2Backend:
        """Loads the configured backend and model."""
        c = self._cfg
        return load_backend(
            c.model,
            backend=c.backend,
            meta_model_cfg=c.meta_model_cfg,
            device=c.device,
            dtype=c.dtype,
            prompts_per_batch=c.prompts_per_batch,
            mask_threshold=c.mask_threshold,
        )

    def run_inference(
        self, batch: Sequence[Sam2Request], model: Sam2Backend, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Sam2Result]:
        """One encoder pass for the batch's images, batched prompts per image."""
        preds = model.predict_images([(r.example.image_bytes, r.prompts) for r in batch])
        if len(preds) != len(batch):
            raise RuntimeError(f"SAM2 backend returned {len(preds)} results for {len(batch)} images.")
        return [Sam2Result(r.example, r.prompts, tuple(p), r.cache_key) for r, p in zip(batch, preds)]

    def get_num_bytes(self, batch: Sequence[Sam2Request]) -> int:
        """Encoded image bytes of the batch (cheaper than Beam's pickling default)."""
        return sum(len(r.example.image_bytes) for r in batch)

    def get_metrics_namespace(self) -> str:
        """Namespace of RunInference's own metrics."""
        return "orsgen_sam2"


class _PlanDoFn(beam.DoFn):
    """Plans each image's prompts; images without any bypass the model.

    With a cache root, an image whose predictions are cached comes out as a
    ``Sam2Result`` under ``CACHED`` (it skips RunInference); a miss carries
    its cache key to RunInference so that CacheStore can store the answer.
    """

    def __init__(self, cfg: VerifySam2Config, input_types: dict[str, str], cache_root: str | None = None) -> None:
        self._cfg = cfg
        self._types = input_types
        self._cache_root = cache_root
        self._cache: Sam2ResultCache | None = None
        self._fingerprint: dict[str, Any] = {}

    def _open_cache(self) -> Sam2ResultCache:
        # Opened at the first image, not in setup(): a worker that never sees an
        # image with prompts never touches the object store. The fingerprint is
        # taken on the worker, where a local checkpoint's files are.
        if self._cache is None:
            self._fingerprint = fingerprint_of(self._cfg)
            self._cache = Sam2ResultCache(str(self._cache_root))
        return self._cache

    def process(self, ex: ImageExample) -> Iterator[Any]:
        prompts = plan_prompts(ex, self._cfg, self._types.get(ex.input_name, ""))
        if not prompts:
            yield TaggedOutput(BYPASS, ex)
            return
        Metrics.counter(NAMESPACE, "sam2_prompts").inc(len(prompts))
        key = ""
        if self._cache_root:
            cache = self._open_cache()
            key = sam2_cache_key(ex.image_bytes, prompts, self._fingerprint)
            corrupt = cache.corrupt
            hit = cache.get(key, prompts)
            if cache.corrupt != corrupt:
                Metrics.counter(NAMESPACE, "sam2_cache_corrupt").inc()
            if hit is not None:
                Metrics.counter(NAMESPACE, "sam2_cache_hits").inc()
                yield TaggedOutput(CACHED, Sam2Result(ex, prompts, hit, key))
                return
            Metrics.counter(NAMESPACE, "sam2_cache_misses").inc()
        yield Sam2Request(ex, prompts, key)


class _CacheStoreDoFn(beam.DoFn):
    """Stores each inferred result under its cache key, then passes it on."""

    def __init__(self, cache_root: str) -> None:
        self._cache_root = cache_root
        self._cache: Sam2ResultCache | None = None

    def process(self, result: Sam2Result) -> Iterator[Sam2Result]:
        if result.cache_key:
            if self._cache is None:  # opened at the first result (see _PlanDoFn)
                self._cache = Sam2ResultCache(self._cache_root)
            self._cache.put(result.cache_key, result.example.image.sha256, result.predictions)
            Metrics.counter(NAMESPACE, "sam2_cache_writes").inc()
        yield result


class _ApplyDoFn(beam.DoFn):
    """Applies predictions; StageDoFn's checks keep every removal accounted for."""

    def __init__(self, cfg: VerifySam2Config, input_types: dict[str, str]) -> None:
        self._cfg = cfg
        self._types = input_types
        self._current: tuple[ImageExample | None, list[Reject]] = (None, [])
        self._stage: StageDoFn | None = None

    def setup(self) -> None:
        # StageDoFn holds the accounting rules (a removed instance or sample
        # needs a reject naming it); it is fed the result computed below.
        self._stage = StageDoFn("VerifySam2", lambda _ex: self._current)

    def process(self, result: Sam2Result) -> Iterator[Any]:
        ex = result.example
        res = apply_predictions(
            ex, result.predictions, self._cfg, prompts=result.prompts, input_type=self._types.get(ex.input_name, "")
        )
        self._current = (res.example, list(res.rejects))
        assert self._stage is not None
        yield from self._stage.process(ex)
        for o in res.outcomes:
            yield TaggedOutput(OUTCOMES, o)


class _DeadLetterDoFn(beam.DoFn):
    """A failed inference batch: every image in it becomes an image reject."""

    # Its main output is rejects, not image records (pipelines/dataflow_graph.py).
    small_main_output = True

    def process(self, element: tuple[Sequence[Sam2Request], Any]) -> Iterator[Any]:
        batch, error = element
        text = error[1] if isinstance(error, tuple) and len(error) > 1 else str(error)
        # Reprs such as "<_io.BytesIO object at 0x7f...>" differ per run: the
        # reject's message must not (byte-identical reruns).
        text = _ADDRESS.sub("", str(text))
        for req in batch:
            ex = req.example
            Metrics.counter(NAMESPACE, "dropped_sam2_inference_failed").inc()
            yield inference_failed_reject(ex, str(text))
            # The image's instances, refs and samples go with it.
            yield TaggedOutput(EVENTS, ("dropped_with_image/instances", len(ex.instances)))
            yield TaggedOutput(EVENTS, ("dropped_with_image/refs", len(ex.refs)))
            yield TaggedOutput(EVENTS, ("dropped_with_image/samples", len(ex.samples)))


class ReportCombineFn(beam.CombineFn):
    """Combines outcomes into one ``ReportAccumulator`` (counts, histograms, worst)."""

    def __init__(self, bins: int, worst_n: int) -> None:
        self._bins = bins
        self._worst_n = worst_n

    def create_accumulator(self) -> ReportAccumulator:
        return ReportAccumulator(bins=self._bins, worst_n=self._worst_n)

    def add_input(self, acc: ReportAccumulator, o: Sam2Outcome) -> ReportAccumulator:
        return acc.add(o)

    def merge_accumulators(self, accs: Iterable[ReportAccumulator]) -> ReportAccumulator:
        it = iter(accs)
        first = next(it)
        for a in it:
            first.merge(a)
        return first

    def extract_output(self, acc: ReportAccumulator) -> ReportAccumulator:
        return acc.finish()


class _RenderDoFn(beam.DoFn):
    """Renders preview tiles of the worst cases that live on this image."""

    def __init__(self, tile_px: int) -> None:
        self._tile_px = tile_px

    def process(self, ex: ImageExample, worst: Sequence[Sam2Outcome]) -> Iterator[Any]:
        mine = [o for o in worst if o.image_key == ex.key]
        if mine:
            yield from render_tiles(ex.image_bytes, mine, self._tile_px)


def _worst_cases(acc: ReportAccumulator) -> list[Sam2Outcome]:
    return [o for kind in sorted(acc.worst) for o in acc.worst[kind]]


def _write_report(_: Any, *, out: str, cfg: VerifySam2Config, acc: ReportAccumulator, tiles: list[Any]) -> list[str]:
    return write_report(out, report_files(summarize(acc, cfg), tiles))


def sam2_cache_root(cfg: VerifySam2Config, out: str) -> str:
    """Where SAM2 predictions are cached: ``cache_dir``, else ``<out>/_cache/sam2``; "" when off."""
    if not cfg.cache:
        return ""
    return cfg.cache_dir or f"{out.rstrip('/')}/_cache/sam2"


class VerifySam2(beam.PTransform):
    """The SAM2 filter / cleaner over a PCollection of ImageExamples.

    Args:
        cfg: the whole config (``verify_sam2`` section and input types).
        out: the output root; the report goes to ``<out>/reports/verify_sam2/``.
        handler: the model handler (default ``Sam2ModelHandler(cfg.verify_sam2)``).
        cache_root: where SAM2 predictions are cached (default
            ``verify_sam2.cache_dir``, else ``<out>/_cache/sam2``; none when
            ``verify_sam2.cache`` is false).

    Returns (from ``expand``):
        ``(examples, rejects, events)``: the examples with cleaned masks and
        verified samples, the rejects, and counting events for the manifest.
    """

    def __init__(
        self, cfg: OrsgenConfig, out: str, handler: ModelHandler | None = None, cache_root: str | None = None
    ) -> None:
        super().__init__()
        self._cfg = cfg.verify_sam2
        self._types = {inp.name: inp.type for inp in cfg.inputs}
        self._out = out
        self._handler = handler or Sam2ModelHandler(self._cfg)
        self._cache_root = sam2_cache_root(self._cfg, out) if cache_root is None else cache_root

    def expand(self, examples: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
        cfg = self._cfg
        planned = examples | "Plan" >> beam.ParDo(_PlanDoFn(cfg, self._types, self._cache_root)).with_outputs(
            BYPASS, CACHED, main="requests"
        )
        results, dlq = planned.requests | "RunInference" >> RunInference(self._handler).with_exception_handling()
        if self._cache_root:
            stored = results | "CacheStore" >> beam.ParDo(_CacheStoreDoFn(self._cache_root))
            results = (stored, planned[CACHED]) | "WithCached" >> beam.Flatten()
        applied = results | "Apply" >> beam.ParDo(_ApplyDoFn(cfg, self._types)).with_outputs(
            REJECTS, EVENTS, OUTCOMES, main="examples"
        )
        failed = dlq.failed_inferences | "DeadLetters" >> beam.ParDo(_DeadLetterDoFn()).with_outputs(
            EVENTS, main="rejects"
        )
        out_examples = (applied.examples, planned[BYPASS]) | "Merge" >> beam.Flatten()
        rejects = (applied[REJECTS], failed.rejects) | "Rejects" >> beam.Flatten()
        events = (applied[EVENTS], failed[EVENTS]) | "Events" >> beam.Flatten()
        if cfg.report.enabled:
            acc = applied[OUTCOMES] | "Summarize" >> beam.CombineGlobally(
                ReportCombineFn(cfg.report.histogram_bins, cfg.report.worst_cases)
            )
            worst = acc | "Worst" >> beam.FlatMap(_worst_cases)
            tiles = out_examples | "RenderWorst" >> beam.ParDo(
                _RenderDoFn(cfg.report.tile_px), worst=beam.pvalue.AsList(worst)
            )
            _ = (
                examples.pipeline
                | "ReportTrigger" >> beam.Create([None])
                | "WriteReport"
                >> beam.Map(
                    _write_report,
                    out=self._out,
                    cfg=cfg,
                    acc=beam.pvalue.AsSingleton(acc),
                    tiles=beam.pvalue.AsList(tiles),
                )
            )
        return out_examples, rejects, events
