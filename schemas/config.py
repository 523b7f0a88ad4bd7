"""Config models: YAML validated by pydantic, one model per stage under one root.

Load with ``load_config(path, overrides)``. A validation error is raised as
``ConfigError`` whose message names every bad key with its value, e.g.
``regions.min_area_frac = -1: Input should be greater than or equal to 0``.
Beam runner flags are not part of this config; they stay Beam's own
``PipelineOptions``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """The config is invalid; the message names the key, the value and the fix."""


class _Model(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sa1bInput(_Model):
    """SA-1B tar shards (``sa_000000.tar`` with ``sa_<id>.jpg`` + ``sa_<id>.json``).

    Attributes:
        name: unique name of this input; prefixes output keys.
        shards: fsspec URLs or globs of tar shards (local, gs://, s3://, hf://).
        max_images: stop after this many images per shard (None: all).
    """

    type: Literal["sa1b"] = "sa1b"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    shards: list[str] = Field(min_length=1)
    max_images: int | None = Field(default=None, ge=1)


class CocoInput(_Model):
    """COCO instances JSON plus an image folder or URL prefix.

    Attributes:
        name: unique name of this input.
        annotations: path or URL of ``instances_*.json``.
        images: folder or URL prefix that ``file_name`` is joined to.
        max_images: read at most this many images (None: all).
    """

    type: Literal["coco"] = "coco"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    annotations: str
    images: str
    max_images: int | None = Field(default=None, ge=1)


class RefcocoInput(_Model):
    """RefCOCO / RefCOCO+ / RefCOCOg ``refs(<splitBy>).p`` with its instances.

    Attributes:
        name: unique name of this input.
        refs: path of the refs pickle (read with a restricted unpickler) or a
            JSON list of the same refs.
        instances: the COCO ``instances.json`` the refs point into.
        images: folder or URL prefix of the COCO train2014 images.
        dataset: dataset tag stored on refs, e.g. ``refcoco_unc``.
        splits: keep only refs of these source splits (None: all).
    """

    type: Literal["refcoco"] = "refcoco"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    refs: str
    instances: str
    images: str
    dataset: str = "refcoco_unc"
    splits: list[str] | None = None
    max_images: int | None = Field(default=None, ge=1)


class GrefcocoInput(_Model):
    """gRefCOCO ``grefs(unc)`` as ``.p`` or ``.json``: multi-target and no-target refs."""

    type: Literal["grefcoco"] = "grefcoco"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    refs: str
    instances: str
    images: str
    dataset: str = "grefcoco_unc"
    splits: list[str] | None = None
    max_images: int | None = Field(default=None, ge=1)


InputConfig = Annotated[Sa1bInput | CocoInput | RefcocoInput | GrefcocoInput, Field(discriminator="type")]


class ImageConfig(_Model):
    """Image reading limits.

    Attributes:
        max_pixels: refuse images whose header claims more pixels than this
            (decompression-bomb guard); the image becomes a reject.
        max_bytes: refuse encoded images larger than this many bytes.
        verify: ``full`` decodes every image to catch truncated/corrupt data;
            ``header`` only parses the header (faster, catches less).
    """

    max_pixels: int = Field(default=64_000_000, ge=1)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    verify: Literal["full", "header"] = "full"


class RegionConfig(_Model):
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


class SplitConfig(_Model):
    """Split assignment.

    Attributes:
        ratios: split name -> fraction; assigned by a salted hash of image_id.
        salt: salt of that hash; change it to draw a different partition.
        keep_source_splits: keep a source's own split (RefCOCO train/val/...).
    """

    ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    salt: str = "orsgen"
    keep_source_splits: bool = True

    @model_validator(mode="after")
    def _check_ratios(self) -> "SplitConfig":
        total = sum(self.ratios.values())
        if not self.ratios or any(v < 0 for v in self.ratios.values()) or abs(total - 1.0) > 1e-6:
            raise ValueError(f"ratios must be non-negative and sum to 1, got {self.ratios} (sum {total:.6g}).")
        for name in self.ratios:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"split name {name!r} must use only letters, digits, '_' and '-'.")
        return self


class WriteConfig(_Model):
    """Shard writers.

    Attributes:
        formats: which outputs to write.
        shard_max_images: roll a shard over after this many images.
        shard_max_bytes: roll a shard over before it passes this many bytes.
        num_buckets: images are hashed into this many buckets per split; each
            bucket is written as one or more shards. More buckets spread work
            over more workers.
        parquet_row_group_max_bytes: Parquet row groups stay under this size.
        parquet_compression: Parquet codec.
    """

    formats: list[Literal["webdataset", "parquet"]] = Field(default_factory=lambda: ["webdataset", "parquet"])
    shard_max_images: int = Field(default=1000, ge=1)
    shard_max_bytes: int = Field(default=1_000_000_000, ge=1024)
    num_buckets: int = Field(default=4, ge=1, le=100_000)
    parquet_row_group_max_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    parquet_compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


class CorsConfig(_Model):
    """SA1B-CoRS: VLM boxes + labels matched to SA-1B fragments, then verified.

    Attributes:
        iof_thresh: a fragment joins a box's instance when at least this
            fraction of the fragment lies inside the box (intersection over
            fragment, IoF). IoF rather than IoU, because SA-1B splits one
            object into many parts, each with a low IoU against the box.
        min_box_iou: the merged mask's tight box must have at least this IoU
            with the VLM box, or the merge failed (fragments cover only a corner).
        min_coverage: the merged mask must fill at least this fraction of the
            VLM box's pixels, or the merge failed (a few scattered slivers).
        fallback: what to try, in order, when merging fails: ``best_region``
            takes the single region with the highest mask IoU with the box
            rectangle (at least ``fallback_min_iou``); ``box`` uses the box
            rectangle itself as the mask (``mask_origin: vlm_box``, marked in the
            sample's metadata). A box that nothing matches rejects its label's
            sample (``cors_no_match``).
        fallback_min_iou: least mask IoU of the ``best_region`` fallback.
        max_boxes_per_image: grounded boxes kept per image (whole labels are
            kept or rejected, ``cors_too_many_boxes``), a guard against
            repetition loops.
        verify: run the verification pass (one ``cors_verify`` request per
            label); a negative verdict rejects the sample (``cors_verify_failed``).
    """

    iof_thresh: float = Field(default=0.8, gt=0.0, le=1.0)
    min_box_iou: float = Field(default=0.5, ge=0.0, le=1.0)
    min_coverage: float = Field(default=0.2, ge=0.0, le=1.0)
    fallback: list[Literal["best_region", "box"]] = Field(default_factory=lambda: ["best_region", "box"])
    fallback_min_iou: float = Field(default=0.5, ge=0.0, le=1.0)
    max_boxes_per_image: int = Field(default=64, ge=1)
    verify: bool = True


class DersConfig(_Model):
    """SA1B-DeRS: one discriminative description per salient region, re-grounded.

    Attributes:
        min_area_frac: saliency gate; only regions covering at least this
            fraction of the image are described (smaller ones are counted as
            ``caption/ders_not_salient`` events, not rejected: they stay in
            the dataset, just without a description).
        max_regions_per_image: describe at most this many regions per image,
            largest first (the rest count as ``caption/ders_over_cap``).
        reground_iou_thresh: keep a description only if the box the VLM finds
            for it on the original image has at least this IoU with the target
            box (the recipe's 0.8).
        reject_ambiguous: reject a description whose re-grounding returns more
            than one distinct box (it is not discriminative).
        send_original: send the original image beside the overlay (two images
            per describe request; better descriptions, about twice the image tokens).
    """

    min_area_frac: float = Field(default=0.01, ge=0.0, le=1.0)
    max_regions_per_image: int = Field(default=8, ge=1)
    reground_iou_thresh: float = Field(default=0.8, ge=0.0, le=1.0)
    reject_ambiguous: bool = True
    send_original: bool = True


class OverlayConfig(_Model):
    """How targets are drawn for the VLM (DeRS describe, CoRS verify).

    Attributes:
        fill_rgb: fill and contour colour.
        fill_alpha: fill opacity, 0..1.
        contour_px: contour thickness in pixels.
        box_rgb: box colour.
        box_px: box line thickness in pixels.
    """

    fill_rgb: tuple[int, int, int] = (255, 0, 0)
    fill_alpha: float = Field(default=0.45, ge=0.0, le=1.0)
    contour_px: int = Field(default=2, ge=0)
    box_rgb: tuple[int, int, int] = (0, 255, 0)
    box_px: int = Field(default=2, ge=0)


class CaptionSamplingConfig(_Model):
    """Generation parameters of every caption request (part of the cache key).

    Attributes:
        max_tokens: most tokens per answer (grounding lists need the most).
        temperature: 0 is greedy.
        top_p: nucleus mass.
        seed: sampling seed, where the server honours it.
    """

    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0


class OrsgenConfig(_Model):
    """The root config of one orsgen run.

    Attributes:
        name: dataset name, used in the manifest and card.
        seed: seed of every sampling decision (combined with image ids).
        inputs: the sources to read.
        image: image reading limits.
        regions: region selection.
        splits: split assignment.
        write: shard writers.
    """

    name: str = "orsgen-dataset"
    seed: int = 0
    inputs: list[InputConfig] = Field(min_length=1)
    image: ImageConfig = ImageConfig()
    regions: RegionConfig = RegionConfig()
    splits: SplitConfig = SplitConfig()
    write: WriteConfig = WriteConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> "OrsgenConfig":
        names = [i.name for i in self.inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"input names must be unique; {dupes} appear more than once.")
        return self

    def sha256(self) -> str:
        """Hex sha256 of the resolved config (canonical JSON)."""
        data = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _format_errors(err: ValidationError, data: Any) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in {"sa1b", "coco", "refcoco", "grefcoco"}))
        value = e.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 120:
            shown = shown[:117] + "..."
        lines.append(f"  {loc or '<root>'} = {shown}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines) + "\nFix these keys in the YAML file or the --set overrides."


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"--set {dotted}: index {idx} is past the end of a list of {len(node)}.")
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt_is_index else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"--set {dotted}: index {idx} is past the end of a list of {len(node)}.")
        node[idx] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``key.sub=value`` overrides; values are parsed as YAML scalars.

    Args:
        data: the raw config mapping (modified in place and returned).
        overrides: strings such as ``regions.min_area_frac=0.01`` or
            ``inputs.0.max_images=10``.

    Returns:
        The updated mapping.

    Raises:
        ConfigError: an override is not of the form ``key=value``.
    """
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r} is not of the form key=value (e.g. regions.min_area_frac=0.01).")
        key, raw = ov.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def config_from_dict(data: dict[str, Any]) -> OrsgenConfig:
    """Validates a config mapping.

    Raises:
        ConfigError: naming every bad key and value.
    """
    try:
        return OrsgenConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, data)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> OrsgenConfig:
    """Loads and validates a YAML config file.

    Relative input paths in the file are resolved against the file's folder.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings applied before validation.

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing, not YAML, or invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML config such as configs/demo.yaml.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}.")
    data = apply_overrides(data, overrides or [])
    data = _resolve_relative_paths(data, p.parent)
    return config_from_dict(data)


_PATH_KEYS = ("shards", "annotations", "images", "refs", "instances")


def _is_url(s: str) -> bool:
    return "://" in s


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    for inp in data.get("inputs") or []:
        if not isinstance(inp, dict):
            continue
        for k in _PATH_KEYS:
            v = inp.get(k)
            if isinstance(v, str) and not _is_url(v) and not Path(v).is_absolute():
                inp[k] = str((base / v).resolve())
            elif isinstance(v, list):
                inp[k] = [
                    str((base / s).resolve()) if isinstance(s, str) and not _is_url(s) and not Path(s).is_absolute() else s
                    for s in v
                ]
    return data
