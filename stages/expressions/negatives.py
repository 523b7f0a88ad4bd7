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

import operator
from collections.abc import Collection, Sequence
from typing import overload

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
    return list(NegativeCandidates(ctx, vocabulary, templates, held_out=held_out, hard_first=hard_first))


class NegativeCandidates(Sequence[Candidate]):
    """``negative_candidates(...)`` as a sequence that makes each candidate when it is first read.

    ``balance`` reads the length and draws the first few (a few per image);
    with COCO's 80 categories some 75 are absent from an image, and with
    LVIS's 1,203 nearly all, so the text pick, its formatting and the
    record of every other absent category are never made. The order
    (``absent_categories``) and every category's noun forms are made at
    once, as ``negative_candidates`` makes them, so a name whose forms
    cannot be written fails here as it fails there.
    """

    def __init__(
        self,
        ctx: ImageContext,
        vocabulary: Sequence[Category],
        templates: TemplateSet,
        *,
        held_out: Collection[str] = (),
        hard_first: bool = True,
    ) -> None:
        self._ctx = ctx
        self._texts = templates.no_target
        absent = absent_categories(ctx, vocabulary, templates, held_out=held_out, hard_first=hard_first)
        self._absent = [(cat, hard, noun_forms(cat.name, templates.nouns)) for cat, hard in absent]
        self._made: dict[int, Candidate] = {}

    def __len__(self) -> int:
        return len(self._absent)

    @overload
    def __getitem__(self, index: int) -> Candidate: ...

    @overload
    def __getitem__(self, index: slice) -> list[Candidate]: ...

    def __getitem__(self, index: int | slice) -> Candidate | list[Candidate]:
        if isinstance(index, slice):
            return [self._candidate(i) for i in range(*index.indices(len(self._absent)))]
        i = operator.index(index)
        if i < 0:
            i += len(self._absent)
        if not 0 <= i < len(self._absent):
            raise IndexError("negative candidate index out of range")
        return self._candidate(i)

    def _candidate(self, i: int) -> Candidate:
        made = self._made.get(i)
        if made is None:
            cat, hard, f = self._absent[i]
            text = self._ctx.pick(self._texts, "no_target", cat.name).format(noun=f.singular, plural=f.plural)
            made = self._made[i] = Candidate(
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
        return made
