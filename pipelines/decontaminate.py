"""Beam wiring of decontamination: hash once, match against the index, group near-duplicates.

    examples ──► HashImages (index as a side input) ──► examples
                     ├─► matches (image_id, [BenchmarkMatch])   ─► side input of the overlap filter
                     └─► hashes ─► LSH buckets ─► edges ─► union-find ─► (image_id, group_id)
    examples + groups ──► each member's natural split ─► most protected per group
                      ──► (image_id, group split): side input of the splits stage
    ... splits ... ──► BenchmarkOverlap: matched images in training splits ─► benchmark_overlap rejects

The pure work lives in ``stages/decontaminate``; these are thin wrappers.
Everything shuffled after hashing is light (ids and 32-byte hashes): the
examples themselves never move for decontamination. The grouping's one
global step (``ToList`` of the edges) holds only edges between
near-duplicates, which are few by nature.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from orsgen.pipelines.transforms import EVENTS, NAMESPACE, REJECTS
from orsgen.schemas.config import DecontaminateConfig
from orsgen.schemas.records import ImageExample, Reject, RejectLevel
from orsgen.stages.decontaminate import (
    STAGE,
    UNHASHABLE_IMAGE,
    BenchmarkIndex,
    BenchmarkMatch,
    HashError,
    hash_example,
    match_examples,
    overlap_reject,
)
from orsgen.stages.decontaminate.groups import HashedImage, bucket_edges, bucket_keys, connected_groups, group_sizes, group_split

#: Tagged outputs of ``HashImages``: ids with 32-byte hashes, and ids with
#: their benchmark matches; never whole records (listed in
#: ``pipelines.dataflow_graph.SMALL_TAGS``).
HASHES = "decontaminate_hashes"
MATCHES = "decontaminate_matches"
#: Where the matched pairs are listed for ``orsgen preview --matches``.
MATCHES_FILE = "_meta/decontaminate/matches.jsonl"


#: Images hashed and matched per batch (``HashImages``): one vectorised
#: index search per batch instead of one per image; bounds what a batch holds.
MATCH_BATCH = 32


class HashImagesDoFn(beam.DoFn):
    """Hashes each image of a batch once and matches the batch against the benchmark index.

    Input: a list of examples (``beam.BatchElements``); the search runs once
    per batch. Outputs, per example: the example unchanged (main),
    ``hashes`` (a ``HashedImage`` when near-duplicate groups are on),
    ``matches`` (``(image_id, matches)`` for a matched image), and an
    ``unhashable_image`` reject for bytes that cannot be decoded (an image
    that cannot be checked is not let through).
    """

    def __init__(self, cfg: DecontaminateConfig) -> None:
        self._cfg = cfg
        self._hashed = Metrics.counter(NAMESPACE, "decontaminate_hashed")

    def process(self, batch: list[ImageExample], index: BenchmarkIndex | None = None) -> Iterator[Any]:
        hashed = []
        for ex in batch:
            try:
                hashed.append((ex, hash_example(ex, self._cfg.crop_frac)))
            except HashError as err:
                yield beam.pvalue.TaggedOutput(
                    REJECTS,
                    Reject(ex.key, STAGE, UNHASHABLE_IMAGE, f"{err} Decontamination cannot check it, so it is left out.",
                           RejectLevel.IMAGE, ex.image.image_id),
                )
                for level, n in (("instances", len(ex.instances)), ("refs", len(ex.refs)), ("samples", len(ex.samples))):
                    yield beam.pvalue.TaggedOutput(EVENTS, (f"dropped_with_image/{level}", n))
        self._hashed.inc(len(hashed))
        found = match_examples(hashed, index, self._cfg.written_paths) if index is not None and hashed else [[] for _ in hashed]
        for (ex, hashes), matches in zip(hashed, found):
            if self._cfg.near_duplicates:
                yield beam.pvalue.TaggedOutput(HASHES, HashedImage(ex.image.image_id, hashes.phash, hashes.crops))
            if matches:
                yield beam.pvalue.TaggedOutput(MATCHES, (ex.image.image_id, tuple(matches)))
            yield ex


def _bucket(img: HashedImage) -> Iterator[tuple[tuple[int, int], HashedImage]]:
    for key in bucket_keys(img):
        yield key, img


def _edges(element: tuple[Any, Iterable[HashedImage]], max_distance: int) -> Iterator[tuple[str, str]]:
    _, images = element
    yield from bucket_edges(images, max_distance)


def _groups(edges: list[tuple[str, str]]) -> Iterator[Any]:
    groups = connected_groups(sorted(edges))
    sizes = group_sizes(groups)
    yield beam.pvalue.TaggedOutput(EVENTS, ("decontaminate/near_duplicates/groups", len(sizes)))
    yield beam.pvalue.TaggedOutput(EVENTS, ("decontaminate/near_duplicates/images", len(groups)))
    for what in ("moved_images", "moved_groups"):  # counted per group in GroupSplits; present when none
        yield beam.pvalue.TaggedOutput(EVENTS, (f"decontaminate/near_duplicates/{what}", 0))
    yield from groups.items()


class NearDuplicateGroups(beam.PTransform):
    """``HashedImage``s -> ``(image_id, group_id)`` for every image in a group of two or more.

    Also returns the grouping's counting events.
    """

    def __init__(self, max_distance: int) -> None:
        super().__init__()
        self._k = max_distance

    def expand(self, hashes: Any) -> tuple[Any, Any]:
        res = (
            hashes
            | "Buckets" >> beam.FlatMap(_bucket)
            | "GroupBuckets" >> beam.GroupByKey()
            | "Edges" >> beam.FlatMap(_edges, max_distance=self._k)
            | "OneEdgeEach" >> beam.Distinct()
            | "AllEdges" >> beam.combiners.ToList()
            | "UnionFind" >> beam.FlatMap(_groups).with_outputs(EVENTS, main="groups")
        )
        return res.groups, res[EVENTS]


class MemberSplitsDoFn(beam.DoFn):
    """``(group_id, (image_id, split alone, split by the group's hash))`` for each grouped example.

    Its output is ids and split names, never the record
    (``small_main_output``: the shuffle by group moves no image).
    """

    small_main_output = True

    def __init__(self, natural: Callable[[ImageExample, str], str]) -> None:
        self._natural = natural

    def process(self, ex: ImageExample, groups: dict[str, str]) -> Iterator[tuple[str, tuple[str, str, str]]]:
        group = groups.get(ex.image.image_id)
        if group is not None:
            # Hashed splits of a group's members are drawn from the group id, so
            # they agree; source and OOD splits are the members' own. The split
            # the image would get alone is kept to count the images moved.
            yield group, (ex.image.image_id, self._natural(ex, ex.image.image_id), self._natural(ex, group))


def _group_split(element: tuple[str, Iterable[tuple[str, str, str]]], train_splits: tuple[str, ...]) -> Iterator[Any]:
    group, members = element
    split, moved = group_split(members, train_splits)
    yield beam.pvalue.TaggedOutput(EVENTS, ("decontaminate/near_duplicates/moved_images", len(moved)))
    yield beam.pvalue.TaggedOutput(EVENTS, ("decontaminate/near_duplicates/moved_groups", int(bool(moved))))
    yield group, split


class GroupSplits(beam.PTransform):
    """``(image_id, split)`` for every image of a near-duplicate group: the group's one split.

    The group's split is its members' most protected natural split
    (``ood_*``, then evaluation, then training: ``stages.splits.most_protected_split``),
    so a near-duplicate of an evaluation image never stays in train.
    Returns ``(overrides, events)``; the events count the images (and
    groups) whose split differs from the one the image would get alone.

    Args:
        groups: the ``(image_id, group_id)`` PCollection.
        natural: ``(example, hash id) -> split``, the run's split rule with
            the hashed part drawn from ``hash id``.
        train_splits: the training splits.
    """

    def __init__(self, groups: Any, natural: Callable[[ImageExample, str], str], train_splits: Iterable[str]) -> None:
        super().__init__()
        self._groups = groups
        self._natural = natural
        self._train = tuple(train_splits)

    def expand(self, examples: Any) -> tuple[Any, Any]:
        res = (
            examples
            | "MemberSplits" >> beam.ParDo(MemberSplitsDoFn(self._natural), beam.pvalue.AsDict(self._groups))
            # Only ids and split names are shuffled here.
            | "ByGroup" >> beam.GroupByKey()
            | "GroupSplit" >> beam.FlatMap(_group_split, train_splits=self._train).with_outputs(EVENTS, main="splits")
        )
        overrides = self._groups | "ImageSplit" >> beam.Map(
            lambda kv, splits: (kv[0], splits[kv[1]]), splits=beam.pvalue.AsDict(res.splits)
        )
        return overrides, res[EVENTS]


def overlap_stage(
    ex: ImageExample, matches: dict[str, tuple[BenchmarkMatch, ...]], cfg: DecontaminateConfig, train_splits: tuple[str, ...]
) -> tuple[ImageExample | None, list[Reject], list[tuple[str, int]]]:
    """Rejects a matched image in a training split (or any split, unless ``keep_in_heldout``)."""
    found = matches.get(ex.image.image_id, ())
    if not found:
        return ex, [], []
    reject = overlap_reject(ex, found, cfg, train_splits)
    action = "rejected" if reject else "kept_in_heldout"
    events = [(f"decontaminate/{action}/{m.benchmark}/{m.kind}", 1) for m in found]
    events.append((f"decontaminate/{action}/images", 1))
    return (None, [reject], events) if reject else (ex, [], events)


def match_records(
    ex: ImageExample, matches: dict[str, tuple[BenchmarkMatch, ...]], train_splits: tuple[str, ...], keep_in_heldout: bool
) -> Iterator[dict[str, Any]]:
    """One JSON record per (image, match) for the matches file (``orsgen preview --matches``)."""
    for m in matches.get(ex.image.image_id, ()):
        yield {
            "image_id": ex.image.image_id,
            "key": ex.key,
            "uri": ex.image.uri,
            "split": ex.split,
            "action": "kept_in_heldout" if (keep_in_heldout and ex.split not in train_splits) else "rejected",
            "benchmark": m.benchmark,
            "kind": m.kind,
            "value": m.value,
            "distance": m.distance,
            "benchmark_ref": m.ref,
        }


class MatchRecordsDoFn(beam.DoFn):
    """``match_records`` as a DoFn: small JSON records of matched images, never the image record."""

    small_main_output = True

    def __init__(self, train_splits: tuple[str, ...], keep_in_heldout: bool) -> None:
        self._train = train_splits
        self._keep = keep_in_heldout

    def process(self, ex: ImageExample, matches: dict[str, tuple[BenchmarkMatch, ...]]) -> Iterator[dict[str, Any]]:
        yield from match_records(ex, matches, self._train, self._keep)


def write_matches_file(records: list[dict[str, Any]], out: str) -> str:
    """Writes the sorted match records as JSON lines (temp name, then rename); returns the path."""
    import posixpath

    import fsspec

    from orsgen.stages.write.files import _rename, _tmp_path

    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{MATCHES_FILE}"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    lines = sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records)
    tmp = _tmp_path(path)
    with fs.open(tmp, "wb") as f:
        f.write(("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    _rename(fs, tmp, path)
    return path


class Decontaminate(beam.PTransform):
    """Hashing, matching and near-duplicate groups, before the splits stage.

    Returns ``(examples, rejects, events, split_overrides, matches)``: the
    examples unchanged (less unhashable ones), the ``(image_id, split)`` of
    every image in a near-duplicate group (a side input of the splits stage;
    empty when grouping is off) and the ``(image_id, matches)`` of every
    matched image (a side input of ``BenchmarkOverlap``).

    Args:
        cfg: the decontamination config.
        index: the benchmark index (``prepare_index``), or None.
        natural: ``(example, hash id) -> split``, the run's split rule.
        train_splits: the training splits.
    """

    def __init__(
        self,
        cfg: DecontaminateConfig,
        index: BenchmarkIndex | None,
        natural: Callable[[ImageExample, str], str],
        train_splits: Iterable[str],
    ) -> None:
        super().__init__()
        self._cfg = cfg
        self._index = index
        self._natural = natural
        self._train = tuple(train_splits)

    def expand(self, examples: Any) -> tuple[Any, Any, Any, Any, Any]:
        p = examples.pipeline
        side = ()
        events_l = []
        if self._index is not None:
            # The index is one small object (ids and 32-byte hashes): a
            # singleton side input, its search tables rebuilt on each worker.
            side = (beam.pvalue.AsSingleton(p | "Index" >> beam.Create([self._index])),)
            index_events = [
                (f"decontaminate/index/{bench}/{what}", n)
                for bench, counts in sorted(self._index.counts.items())
                for what, n in sorted(counts.items())
            ]
            events_l.append(p | "IndexCounts" >> beam.Create(index_events or [("decontaminate/index/hashes", 0)]))
        # Batches keep each element's window (BatchElements batches per
        # window), and hold at most MATCH_BATCH images.
        batches = examples | "MatchBatches" >> beam.BatchElements(min_batch_size=MATCH_BATCH, max_batch_size=MATCH_BATCH)
        res = batches | "HashImages" >> beam.ParDo(HashImagesDoFn(self._cfg), *side).with_outputs(
            REJECTS, EVENTS, HASHES, MATCHES, main="examples"
        )
        events_l.append(res[EVENTS])
        if self._cfg.near_duplicates:
            groups, group_events = res[HASHES] | "NearDuplicates" >> NearDuplicateGroups(self._cfg.max_distance)
            events_l.append(group_events)
            overrides, moved_events = res.examples | "GroupSplits" >> GroupSplits(groups, self._natural, self._train)
            events_l.append(moved_events)
        else:
            overrides = p | "NoGroups" >> beam.Create([])
        events = events_l | "DecontaminateEvents" >> beam.Flatten()
        return res.examples, res[REJECTS], events, overrides, res[MATCHES]


class BenchmarkOverlap(beam.PTransform):
    """After the splits stage: ``benchmark_overlap`` rejects, and the matches file.

    Returns ``(examples, rejects, events)``.
    """

    def __init__(self, cfg: DecontaminateConfig, matches: Any, train_splits: Iterable[str], out: str) -> None:
        super().__init__()
        self._cfg = cfg
        self._matches = matches
        self._train = tuple(train_splits)
        self._out = out

    def expand(self, examples: Any) -> tuple[Any, Any, Any]:
        import functools

        from orsgen.pipelines.transforms import StageDoFn

        matches = beam.pvalue.AsDict(self._matches)
        res = examples | "Filter" >> beam.ParDo(
            StageDoFn("BenchmarkOverlap", functools.partial(overlap_stage, cfg=self._cfg, train_splits=self._train)), matches
        ).with_outputs(REJECTS, EVENTS, main="examples")
        _ = (
            examples
            | "MatchRecords" >> beam.ParDo(MatchRecordsDoFn(self._train, self._cfg.keep_in_heldout), matches)
            | "AllMatchRecords" >> beam.combiners.ToList()
            | "WriteMatches" >> beam.Map(write_matches_file, self._out)
        )
        return res.examples, res[REJECTS], res[EVENTS]
