"""The ``expressions`` stage: referring samples from an image's annotations.

``add_expressions`` is the pure core (one ``ImageExample`` in, the example
with its new samples and any sample-level rejects out); ``expressions_stage``
adapts it to the pipeline's stage signature. Each sample gets its trainer
targets (union RLE, SVG path, per-target box, Seg-Zero points, Qwen box)
from ``stages.common.targets.attach_targets``.

The stage runs *before* region selection: an instance that region selection
will drop (too small, say) is still visible in the image, so it must still
count when deciding whether "the leftmost cup" is unique and what "all cups"
means. Such instances are never targets: the stage asks ``select_regions``
(the same pure function, the same config) which instances survive, and a
category sample or description that would need a dropped one is not written.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from orsgen.schemas.config import ExpressionConfig, OrsgenConfig
from orsgen.schemas.records import Category, ImageExample, Reject, RejectLevel, Sample, safe_key
from orsgen.stages.expressions.balance import balance
from orsgen.stages.expressions.categories import category_candidates
from orsgen.stages.expressions.context import Candidate, ImageContext
from orsgen.stages.expressions.descriptions import description_candidates
from orsgen.stages.expressions.geometry import Margins
from orsgen.stages.expressions.negatives import NegativeCandidates
from orsgen.stages.expressions.templates import TemplateSet
from orsgen.stages.expressions.vocabulary import load_vocabulary
from orsgen.stages.regions import select_regions
from orsgen.stages.common.targets import TargetCache, TargetError, target_fields

STAGE = "expressions"
GENERATOR = "template"


def margins_for(cfg: ExpressionConfig, width: int, height: int) -> Margins:
    """The semantics' margins of an image under ``cfg``."""
    return Margins.for_image(
        width,
        height,
        margin_px=cfg.margin_px,
        margin_frac=cfg.margin_frac,
        size_margin=cfg.size_margin,
        next_to_max_gap_frac=cfg.next_to_max_gap_frac,
        axis_overlap_frac=cfg.relation_max_axis_overlap,
    )


def held_out_categories(cfg: OrsgenConfig) -> frozenset[str]:
    """Category names held out by the OOD split rules."""
    return frozenset(c for rule in cfg.splits.ood for c in rule.categories)


def generate_candidates(
    ctx: ImageContext,
    vocabulary: Sequence[Category],
    templates: TemplateSet,
    cfg: ExpressionConfig,
    *,
    held_out: Collection[str] = (),
) -> tuple[list[Candidate], Counter[str]]:
    """Every kind's candidates of one image, deduplicated and capped.

    Args:
        ctx: the image.
        vocabulary: the input's categories (for negatives); may be empty.
        templates: the template set.
        cfg: the stage config.
        held_out: category names never used as negatives.

    Returns:
        ``(selected candidates, counts of what was left out and why)``.
    """
    k = cfg.kinds
    cats, c1 = category_candidates(
        ctx, templates, crowd_policy=cfg.crowd_policy, single=k.category_single, multi=k.category_multi
    )
    descs, c2 = description_candidates(
        ctx,
        templates,
        families=cfg.families,
        phrase=k.phrase,
        description=k.description,
        max_instances_per_category=cfg.max_instances_per_category,
    )
    # Made as balance draws them (a few of the absent categories).
    negs: Sequence[Candidate] = (
        NegativeCandidates(ctx, vocabulary, templates, held_out=held_out, hard_first=cfg.hard_negatives)
        if k.no_target
        else []
    )
    selected, c3 = balance(ctx, cats + descs, negs, cfg)
    counts: Counter[str] = Counter()
    for prefix, c in (("category", c1), ("description", c2), ("balance", c3)):
        for key, n in c.items():
            counts[f"{prefix}/{key}"] += n
    return selected, counts


def sample_id_of(key: str, cand: Candidate) -> str:
    """A stable sample id: the example key and a digest of kind and text (unique per image)."""
    digest = hashlib.sha256(f"{cand.kind}\x00{cand.expression}".encode("utf-8")).hexdigest()[:12]
    # safe_key maps character by character and "-x" + hex digits are safe, so
    # this is safe_key(f"{key}-x{digest}") with the key's part made once per image.
    return f"{_safe_key_prefix(key)}-x{digest}"


@functools.lru_cache(maxsize=1024)
def _safe_key_prefix(key: str) -> str:
    return safe_key(key)


def add_expressions(
    ex: ImageExample,
    vocabulary: Sequence[Category],
    templates: TemplateSet,
    cfg: ExpressionConfig,
    *,
    seed: int,
    kept_ids: Collection[str] | None = None,
    held_out: Collection[str] = (),
) -> tuple[ImageExample, list[Reject], Counter[str]]:
    """Adds annotation-derived referring samples to one image.

    Args:
        ex: the image with all its annotated instances.
        vocabulary: the input's category vocabulary (for negatives).
        templates: the template set.
        cfg: the stage config.
        seed: the config seed.
        kept_ids: instances region selection keeps (None: all); others are
            context only, never targets.
        held_out: OOD category names, never used as negatives.

    Returns:
        ``(example with samples appended, rejects, counts)``; a candidate
        whose trainer targets cannot be computed becomes a sample-level
        reject; ``counts`` says what was left out and why
        (``description/near_tie``, ``category/crowd``,
        ``balance/over_kind_cap``, ...).
    """
    w, h = ex.image.width, ex.image.height
    coverage = load_vocabulary(cfg.vocabulary)  # cached: read once per process
    ctx = ImageContext.build(
        ex.image.image_id,
        w,
        h,
        ex.instances,
        margins_for(cfg, w, h),
        seed=seed,
        kept_ids=kept_ids,
        presence=ex.presence,
        coverage=coverage,
        nouns=templates.nouns,
    )
    selected, counts = generate_candidates(ctx, vocabulary, templates, cfg, held_out=held_out)
    by_id = {i.instance_id: i for i in ex.instances}
    samples: list[Sample] = []
    rejects: list[Reject] = []
    existing = {s.sample_id for s in ex.samples}
    # Samples of one image share targets: points, unions and SVG paths are computed once,
    # the outlines of all the image's target sets together.
    target_cache = TargetCache()
    todo = []
    for cand in selected:
        sid = sample_id_of(ex.key, cand)
        if sid not in existing:  # a rerun of the stage on its own output adds nothing twice
            todo.append((sid, cand))
    target_cache.prepare([cand.target_ids for _, cand in todo], by_id, w, h)
    for sid, cand in todo:
        try:
            # attach_targets' fields, the Sample then built once with them.
            union, svg, geoms = target_fields(
                cand.target_ids, by_id, w, h, image_id=ex.image.image_id, cache=target_cache
            )
        except TargetError as err:
            rejects.append(Reject(sid, STAGE, err.reason, str(err), RejectLevel.SAMPLE, ex.image.image_id))
            continue
        samples.append(
            Sample(
                sample_id=sid,
                image_id=ex.image.image_id,
                expression=cand.expression,
                kind=cand.kind,
                target_ids=cand.target_ids,
                generator=GENERATOR,
                template=cand.template,
                union_rle=union,
                union_svg=svg,
                targets=geoms,
                metadata={**cand.metadata, "templates_version": templates.version, "vocabulary_version": coverage.version},
            )
        )
    counts["images"] += 1
    return ex.replace(samples=ex.samples + tuple(samples)), rejects, counts


def expressions_stage(
    ex: ImageExample,
    vocabularies: Mapping[str, Sequence[Category]],
    *,
    cfg: OrsgenConfig,
    input_types: Mapping[str, str],
    templates: TemplateSet,
) -> tuple[ImageExample | None, list[Reject], list[tuple[str, int]]]:
    """The pipeline stage: expressions for images of the configured input types.

    Args:
        ex: one example.
        vocabularies: input name -> category vocabulary (a Beam side input).
        cfg: the whole config (expressions, regions, splits, seed).
        input_types: input name -> input type.
        templates: the loaded template set.

    Returns:
        ``(example, rejects, events)``; images of other input types pass
        unchanged. Events are ``("expressions/<what>", n)`` counts for the
        manifest.
    """
    ecfg = cfg.expressions
    itype = input_types.get(ex.input_name, "")
    if not ecfg.enabled or itype not in ecfg.apply_to:
        return ex, [], []
    kept_ids = None
    if itype in cfg.regions.apply_to:
        kept, _dropped = select_regions(
            ex.instances, ex.image.width, ex.image.height, cfg.regions, annotated=itype != "sa1b"
        )
        kept_ids = {i.instance_id for i in kept}
    vocabulary = tuple(vocabularies.get(ex.input_name, ()))
    out, rejects, counts = add_expressions(
        ex, vocabulary, templates, ecfg, seed=cfg.seed, kept_ids=kept_ids, held_out=held_out_categories(cfg)
    )
    if not vocabulary and ecfg.kinds.no_target:
        counts["negatives/no_vocabulary"] += 1
    return out, rejects, [(f"expressions/{k}", int(n)) for k, n in sorted(counts.items())]
