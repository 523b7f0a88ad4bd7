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

StageFunction = Callable[[ImageExample], tuple[ImageExample | None, list[Reject]]]


def example_events(prefix: str, ex: ImageExample) -> list[tuple[str, int]]:
    """Counting events of one example: images, instances, refs and samples."""
    return [
        (f"{prefix}/images", 1),
        (f"{prefix}/instances", len(ex.instances)),
        (f"{prefix}/refs", len(ex.refs)),
        (f"{prefix}/samples", len(ex.samples)),
    ]


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

    def process(self, ex: ImageExample) -> Iterator[Any]:
        self._in.inc()
        out, rejects = self._fn(ex)
        for r in rejects:
            Metrics.counter(NAMESPACE, f"dropped_{r.reason}").inc()
            yield TaggedOutput(REJECTS, r)
        if out is not None:
            yield out
        elif not any(r.level == RejectLevel.IMAGE for r in rejects):
            raise RuntimeError(
                f"stage {self._name} dropped image {ex.image.image_id} without an image-level reject; "
                "this is a bug in that stage."
            )
        else:
            # The instances and refs go with the image; count them so their
            # levels reconcile too.
            yield TaggedOutput(EVENTS, ("dropped_with_image/instances", len(ex.instances)))
            yield TaggedOutput(EVENTS, ("dropped_with_image/refs", len(ex.refs)))


class IngestDoFn(beam.DoFn):
    """Runs a reader (``element -> iterable of ImageExample | Reject``).

    Also emits counting events for what was read, which the manifest uses to
    reconcile inputs with what was written and rejected.
    """

    def __init__(self, name: str, reader: Callable[[Any], Any]) -> None:
        self._name = name
        self._reader = reader
        self._images = Metrics.counter(NAMESPACE, f"{name}_images")

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
