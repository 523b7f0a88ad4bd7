"""Benchmark decontamination and near-duplicate groups (pure core).

* ``hashing``: sha256 and the 256-bit pHash (with one-side crop variants);
* ``matching``: exact Hamming search by multi-index hashing, and the
  brute-force reference;
* ``index``: the benchmark index, read from the configured sources, kept in
  one Parquet file;
* ``groups``: near-duplicate groups within a build (LSH buckets, edges,
  union-find).

This module holds the per-image decisions the Beam wrappers
(``pipelines/decontaminate.py``) call: which identities an image has, and
whether a matched image in a given split is rejected.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from orsgen.schemas.config import DecontaminateConfig
from orsgen.schemas.records import ImageExample, Reject, RejectLevel
from orsgen.stages.decontaminate.hashing import HashError, ImageHashes, image_hashes
from orsgen.stages.decontaminate.index import BenchmarkIndex, BenchmarkMatch, coco_id_of_file_name, prepare_index

STAGE = "decontaminate"
#: An image of a training split (or of any split, unless
#: ``decontaminate.keep_in_heldout``) matches a benchmark image.
BENCHMARK_OVERLAP = "benchmark_overlap"
#: The image bytes could not be decoded for the perceptual hash.
UNHASHABLE_IMAGE = "unhashable_image"

__all__ = [
    "BENCHMARK_OVERLAP",
    "STAGE",
    "UNHASHABLE_IMAGE",
    "BenchmarkIndex",
    "BenchmarkMatch",
    "HashError",
    "ImageHashes",
    "coco_id_of",
    "hash_example",
    "image_hashes",
    "match_example",
    "match_examples",
    "overlap_reject",
    "portable_ref",
    "prepare_index",
]


def coco_id_of(ex: ImageExample) -> tuple[int | None, str]:
    """The COCO id of an example's image and where it came from.

    Returns:
        ``(id, "coco_id")`` for an image read from COCO / RefCOCO-family
        inputs, ``(id, "file_name")`` when only a COCO-style file name gives
        it, else ``(None, "")``.
    """
    img = ex.image
    if img.source in ("coco", "refcoco", "grefcoco"):
        tail = img.image_id.rsplit(":", 1)[-1]
        if tail.isdigit():
            return int(tail), "coco_id"
    named = coco_id_of_file_name(img.file_name)
    return (named, "file_name") if named is not None else (None, "")


def hash_example(ex: ImageExample, crop_frac: float) -> ImageHashes:
    """Hashes an example's image once (its sha256 from ingest is reused).

    Raises:
        HashError: the image cannot be decoded.
    """
    return image_hashes(ex.image_bytes, crop_frac, ex.image.sha256 or None)


def match_example(ex: ImageExample, hashes: ImageHashes, index: BenchmarkIndex) -> list[BenchmarkMatch]:
    """The benchmark identities an example's image matches."""
    return match_examples([(ex, hashes)], index)[0]


def match_examples(
    items: Sequence[tuple[ImageExample, ImageHashes]], index: BenchmarkIndex, written: dict[str, str] | None = None
) -> list[list[BenchmarkMatch]]:
    """``match_example`` for a batch: one vectorised pHash search for all of them.

    ``written``: the config's ``written_paths``; a benchmark ref under a path
    the config gave relative to its folder is shown that way (``portable_ref``).
    """
    ids = [coco_id_of(ex) for ex, _ in items]
    found = index.match_many([(h, cid) for (_, h), (cid, _) in zip(items, ids)])
    out = []
    for (ex, _), (_, how), matches in zip(items, ids, found):
        matches = [
            BenchmarkMatch(
                m.benchmark,
                # The id came from the file name: report it as a file-name match.
                "file_name" if how == "file_name" and m.kind == "coco_id" else m.kind,
                ex.image.file_name if how == "file_name" and m.kind == "coco_id" else m.value,
                m.distance,
                portable_ref(m.ref, written or {}),
            )
            for m in matches
        ]
        out.append(matches)
    return out


def portable_ref(ref: str, written: dict[str, str]) -> str:
    """A benchmark ref (a path, ``path#member`` or ``coco:<id>``) as the config wrote its path.

    Refs under a benchmark path the config gave relative to its folder come
    out relative to that folder (``orsgen preview --matches --inputs-root``
    resolves them), so the output holds no path of the machine that built it.
    """
    from orsgen.schemas.config.base import display_path

    if not ref or not written or ref.startswith("coco:"):
        return ref
    path, sep, member = ref.partition("#")
    return display_path(path, written) + sep + member


def overlap_reject(
    ex: ImageExample, matches: Sequence[BenchmarkMatch], cfg: DecontaminateConfig, train_splits: Collection[str]
) -> Reject | None:
    """The ``benchmark_overlap`` reject of a matched example in its split, or None to keep it.

    A match in a training split is always rejected; in a held-out split only
    when ``keep_in_heldout`` is false.
    """
    if not matches:
        return None
    if ex.split not in train_splits and cfg.keep_in_heldout:
        return None
    what = "; ".join(m.describe() for m in matches[:4]) + (f"; and {len(matches) - 4} more" if len(matches) > 4 else "")
    return Reject(
        source_key=ex.key,
        stage=STAGE,
        reason=BENCHMARK_OVERLAP,
        message=(
            f"image {ex.image.image_id} (split {ex.split!r}) is a copy of a benchmark image: {what}. "
            "It is left out so that no evaluation image is trained on"
            + ("." if ex.split in train_splits else " (set decontaminate.keep_in_heldout: true to keep it in held-out splits).")
        ),
        level=RejectLevel.IMAGE,
        image_id=ex.image.image_id,
    )
