"""No-target negatives (gRefCOCO / GenSeg-R1 style): a category that is not there.

A category of the input's vocabulary is absent from an image when no
annotation of it exists at all, crowd and rejected annotations included.
Absent categories are ranked for one image: hard negatives first (the same
supercategory as a category that is present: "dog" in an image with a cat),
each group in a seeded order. A category whose words cover a present
category, or are covered by one, is never a negative ("table" on an image
with a coffee table, "glass" with a wine glass; the rules are in
``vocabulary``), and neither is a held-out OOD category (its name must not
reach training data).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from orsgen.schemas.records import Category, ExpressionKind
from orsgen.stages.expressions.context import Candidate, ImageContext
from orsgen.stages.expressions.templates import TemplateSet, noun_forms
from orsgen.stages.expressions.vocabulary import Coverage

#: Without a vocabulary file a word covers what is written the same way, the
#: multi-word names it ends and what it is the supercategory of.
_PLAIN = Coverage(version=0, table={})


def absent_categories(
    ctx: ImageContext,
    vocabulary: Sequence[Category],
    templates: TemplateSet,
    *,
    held_out: Collection[str] = (),
    hard_first: bool = True,
) -> list[tuple[Category, bool]]:
    """The categories absent from an image, in the order negatives are drawn.

    Args:
        ctx: the image.
        vocabulary: the input's categories.
        templates: for the written noun forms.
        held_out: category names that are never negatives.
        hard_first: put same-supercategory categories first.

    Returns:
        ``(category, is_hard)`` pairs, hard ones first when ``hard_first``.
    """
    cov = ctx.coverage if ctx.coverage is not None else _PLAIN
    present = cov.index(ctx.present_categories or tuple((n, "") for n in sorted(ctx.present_names)), templates.nouns)
    seen: set[str] = set()
    absent: list[tuple[Category, bool]] = []
    for cat in sorted(vocabulary, key=lambda c: c.id):
        if cat.id in ctx.present_ids or cat.name in ctx.present_names or cat.name in held_out or cat.name in seen:
            continue
        if present.touches(cat.name, cat.supercategory):
            continue
        seen.add(cat.name)
        absent.append((cat, bool(cat.supercategory) and cat.supercategory in ctx.present_supercategories))
    ordered = ctx.shuffled(absent, key=lambda cb: cb[0].name)
    if hard_first:
        ordered = [cb for cb in ordered if cb[1]] + [cb for cb in ordered if not cb[1]]
    return ordered


def negative_candidates(
    ctx: ImageContext,
    vocabulary: Sequence[Category],
    templates: TemplateSet,
    *,
    held_out: Collection[str] = (),
    hard_first: bool = True,
) -> list[Candidate]:
    """``no_target`` candidates of one image, in the order they are drawn.

    Returns:
        One candidate per absent category (see ``absent_categories``); the
        caller takes as many as the negative ratio asks for.
    """
    out = []
    for cat, hard in absent_categories(ctx, vocabulary, templates, held_out=held_out, hard_first=hard_first):
        f = noun_forms(cat.name, templates.nouns)
        text = ctx.pick(templates.no_target, "no_target", cat.name).format(noun=f.singular, plural=f.plural)
        out.append(
            Candidate(
                kind=str(ExpressionKind.NO_TARGET),
                expression=text,
                target_ids=(),
                template="no_target.category",
                metadata={
                    "category": cat.name,
                    "category_id": cat.id,
                    "supercategory": cat.supercategory,
                    "hard": hard,
                },
            )
        )
    return out
