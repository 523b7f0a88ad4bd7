"""Deterministic, image-disjoint split assignment.

A split is a function of the image id (salted hash) or of the source's own
split, never of worker count, bundle order or run time, so reruns and
different runners put every image in the same split.
"""

from __future__ import annotations

import hashlib

from orsgen.schemas.config import SplitConfig


def hash_unit(text: str, salt: str) -> float:
    """Maps ``salt + text`` to a uniform number in [0, 1) with sha256."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(image_id: str, cfg: SplitConfig, source_split: str = "") -> str:
    """The split of one image.

    Args:
        image_id: stable image id.
        cfg: ratios, salt and whether to keep source splits.
        source_split: the source's own split (RefCOCO train/val/testA/...),
            or "" when the source has none.

    Returns:
        The split name.
    """
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
