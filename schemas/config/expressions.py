"""Config of the expressions stage."""

from __future__ import annotations

from typing import Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field


class ExpressionKinds(ConfigModel):
    """Which annotation-derived expression kinds the ``expressions`` stage writes."""

    category_single: bool = True
    category_multi: bool = True
    phrase: bool = True
    description: bool = True
    no_target: bool = True


class ExpressionCaps(ConfigModel):
    """Most samples of each kind per image (after deduplication)."""

    category_single: int = Field(default=4, ge=0)
    category_multi: int = Field(default=4, ge=0)
    phrase: int = Field(default=6, ge=0)
    description: int = Field(default=8, ge=0)
    no_target: int = Field(default=4, ge=0)


class ExpressionConfig(ConfigModel):
    """Referring expressions from annotations (categories, templates, negatives).

    Attributes:
        enabled: run the stage at all.
        apply_to: input types whose images get expressions (they need
            category annotations; SA-1B regions have none).
        templates: templates YAML (local path or fsspec URL; relative paths
            are resolved against the config file); None uses the bundled
            ``configs/templates/expressions.yaml``.
        kinds: per-kind switches.
        families: descriptive template families to use.
        max_per_image: most samples per image, all kinds together.
        max_per_kind: most samples per kind per image.
        max_per_target: most phrase + description samples per target set.
        margin_px: smallest position margin in pixels: a condition must hold
            by more than the margin, and rivals must fail it by more than the
            margin, or nothing is emitted (near-ties never become data).
        margin_frac: position margin as a fraction of ``min(width, height)``;
            the larger of the two applies.
        size_margin: "largest" needs a visible area this fraction above every
            other instance's (0.25 = 25% larger); "smallest" mirrors it.
        next_to_max_gap_frac: boxes at most this far apart (fraction of
            ``min(width, height)``) are ``next_to``.
        relation_max_axis_overlap: directional relations (left of, above...)
            need the two boxes separated along the relation's axis: their
            overlap on that axis, as a fraction of the smaller box's extent
            there, must stay under this (0.1: at most 10% overlap).
        vocabulary: the word-coverage file (short names and synonyms -> the
            categories they cover; local path or fsspec URL); None uses the
            bundled ``configs/vocabulary/coverage.yaml``. Negatives never name a word
            that covers a present category.
        max_instances_per_category: categories with more instances than this
            get no descriptive samples (crowded scenes defeat short descriptions).
        crowd_policy: ``skip``: a category with a crowd annotation gets no
            category or descriptive samples (its extent is unknowable);
            ``non_crowd``: category samples target its non-crowd instances.
            Descriptions never target or anchor on a crowd category.
        negative_ratio: expected ``no_target`` samples per positive sample
            (stochastic rounding seeded by image id and ``seed``).
        hard_negatives: draw negatives from the supercategories present in
            the image first (a dog-free image with a cat gets "dog").
    """

    enabled: bool = True
    apply_to: list[Literal["coco", "refcoco", "grefcoco"]] = Field(default_factory=lambda: ["coco"])
    templates: str | None = None
    kinds: ExpressionKinds = ExpressionKinds()
    families: list[Literal["absolute", "ordinal", "size", "relation"]] = Field(
        default_factory=lambda: ["absolute", "ordinal", "size", "relation"]
    )
    max_per_image: int = Field(default=24, ge=0)
    max_per_kind: ExpressionCaps = ExpressionCaps()
    max_per_target: int = Field(default=3, ge=1)
    margin_px: float = Field(default=4.0, ge=0.0)
    margin_frac: float = Field(default=0.03, ge=0.0, le=0.5)
    size_margin: float = Field(default=0.25, ge=0.0)
    next_to_max_gap_frac: float = Field(default=0.05, ge=0.0, le=1.0)
    relation_max_axis_overlap: float = Field(default=0.1, ge=0.0, le=1.0)
    vocabulary: str | None = None
    max_instances_per_category: int = Field(default=10, ge=1)
    crowd_policy: Literal["skip", "non_crowd"] = "skip"
    negative_ratio: float = Field(default=0.25, ge=0.0)
    hard_negatives: bool = True
