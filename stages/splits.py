"""Deterministic, image-disjoint split assignment.

A split is a function of the image id (salted hash) or of the source's own
split, never of worker count, bundle order or run time, so reruns and
different runners put every image in the same split.

OOD holdouts (``splits.ood``, ORS-Bench style) come first: an image with a
held-out category, or with a sample whose target area falls in an extreme
range, goes to that rule's ``ood_*`` split, whole.

One image can arrive through several inputs (RefCOCO, RefCOCO+, RefCOCOg and
COCO share images) whose own splits disagree. ``resolve_split_conflicts``
keeps splits image-disjoint across inputs: the image goes to its most
protected split (``ood_*``, then evaluation splits, then training) and the
copies that wanted another split become ``split_conflict`` rejects.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Iterable, Sequence

from orsgen.schemas.config import OodRule, SplitConfig
from orsgen.schemas.records import ImageExample, Reject, RejectLevel
from orsgen.stages.common.masks import rle_area


_sha256 = hashlib.sha256
#: The first 8 bytes as a big-endian unsigned integer: ``int.from_bytes(digest[:8], "big")``.
_first_u64 = struct.Struct(">Q").unpack_from


def sha256_unit(text: str) -> float:
    """A uniform number in [0, 1): the first 8 bytes of ``text``'s sha256, big-endian, over 2**64."""
    return _first_u64(_sha256(text.encode("utf-8")).digest())[0] / 2.0**64


def hash_unit(text: str, salt: str) -> float:
    """Maps ``salt + text`` to a uniform number in [0, 1) with sha256."""
    return sha256_unit(f"{salt}\x00{text}")


def ood_split(
    rules: Iterable[OodRule],
    category_names: Iterable[str] = (),
    target_area_fracs: Iterable[float] = (),
) -> str:
    """The first OOD rule an image matches, or "".

    Args:
        rules: the OOD rules, in config order.
        category_names: categories annotated in the image (crowd included).
        target_area_fracs: for each sample with targets, its union target
            mask area as a fraction of the image.

    Returns:
        The matching rule's split name, or "" when none matches.
    """
    names = set(category_names)
    fracs = list(target_area_fracs)
    for rule in rules:
        if names & set(rule.categories):
            return rule.name
        if rule.min_area_frac is None and rule.max_area_frac is None:
            continue
        lo = rule.min_area_frac if rule.min_area_frac is not None else 0.0
        hi = rule.max_area_frac if rule.max_area_frac is not None else 1.0
        if any(lo <= f <= hi for f in fracs):
            return rule.name
    return ""


def example_ood_split(ex: ImageExample, cfg: SplitConfig) -> str:
    """``ood_split`` of an example: its instances' categories and its samples' target areas."""
    if not cfg.ood:
        return ""
    img_area = float(ex.image.width * ex.image.height) or 1.0
    names = [i.category_name for i in ex.instances if i.category_name]
    fracs = [rle_area(s.union_rle) / img_area for s in ex.samples if s.target_ids and s.union_rle is not None]
    return ood_split(cfg.ood, names, fracs)


def assign_split(image_id: str, cfg: SplitConfig, source_split: str = "", ood: str = "") -> str:
    """The split of one image.

    Args:
        image_id: stable image id.
        cfg: ratios, salt and whether to keep source splits.
        source_split: the source's own split (RefCOCO train/val/testA/...),
            or "" when the source has none.
        ood: the OOD split the image matches (``example_ood_split``), or "";
            it wins over everything else, so that a held-out category never
            reaches a training split, not even a source's own.

    Returns:
        The split name.
    """
    if ood:
        return ood
    if source_split and cfg.keep_source_splits:
        return source_split
    u = hash_unit(image_id, cfg.salt)
    acc = 0.0
    last = ""
    for name, ratio in cfg.ratios.items():
        if ratio <= 0:
            continue
        acc += ratio
        last = name
        if u < acc:
            return name
    return last  # float rounding at the top end


SPLIT_CONFLICT = "split_conflict"


def split_priority(split: str, train_splits: Collection[str]) -> tuple[int, str]:
    """Sort key of splits by protection: ``ood_*`` first, then evaluation, then training.

    Ties break alphabetically, so every runner resolves a conflict the same way.
    """
    if split.startswith("ood_"):
        return (0, split)
    if split not in train_splits:
        return (1, split)
    return (2, split)


def most_protected_split(splits: Iterable[str], train_splits: Collection[str]) -> str:
    """The one split of images that must stay together (a near-duplicate group): the most protected.

    Any member in an ``ood_*`` or evaluation split pulls the whole group there,
    so a near-copy of a held-out image never stays in training.
    """
    return min(splits, key=lambda s: split_priority(s, train_splits))


def resolve_split_conflicts(
    copies: Sequence[tuple[ImageExample, str]], train_splits: Collection[str]
) -> tuple[list[tuple[ImageExample, str]], list[tuple[ImageExample, Reject]]]:
    """Puts every copy of one image in one split.

    Args:
        copies: ``(example, its own split)`` for each input that holds the
            image (same ``image_id``, different input names).
        train_splits: the training split names (``splits.train_splits``).

    Returns:
        ``(kept, dropped)``: the copies whose split is the image's split, and
        each other copy with its image-level ``split_conflict`` reject.
    """
    if not copies:
        return [], []
    ordered = sorted(copies, key=lambda c: c[0].key)
    chosen = min((s for _, s in ordered), key=lambda s: split_priority(s, train_splits))
    kept = [(ex, s) for ex, s in ordered if s == chosen]
    dropped = []
    for ex, s in ordered:
        if s == chosen:
            continue
        holders = sorted({k.input_name for k, ks in ordered if ks == chosen})
        dropped.append(
            (
                ex,
                Reject(
                    source_key=ex.key,
                    stage="splits",
                    reason=SPLIT_CONFLICT,
                    message=(
                        f"image {ex.image.image_id} is in split {s!r} of input {ex.input_name!r} but in split "
                        f"{chosen!r} of {holders}; splits stay image-disjoint, so this copy is left out "
                        "(set splits.keep_source_splits: false to hash all inputs into one partition instead)."
                    ),
                    level=RejectLevel.IMAGE,
                    image_id=ex.image.image_id,
                ),
            )
        )
    return kept, dropped
