"""Category samples (SA1B-CoRS style): a category name refers to all its instances.

For each category annotated in an image:

* one non-crowd instance -> ``category_single`` ("the cup");
* several -> ``category_multi`` ("all cups"), whose targets are *all* the
  non-crowd instances of the category.

A crowd annotation (``iscrowd``) covers an unknown number of instances, so by
default (``crowd_policy: skip``) its category gets no category sample at all;
``non_crowd`` writes one targeting the non-crowd instances. A category one of
whose instances region selection drops gets none either: its mask would miss
an object the words name.
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
        reason (``crowd``, ``target_dropped``).
    """
    out: list[Candidate] = []
    skipped: Counter[str] = Counter()
    for name in sorted(ctx.pools):
        pool = ctx.pools[name]
        has_crowd = name in ctx.crowd_categories
        if has_crowd and crowd_policy == "skip":
            skipped["crowd"] += 1
            continue
        targets = tuple(sorted(g.instance_id for g in pool))
        if any(t not in ctx.kept_ids for t in targets):
            skipped["target_dropped"] += 1
            continue
        forms: NounForms = noun_forms(name, templates.nouns)
        is_multi = len(targets) > 1
        if (is_multi and not multi) or (not is_multi and not single):
            continue
        kind = ExpressionKind.CATEGORY_MULTI if is_multi else ExpressionKind.CATEGORY_SINGLE
        texts = templates.category.multi if is_multi else templates.category.single
        text = ctx.pick(texts, "category", name).format(noun=forms.singular, plural=forms.plural)
        out.append(
            Candidate(
                kind=str(kind),
                expression=text,
                target_ids=targets,
                template="category.multi" if is_multi else "category.single",
                metadata={
                    "category": name,
                    "n_instances": len(targets),
                    "crowd_excluded": has_crowd,
                },
            )
        )
    return out, skipped
