"""Thin Beam wrappers around the pure stage functions.

A stage function takes one ``ImageExample`` and returns ``(example or None,
rejects)``. ``StageDoFn`` turns it into a DoFn with a main output, a
``rejects`` output and a ``dropped_<reason>`` counter per reject, so no stage
has to know about Beam and no drop goes uncounted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

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


class StageDoFn(beam.DoFn):
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
        self._in.inc()
        result = self._fn(ex, *side_inputs)
        out, rejects = result[0], result[1]
        # A stage may also return counting events ``[(key, n)]`` (what it
        # skipped and why); they reach the manifest like every other event.
        for key, n in result[2] if len(result) > 2 else ():
            if n:
                yield TaggedOutput(EVENTS, (key, n))
        for r in rejects:
            Metrics.counter(NAMESPACE, f"dropped_{r.reason}").inc()
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
            yield TaggedOutput(
                EVENTS, ("dropped_with_image/instances", sum(i.instance_id not in own for i in ex.instances))
            )
            yield TaggedOutput(EVENTS, ("dropped_with_image/refs", len(ex.refs)))
            yield TaggedOutput(EVENTS, ("dropped_with_image/samples", sum(s.sample_id not in own for s in ex.samples)))
            return
        yield from self._account(ex, out, rejects)
        yield out

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
                    yield TaggedOutput(EVENTS, ("created/samples", created))


class IngestDoFn(beam.DoFn):
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
                Metrics.counter(NAMESPACE, f"dropped_{item.reason}").inc()
                yield TaggedOutput(REJECTS, item)
                yield TaggedOutput(EVENTS, (f"ingest_rejects/{item.level}", 1))
            elif isinstance(item, ImageExample):
                self._images.inc()
                for ev in example_events("read", item):
                    yield TaggedOutput(EVENTS, ev)
                yield item
            else:
                raise TypeError(f"reader {self._name} yielded {type(item).__name__}; expected ImageExample or Reject.")
