"""Config of the splits stage."""

from __future__ import annotations

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field, model_validator


class OodRule(ConfigModel):
    """An out-of-distribution holdout (ORS-Bench style): matching images go to ``name``.

    An image matches when it holds an instance (crowd included) of one of
    ``categories``, or a sample whose union target mask covers a fraction of
    the image inside ``[min_area_frac, max_area_frac]`` (either bound may be
    left out). Splits stay image-disjoint, so the whole image moves.

    Attributes:
        name: the split name; must start with ``ood_``.
        categories: held-out category names. They are also never used as
            ``no_target`` negatives on other images, so the words do not leak
            into training.
        min_area_frac: lower bound of the extreme target-area range.
        max_area_frac: upper bound of the extreme target-area range.
    """

    name: str = Field(pattern=r"^ood_[A-Za-z0-9_]+$")
    categories: list[str] = Field(default_factory=list)
    min_area_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_area_frac: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "OodRule":
        if not self.categories and self.min_area_frac is None and self.max_area_frac is None:
            raise ValueError(f"OOD rule {self.name!r} holds nothing out; give categories and/or min_area_frac / max_area_frac.")
        if self.min_area_frac is not None and self.max_area_frac is not None and self.min_area_frac > self.max_area_frac:
            raise ValueError(
                f"OOD rule {self.name!r}: min_area_frac ({self.min_area_frac}) is above max_area_frac ({self.max_area_frac})."
            )
        return self


class SplitConfig(ConfigModel):
    """Split assignment.

    Attributes:
        ratios: split name -> fraction; assigned by a salted hash of image_id.
        salt: salt of that hash; change it to draw a different partition.
        keep_source_splits: keep a source's own split (RefCOCO train/val/...).
        ood: out-of-distribution holdouts, checked in order before everything
            else (source splits included, so held-out categories never leak
            into a source's train split); the first match wins.
        train_splits: the splits used for training. When one image arrives
            through several inputs whose splits disagree (RefCOCO unc and
            RefCOCOg umd share COCO images), the image goes to the evaluation
            (or ``ood_*``) split and its training copies are rejected as
            ``split_conflict``: evaluation images are never trained on.
    """

    ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    salt: str = "orsgen"
    keep_source_splits: bool = True
    ood: list[OodRule] = Field(default_factory=list)
    train_splits: list[str] = Field(default_factory=lambda: ["train"])

    @model_validator(mode="after")
    def _check_ood(self) -> "SplitConfig":
        names = [r.name for r in self.ood]
        dupes = sorted({n for n in names if names.count(n) > 1 or n in self.ratios})
        if dupes:
            raise ValueError(f"OOD split names must be unique and differ from the ratios' splits; {dupes} repeat.")
        return self

    @model_validator(mode="after")
    def _check_ratios(self) -> "SplitConfig":
        total = sum(self.ratios.values())
        if not self.ratios or any(v < 0 for v in self.ratios.values()) or abs(total - 1.0) > 1e-6:
            raise ValueError(f"ratios must be non-negative and sum to 1, got {self.ratios} (sum {total:.6g}).")
        for name in self.ratios:
            # Hugging Face `datasets` accepts split names matching \w+ only.
            if not (name.isascii() and name.replace("_", "").isalnum()):
                raise ValueError(f"split name {name!r} must use only letters, digits and '_' (a Hugging Face split name).")
        return self
