"""Duplicate images: the same key arriving more than once.

The same SA-1B shard listed twice (or matched by two globs), a re-uploaded
copy under another shard name, or two configs inputs reading one file all
yield examples with the same key. One copy is kept, chosen by content rather
than arrival order so that every runner keeps the same one, and each other
copy becomes an image-level reject ``duplicate_image``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from orsgen.schemas.records import Reject, RejectLevel

STAGE = "dedupe"
DUPLICATE_IMAGE = "duplicate_image"


class Copy(Protocol):
    """What dedupe needs of an example (``EncodedExample`` has it)."""

    @property
    def key(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def uri(self) -> str: ...
    @property
    def image_id(self) -> str: ...


T = TypeVar("T", bound=Copy)


def dedupe_by_key(items: Iterable[T]) -> tuple[list[T], list[tuple[T, Reject]]]:
    """Keeps one item per key: the one with the smallest ``(sha256, uri)``.

    Args:
        items: the examples of one group (e.g. one write bucket), any order.

    Returns:
        ``(kept, dropped)``: kept items sorted by key, and each dropped copy
        with its image-level reject.
    """
    by_key: dict[str, list[T]] = {}
    for it in items:
        by_key.setdefault(it.key, []).append(it)
    kept: list[T] = []
    dropped: list[tuple[T, Reject]] = []
    for key in sorted(by_key):
        group = sorted(by_key[key], key=lambda c: (c.sha256, c.uri))
        kept.append(group[0])
        for i, dup in enumerate(group[1:], start=1):
            same = "identical bytes" if dup.sha256 == group[0].sha256 else "different bytes"
            dropped.append(
                (
                    dup,
                    Reject(
                        source_key=f"{dup.uri or key}#copy{i}",
                        stage=STAGE,
                        reason=DUPLICATE_IMAGE,
                        message=(
                            f"image key {key} arrived {len(group)} times ({same}); kept the copy from "
                            f"{group[0].uri or key}. Check that no shard or input is listed twice."
                        ),
                        level=RejectLevel.IMAGE,
                        image_id=dup.image_id,
                    ),
                )
            )
    return kept, dropped
