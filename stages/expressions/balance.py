"""Deduplication and balance of one image's candidates.

1. **Merge identical expressions.** Texts are compared case- and
   space-insensitively. Identical texts with the same targets merge into one
   (the others' template ids go to ``metadata["merged_templates"]``);
   identical texts with *different* targets would make the text ambiguous,
   so all of them are dropped (counted as ``conflict``).
2. **Per-target cap.** At most ``max_per_target`` phrase + description
   samples name the same target set, so one salient object does not take
   all the descriptions.
3. **Per-kind caps**, then a **per-image cap** filled round-robin across the
   positive kinds (category_single, category_multi, description, phrase).
4. **Negatives.** ``no_target`` samples are drawn in their given order
   (hard negatives first); their number is ``negative_ratio`` times the
   positives, stochastically rounded, within the caps.

Every choice uses the image's seeded order (``ImageContext.shuffled``), so
the result depends only on the seed, the image and the candidates.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from orsgen.schemas.config import ExpressionConfig
from orsgen.schemas.records import ExpressionKind
from orsgen.stages.expressions.context import Candidate, ImageContext

#: Order of kinds in the output and in the round-robin fill.
KIND_ORDER = (
    str(ExpressionKind.CATEGORY_SINGLE),
    str(ExpressionKind.CATEGORY_MULTI),
    str(ExpressionKind.DESCRIPTION),
    str(ExpressionKind.PHRASE),
    str(ExpressionKind.NO_TARGET),
)
_DESCRIPTIVE = (str(ExpressionKind.DESCRIPTION), str(ExpressionKind.PHRASE))


@functools.lru_cache(maxsize=16384)
def normalize(text: str) -> str:
    """The form identical expressions share: lower case, single spaces.

    Kept per text: the same texts recur in image after image, and the lookup
    costs a fraction of the split and join (a pure function of the string).
    """
    return " ".join(text.lower().split())


def _cand_key(c: Candidate) -> str:
    # A candidate's name in the seeded order.
    return f"{c.kind}\x00{c.template}\x00{c.expression}\x00{','.join(c.target_ids)}"


def merge_identical(cands: Sequence[Candidate]) -> tuple[list[Candidate], Counter[str]]:
    """Merges candidates with the same normalised text (see the module docstring).

    Returns:
        ``(kept, counts)`` with ``counts["merged"]`` and ``counts["conflict"]``.
    """
    # Each text's first candidate, and the rest of its group (input order) for
    # the few texts that repeat: most texts need no list of their own.
    first: dict[str, Candidate] = {}
    more: dict[str, list[Candidate]] = {}
    for c in cands:
        text = normalize(c.expression)
        if text in first:
            more.setdefault(text, []).append(c)
        else:
            first[text] = c
    counts: Counter[str] = Counter()
    if not more:
        return [first[text] for text in sorted(first)], counts  # nothing to merge or to conflict with
    kept: list[Candidate] = []
    for text in sorted(first):
        rest = more.get(text)
        if rest is None:
            kept.append(first[text])
            continue
        group = [first[text], *rest]
        if len({c.target_ids for c in group}) > 1:
            counts["conflict"] += len(group)
            continue
        group = sorted(group, key=lambda c: (KIND_ORDER.index(c.kind) if c.kind in KIND_ORDER else 99, c.template, c.expression))
        best = group[0]
        if len(group) > 1:
            counts["merged"] += len(group) - 1
            others = sorted({c.template for c in group[1:]} - {best.template})
            if others:
                best = replace(best, metadata={**best.metadata, "merged_templates": others})
        kept.append(best)
    return kept, counts


def stochastic_round(x: float, u: float) -> int:
    """``floor(x)``, plus one with probability ``frac(x)`` (``u`` uniform in [0, 1))."""
    base = math.floor(x)
    return int(base + (1 if u < x - base else 0))


def balance(
    ctx: ImageContext,
    positives: Sequence[Candidate],
    negatives: Sequence[Candidate],
    cfg: ExpressionConfig,
) -> tuple[list[Candidate], Counter[str]]:
    """Dedups and caps one image's candidates.

    Args:
        ctx: the image (seeded order).
        positives: category, description and phrase candidates.
        negatives: ``no_target`` candidates in the order to draw them.
        cfg: caps and the negative ratio.

    Returns:
        ``(selected, counts)``: the samples to write, sorted by kind order
        then text, and what was left out per reason (``merged``,
        ``conflict``, ``over_target_cap``, ``over_kind_cap``,
        ``over_image_cap``).
    """
    merged, counts = merge_identical(positives)
    order = ctx.shuffled(merged, key=_cand_key)

    # Per-target cap over phrase + description, in the seeded order: the
    # descriptive candidates as they come in ``order`` (shuffling them again
    # with the same key gives that same order: tests/test_expressions_fast.py),
    # in the same pass that sorts the candidates by kind.
    by_kind: dict[str, list[Candidate]] = {}
    per_target: dict[tuple[str, ...], int] = {}
    max_per_target = cfg.max_per_target
    over_target_cap = 0
    for c in order:
        kind = c.kind
        lst = by_kind.get(kind)
        if lst is None:
            lst = by_kind[kind] = []
        if kind in _DESCRIPTIVE:
            n = per_target.get(c.target_ids, 0)
            if n >= max_per_target:
                over_target_cap += 1
                continue
            per_target[c.target_ids] = n + 1
        lst.append(c)
    if over_target_cap:
        counts["over_target_cap"] += over_target_cap

    caps = cfg.max_per_kind
    for k in list(by_kind):
        cap = getattr(caps, k)
        if len(by_kind[k]) > cap:
            counts["over_kind_cap"] += len(by_kind[k]) - cap
            by_kind[k] = by_kind[k][:cap]

    # Round-robin over the positive kinds, so a cap keeps every kind present.
    queue: list[Candidate] = []
    lists = [list(by_kind.get(k, [])) for k in KIND_ORDER[:-1]]
    while any(lists):
        for lst in lists:
            if lst:
                queue.append(lst.pop(0))

    n_pos0 = min(len(queue), cfg.max_per_image)
    want = stochastic_round(cfg.negative_ratio * n_pos0, ctx.unit("negative_count"))
    n_neg = min(want, caps.no_target, len(negatives), cfg.max_per_image)
    if want > n_neg:
        counts["negatives_short"] += want - n_neg
    n_pos = min(n_pos0, cfg.max_per_image - n_neg)
    counts["over_image_cap"] += len(queue) - n_pos
    selected = queue[:n_pos] + list(negatives[:n_neg])
    selected.sort(key=lambda c: (KIND_ORDER.index(c.kind), normalize(c.expression), c.expression))
    return selected, counts
