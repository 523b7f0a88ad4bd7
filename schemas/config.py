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
        max_images: read at most this many images (None: all).
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
    """gRefCOCO ``grefs(unc)`` as ``.p`` or ``.json``: multi-target and no-target refs.

    Attributes:
        name: unique name of this input.
        refs: path of ``grefs(unc).json`` or the ``.p`` pickle (read with a
            restricted unpickler); ``ann_id`` is a list, ``[-1]`` means no target.
        instances: the COCO ``instances.json`` the refs point into.
        images: folder or URL prefix of the COCO train2014 images.
        dataset: dataset tag stored on refs.
        splits: keep only refs of these source splits (None: all).
        max_images: read at most this many images (None: all).
    """

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


class OodRule(_Model):
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


class SplitConfig(_Model):
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


class ExpressionKinds(_Model):
    """Which annotation-derived expression kinds the ``expressions`` stage writes."""

    category_single: bool = True
    category_multi: bool = True
    phrase: bool = True
    description: bool = True
    no_target: bool = True


class ExpressionCaps(_Model):
    """Most samples of each kind per image (after deduplication)."""

    category_single: int = Field(default=4, ge=0)
    category_multi: int = Field(default=4, ge=0)
    phrase: int = Field(default=6, ge=0)
    description: int = Field(default=8, ge=0)
    no_target: int = Field(default=4, ge=0)


class ExpressionConfig(_Model):
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
    max_instances_per_category: int = Field(default=10, ge=1)
    crowd_policy: Literal["skip", "non_crowd"] = "skip"
    negative_ratio: float = Field(default=0.25, ge=0.0)
    hard_negatives: bool = True


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
    num_buckets: int = Field(default=4, ge=1, le=99_999)
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
            A verdict is positive when the category is correct, the coverage
            complete and at most ``verify_max_missed`` instances are missed.
        verify_max_missed: missed instances the verifier may report for a
            label to be kept (0: a category sample must name every instance).
    """

    iof_thresh: float = Field(default=0.8, gt=0.0, le=1.0)
    min_box_iou: float = Field(default=0.5, ge=0.0, le=1.0)
    min_coverage: float = Field(default=0.2, ge=0.0, le=1.0)
    fallback: list[Literal["best_region", "box"]] = Field(default_factory=lambda: ["best_region", "box"])
    fallback_min_iou: float = Field(default=0.5, ge=0.0, le=1.0)
    max_boxes_per_image: int = Field(default=64, ge=1)
    verify: bool = True
    verify_max_missed: int = Field(default=0, ge=0)


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
        max_tokens: most tokens per answer. Grounding lists need the most:
            about 25 tokens per box, so 64 boxes take ~1600; a list cut off by
            the limit keeps only its complete entries.
        temperature: 0 is greedy.
        top_p: nucleus mass.
        seed: sampling seed, where the server honours it.
    """

    max_tokens: int = Field(default=2048, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0


class CaptionBackendConfig(_Model):
    """The VLM backend of the caption stages (``stages/caption/backends.py``).

    Attributes:
        backend: ``openai`` (any OpenAI-compatible server: vLLM, SGLang,
            ``transformers serve``), ``managed`` (orsgen starts
            ``server_command`` on each worker) or ``transformers`` (in-process).
        model: served model name (``openai`` / ``managed``; vLLM serves the
            path or hub id it was given unless ``--served-model-name``) or a
            local path / hub id (``transformers``).
        base_url: ``openai``: server URL, e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: NAME of the environment variable holding the API key
            (the key itself never goes in a config); None: no key.
        server_command: ``managed``: argv with ``{model}``, ``{host}``,
            ``{port}`` placeholders, e.g. ``[/opt/vllm-venv/bin/vllm, serve,
            "{model}", --host, "{host}", --port, "{port}"]``.
        server_env: ``managed``: extra environment of the server.
        server_host: ``managed``: interface the server binds.
        server_port: ``managed``: port (0: a free one).
        server_startup_timeout_s: ``managed``: wait for ``/v1/models`` this long.
        server_max_restarts: ``managed``: restarts after the server dies.
        max_in_flight: most concurrent requests per client: one client per Beam
            SDK process and round for ``openai``, one per worker when shared.
        timeout_s: per-request timeout.
        max_retries: resends after 429, 5xx, timeouts and dropped connections.
        backoff_initial_s: first backoff, doubled per retry (with jitter).
        backoff_max_s: backoff cap.
        max_image_side_px: images are resized to at most this longest side
            before sending (part of the cache key; box conversion uses it).
        response_format: ``auto`` sends each prompt's JSON schema as
            ``response_format`` and stops when a server rejects it;
            ``json_schema`` always; ``none`` never.
        extra_body: extra fields of every request, e.g. ``{top_k: 20}`` or
            ``{chat_template_kwargs: {enable_thinking: false}}``.
        send_seed: send the sampling seed.
        box_convention: how the model writes boxes: ``absolute`` (Qwen2.5-VL,
            pixels of the resized input) or ``relative_1000`` (Qwen3-VL).
        image_factor_px: the processor's resize factor (28 Qwen2.5-VL, 32 Qwen3-VL).
        image_min_pixels: the processor's ``min_pixels``.
        image_max_pixels: the processor's ``max_pixels`` (as the server runs it).
        device: ``transformers``: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``transformers``: ``auto`` (bfloat16 on CUDA, float32 on CPU) or a dtype.
        batch_size: ``transformers``: requests per ``generate`` call.
        min_batch_size: Beam ``RunInference`` batching (``batch_elements_kwargs``).
        max_batch_size: same; for HTTP backends keep it near ``max_in_flight``
            so one bundle fills the concurrency budget.
        share_model_across_processes: one captioner (one managed server, one
            model copy) per worker machine instead of per process; None: on for
            ``managed`` and ``transformers``, off for ``openai``.
        cache: keep a response cache under ``OUT/_cache/vlm`` (or ``cache_dir``).
        cache_dir: where the cache lives (None: under the output directory).
    """

    backend: Literal["openai", "managed", "transformers"] = "openai"
    model: str = ""
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    server_command: list[str] = Field(default_factory=list)
    server_env: dict[str, str] = Field(default_factory=dict)
    server_host: str = "127.0.0.1"
    server_port: int = Field(default=0, ge=0, le=65535)
    server_startup_timeout_s: float = Field(default=900.0, gt=0)
    server_max_restarts: int = Field(default=3, ge=0)
    max_in_flight: int = Field(default=64, ge=1, le=4096)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    max_image_side_px: int = Field(default=1024, ge=32)
    response_format: Literal["auto", "json_schema", "none"] = "auto"
    extra_body: dict[str, Any] = Field(default_factory=dict)
    send_seed: bool = True
    box_convention: Literal["absolute", "relative_1000"] = "absolute"
    image_factor_px: int = Field(default=28, ge=1)
    image_min_pixels: int = Field(default=3136, ge=1)
    image_max_pixels: int = Field(default=12_845_056, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    batch_size: int = Field(default=8, ge=1)
    min_batch_size: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=64, ge=1)
    share_model_across_processes: bool | None = None
    cache: bool = True
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check_backend(self) -> "CaptionBackendConfig":
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1.")
        if self.backend == "managed" and not self.server_command:
            raise ValueError(
                "backend 'managed' needs server_command, e.g. [vllm, serve, '{model}', --host, '{host}', --port, '{port}']."
            )
        if self.backend == "managed" and not any("{port}" in a for a in self.server_command) and self.server_port == 0:
            raise ValueError("server_command has no '{port}' placeholder; add one or set server_port to the port it listens on.")
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(f"min_batch_size ({self.min_batch_size}) is above max_batch_size ({self.max_batch_size}).")
        if "stop" in self.extra_body:
            raise ValueError("extra_body must not set 'stop': transformers serve answers HTTP 500 to it for VLMs, and the prompts ask for JSON instead.")
        return self

    @property
    def shares_model(self) -> bool:
        """Whether one captioner serves all processes of a worker."""
        if self.share_model_across_processes is not None:
            return self.share_model_across_processes
        return self.backend in ("managed", "transformers")


class CaptionConfig(_Model):
    """VLM captioning: SA1B-CoRS category samples and SA1B-DeRS descriptions.

    Off by default: it needs a VLM (a vLLM / OpenAI-compatible server, a
    managed server, or an in-process transformers model).

    Attributes:
        enabled: run the caption stage (after region selection, before splits).
        apply_to: input types whose images are captioned.
        paths: ``cors`` (category-oriented: grounding, IoF merging,
            verification) and / or ``ders`` (descriptive: overlay, description,
            re-grounding).
        backend: the VLM backend (server URL, model, box convention, retries,
            cache).
        prompts: a prompt template file or folder (None: the bundled
            ``configs/prompts/``); relative paths are resolved against the
            config file's folder.
        sampling: generation parameters of every request.
        cors: CoRS thresholds.
        ders: DeRS thresholds.
        overlay: how targets are highlighted for the VLM.
    """

    enabled: bool = False
    apply_to: list[Literal["sa1b", "coco"]] = Field(default_factory=lambda: ["sa1b"], min_length=1)
    paths: list[Literal["cors", "ders"]] = Field(default_factory=lambda: ["cors", "ders"], min_length=1)
    backend: CaptionBackendConfig = CaptionBackendConfig()
    prompts: str | None = None
    sampling: CaptionSamplingConfig = CaptionSamplingConfig()
    cors: CorsConfig = CorsConfig()
    ders: DersConfig = DersConfig()
    overlay: OverlayConfig = OverlayConfig()

    @model_validator(mode="after")
    def _check_enabled(self) -> "CaptionConfig":
        if self.enabled and not self.backend.model:
            raise ValueError(
                "caption is enabled but caption.backend.model is empty; set the served model name "
                "(e.g. Qwen/Qwen2.5-VL-72B-Instruct) or a local path for backend 'transformers'."
            )
        return self


class Sam2FilterConfig(_Model):
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


class Sam2CleanConfig(_Model):
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


class Sam2ReportConfig(_Model):
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


class VerifySam2Config(_Model):
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
            between worker processes (Beam's ``large_model``); for big models
            on multi-process workers.
        model_copies: with sharing, how many copies to load per machine.
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
    share_model_across_processes: bool = False
    model_copies: int | None = Field(default=None, ge=1)
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
        verify_sam2: SAM2 consistency filter and mask cleaner (off by default).
        expressions: referring expressions from annotations (categories,
            templates, no-target negatives).
        caption: VLM captioning, SA1B-CoRS and SA1B-DeRS (off by default).
    """

    name: str = "orsgen-dataset"
    seed: int = 0
    inputs: list[InputConfig] = Field(min_length=1)
    image: ImageConfig = ImageConfig()
    regions: RegionConfig = RegionConfig()
    splits: SplitConfig = SplitConfig()
    write: WriteConfig = WriteConfig()
    verify_sam2: VerifySam2Config = VerifySam2Config()
    expressions: ExpressionConfig = ExpressionConfig()
    caption: CaptionConfig = CaptionConfig()

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
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML config such as configs/sa1b.yaml (or run `orsgen demo`).")
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
    cap = data.get("caption")
    if isinstance(cap, dict) and isinstance(cap.get("prompts"), str):
        t = cap["prompts"]
        if not _is_url(t) and not Path(t).is_absolute():
            cap["prompts"] = str((base / t).resolve())
    expr = data.get("expressions")
    if isinstance(expr, dict) and isinstance(expr.get("templates"), str):
        t = expr["templates"]
        if not _is_url(t) and not Path(t).is_absolute():
            expr["templates"] = str((base / t).resolve())
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


#: Flags whose value is a secret (vLLM / SGLang ``--api-key``, hub tokens).
SECRET_FLAGS = ("--api-key", "--api_key", "--token", "--hf-token", "--hf_token")
REDACTED = "***"


def redact_argv(argv: list[str] | tuple[str, ...]) -> list[str]:
    """A command line safe to log or publish: values of secret flags become ``***``.

    Handles ``--api-key KEY`` and ``--api-key=KEY``. Prefer passing keys
    through the environment (e.g. ``VLLM_API_KEY``, inherited by the server).
    """
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _value = a.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(a)
                hide_next = True
            continue
        out.append(a)
    return out


def redacted_config(cfg: "OrsgenConfig") -> dict[str, Any]:
    """The resolved config as JSON values, with secret values masked.

    This is what the manifest (and so a published dataset card) records:
    ``caption.backend.server_env`` values and the values of secret flags in
    ``server_command`` become ``***``. Environment variable NAMES (such as
    ``api_key_env``) are kept; they are not secrets. The config sha256 is
    still computed on the full config, which does not reveal the values.
    """
    data = cfg.model_dump(mode="json")
    backend = (data.get("caption") or {}).get("backend") or {}
    if backend.get("server_env"):
        backend["server_env"] = {k: REDACTED for k in backend["server_env"]}
    if backend.get("server_command"):
        backend["server_command"] = redact_argv(backend["server_command"])
    return data
