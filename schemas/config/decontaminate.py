"""Config of the decontamination stage: benchmark sources and near-duplicate groups."""

from __future__ import annotations

from typing import Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field, model_validator

#: The RefCOCO-family splits that are evaluation sets (RefCOCO/+ testA/testB,
#: RefCOCOg umd test, gRefCOCO testA/testB): protected when ``splits`` is empty.
DEFAULT_REF_SPLITS = ("val", "testA", "testB", "test")


class BenchmarkSource(ConfigModel):
    """One benchmark whose images must not reach a training split.

    Types and what ``path`` is:

    * ``refs``: a RefCOCO-family refs file (``refs(unc).p`` pickle or JSON,
      gRefCOCO ``grefs(unc).json``); the images of the refs in ``splits`` are
      protected by COCO id. With ``instances`` (the COCO instances file) their
      file names are known too, and with ``images`` (the image folder) their
      bytes are hashed (sha256 and perceptual hash).
    * ``coco``: a COCO-format JSON (``images`` with ``id`` and ``file_name``);
      every image is protected by COCO id, and hashed when ``images`` is given.
    * ``orsgen``: an earlier orsgen output folder; the images of its
      ``splits`` (default: every split but ``splits.train_splits``) are
      protected by sha256 and perceptual hash (and COCO id where they have one).
    * ``images``: an image folder (``*.jpg``, ``*.jpeg``, ``*.png``, ``*.webp``,
      searched recursively), hashed.
    * ``hashes``: a text file, one identity a line: ``sha256:<64 hex>``,
      ``phash:<64 hex>`` (a 256-bit pHash as orsgen computes it), or a bare
      64-hex sha256; ``#`` starts a comment.

    Attributes:
        name: the benchmark's name, used in reject messages and reports.
        type: the kind of source (above).
        path: the file or folder (local path or fsspec URL).
        images: image folder of a ``refs`` or ``coco`` source (optional).
        instances: COCO instances file of a ``refs`` source (optional).
        splits: ``refs``: the ref splits to protect (default val, testA,
            testB, test); ``orsgen``: the output splits to protect.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=100)
    type: Literal["refs", "coco", "orsgen", "images", "hashes"]
    path: str = Field(min_length=1)
    images: str | None = None
    instances: str | None = None
    splits: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fields_fit_type(self) -> "BenchmarkSource":
        if self.images is not None and self.type not in ("refs", "coco"):
            raise ValueError(f"benchmark {self.name!r}: images is only for refs and coco sources; a {self.type} source reads its images from path.")
        if self.instances is not None and self.type != "refs":
            raise ValueError(f"benchmark {self.name!r}: instances is only for refs sources.")
        if self.splits and self.type not in ("refs", "orsgen"):
            raise ValueError(f"benchmark {self.name!r}: splits is only for refs and orsgen sources.")
        return self


class DecontaminateConfig(ConfigModel):
    """Benchmark decontamination and near-duplicate groups (off by default).

    Every image is hashed once (sha256 of the bytes, a 256-bit pHash of the
    image and of ``crop_frac`` crops of each side) and matched against an index
    of the benchmarks' identities: COCO ids, COCO file names, sha256 and pHash
    within ``max_distance`` bits. A match in a training split becomes an
    image-level reject ``benchmark_overlap``.

    Attributes:
        sources: the benchmarks to protect.
        index: a file holding the index (Parquet). When it exists and was built
            from the same sources (or ``sources`` is empty) it is read instead
            of reading the sources again; when it is missing it is built from
            ``sources`` and written there, once.
        max_distance: largest Hamming distance, in bits of the 256-bit pHash,
            that counts as a copy (31 is the matcher's exact radius for 16
            chunks of 16 bits; see the README for the measured recall and
            false-positive rate).
        crop_frac: the benchmark index also stores the pHash of the image with
            this fraction cut off each side (left, right, top, bottom), so that
            copies cropped on one side still match.
        keep_in_heldout: matched images in a held-out split (any split not in
            ``splits.train_splits``) are kept instead of rejected.
        near_duplicates: group images of this build whose pHashes lie within
            ``max_distance`` (crops included) and give each group one split,
            so that no near-duplicate pair straddles train and a held-out split.
    """

    sources: list[BenchmarkSource] = Field(default_factory=list)
    index: str | None = None
    max_distance: int = Field(default=31, ge=0, le=63)
    crop_frac: float = Field(default=0.04, ge=0.0, le=0.2)
    keep_in_heldout: bool = False
    near_duplicates: bool = False

    @model_validator(mode="after")
    def _unique_names(self) -> "DecontaminateConfig":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"benchmark names must be unique; {dupes} appear more than once.")
        return self

    @property
    def matching(self) -> bool:
        """Whether images are matched against a benchmark index."""
        return bool(self.sources) or self.index is not None

    @property
    def active(self) -> bool:
        """Whether the stage runs at all (benchmarks or near-duplicate groups)."""
        return self.matching or self.near_duplicates
