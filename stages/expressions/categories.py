"""Category samples (SA1B-CoRS style): a category name refers to all its instances.

For each category annotated in an image:

* one non-crowd instance -> ``category_single`` ("the cup");
* several -> ``category_multi`` ("all cups"), whose targets are *all* the
  non-crowd instances of the category.

A crowd annotation (``iscrowd``) covers an unknown number of instances, so by
default (``crowd_policy: skip``) its category gets no category sample at all;
``non_crowd`` writes one targeting the non-crowd instances, and records on the
sample (``crowd_excluded``, ``crowd_ids``) that a crowd region is left
unmasked. A category one of whose instances region selection drops gets none
either: its mask would miss an object the words name. Nor does a category
with an annotation that ingest rejected (its object is there, its mask is
not), nor one whose written word also covers another category in the image
("the table" with a dining table and a coffee table; ``vocabulary``).
"""

from __future__ import annotations

from collections import Counter

from orsgen.schemas.records import ExpressionKind
from orsgen.stages.expressions.context import Candidate, ImageContext
from orsgen.stages.expressions.templates import NounForms, TemplateSet, noun_forms


def category_candidates(
    ctx: ImageContext,
    templates: TemplateSet,
    *,
    crowd_policy: str = "skip",
    single: bool = True,
    multi: bool = True,
) -> tuple[list[Candidate], Counter[str]]:
    """Category-name candidates of one image.

    Args:
        ctx: the image.
        templates: texts and noun forms.
        crowd_policy: ``skip`` or ``non_crowd`` (see the module docstring).
        single: write ``category_single`` samples.
        multi: write ``category_multi`` samples.

    Returns:
        ``(candidates, skipped)``; ``skipped`` counts categories left out per
        reason (``crowd``, ``target_dropped``, ``rejected_annotation``,
        ``word_covers_other``), and ``crowd_region_unmasked``: samples
        written under ``non_crowd`` whose mask leaves a crowd region out.
    """
    out: list[Candidate] = []
    skipped: Counter[str] = Counter()
    for name in sorted(ctx.pools):
        pool = ctx.pools[name]
        has_crowd = name in ctx.crowd_categories
        if has_crowd and crowd_policy == "skip":
            skipped["crowd"] += 1
            continue
        if name in ctx.rejected_categories:
            skipped["rejected_annotation"] += 1
            continue
        if ctx.covers_another(name) is not None:
            skipped["word_covers_other"] += 1
            continue
        targets = tuple(sorted(g.instance_id for g in pool))
        if any(t not in ctx.kept_ids for t in targets):
            skipped["target_dropped"] += 1
            continue
        forms: NounForms = noun_forms(name, templates.nouns)
        is_multi = len(targets) > 1
        if (is_multi and not multi) or (not is_multi and not single):
            continue
        if has_crowd:
            skipped["crowd_region_unmasked"] += 1  # written, but its mask leaves the crowd out
        kind = ExpressionKind.CATEGORY_MULTI if is_multi else ExpressionKind.CATEGORY_SINGLE
        texts = templates.category.multi if is_multi else templates.category.single
        text = ctx.pick(texts, "category", name).format(noun=forms.singular, plural=forms.plural)
        out.append(
            Candidate(
                kind=str(kind),
                expression=text,
                target_ids=targets,
                template="category.multi" if is_multi else "category.single",
                metadata=_metadata(ctx, name, len(targets), has_crowd, crowd_policy),
            )
        )
    return out, skipped


def _metadata(ctx: ImageContext, name: str, n: int, has_crowd: bool, crowd_policy: str) -> dict[str, object]:
    meta: dict[str, object] = {"category": name, "n_instances": n, "crowd_excluded": has_crowd}
    if has_crowd:
        # crowd_policy non_crowd: the words name every instance, the mask leaves
        # the crowd region out. Users filtering for exact masks need to know.
        meta["crowd_policy"] = crowd_policy
        meta["crowd_ids"] = sorted(g.instance_id for g in ctx.geoms.values() if g.iscrowd and g.category == name)
    return meta
