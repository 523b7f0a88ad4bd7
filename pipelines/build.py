"""The orsgen Beam pipeline, assembled from stages.

    inputs ──► ingest (SA-1B shards │ COCO/RefCOCO plan → load; vocabulary side output)
           ──► expressions (categories, descriptions, negatives) ──► regions
           ──► refs → human samples ──► [caption: CoRS / DeRS] ──► [verify_sam2]
           ──► splits ──► [screening] ──► encode ──► GroupByKey(split, bucket) ──► WebDataset + Parquet
                                               └─► split sizes (side input: buckets per split)
    rejects ──► GroupByKey(bucket) ──► rejects Parquet   (count: side input, buckets)
    stats + counts ──► manifest.json

Everything runner-specific stays in Beam's ``PipelineOptions``; the same graph
runs on the Python direct runner, Dataflow, Flink or Spark.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

import orsgen
from orsgen.pipelines.transforms import EVENTS, REJECTS, IngestDoFn, StageChainDoFn, StageDoFn
from orsgen.schemas.config import CocoInput, GrefcocoInput, OrsgenConfig, RefcocoInput, Sa1bInput, redacted_config
from orsgen.schemas.records import ImageExample, Reject, RejectLevel, replace_record
from orsgen.stages.ingest import coco as ingest_coco, sa1b as ingest_sa1b
from orsgen.stages.refs import add_human_samples, ref_source_split
from orsgen.stages.regions import select_regions
from orsgen.stages.expressions import expressions_stage, load_templates
from orsgen.stages.expressions.vocabulary import load_vocabulary
from orsgen.stages.splits import assign_split, example_ood_split, resolve_split_conflicts
from orsgen.stages.write.groups import DroppedCopy, GroupRecord, read_group_records, write_group_record
from orsgen.stages.write import (
    EncodedExample,
    ShardStats,
    auto_num_buckets,
    bucket_of,
    build_manifest,
    encode_example,
    write_group,
    write_manifest,
    write_rejects_bucket,
)

MANIFEST = "manifest.json"
#: Beam metrics namespace of the write stage (groups_written, groups_resumed).
WRITE_METRICS = "orsgen_write"
#: Tagged output of the COCO-family plan step: ``(input name, categories)``.
VOCABULARY = "vocabulary"


# ------------------------------------------------------------------ stage cores


def regions_stage(ex: ImageExample, cfg: OrsgenConfig, input_types: dict[str, str]) -> tuple[ImageExample | None, list[Reject]]:
    """Region selection for one example (pure; the Beam wrapper is StageDoFn)."""
    itype = input_types.get(ex.input_name, "")
    if itype not in cfg.regions.apply_to:
        return ex, []
    kept, dropped = select_regions(
        ex.instances, ex.image.width, ex.image.height, cfg.regions, annotated=itype != "sa1b"
    )
    rejects = [
        Reject(inst.instance_id, "regions", reason, msg, RejectLevel.INSTANCE, ex.image.image_id)
        for inst, reason, msg in dropped
    ]
    kept_ids = {i.instance_id for i in kept}
    samples = ex.samples
    gone = [s for s in samples if any(t not in kept_ids for t in s.target_ids)]
    if gone:
        # The expressions stage only targets instances that survive selection,
        # so this is a safety net: a sample never points at a dropped instance.
        rejects += [
            Reject(s.sample_id, "regions", "target_dropped",
                   f"targets {[t for t in s.target_ids if t not in kept_ids]} were dropped by region selection.",
                   RejectLevel.SAMPLE, ex.image.image_id)
            for s in gone
        ]
        samples = tuple(s for s in samples if s not in gone)
    # An SA-1B image left with no region has nothing to refer to; it is
    # rejected as ``no_regions`` by the writer, after duplicate copies are
    # found, so that a second copy is reported as ``duplicate_image``.
    return ex.replace(instances=tuple(kept), samples=samples), rejects


def no_regions_reject(enc: EncodedExample, cfg: OrsgenConfig) -> Reject | None:
    """The ``no_regions`` reject of an SA-1B image whose regions were all dropped, or None.

    SA-1B image ids are ``sa1b:<id>`` (``stages.ingest.sa1b``), so the encoded
    example says where it came from without its records.
    """
    if enc.n_instances or "sa1b" not in cfg.regions.apply_to or not enc.image_id.startswith("sa1b:"):
        return None
    return Reject(
        enc.key, "regions", "no_regions", "every region of the image was dropped by region selection "
        "(see its instance rejects); loosen the regions thresholds to keep it.",
        RejectLevel.IMAGE, enc.image_id,
    )


def refs_stage(ex: ImageExample) -> tuple[ImageExample | None, list[Reject]]:
    """RefCOCO-family sentences become human samples."""
    return add_human_samples(ex)


def natural_split(ex: ImageExample, cfg: OrsgenConfig, hash_id: str | None = None) -> str:
    """The split one input's copy of an image asks for: OOD rule, source split or hash.

    ``hash_id`` replaces the image id in the hash (a near-duplicate group's id).
    """
    return assign_split(hash_id or ex.image.image_id, cfg.splits, ref_source_split(ex), example_ood_split(ex, cfg.splits))


def _natural_for_group(ex: ImageExample, group_id: str, cfg: OrsgenConfig) -> str:
    return natural_split(ex, cfg, hash_id=group_id)


def _stamp_split(ex: ImageExample, split: str) -> ImageExample:
    samples = tuple(s if s.split == split else _with_split(s, split) for s in ex.samples)
    return ex.replace(split=split, samples=samples)


def splits_stage(
    ex: ImageExample, cfg: OrsgenConfig, overrides: dict[str, str] | None = None
) -> tuple[ImageExample | None, list[Reject]]:
    """Assigns the image's split and stamps it on its samples.

    ``overrides``: ``image_id -> split`` of near-duplicate groups (one split per group).
    """
    return _stamp_split(ex, (overrides or {}).get(ex.image.image_id) or natural_split(ex, cfg)), []


def _splits_with_overrides(
    ex: ImageExample, overrides: dict[str, str] | None = None, *, cfg: OrsgenConfig
) -> tuple[ImageExample | None, list[Reject]]:
    return splits_stage(ex, cfg, overrides)


class ImageSplitsDoFn(beam.DoFn):
    """Splits for the copies of one image that arrived through several inputs.

    Input: ``(image_id, examples)`` after a GroupByKey on the image id. Copies
    that agree keep their split; on disagreement the most protected split wins
    and the other copies become ``split_conflict`` image rejects.
    """

    def __init__(self, cfg: OrsgenConfig) -> None:
        self._cfg = cfg

    def process(self, element: tuple[str, Iterable[ImageExample]], overrides: dict[str, str] | None = None) -> Iterator[Any]:
        image_id, examples = element
        copies = [(ex, natural_split(ex, self._cfg)) for ex in examples]
        kept, dropped = resolve_split_conflicts(copies, self._cfg.splits.train_splits)
        if image_id in (overrides or {}):
            # The image is in a near-duplicate group: its kept copies take the group's split.
            kept = [(ex, overrides[image_id]) for ex, _ in kept]  # type: ignore[index]
        for ex, reject in dropped:
            yield beam.pvalue.TaggedOutput(REJECTS, reject)
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/instances", len(ex.instances)))
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/refs", len(ex.refs)))
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/samples", len(ex.samples)))
        for ex, split in kept:
            yield _stamp_split(ex, split)


def _with_split(sample: Any, split: str) -> Any:
    return replace_record(sample, split=split)  # dataclasses.replace, by the record's slots


# ------------------------------------------------------------------ write DoFns


class WriteBucketDoFn(beam.DoFn):
    """Writes one (split, bucket, num_buckets) group as WebDataset and Parquet shards.

    The group's values are consumed once, as an iterator (a runner may page
    a large group in lazily), and spilled to worker-local disk past
    ``write.spill_memory_max_bytes``: memory stays bounded whatever the
    group's size.
    """

    def __init__(self, out: str, cfg: OrsgenConfig) -> None:
        self._out = out
        self._cfg = cfg
        self._sha = cfg.sha256()

    def process(self, element: tuple[tuple[str, int, int], Iterable[EncodedExample]]) -> Iterator[Any]:
        (split, bucket, nb), examples = element
        # Copies of one key hash to the same bucket: write_group keeps one and
        # rejects the rest.
        res = write_group(
            self._out, split, bucket, examples, self._cfg.write, num_buckets=nb,
            # After dedupe: a copy of an image is a duplicate whether or not it has regions.
            reject_after_dedupe=functools.partial(no_regions_reject, cfg=self._cfg),
        )
        written = res.written
        # Last: a rerun trusts this record and skips the group before the shuffle.
        write_group_record(
            self._out,
            GroupRecord(
                split=split,
                bucket=bucket,
                num_buckets=nb,
                config_sha256=self._sha,
                stats=tuple(res.stats),
                written={
                    "images": len(written),
                    "instances": sum(e.n_instances for e in written),
                    "refs": sum(e.n_refs for e in written),
                    "samples": sum(e.n_samples for e in written),
                },
                dropped=tuple(DroppedCopy(r, d.n_instances, d.n_refs, d.n_samples) for d, r in res.dropped),
            ),
        )
        Metrics.counter(WRITE_METRICS, "groups_written").inc()
        for dup, reject in res.dropped:
            yield beam.pvalue.TaggedOutput(REJECTS, reject)
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/instances", dup.n_instances))
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/refs", dup.n_refs))
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/samples", dup.n_samples))
        # The counts come from the encoded fields: the ImageExamples do not
        # cross the shuffle. One event per level per bucket, not per example.
        yield beam.pvalue.TaggedOutput(EVENTS, ("written/images", len(written)))
        yield beam.pvalue.TaggedOutput(EVENTS, ("written/instances", sum(e.n_instances for e in written)))
        yield beam.pvalue.TaggedOutput(EVENTS, ("written/refs", sum(e.n_refs for e in written)))
        yield beam.pvalue.TaggedOutput(EVENTS, ("written/samples", sum(e.n_samples for e in written)))
        yield from res.stats


class ResumedGroupsDoFn(beam.DoFn):
    """Stands in for the groups a previous run of this config completed.

    Emits each recorded group's shard stats, written counts and dropped
    copies' rejects exactly as ``WriteBucketDoFn`` would, for the records
    whose bucket count matches this run's (the side input), so a resumed
    run's manifest equals an uninterrupted run's.
    """

    def process(self, record: GroupRecord, buckets: dict[str, int]) -> Iterator[Any]:
        # A record of another plan (bucket count) stands for nothing: that
        # group is not skipped either. (No bare `return` in this generator:
        # Beam warns about `yield` and `return` in one process method.)
        if buckets.get(record.split) == record.num_buckets:
            yield from self._replay(record)

    @staticmethod
    def _replay(record: GroupRecord) -> Iterator[Any]:
        Metrics.counter(WRITE_METRICS, "groups_resumed").inc()
        for d in record.dropped:
            yield beam.pvalue.TaggedOutput(REJECTS, d.reject)
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/instances", d.n_instances))
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/refs", d.n_refs))
            yield beam.pvalue.TaggedOutput(EVENTS, ("dropped_with_image/samples", d.n_samples))
        for level in ("images", "instances", "refs", "samples"):
            yield beam.pvalue.TaggedOutput(EVENTS, (f"written/{level}", record.written[level]))
        yield from record.stats


def _read_group_records(_: bytes, out: str, config_sha256: str) -> dict[tuple[str, int, int], GroupRecord]:
    # Run once, from an Impulse: the listing happens in the job, not on the launcher.
    return read_group_records(out, config_sha256=config_sha256)


def _completed_groups(records: dict[tuple[str, int, int], GroupRecord]) -> list[GroupRecord]:
    return [records[k] for k in sorted(records)]


def _completed_groups_of(_: bytes, records: dict[tuple[str, int, int], GroupRecord]) -> list[GroupRecord]:
    return _completed_groups(records)


def _not_resumed(kv: tuple[tuple[str, int, int], EncodedExample], resumed: frozenset[tuple[str, int, int]]) -> bool:
    return kv[0] not in resumed


class WriteRejectsDoFn(beam.DoFn):
    """Writes one bucket of rejects as Parquet parts (external sort: bounded memory)."""

    def __init__(self, out: str, cfg: OrsgenConfig) -> None:
        self._out = out
        self._cfg = cfg

    def process(self, element: tuple[tuple[int, int], Iterable[Reject]]) -> Iterator[ShardStats]:
        (bucket, nb), rejects = element
        w = self._cfg.write
        yield from write_rejects_bucket(
            self._out,
            bucket,
            rejects,
            compression=w.parquet_compression,
            num_buckets=nb,
            max_rows=w.rejects_shard_max_rows,
            memory_max_bytes=w.spill_memory_max_bytes,
            spill_dir=w.spill_dir,
        )


class SplitSizeDoFn(beam.DoFn):
    """An encoded record's ``(split, (1, size_bytes))``: what the bucket count of its split needs.

    ``small_main_output`` tells the offline shuffle check
    (``pipelines/dataflow_graph.py``) that what follows carries a few bytes per
    record, not the record, so the combine after it is no record shuffle.
    """

    small_main_output = True

    def process(self, enc: EncodedExample) -> Iterator[tuple[str, tuple[int, int]]]:
        yield enc.split, (1, enc.size)


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    n = b = 0
    for x, y in pairs:
        n += x
        b += y
    return n, b


def split_num_buckets(sizes: dict[str, tuple[int, int]], cfg: OrsgenConfig) -> dict[str, int]:
    """Bucket count per split for ``write.num_buckets`` (``auto``: from the split's size).

    Args:
        sizes: ``{split: (images, encoded tar bytes)}``.
        cfg: the config.

    Returns:
        ``{split: num_buckets}``.
    """
    w = cfg.write
    if isinstance(w.num_buckets, int):
        return {split: w.num_buckets for split in sizes}
    return {
        split: auto_num_buckets(n, b, w.shard_max_images, w.shard_max_bytes) for split, (n, b) in sizes.items()
    }


def rejects_num_buckets(n_rejects: int, cfg: OrsgenConfig) -> int:
    """Bucket count of the rejects: ``write.num_buckets``, or from their number with ``auto``."""
    w = cfg.write
    if isinstance(w.num_buckets, int):
        return w.num_buckets
    return auto_num_buckets(n_rejects, 0, w.rejects_shard_max_rows, 0)


def _key_by_fixed_bucket(enc: EncodedExample, nb: int) -> tuple[tuple[str, int, int], EncodedExample]:
    # Every split's count known before the run (an integer
    # ``write.num_buckets``): the keys of ``_key_by_bucket``, no side input.
    return (enc.split, bucket_of(enc.key, nb), nb), enc


def _key_by_bucket(enc: EncodedExample, buckets: dict[str, int]) -> tuple[tuple[str, int, int], EncodedExample]:
    return _key_by_fixed_bucket(enc, buckets[enc.split])


def _key_reject(r: Reject, nb: int) -> tuple[tuple[int, int], Reject]:
    return (bucket_of(r.source_key, nb), nb), r


def reconcile(events: dict[str, int], rejects_by_level: dict[str, int]) -> dict[str, Any]:
    """Builds the per-level ``inputs = written + rejected`` accounting.

    Args:
        events: summed counting events of the run.
        rejects_by_level: reject counts per level.

    Returns:
        ``{level: {inputs, written, rejected, reconciled}}`` for images,
        instances, refs and samples.
    """
    g = events.get
    levels: dict[str, Any] = {}
    img_in = g("read/images", 0) + g("ingest_rejects/image", 0)
    levels["images"] = (img_in, g("written/images", 0), rejects_by_level.get("image", 0))
    # Stages may create instances (CoRS merges SA-1B fragments into new ones).
    inst_in = g("read/instances", 0) + g("ingest_rejects/instance", 0) + g("created/instances", 0)
    levels["instances"] = (
        inst_in,
        g("written/instances", 0),
        rejects_by_level.get("instance", 0) + g("dropped_with_image/instances", 0),
    )
    ref_in = g("read/refs", 0) + g("ingest_rejects/ref", 0)
    levels["refs"] = (ref_in, g("written/refs", 0), rejects_by_level.get("ref", 0) + g("dropped_with_image/refs", 0))
    sample_in = g("read/samples", 0) + g("created/samples", 0)
    levels["samples"] = (
        sample_in,
        g("written/samples", 0),
        rejects_by_level.get("sample", 0) + g("dropped_with_image/samples", 0),
    )
    return {
        k: {"inputs": i, "written": w, "rejected": r, "reconciled": i == w + r} for k, (i, w, r) in levels.items()
    }


def _manifest_fn(
    _: Any,
    *,
    out: str,
    cfg: OrsgenConfig,
    stats: list[ShardStats],
    events: dict[str, int],
    screening_digest: str = "",
) -> str:
    rejects_by_level: dict[str, int] = {}
    rejects_by_reason: dict[str, int] = {}
    for s in stats:
        if s.format != "rejects":
            continue
        for key, n in s.rejects_by_reason.items():
            level = key.split("/", 1)[0]
            rejects_by_level[level] = rejects_by_level.get(level, 0) + n
            rejects_by_reason[key] = rejects_by_reason.get(key, 0) + n
    levels = reconcile(events, rejects_by_level)
    counts = {
        "inputs": levels["images"]["inputs"],
        "written": levels["images"]["written"],
        "rejected": levels["images"]["rejected"],
        "levels": levels,
        "rejected_by_reason": dict(sorted(rejects_by_reason.items())),
        "shard_rejects": rejects_by_level.get("shard", 0),
    }
    caption = {k.split("/", 1)[1]: n for k, n in sorted(events.items()) if k.startswith("caption/")}
    if caption:
        # What the VLM stage asked and skipped (requests per task, regions under
        # the saliency gate, match methods): events, not rejects.
        counts["caption"] = caption
    expressions = {k.split("/", 1)[1]: n for k, n in sorted(events.items()) if k.startswith("expressions/")}
    if expressions:
        # What the expressions stage left out and why (crowds, near-ties, caps): events, not rejects.
        counts["expressions"] = expressions
    if cfg.review.active:
        from orsgen.stages.screening import screening_figures

        # Per split: accepted, human_rejected, skipped, unscreened (held out), written.
        counts["screening"] = {
            **screening_figures(events, cfg.review.require_screened_for),
            "decisions_sha256": screening_digest,
        }
    decontamination = {k.split("/", 1)[1]: n for k, n in sorted(events.items()) if k.startswith("decontaminate/")}
    if decontamination:
        # Overlaps by benchmark and match kind, index sizes, near-duplicate groups.
        counts["decontamination"] = decontamination
    manifest = build_manifest(
        name=cfg.name,
        config=redacted_config(cfg),
        config_sha256=cfg.sha256(),
        version=orsgen.__version__,
        shard_stats=stats,
        counts=counts,
    )
    return write_manifest(out, manifest)


# ------------------------------------------------------------------ assembly


def _read_input(
    p: beam.Pipeline, inp: Any, cfg: OrsgenConfig, vocab_l: list[Any] | None = None
) -> tuple[Any, list[Any], list[Any]]:
    """Ingest of one input: (examples, [rejects pcolls], [events pcolls]).

    A COCO-family input also appends its ``(name, categories)`` PCollection
    to ``vocab_l`` (the vocabulary side input of the expressions stage).
    """
    label = f"Ingest[{inp.name}]"
    if isinstance(inp, Sa1bInput):
        shards = ingest_sa1b.expand_shards(inp.shards)
        reader = functools.partial(
            ingest_sa1b.read_sa1b_shard,
            input_name=inp.name,
            image_cfg=cfg.image,
            max_images=inp.max_images,
            written_paths=inp.written_paths,
        )
        res = (
            p
            | f"{label}/Shards" >> beam.Create(shards)
            | f"{label}/Spread" >> beam.Reshuffle()
            | f"{label}/Read" >> beam.ParDo(IngestDoFn(inp.name, reader)).with_outputs(REJECTS, EVENTS, main="examples")
        )
        return res.examples, [res[REJECTS]], [res[EVENTS]]
    assert isinstance(inp, (CocoInput, RefcocoInput, GrefcocoInput))
    planned = (
        p
        # One element: an Impulse and the input bound to the step (a
        # Create([inp]) is an Impulse plus three steps, each paid per run).
        | f"{label}/Config" >> beam.Impulse()
        | f"{label}/Plan" >> beam.FlatMap(_plan_items, inp=inp).with_outputs(REJECTS, EVENTS, VOCABULARY, main="tasks")
    )
    if vocab_l is not None:
        vocab_l.append(planned[VOCABULARY])
    loader = functools.partial(ingest_coco.load_task, image_cfg=cfg.image)
    res = (
        planned.tasks
        | f"{label}/Spread" >> beam.Reshuffle()
        | f"{label}/Load" >> beam.ParDo(IngestDoFn(inp.name, loader)).with_outputs(REJECTS, EVENTS, main="examples")
    )
    return res.examples, [planned[REJECTS], res[REJECTS]], [planned[EVENTS], res[EVENTS]]


def _plan_items(_: bytes, inp: Any) -> Iterator[Any]:
    categories, items = ingest_coco.plan_input(inp)
    yield beam.pvalue.TaggedOutput(VOCABULARY, (inp.name, tuple(categories)))
    for item in items:
        if isinstance(item, Reject):
            yield beam.pvalue.TaggedOutput(REJECTS, item)
            yield beam.pvalue.TaggedOutput(EVENTS, (f"ingest_rejects/{item.level}", 1))
        else:
            yield item


def _apply_stages(
    examples: Any, stages: list[tuple[str, Any, tuple[Any, ...]]], rejects_l: list[Any], events_l: list[Any]
) -> Any:
    """Consecutive stage functions ``(name, fn, side inputs)`` on ``examples``; returns the examples out.

    One stage is a ``StageDoFn`` ParDo of its own name; several are one
    ``StageChainDoFn`` ParDo named after them all (``Expressions+Regions+...``):
    the same rejects, events and counters, without an example element
    between each two of them.
    """
    if len(stages) == 1:
        name, fn, side = stages[0]
        res = examples | name >> beam.ParDo(StageDoFn(name, fn), *side).with_outputs(REJECTS, EVENTS, main="examples")
    else:
        chain = StageChainDoFn([(StageDoFn(name, fn), len(side)) for name, fn, side in stages])
        res = examples | "+".join(name for name, _, _ in stages) >> beam.ParDo(
            chain, *(s for _, _, side in stages for s in side)
        ).with_outputs(REJECTS, EVENTS, main="examples")
    rejects_l.append(res[REJECTS])
    events_l.append(res[EVENTS])
    return res.examples


def build_pipeline(p: beam.Pipeline, cfg: OrsgenConfig, out: str, index: Any = None) -> None:
    """Adds the whole orsgen graph to ``p``.

    Args:
        p: a Beam pipeline (any runner).
        cfg: the validated config.
        out: output root, a local path or fsspec URL (gs://, s3://...).
        index: the benchmark index (``stages.decontaminate.prepare_index``);
            None reads or builds it here when ``decontaminate`` has sources.
    """
    input_types = {inp.name: inp.type for inp in cfg.inputs}
    examples_l, rejects_l, events_l, vocab_l = [], [], [], []
    for inp in cfg.inputs:
        ex, rej, ev = _read_input(p, inp, cfg, vocab_l)
        examples_l.append(ex)
        rejects_l.extend(rej)
        events_l.extend(ev)
    examples = examples_l | "AllExamples" >> beam.Flatten()

    # The category vocabularies (small: one list per input) reach the
    # expressions stage as a side input; templates are read once, here.
    # Without a COCO-family input there is no vocabulary: the stage gets an
    # empty mapping (what a side input of nothing gave) and the graph no
    # source of its own for it.
    vocab: Any = beam.pvalue.AsDict(vocab_l | "AllVocabularies" >> beam.Flatten()) if vocab_l else {}
    side_inputs: dict[str, tuple[Any, ...]] = {"Expressions": (vocab,)}
    templates = load_templates(cfg.expressions.templates) if cfg.expressions.enabled else None
    if cfg.expressions.enabled:
        # Read here too, so that a bad vocabulary file fails before the job starts.
        load_vocabulary(cfg.expressions.vocabulary)
    stages = [
        # Before Regions: instances that selection drops are still visible, so
        # they must count for uniqueness and category extent (never as targets).
        ("Expressions", functools.partial(expressions_stage, cfg=cfg, input_types=input_types, templates=templates)),
        ("Regions", functools.partial(regions_stage, cfg=cfg, input_types=input_types)),
        ("HumanSamples", refs_stage),
    ]
    pending = [(name, fn, side_inputs.get(name, ())) for name, fn in stages]
    # With one input and no caption, SAM2 or decontamination stage in between,
    # Splits follows HumanSamples directly and joins the same ParDo.
    chain_splits = len(cfg.inputs) == 1 and not (
        cfg.caption.enabled or cfg.verify_sam2.active or cfg.decontaminate.active
    )
    if not chain_splits:
        examples = _apply_stages(examples, pending, rejects_l, events_l)

    # VLM captioning (SA1B-CoRS / SA1B-DeRS): after region selection, before SAM2
    # verification and splits (off by default: it needs a VLM server or model).
    if cfg.caption.enabled:
        from orsgen.pipelines.caption import CaptionExamples, caption_model_handler

        examples, cap_rejects, cap_events = examples | "Caption" >> CaptionExamples(
            cfg.caption, input_types, caption_model_handler(cfg.caption, out)
        )
        rejects_l.append(cap_rejects)
        events_l.append(cap_events)

    # SAM2 consistency filter / mask cleaner: after every stage that makes
    # samples, before splits (off by default; needs the sam2 extra and a model).
    if cfg.verify_sam2.active:
        from orsgen.pipelines.verify_sam2 import VerifySam2

        examples, sam2_rejects, sam2_events = examples | "VerifySam2" >> VerifySam2(cfg, out)
        rejects_l.append(sam2_rejects)
        events_l.append(sam2_events)

    # Benchmark decontamination and near-duplicate groups (off by default):
    # every image is hashed once and matched against the benchmark index.
    split_side: tuple[Any, ...] = ()
    if cfg.decontaminate.active:
        from orsgen.pipelines.decontaminate import BenchmarkOverlap, Decontaminate
        from orsgen.stages.decontaminate import prepare_index

        if index is None:
            index = prepare_index(cfg.decontaminate, cfg.splits.train_splits)
        examples, dec_rejects, dec_events, overrides, matches = examples | "Decontaminate" >> Decontaminate(
            cfg.decontaminate, index, functools.partial(_natural_for_group, cfg=cfg), cfg.splits.train_splits
        )
        rejects_l.append(dec_rejects)
        events_l.append(dec_events)
        split_side = (beam.pvalue.AsDict(overrides),)

    if len(cfg.inputs) > 1:
        # Several inputs can hold the same image (RefCOCO/+/g and COCO share
        # images) with different source splits; deciding per image keeps the
        # splits image-disjoint across inputs.
        res = (
            examples
            | "KeyByImage" >> beam.Map(lambda ex: (ex.image.image_id, ex))
            | "GroupByImage" >> beam.GroupByKey()
            | "Splits" >> beam.ParDo(ImageSplitsDoFn(cfg), *split_side).with_outputs(REJECTS, EVENTS, main="examples")
        )
        examples = res.examples
        rejects_l.append(res[REJECTS])
        events_l.append(res[EVENTS])
    else:
        splits = ("Splits", functools.partial(_splits_with_overrides, cfg=cfg), split_side)
        examples = _apply_stages(examples, [*pending, splits] if chain_splits else [splits], rejects_l, events_l)
    if cfg.decontaminate.matching:
        res_o = examples | "BenchmarkOverlap" >> BenchmarkOverlap(cfg.decontaminate, matches, cfg.splits.train_splits, out)
        examples = res_o[0]
        rejects_l.append(res_o[1])
        events_l.append(res_o[2])

    # Human screening (orsgen review): after splits, which it needs; off by default.
    screening_digest = ""
    if cfg.review.active:
        from orsgen.stages.screening import DECISIONS_EVENT, decisions_digest, latest_decisions, read_decisions, screening_stage

        decisions = latest_decisions(read_decisions(cfg.review.decisions)) if cfg.review.decisions else {}
        screening_digest = decisions_digest(decisions)
        fn = functools.partial(
            screening_stage, decisions=decisions, require_screened_for=frozenset(cfg.review.require_screened_for)
        )
        res = examples | "Screening" >> beam.ParDo(StageDoFn("Screening", fn)).with_outputs(REJECTS, EVENTS, main="examples")
        examples = res.examples
        rejects_l.append(res[REJECTS])
        events_l.append(res[EVENTS])
        events_l.append(p | "ScreeningDecisions" >> beam.Create([(DECISIONS_EVENT, len(decisions))]))

    encoded = (
        examples
        # Encoding is per-example CPU work: done here, on every worker before
        # the shuffle, it leaves the serial per-bucket writer only bytes to stream.
        | "Encode" >> beam.Map(encode_example, formats=list(cfg.write.formats))
    )
    # Each split's size (small metadata: one (images, bytes) pair per split)
    # sets its bucket count, so small splits get full shards too.
    buckets = beam.pvalue.AsSingleton(
        encoded
        | "SplitSizes" >> beam.ParDo(SplitSizeDoFn())
        | "SumSplitSizes" >> beam.CombinePerKey(_sum_pairs)
        # Without the combine's own default (an extra impulse stage and four
        # transforms per run); the side input's default stands in for it.
        | "AllSplitSizes" >> beam.combiners.ToDict(has_defaults=False)
        | "BucketsPerSplit" >> beam.Map(split_num_buckets, cfg=cfg),
        default_value=split_num_buckets({}, cfg),
    )
    # Groups a crashed run of this config completed: listed once, in the job
    # (not on the launcher, which may not reach the output store), before any
    # group of this run is written (the filter waits for this side input), so
    # the filter and the stand-in records agree on one set.
    sha = cfg.sha256()
    resumed = (
        p
        | "ResumeScan" >> beam.Impulse()
        | "ReadGroupRecords" >> beam.Map(_read_group_records, out=out, config_sha256=sha)
    )
    # A fixed ``num_buckets`` is known now: keying needs no side input, so it
    # fuses with Encode and the encoded records cross one boundary (the
    # GroupByKey), not two (``auto`` materialises them once more before
    # ``KeyByBucket``, which waits for every split's size).
    fixed_nb = cfg.write.num_buckets if isinstance(cfg.write.num_buckets, int) else None
    written = (
        encoded
        | "KeyByBucket"
        >> (
            beam.Map(_key_by_bucket, buckets=buckets)
            if fixed_nb is None
            else beam.Map(_key_by_fixed_bucket, nb=fixed_nb)
        )
        # Before the shuffle: a completed group's records never cross it.
        | "SkipCompletedGroups"
        >> beam.Filter(_not_resumed, resumed=beam.pvalue.AsSingleton(resumed | "ResumedKeys" >> beam.Map(frozenset)))
        | "GroupBuckets" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteBucketDoFn(out, cfg)).with_outputs(EVENTS, REJECTS, main="stats")
    )
    if fixed_nb is None:
        completed = resumed | "CompletedGroups" >> beam.FlatMap(_completed_groups)
    else:
        # The records reach the stand-ins as a side input of their own
        # impulse: fused with the scan, ResumeGroups (which waits for the
        # split sizes, i.e. for Encode's stage) would make that stage wait for
        # itself through the SkipCompletedGroups side input, now that
        # KeyByBucket is fused with Encode.
        completed = (
            p
            | "ResumeTrigger" >> beam.Impulse()
            | "CompletedGroups" >> beam.FlatMap(_completed_groups_of, records=beam.pvalue.AsSingleton(resumed))
        )
    recorded = (
        completed
        | "ResumeGroups" >> beam.ParDo(ResumedGroupsDoFn(), buckets=buckets).with_outputs(EVENTS, REJECTS, main="stats")
    )
    events_l.append(recorded[EVENTS])
    rejects_l.append(recorded[REJECTS])
    events_l.append(written[EVENTS])
    rejects_l.append(written[REJECTS])
    all_rejects = rejects_l | "AllRejects" >> beam.Flatten()
    # A fixed count needs no count of the rejects first (see KeyByBucket).
    rejects_nb: Any = fixed_nb
    if fixed_nb is None:
        rejects_nb = beam.pvalue.AsSingleton(
            all_rejects
            | "CountRejects" >> beam.combiners.Count.Globally(has_defaults=False)
            | "RejectsBuckets" >> beam.Map(rejects_num_buckets, cfg=cfg),
            default_value=rejects_num_buckets(0, cfg),
        )
    reject_stats = (
        all_rejects
        | "KeyRejects" >> beam.Map(_key_reject, nb=rejects_nb)
        | "GroupRejects" >> beam.GroupByKey()
        | "WriteRejects" >> beam.ParDo(WriteRejectsDoFn(out, cfg))
    )
    stats = (written.stats, recorded.stats, reject_stats) | "AllStats" >> beam.Flatten()
    events = events_l | "AllEvents" >> beam.Flatten() | "SumEvents" >> beam.CombinePerKey(sum)
    _ = (
        p
        | "ManifestTrigger" >> beam.Impulse()
        | "WriteManifest"
        >> beam.Map(
            _manifest_fn,
            out=out,
            cfg=cfg,
            stats=beam.pvalue.AsList(stats),
            events=beam.pvalue.AsDict(events),
            screening_digest=screening_digest,
        )
    )
