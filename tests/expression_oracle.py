"""An independent oracle for descriptive expressions, on dense numpy masks.

It re-implements the semantics documented in the README ("Descriptive
families") from scratch: no orsgen geometry code is imported. Centroids are
means of decoded mask pixel coordinates, boxes come from ``np.nonzero``, the
templates come straight from the YAML file. ``check_expression`` says whether
an emitted expression is exactly right: its text is one of its template's
texts, the template's predicate holds clearly for every target, fails clearly
for every other instance of the category, and its anchor is unambiguous.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import yaml


@dataclass
class DenseInstance:
    """One instance as the oracle sees it."""

    instance_id: str
    category: str | None
    iscrowd: bool
    mask: np.ndarray  # (h, w) bool

    @functools.cached_property
    def _stats(self) -> dict[str, float]:
        ys, xs = np.nonzero(self.mask)
        return {
            "area": float(len(xs)),
            "cx": float(xs.mean() + 0.5),
            "cy": float(ys.mean() + 0.5),
            "x0": float(xs.min()),
            "x1": float(xs.max() + 1),
            "y0": float(ys.min()),
            "y1": float(ys.max() + 1),
        }

    def stats(self) -> dict[str, float]:
        """Area, centroid (pixel centres at +0.5) and box (exclusive max) of the mask."""
        return self._stats


def bundled_templates() -> dict[str, Any]:
    """The raw YAML of the bundled templates."""
    text = resources.files("orsgen.configs").joinpath("templates", "expressions.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _clear(values_margins: list[tuple[float, float]]) -> str:
    """'yes' when every value beats its margin, 'no' when one is beaten by it, else 'tie'."""
    if any(v < -m for v, m in values_margins):
        return "no"
    if all(v > m for v, m in values_margins):
        return "yes"
    return "tie"


def _both(a: str, b: str) -> str:
    """Two readings (centroid, box) combined: agree or it is a tie."""
    return a if a == b else "tie"


def _absolute(s: dict[str, float], region: str, w: int, h: int, m: float) -> str:
    # Centroid reading and box-centre reading must agree.
    return _both(
        _absolute_at(s["cx"], s["cy"], region, w, h, m),
        _absolute_at((s["x0"] + s["x1"]) / 2, (s["y0"] + s["y1"]) / 2, region, w, h, m),
    )


def _absolute_at(x: float, y: float, region: str, w: int, h: int, m: float) -> str:
    third_x, third_y = w / 3.0, h / 3.0
    parts = {
        "left": [third_x - x],
        "right": [x - 2 * third_x],
        "top": [third_y - y],
        "bottom": [y - 2 * third_y],
    }
    if region == "center":
        vals = [x - third_x, 2 * third_x - x, y - third_y, 2 * third_y - y]
    elif "_" in region:
        a, b = region.split("_")
        vals = parts[a] + parts[b]
    else:
        vals = parts[region]
    return _clear([(v, m) for v in vals])


def _ordinal(stats: list[dict[str, float]], i: int, side: str, rank: int, m: float) -> str:
    # Centroid reading and leading-box-edge reading must agree.
    centroid = {"left": ("cx", 1), "right": ("cx", -1), "top": ("cy", 1), "bottom": ("cy", -1)}[side]
    edge = {"left": ("x0", 1), "right": ("x1", -1), "top": ("y0", 1), "bottom": ("y1", -1)}[side]
    return _both(_ordinal_by(stats, i, centroid, rank, m), _ordinal_by(stats, i, edge, rank, m))


def _ordinal_by(stats: list[dict[str, float]], i: int, key_sign: tuple[str, int], rank: int, m: float) -> str:
    key, sign = key_sign
    vals = np.array([sign * s[key] for s in stats])
    v = vals[i]
    others = np.delete(vals, i)
    surely_before = int((others < v - m).sum())
    maybe_before = int((others <= v + m).sum())
    if surely_before == maybe_before == rank:
        return "yes"
    if rank < surely_before or rank > maybe_before:
        return "no"
    return "tie"


def _size(stats: list[dict[str, float]], i: int, order: str, size_margin: float) -> str:
    a = np.array([s["area"] for s in stats])
    others = np.delete(a, i)
    f = 1.0 + size_margin
    if order == "largest":
        if (a[i] > f * others).all():
            return "yes"
        if (others > f * a[i]).any():
            return "no"
    else:
        if (a[i] * f < others).all():
            return "yes"
        if (a[i] > f * others).any():
            return "no"
    return "tie"


def _inside(px: float, py: float, box: dict[str, float], m: float) -> bool:
    """The point is inside the box or within ``m`` of it (not plainly outside)."""
    return box["x0"] - m <= px <= box["x1"] + m and box["y0"] - m <= py <= box["y1"] + m


def _plain_pair(s: dict[str, float], r: dict[str, float], m: float) -> bool:
    """Neither centroid is (nearly) inside the other's box."""
    return not _inside(s["cx"], s["cy"], r, m) and not _inside(r["cx"], r["cy"], s, m)


def _directional(s: dict[str, float], r: dict[str, float], rel: str, m: float, axis_overlap: float) -> str:
    c, lo, hi = ("cx", "x0", "x1") if rel in ("left_of", "right_of") else ("cy", "y0", "y1")
    first, second = (s, r) if rel in ("left_of", "above") else (r, s)  # first comes before second on the axis
    verdict = _clear([(second[c] - first[c], m)])
    if verdict != "yes":
        return verdict  # plainly false, or a near-tie, on the centroids alone
    overlap = min(s[hi], r[hi]) - max(s[lo], r[lo])
    allowed = axis_overlap * min(s[hi] - s[lo], r[hi] - r[lo])
    plain = (
        allowed - overlap > m
        and second[hi] - first[hi] > m
        and second[lo] - first[lo] > m
        and _plain_pair(s, r, m)
    )
    # Overlapping objects make the relation doubtful, never false.
    return "yes" if plain else "tie"


def _relation(
    s: dict[str, float], r: dict[str, float], rel: str, m: float, near: float, size_margin: float, axis_overlap: float
) -> str:
    if rel in ("left_of", "right_of", "above", "below"):
        return _directional(s, r, rel, m, axis_overlap)
    if rel == "next_to":
        dx = max(0.0, r["x0"] - s["x1"], s["x0"] - r["x1"])
        dy = max(0.0, r["y0"] - s["y1"], s["y0"] - r["y1"])
        verdict = _clear([(near - math.sqrt(dx * dx + dy * dy), m)])
        return "tie" if verdict == "yes" and not _plain_pair(s, r, m) else verdict
    if rel == "on":
        w = s["x1"] - s["x0"]
        ov = min(s["x1"], r["x1"]) - max(s["x0"], r["x0"])
        return _clear([(ov - 0.6 * w, m), (s["y1"] - r["y0"], m), (r["cy"] - s["y1"], m), (r["y0"] - s["y0"], m)])
    if rel == "holding":
        hgt = s["y1"] - s["y0"]
        box = _clear(
            [
                (r["x0"] - s["x0"], m),
                (s["x1"] - r["x1"], m),
                (r["y0"] - s["y0"], m),
                (s["y1"] - r["y1"], m),
                (r["cy"] - (s["y0"] + 0.2 * hgt), m),
                (s["y0"] + 0.75 * hgt - r["cy"], m),
            ]
        )
        # At most half the holder's area, with the relative size margin.
        f = 1.0 + size_margin
        half = 0.5 * s["area"]
        small = "yes" if half > f * r["area"] else ("no" if f * half < r["area"] else "tie")
        if "no" in (box, small):
            return "no"
        return "yes" if box == small == "yes" else "tie"
    raise AssertionError(f"unknown relation {rel}")


@dataclass
class OracleParams:
    """The margins, from the config, the way the README defines them."""

    margin_px: float
    margin_frac: float
    size_margin: float
    next_to_max_gap_frac: float
    relation_max_axis_overlap: float = 0.1

    def position(self, w: int, h: int) -> float:
        return max(self.margin_px, self.margin_frac * min(w, h))

    def near(self, w: int, h: int) -> float:
        return self.next_to_max_gap_frac * min(w, h)


def truths(
    template: dict[str, Any],
    pool: list[DenseInstance],
    w: int,
    h: int,
    p: OracleParams,
    anchor: DenseInstance | None = None,
) -> list[str]:
    """'yes' / 'no' / 'tie' of a raw YAML template for each instance of ``pool``."""
    stats = [d.stats() for d in pool]
    m = p.position(w, h)
    fam = template["family"]
    if fam == "absolute":
        return [_absolute(s, template["region"], w, h, m) for s in stats]
    if fam == "ordinal":
        return [_ordinal(stats, i, template["side"], template.get("rank", 0), m) for i in range(len(stats))]
    if fam == "size":
        return [_size(stats, i, template["order"], p.size_margin) for i in range(len(stats))]
    if fam == "relation":
        assert anchor is not None
        r = anchor.stats()
        return [
            _relation(s, r, template["relation"], m, p.near(w, h), p.size_margin, p.relation_max_axis_overlap)
            for s in stats
        ]
    raise AssertionError(f"unknown family {fam}")


def texts_for(template: dict[str, Any], kind: str, plural: bool, noun: str, nouns_pl: str, anchor: str) -> set[str]:
    key = f"{kind}_plural" if plural else kind
    return {t.format(noun=noun, plural=nouns_pl, anchor=anchor) for t in template.get(key, [])}


def check_expression(
    expression: str,
    kind: str,
    template_id: str,
    target_ids: list[str] | tuple[str, ...],
    metadata: dict[str, Any],
    instances: list[DenseInstance],
    w: int,
    h: int,
    params: OracleParams,
    templates: dict[str, Any],
    forms: dict[str, tuple[str, str]],
) -> str | None:
    """Checks one emitted phrase / description; returns None if right, else why not.

    Args:
        forms: category name -> (singular, plural) as the texts must write it.
    """
    by_id = {t["id"]: t for t in templates["templates"]}
    t = by_id.get(template_id)
    if t is None:
        return f"unknown template {template_id}"
    if t.get("enabled", True) is False:
        return f"disabled template {template_id} was used"
    cat = metadata["category"]
    crowd_cats = {d.category for d in instances if d.iscrowd}
    if cat in crowd_cats:
        return f"category {cat} has a crowd annotation"
    pool = [d for d in instances if d.category == cat and not d.iscrowd]
    n = len(pool)
    if n < t.get("min_count", 1) or (t.get("max_count") is not None and n > t["max_count"]):
        return f"{n} instances outside the template's count range"
    anchor = None
    anchor_word = ""
    if t["family"] == "relation":
        a_id = metadata.get("anchor_id")
        anchors = [d for d in instances if d.instance_id == a_id]
        if len(anchors) != 1:
            return "anchor missing"
        anchor = anchors[0]
        same = [d for d in instances if d.category == anchor.category]
        if len(same) != 1 or anchor.iscrowd or anchor.category == cat:
            return f"anchor category {anchor.category} is not unique in the image"
        anchor_word = forms[anchor.category][0]
    res = truths(t, pool, w, h, params, anchor)
    if "tie" in res:
        return f"near-tie: {res}"
    chosen = sorted(d.instance_id for d, r in zip(pool, res) if r == "yes")
    if chosen != sorted(target_ids):
        return f"semantics pick {chosen}, expression targets {sorted(target_ids)}"
    sing, plur = forms[cat]
    allowed = texts_for(t, kind, len(chosen) > 1, sing, plur, anchor_word)
    if expression not in allowed:
        return f"text {expression!r} is not one of {sorted(allowed)}"
    return None


def decisive_selections(
    instances: list[DenseInstance],
    w: int,
    h: int,
    params: OracleParams,
    templates: dict[str, Any],
    families: list[str],
    max_instances_per_category: int,
) -> set[tuple[str, str, tuple[str, ...]]]:
    """Every (template id, anchor id, targets) the semantics make decisive.

    For checking that the generator misses nothing: these are all the
    descriptions that are right to emit (targets all kept, texts present).
    """
    out = set()
    crowd_cats = {d.category for d in instances if d.iscrowd}
    cats = sorted({d.category for d in instances if d.category and not d.iscrowd} - crowd_cats)
    for t in templates["templates"]:
        if not t.get("enabled", True) or t["family"] not in families:
            continue
        for cat in cats:
            if t.get("categories") is not None and cat not in t["categories"]:
                continue
            pool = [d for d in instances if d.category == cat and not d.iscrowd]
            n = len(pool)
            if n > max_instances_per_category or n < t.get("min_count", 1):
                continue
            if t.get("max_count") is not None and n > t["max_count"]:
                continue
            anchors: list[DenseInstance | None] = [None]
            if t["family"] == "relation":
                anchors = []
                for other in sorted({d.category for d in instances if d.category} - {cat} - crowd_cats):
                    same = [d for d in instances if d.category == other]
                    if len(same) == 1:
                        anchors.append(same[0])
            for a in anchors:
                res = truths(t, pool, w, h, params, a)
                if "tie" in res or "yes" not in res:
                    continue
                chosen = tuple(sorted(d.instance_id for d, r in zip(pool, res) if r == "yes"))
                if len(chosen) > 1 and not (t.get("description_plural") or t.get("phrase_plural")):
                    continue
                out.add((t["id"], a.instance_id if a else "", chosen))
    return out
