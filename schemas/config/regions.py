"""Config of the regions stage."""

from __future__ import annotations

from typing import Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field, model_validator


class RegionConfig(ConfigModel):
    """Region selection thresholds (SAM's names where SAM has one).

    Attributes:
        min_area_frac: drop regions smaller than this fraction of the image.
        max_area_frac: drop regions larger than this fraction of the image.
        min_area_px: drop regions smaller than this many pixels.
        pred_iou_thresh: drop regions whose ``predicted_iou`` is below this
            (regions without the score pass).
        stability_score_thresh: same for ``stability_score``.
        drop_border_touching: drop regions whose box touches the image border.
        border_margin_px: how close to the border counts as touching.
        mask_nms_thresh: of two regions with mask IoU above this, keep the one
            that ranks higher (score, then area); 1.0 disables.
        max_regions_per_image: keep at most this many regions, best first.
        nms_annotated: also run NMS on human-annotated sources (COCO), where
            overlapping instances are usually real.
        drop_crowd: drop ``iscrowd`` instances (False keeps them so that
            category samples can know a category's extent is unknowable).
        apply_to: input types whose regions are selected. RefCOCO-family
            inputs are left out by default: their human sentences point at
            specific annotations that must not disappear.
    """

    min_area_frac: float = Field(default=0.0005, ge=0.0, le=1.0)
    max_area_frac: float = Field(default=0.95, ge=0.0, le=1.0)
    min_area_px: int = Field(default=16, ge=0)
    pred_iou_thresh: float = Field(default=0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(default=0.92, ge=0.0, le=1.0)
    drop_border_touching: bool = False
    border_margin_px: int = Field(default=1, ge=0)
    mask_nms_thresh: float = Field(default=0.8, gt=0.0, le=1.0)
    max_regions_per_image: int = Field(default=64, ge=1)
    nms_annotated: bool = False
    drop_crowd: bool = False
    apply_to: list[Literal["sa1b", "coco", "refcoco", "grefcoco"]] = Field(default_factory=lambda: ["sa1b", "coco"])

    @model_validator(mode="after")
    def _check_range(self) -> "RegionConfig":
        if self.min_area_frac > self.max_area_frac:
            raise ValueError(
                f"min_area_frac ({self.min_area_frac}) is above max_area_frac ({self.max_area_frac}); "
                "lower min_area_frac or raise max_area_frac."
            )
        return self
