"""Offline inspection of the job graph: which shuffles carry whole image records.

A shuffle (a ``GroupByKey``) of whole image records moves every image's bytes
through Dataflow Shuffle: for SA-1B that is 3–9 MB per image, billed per GB
and the main cost of a pass after the GPUs. orsgen promises at most one such
shuffle end to end, the one before writing; ``record_shuffles`` counts them
on a built pipeline so that CI can hold the promise, with no cloud access
(``DataflowRunner --dry_run=True`` translates the graph and submits nothing).

How records are told from small values (the rule the count follows):

* Seeds: the main output of every ingest read (``IngestDoFn``): one
  ``ImageExample`` per image.
* A PCollection carries records when one of its producer's main inputs does
  (side inputs are broadcast, not shuffled, and are not followed), except the
  tagged outputs in ``SMALL_TAGS``: rejects, counting events, vocabularies,
  writer statistics, SAM2 report outcomes, decontamination's hashes and
  matches; and the main output of a DoFn
  whose class sets ``small_main_output = True`` (e.g. SAM2's dead letters,
  which are rejects). ``Partition``'s numbered outputs, ``Flatten``,
  ``BatchElements``, the caption and SAM2 stages' main outputs all carry records.
* Every leaf ``GroupByKey`` of the expanded graph is visited, including the
  hidden ones: ``Reshuffle`` (and ``Create`` of more than one element, which
  expands to one), ``CombinePerKey`` and ``CoGroupByKey``. A hidden one counts
  exactly like an explicit one: when its input carries records. So
  ``Ingest/Spread`` (a reshuffle of shard paths) and ``SumEvents`` (a combine
  of event counts) do not count, and a ``CoGroupByKey`` that joins examples
  does.
* The rule errs on the side of counting: a small value computed from
  records by a plain ``Map`` (say, ``(key, 1)``) would count too. A passing
  check is therefore a proof; a failing one asks for a look (and, if the
  shuffle is small, an output tag in ``SMALL_TAGS``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from orsgen.pipelines.transforms import EVENTS, REJECTS, IngestDoFn

#: Tagged outputs that never carry whole image records (the last two:
#: decontamination's ids with hashes, and ids with benchmark matches).
SMALL_TAGS = frozenset(
    {REJECTS, EVENTS, "vocabulary", "planned", "stats", "outcomes", "decontaminate_hashes", "decontaminate_matches"}
)

#: The URN of a leaf GroupByKey in the runner API proto.
GBK_URN = "beam:transform:group_by_key:v1"


@dataclass(frozen=True)
class ShuffleReport:
    """The shuffles of a pipeline.

    Attributes:
        all_shuffles: full labels of every leaf GroupByKey.
        record_shuffles: the ones whose input carries whole image records.
    """

    all_shuffles: tuple[str, ...]
    record_shuffles: tuple[str, ...]


def _main_inputs(node: Any) -> Iterable[Any]:
    return tuple(node.main_inputs.values()) if hasattr(node, "main_inputs") else tuple(node.inputs)


def shuffle_report(pipeline: beam.Pipeline, seeds: tuple[type, ...] = (IngestDoFn,)) -> ShuffleReport:
    """Classifies the leaf GroupByKeys of a built pipeline (see the module docstring).

    Args:
        pipeline: a pipeline after ``build_pipeline`` (and, for Dataflow's
            view, after ``run()`` with ``--dry_run=True``).
        seeds: DoFn classes whose main output is one record per image.

    Returns:
        A ``ShuffleReport``.
    """
    carrying: set[int] = set()
    every: list[str] = []
    records: list[str] = []

    class _Visit(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node: Any) -> None:
            transform = node.transform
            fed = any(id(pc) in carrying for pc in _main_inputs(node))
            if isinstance(transform, beam.GroupByKey):
                every.append(node.full_label)
                if fed:
                    records.append(node.full_label)
            seed = isinstance(transform, beam.ParDo) and isinstance(getattr(transform, "fn", None), seeds)
            if not (fed or seed):
                return
            small_main = bool(getattr(getattr(transform, "fn", None), "small_main_output", False))
            for tag, pc in node.outputs.items():
                if tag is None or str(tag) == "None":
                    if not small_main:
                        carrying.add(id(pc))
                elif str(tag) not in SMALL_TAGS:
                    carrying.add(id(pc))

    pipeline.visit(_Visit())
    return ShuffleReport(tuple(every), tuple(records))


def proto_shuffles(pipeline_proto: Any) -> list[str]:
    """Unique names of the leaf GroupByKeys in a runner API pipeline proto (what the runner executes)."""
    return sorted(t.unique_name for t in pipeline_proto.components.transforms.values() if t.spec.urn == GBK_URN)
