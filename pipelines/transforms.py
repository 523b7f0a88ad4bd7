"""Thin Beam wrappers around the pure stage functions.

A stage function takes one ``ImageExample`` and returns ``(example or None,
rejects)``. ``StageDoFn`` turns it into a DoFn with a main output, a
``rejects`` output and a ``dropped_<reason>`` counter per reject, so no stage
has to know about Beam and no drop goes uncounted.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindows

from orsgen.schemas.records import ImageExample, Reject, RejectLevel

REJECTS = "rejects"
EVENTS = "events"
NAMESPACE = "orsgen"

#: ``example -> (example or None, rejects)``, optionally with a third item of
#: counting events ``[(key, n)]``.
StageFunction = Callable[..., tuple[Any, ...]]


def example_events(prefix: str, ex: ImageExample) -> list[tuple[str, int]]:
    """Counting events of one example: images, instances, refs and samples."""
    return [
        (f"{prefix}/images", 1),
        (f"{prefix}/instances", len(ex.instances)),
        (f"{prefix}/refs", len(ex.refs)),
        (f"{prefix}/samples", len(ex.samples)),
    ]


def _redact_worker_logs() -> None:
    # Worker processes (multi-processing direct runner, Dataflow) log on their
    # own; secrets are scrubbed there too (schemas.config.redact).
    from orsgen.schemas.config.redact import install_log_redaction

    install_log_redaction()


class BundleCounts(beam.DoFn):
    """Sums a DoFn's counting events per bundle and emits one event per key in ``finish_bundle``.

    Every event is an element that crosses a fusion break (the ``events``
    flatten is read by a separate combine stage), so per-example events cost
    Beam an encode, a decode and a combine step each: about 14 per COCO image.
    Summed here, a bundle sends one ``(key, sum)`` per key instead. The run's
    totals are the same (``SumEvents`` adds them up either way), and a key
    appears exactly when it did before: once emitted, even with ``n == 0``.

    Used outside a Beam bundle (``start_bundle`` not called, e.g. a DoFn
    driving another one's ``process`` by hand), events are yielded one by one
    as before.
    """

    _sums: dict[str, int] | None = None

    def start_bundle(self) -> None:
        self._sums = {}

    def finish_bundle(self) -> Iterator[Any]:
        sums, self._sums = self._sums, {}
        for key, n in (sums or {}).items():
            yield TaggedOutput(EVENTS, GlobalWindows.windowed_value((key, n)))

    def _events(self, pairs: Iterable[tuple[str, int]]) -> Iterator[TaggedOutput]:
        """Counts each ``(key, n)``; yields the outputs only when not batching (outside a bundle)."""
        sums = self._sums
        for key, n in pairs:
            if sums is None:
                yield TaggedOutput(EVENTS, (key, n))
            else:
                sums[key] = sums.get(key, 0) + n

    def _dropped(self, reason: str) -> None:
        # One counter object per reason (not one per reject); made lazily so
        # the pickled DoFn stays as it was.
        counters = self.__dict__.setdefault("_dropped_counters", {})
        counter = counters.get(reason)
        if counter is None:
            counter = counters[reason] = Metrics.counter(NAMESPACE, f"dropped_{reason}")
        counter.inc()


class StageDoFn(BundleCounts):
    """Runs a pure stage function; rejects go to the ``rejects`` output.

    An example the stage drops must come with an image-level reject, so that
    ``inputs = written + rejected`` keeps holding; a stage that breaks that
    rule fails loudly here rather than losing the image silently.
    """

    def __init__(self, name: str, fn: StageFunction) -> None:
        self._name = name
        self._fn = fn
        self._in = Metrics.counter(NAMESPACE, f"{name}_in")

    def setup(self) -> None:
        _redact_worker_logs()

    def process(self, ex: ImageExample, *side_inputs) -> Iterator[Any]:  # type: ignore[no-untyped-def]
        # Side inputs given to ParDo (e.g. a category vocabulary) reach the
        # stage function as extra positional arguments. (Unannotated: Beam reads
        # an annotation on *args as a type hint of one tuple-valued input.)
        out = yield from self._stage(ex, side_inputs)
        if out is not None:
            yield out

    def _stage(self, ex: ImageExample, side_inputs: tuple[Any, ...]) -> Generator[Any, None, ImageExample | None]:
        """Runs the stage on ``ex``: yields its rejects and events, returns its example (None: dropped)."""
        self._in.inc()
        result = self._fn(ex, *side_inputs)
        out, rejects = result[0], result[1]
        # A stage may also return counting events ``[(key, n)]`` (what it
        # skipped and why); they reach the manifest like every other event.
        yield from self._events((key, n) for key, n in (result[2] if len(result) > 2 else ()) if n)
        for r in rejects:
            self._dropped(r.reason)
            yield TaggedOutput(REJECTS, r)
        if out is None:
            if not any(r.level == RejectLevel.IMAGE for r in rejects):
                raise RuntimeError(
                    f"stage {self._name} dropped image {ex.image.image_id} without an image-level reject; "
                    "this is a bug in that stage."
                )
            # The instances, refs and samples go with the image; count them so
            # their levels reconcile too. Those the stage rejected on their own
            # (region selection's instance rejects, say) are counted by their
            # reject already: counting them again would make rejected > inputs.
            own = {r.source_key for r in rejects if r.level in (RejectLevel.INSTANCE, RejectLevel.SAMPLE)}
            yield from self._events(
                (
                    ("dropped_with_image/instances", sum(i.instance_id not in own for i in ex.instances)),
                    ("dropped_with_image/refs", len(ex.refs)),
                    ("dropped_with_image/samples", sum(s.sample_id not in own for s in ex.samples)),
                )
            )
            return None
        yield from self._account(ex, out, rejects)
        return out

    def _account(self, ex: ImageExample, out: ImageExample, rejects: list[Reject]) -> Iterator[Any]:
        """Checks that nothing vanished without a reject, and counts new samples.

        A stage may remove an instance or a sample only with a reject whose
        ``source_key`` is that id; anything else is a silent drop, which is a
        bug. Samples created here are counted independently of what is written
        later, which is what makes the manifest's sample reconciliation a check.
        """
        for level, before, after in (
            (RejectLevel.INSTANCE, {i.instance_id for i in ex.instances}, {i.instance_id for i in out.instances}),
            (RejectLevel.SAMPLE, {s.sample_id for s in ex.samples}, {s.sample_id for s in out.samples}),
        ):
            keys = {r.source_key for r in rejects if r.level == level}
            vanished = before - after - keys
            if vanished:
                raise RuntimeError(
                    f"stage {self._name} removed {level}s {sorted(vanished)[:5]} of image {ex.image.image_id} "
                    "without a reject; this is a bug in that stage."
                )
            if level == RejectLevel.SAMPLE:
                created = len(after - before) + len(keys - before)
                if created:
                    yield from self._events((("created/samples", created),))


class StageChainDoFn(BundleCounts):
    """Consecutive stages in one ParDo: each ``StageDoFn`` runs on what the one before returned.

    Every stage keeps its own rules and figures: its ``<name>_in`` and
    ``dropped_<reason>`` counters, its accounting checks and its error
    messages; an image one stage drops never reaches the next. What goes is
    one main output per stage in between: each is an element that Beam hands
    on, counts and, for some elements, pickles to estimate its size (an
    ``ImageExample`` is tens of kilobytes). The rejects and events are the
    same elements the separate ParDos emitted (events summed per bundle, as
    ``BundleCounts`` does), and the examples that come out are the same.

    Args:
        stages: ``(stage, number of side inputs)`` in order; the ParDo's
            side inputs are handed out to the stages in that order.
    """

    def __init__(self, stages: list[tuple[StageDoFn, int]]) -> None:
        self._stages = tuple(stages)

    def setup(self) -> None:
        _redact_worker_logs()

    def start_bundle(self) -> None:
        super().start_bundle()
        # One dict for the bundle: the stages count into the chain's sums.
        for stage, _ in self._stages:
            stage._sums = self._sums

    def finish_bundle(self) -> Iterator[Any]:
        for stage, _ in self._stages:
            stage._sums = None
        yield from super().finish_bundle()

    def process(self, ex: ImageExample, *side_inputs) -> Iterator[Any]:  # type: ignore[no-untyped-def]
        at = 0
        for stage, n_side in self._stages:
            try:
                ex = yield from stage._stage(ex, side_inputs[at : at + n_side])
            except Exception as err:
                # Beam names the chained step ("A+B+C"): say which stage raised.
                err.add_note(f"orsgen: raised in stage {stage._name} of the chained step, on image {ex.image.image_id}.")
                raise
            if ex is None:
                return
            at += n_side
        yield ex


class IngestDoFn(BundleCounts):
    """Runs a reader (``element -> iterable of ImageExample | Reject``).

    Also emits counting events for what was read, which the manifest uses to
    reconcile inputs with what was written and rejected.
    """

    def __init__(self, name: str, reader: Callable[[Any], Any]) -> None:
        self._name = name
        self._reader = reader
        self._images = Metrics.counter(NAMESPACE, f"{name}_images")

    def setup(self) -> None:
        _redact_worker_logs()

    def process(self, element: Any) -> Iterator[Any]:
        for item in self._reader(element):
            if isinstance(item, Reject):
                self._dropped(item.reason)
                yield TaggedOutput(REJECTS, item)
                yield from self._events(((f"ingest_rejects/{item.level}", 1),))
            elif isinstance(item, ImageExample):
                self._images.inc()
                yield from self._events(example_events("read", item))
                yield item
            else:
                raise TypeError(f"reader {self._name} yielded {type(item).__name__}; expected ImageExample or Reject.")


class CachedViewOptions(PipelineOptions):
    """``PipelineOptions`` whose ``view_as`` returns one view per options class.

    Beam asks the pipeline's options for a view about 470 times while it
    builds and runs the orsgen graph (type checks of every transform), and
    each new view builds and runs an argparse parser (~0.3 ms): ~0.15 s of
    CPU per run. A view holds no values of its own (they live in the shared
    ``_all_options``), so a cached view reads and writes exactly what a new
    one would. ``pipelines.run.pipeline_options`` makes these.
    """

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        # No options of its own (Beam gathers every subclass's arguments).
        pass

    def view_as(self, cls: Any) -> Any:
        views = self.__dict__.setdefault("_views", {})
        view = views.get(cls)
        if view is None:
            view = views[cls] = super().view_as(cls)
        return view

    def __getstate__(self) -> dict[str, Any]:
        # Views are rebuilt on demand; they are not part of the options.
        state = dict(super().__getstate__())
        state.pop("_views", None)
        return state
