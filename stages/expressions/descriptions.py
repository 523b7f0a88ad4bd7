"""Descriptive samples (SA1B-DeRS style) with verified uniqueness.

Every enabled template is tried on every category of the image (and, for
relations, every possible anchor). ``geometry`` evaluates the template's
predicate on each non-crowd instance of the category: ``TRUE``, ``FALSE`` or
``UNSURE`` under the configured margins. A candidate is written only when the
result is decisive (no ``UNSURE``, at least one ``TRUE``): the expression
then picks out exactly its targets among all instances of the category in the
image, whether or not region selection keeps them. Several ``TRUE`` instances
give a plural text ("the cups on the left") when the template has one.

Categories with a crowd annotation, or with an annotation ingest rejected,
are never described nor used as anchors: where all their members are is
unknown. Nor is a category whose written word also covers another category
in the image ("the table on the left" with a coffee table there too). An
anchor is a category with exactly one instance, so that "the {anchor}"
itself refers unambiguously.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

from orsgen.schemas.records import ExpressionKind
from orsgen.stages.expressions.context import Candidate, ImageContext, make_candidate
from orsgen.stages.expressions.geometry import (
    ABSOLUTE_REGIONS,
    ORDINAL_SIDES,
    SIZE_ORDERS,
    Geom,
    Truth,
    absolute_truth,
    absolute_truth_table,
    ordinal_bounds,
    ordinal_truth,
    ordinal_truth_of_bounds,
    relation_truth,
    size_truth,
    size_truth_table,
)
from orsgen.stages.expressions.templates import (
    AbsoluteTemplate,
    OrdinalTemplate,
    RelationTemplate,
    SizeTemplate,
    TemplateSet,
    noun_forms,
)
from orsgen.stages.splits import sha256_unit

_TABLE_REGIONS = frozenset(ABSOLUTE_REGIONS)
_ORDINAL_SIDES = frozenset(ORDINAL_SIDES)
_SIZE_ORDERS = frozenset(SIZE_ORDERS)
_FAMILY_FIELDS = {"absolute": ("region",), "ordinal": ("side", "rank"), "size": ("order",), "relation": ("relation",)}


def template_semantics(t: Any) -> dict[str, Any]:
    """The family and parameters of a template, as stored in sample metadata."""
    return {"family": t.family, **{k: getattr(t, k) for k in _FAMILY_FIELDS[t.family]}}


def evaluate(t: Any, pool: Sequence[Geom], ctx: ImageContext, anchor: Geom | None = None) -> list[Truth]:
    """Truth of template ``t`` for each instance of ``pool`` in image ``ctx``."""
    m = ctx.margins
    if isinstance(t, AbsoluteTemplate):
        return absolute_truth(pool, t.region, ctx.width, ctx.height, m)
    if isinstance(t, OrdinalTemplate):
        return ordinal_truth(pool, t.side, t.rank, m)
    if isinstance(t, SizeTemplate):
        return size_truth(pool, t.order, m)
    if isinstance(t, RelationTemplate):
        if anchor is None:
            raise ValueError(f"relation template {t.id!r} needs an anchor.")
        return relation_truth(pool, anchor, t.relation, m)
    raise TypeError(f"unknown template type {type(t).__name__}.")


def _anchors(image_anchors: list[tuple[str, Geom]], target_category: str) -> list[tuple[str, Geom]]:
    """Categories other than the target's with exactly one instance and no crowd, kept by region selection.

    ``image_anchors`` is ``_image_anchors(ctx)``, made once per image.
    """
    return [a for a in image_anchors if a[0] != target_category]


def _image_anchors(ctx: ImageContext) -> list[tuple[str, Geom]]:
    """Every category that can be an anchor, by name: one instance, no crowd, kept (``_anchors`` of no target)."""
    out = []
    for name in sorted(ctx.pools):
        pool = ctx.pools[name]
        if ctx.unknown_extent(name) or len(pool) != 1:
            continue
        if ctx.covers_another(name) is not None:
            continue
        if pool[0].instance_id in ctx.kept_ids:
            out.append((name, pool[0]))
    return out


#: How ``description_candidates`` evaluates a template (``_template_plan``).
_ABSOLUTE, _ORDINAL, _SIZE, _RELATION, _OTHER = range(5)
#: Plans by (id of the template set, families, kinds); each entry holds its
#: template set, so an id is never reused while its plan is kept.
_PLANS: dict[tuple[int, tuple[str, ...], tuple[str, ...]], tuple[TemplateSet, list[tuple[Any, ...]]]] = {}
_MAX_PLANS = 8


def _template_plan(templates: TemplateSet, families: tuple[str, ...], keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The enabled templates of ``families``, each with what every image reads of it, made once per template set.

    Each entry is ``(template, how, parameter, min_count, max_count,
    categories, texts, semantics, has_plural)``; ``how`` picks the
    evaluation (``_ABSOLUTE`` / ``_SIZE`` / ``_ORDINAL`` tables, ``evaluate``
    for the rest), ``texts`` holds per kind ``(kind, singular texts, plural
    texts, what a pick hashes between the image's head and the anchor name)``.
    """
    cache_key = (id(templates), families, keys)
    got = _PLANS.get(cache_key)
    if got is not None and got[0] is templates:
        return got[1]
    plan = []
    for t in templates.enabled():
        if t.family not in families:
            continue
        if isinstance(t, AbsoluteTemplate) and t.region in _TABLE_REGIONS:
            how, param = _ABSOLUTE, t.region
        elif isinstance(t, SizeTemplate) and t.order in _SIZE_ORDERS:
            how, param = _SIZE, t.order
        elif isinstance(t, OrdinalTemplate) and t.side in _ORDINAL_SIDES:
            how, param = _ORDINAL, t.side
        elif isinstance(t, RelationTemplate):
            how, param = _RELATION, t.relation  # relation_truth directly (what evaluate calls)
        else:
            how, param = (_RELATION if t.family == "relation" else _OTHER), None
        texts = [(key, getattr(t, key), getattr(t, f"{key}_plural"), f"\x00{t.id}\x00{key}\x00") for key in keys]
        has_plural = bool(t.description_plural or t.phrase_plural)
        plan.append((t, how, param, t.min_count, t.max_count, t.categories, texts, template_semantics(t), has_plural))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[cache_key] = (templates, plan)
    return plan


@functools.lru_cache(maxsize=16384)
def _formatted(text: str, noun: str, plural: str, anchor: str) -> str:
    """``text.format(noun=noun, plural=plural, anchor=anchor)``, kept per text and names.

    A template's text for a category recurs in image after image ("the
    leftmost {noun}" -> "the leftmost cup"), and the lookup costs about a
    third of ``str.format``. A pure function of its four strings; an error
    is raised again each time (``lru_cache`` keeps only results).
    """
    return text.format(noun=noun, plural=plural, anchor=anchor)


def description_candidates(
    ctx: ImageContext,
    templates: TemplateSet,
    *,
    families: Sequence[str],
    phrase: bool = True,
    description: bool = True,
    max_instances_per_category: int = 10,
) -> tuple[list[Candidate], Counter[str]]:
    """Descriptive candidates of one image.

    Args:
        ctx: the image.
        templates: the template set (texts, noun forms).
        families: template families to use.
        phrase: write ``phrase`` candidates.
        description: write ``description`` candidates.
        max_instances_per_category: skip categories with more instances.

    Returns:
        ``(candidates, counts)``; ``counts`` holds ``near_tie`` (some
        instance within the margin), ``no_match`` (no instance matches),
        ``plural_unsupported`` (several match, the template has no plural
        text), ``too_many_instances``, ``target_dropped``
        (the match would target an instance region selection drops) and
        ``crowd`` (a crowd category left out).
    """
    out: list[Candidate] = []
    counts: Counter[str] = Counter()
    kinds = [k for k, on in ((ExpressionKind.DESCRIPTION, description), (ExpressionKind.PHRASE, phrase)) if on]
    if not kinds:
        return out, counts
    plan = _template_plan(templates, tuple(families), tuple(map(str, kinds)))
    # Loop invariants, made once per image: the hashed head of every pick
    # (``ctx.pick(texts, t.id, key, anchor_name, *targets)`` is inlined below:
    # ``unit`` of the joined text, only where there is a choice), the rounded
    # margin, and each category's anchors (the same for every relation template).
    head = ctx._unit_prefix
    margin_px = round(ctx.margins.position_px, 4)
    kept_ids = ctx.kept_ids
    true, unsure = Truth.TRUE, Truth.UNSURE
    anchors_of: dict[str, list[tuple[str, Geom]]] = {}
    image_anchors: list[tuple[str, Geom]] | None = None
    for name in sorted(ctx.pools):
        if name in ctx.crowd_categories:
            counts["crowd"] += 1
            continue
        if name in ctx.rejected_categories:
            counts["rejected_annotation"] += 1
            continue
        if ctx.covers_another(name) is not None:
            counts["word_covers_other"] += 1
            continue
        pool = ctx.pools[name]
        n = len(pool)
        if n > max_instances_per_category:
            counts["too_many_instances"] += 1
            continue
        forms = noun_forms(name, templates.nouns)
        # Every region of the category at once (the nine absolute templates ask
        # them all), both size orders at once, and each side's possible ranks
        # once for both ordinal ranks.
        abs_table: dict[str, list[Truth]] | None = None
        size_table: dict[str, list[Truth]] | None = None
        ord_bounds: dict[str, list[tuple[int, int, int, int]]] = {}
        for t, how, param, min_count, max_count, only, texts_of, semantics, has_plural in plan:
            if n < min_count or (max_count is not None and n > max_count):
                continue
            if only is not None and name not in only:
                continue
            if how == _RELATION:
                if name not in anchors_of:
                    if image_anchors is None:
                        image_anchors = _image_anchors(ctx)  # once per image
                    anchors_of[name] = _anchors(image_anchors, name)
                anchors: list[tuple[str, Geom] | None] = list(anchors_of[name])
            else:
                anchors = [None]
            for anchor in anchors:
                if how == _ABSOLUTE:
                    if abs_table is None:
                        abs_table = absolute_truth_table(pool, ctx.width, ctx.height, ctx.margins)
                    truths = abs_table[param]
                elif how == _ORDINAL:
                    bounds = ord_bounds.get(param)
                    if bounds is None:
                        bounds = ord_bounds[param] = ordinal_bounds(pool, param, ctx.margins)
                    truths = ordinal_truth_of_bounds(bounds, t.rank)
                elif how == _SIZE:
                    if size_table is None:
                        size_table = size_truth_table(pool, ctx.margins)
                    truths = size_table[param]
                elif how == _RELATION and param is not None and anchor:
                    truths = relation_truth(pool, anchor[1], param, ctx.margins)
                else:
                    truths = evaluate(t, pool, ctx, anchor[1] if anchor else None)
                # unique_selection, inlined (a hot path), with the reason when there is none.
                if unsure in truths:
                    counts["near_tie"] += 1
                    continue
                sel = [g.instance_id for g, x in zip(pool, truths) if x is true]
                if not sel:
                    counts["no_match"] += 1
                    continue
                targets = tuple(sorted(sel))
                if not kept_ids.issuperset(targets):
                    counts["target_dropped"] += 1
                    continue
                plural = len(targets) > 1
                if plural and not has_plural:
                    counts["plural_unsupported"] += 1
                    continue
                anchor_name = anchor[0] if anchor else ""
                anchor_noun = noun_forms(anchor_name, templates.nouns).singular if anchor else ""
                meta: dict[str, Any] = {
                    "category": name,
                    "n_instances": n,
                    "semantics": dict(semantics),
                    "margin_px": margin_px,
                }
                if anchor:
                    meta["anchor_category"] = anchor_name
                    meta["anchor_id"] = anchor[1].instance_id
                tail = "\x00".join((anchor_name, *targets))
                for key, singular_texts, plural_texts, pick_mid in texts_of:
                    texts = plural_texts if plural else singular_texts
                    n_texts = len(texts)
                    if not n_texts:
                        continue
                    if n_texts == 1:
                        text = texts[0]
                    else:
                        u = sha256_unit(head + pick_mid + tail)
                        text = texts[min(int(u * n_texts), n_texts - 1)]
                    text = _formatted(text, forms.singular, forms.plural, anchor_noun)
                    out.append(make_candidate(key, text, targets, t.id, dict(meta)))
    return out, counts
