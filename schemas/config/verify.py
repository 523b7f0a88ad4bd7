"""Config of the verify stage (SAM2 filter and mask cleaner)."""

from __future__ import annotations

from typing import Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field, model_validator


class Sam2FilterConfig(ConfigModel):
    """SAM2 consistency filter (Seg-Zero style).

    Every target of every sample is re-predicted by SAM2 from its box and two
    interior points; the sample is kept when each target's mask IoU with the
    prediction is at least ``iou_thresh``, and rejected ``sam2_inconsistent``
    otherwise. The per-target IoUs are stored in ``Sample.sam2_ious``.

    Attributes:
        enabled: run the filter.
        iou_thresh: minimum IoU of every target with SAM2's prediction.
        multimask_output: ask SAM2 for three masks and take the one with the
            highest predicted IoU; False (SAM's advice for box + points, which
            are unambiguous) takes its single-mask output.
        kinds: sample kinds to verify (None: every kind); ``no_target``
            samples have no mask and always pass.
    """

    enabled: bool = False
    iou_thresh: float = Field(default=0.6, ge=0.0, le=1.0)
    multimask_output: bool = False
    kinds: (
        list[Literal["category_single", "category_multi", "phrase", "description", "human", "no_target"]] | None
    ) = None


class Sam2CleanConfig(ConfigModel):
    """RefCOCO-M-style mask cleaning of polygon annotations.

    Each instance whose ``mask_origin`` is listed is re-segmented by SAM2 from
    its box and two interior points. The refined mask replaces the original
    when its IoU with the original lies inside ``iou_band`` and SAM2's own
    predicted IoU is at least ``pred_iou_thresh``; otherwise ``on_reject``
    decides.

    Attributes:
        enabled: run the cleaner.
        mask_origins: instances with these ``mask_origin`` values are cleaned
            (COCO / RefCOCO polygons by default).
        scope: ``all`` cleans every such instance; ``referred`` only those
            that a sample refers to (RefCOCO-M re-segmented referred instances
            only, which also saves the decoder work on the rest).
        multimask_output: ask for three masks and keep the one with the
            highest predicted IoU.
        iou_band: ``[min, max]`` IoU of the refined mask with the original for
            the refinement to be accepted; below ``min`` SAM2 most likely
            segmented something else.
        pred_iou_thresh: minimum SAM2 predicted IoU of the refined mask.
        on_reject: what happens to an instance whose refinement is not
            accepted: ``keep`` the original, ``flag`` it (kept; samples that
            refer to it get ``metadata.sam2.flagged``), or ``drop`` it (an
            instance reject ``sam2_unrecoverable_mask``; samples and refs that
            refer to it are rejected ``sam2_target_dropped``).
    """

    enabled: bool = False
    mask_origins: list[str] = Field(default_factory=lambda: ["polygon"], min_length=1)
    scope: Literal["all", "referred"] = "all"
    multimask_output: bool = True
    iou_band: tuple[float, float] = (0.7, 1.0)
    pred_iou_thresh: float = Field(default=0.85, ge=0.0, le=1.0)
    on_reject: Literal["keep", "flag", "drop"] = "flag"

    @model_validator(mode="after")
    def _check_band(self) -> "Sam2CleanConfig":
        lo, hi = self.iou_band
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"iou_band must be [min, max] with 0 <= min <= max <= 1, got {list(self.iou_band)}.")
        return self


class Sam2ReportConfig(ConfigModel):
    """The verification report under ``<out>/reports/verify_sam2/``.

    Attributes:
        enabled: write ``report.json``, ``iou_histogram.png`` and the
            worst-case preview sheets.
        worst_cases: how many of the lowest-IoU instances each sheet shows.
        histogram_bins: bins of the IoU histograms over [0, 1].
        tile_px: side of one preview tile in pixels.
    """

    enabled: bool = True
    worst_cases: int = Field(default=24, ge=0, le=1000)
    histogram_bins: int = Field(default=20, ge=2, le=1000)
    tile_px: int = Field(default=192, ge=64, le=1024)


class VerifySam2Config(ConfigModel):
    """SAM2 consistency filter and mask cleaner (off by default).

    The image encoder runs once per image; every prompt of the image (box and
    two interior points per instance) goes through the mask decoder in
    batches of ``prompts_per_batch``.

    Attributes:
        model: a local folder or hub id of a transformers SAM2 checkpoint
            (``facebook/sam2.1-hiera-large``, ...); for ``backend: meta`` a hub
            id or a local ``.pt`` checkpoint (then ``meta_model_cfg`` too).
        backend: ``transformers`` (``Sam2Model``) or ``meta`` (Meta's ``sam2``
            package, ``SAM2ImagePredictor``).
        meta_model_cfg: Meta's Hydra config name for a local checkpoint, e.g.
            ``configs/sam2.1/sam2.1_hiera_l.yaml``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``.
        dtype: ``auto`` is bfloat16 on CUDA and float32 on CPU.
        images_per_batch: images per encoder batch (one RunInference batch).
        prompts_per_batch: prompts per mask-decoder call.
        mask_threshold: logit threshold that binarises SAM2's masks.
        share_model_across_processes: load one model per machine and share it
            between worker processes (Beam's ``large_model``). On by default:
            Dataflow runs one SDK process per vCPU, and each would otherwise
            load its own copy onto the machine's one GPU (8 on a g2-standard-8).
        model_copies: with sharing, how many copies to load per machine.
        cache: keep every image's SAM2 predictions under ``OUT/_cache/sam2``
            (or ``cache_dir``), so that a rerun into the same output sends no
            image through SAM2 whose predictions are known
            (``stages/verify/cache.py``).
        cache_dir: where the cache lives (None: under the output directory);
            a folder or an fsspec URL that every worker can read and write.
        apply_to: input types whose images are verified.
        filter: the consistency filter.
        clean: the mask cleaner.
        report: the report.
    """

    model: str = "facebook/sam2.1-hiera-large"
    backend: Literal["transformers", "meta"] = "transformers"
    meta_model_cfg: str | None = None
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    images_per_batch: int = Field(default=4, ge=1, le=1024)
    prompts_per_batch: int = Field(default=64, ge=1, le=4096)
    mask_threshold: float = 0.0
    share_model_across_processes: bool = True
    model_copies: int | None = Field(default=None, ge=1)
    # Where work is remembered, not what the dataset holds: excluded from
    # model_dump (config sha256, manifest), so turning the cache off or moving
    # it never stops a rerun from resuming.
    cache: bool = Field(default=True, exclude=True)
    cache_dir: str | None = Field(default=None, min_length=1, exclude=True)
    apply_to: list[Literal["sa1b", "coco", "refcoco", "grefcoco"]] = Field(
        default_factory=lambda: ["sa1b", "coco", "refcoco", "grefcoco"]
    )
    filter: Sam2FilterConfig = Sam2FilterConfig()
    clean: Sam2CleanConfig = Sam2CleanConfig()
    report: Sam2ReportConfig = Sam2ReportConfig()

    @property
    def active(self) -> bool:
        """Whether any SAM2 work is switched on."""
        return self.filter.enabled or self.clean.enabled
