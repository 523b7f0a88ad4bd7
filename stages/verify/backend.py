"""SAM2 inference backends: one image-encoder pass per image, batched prompts.

Two backends share one interface (``Sam2Backend.predict_images``):

* ``TransformersSam2Backend`` runs transformers' ``Sam2Model`` with its
  ``Sam2Processor``. The images of a batch go through the image encoder once
  (``get_image_embeddings``); every prompt of an image then goes through the
  prompt encoder and mask decoder only (``image_embeddings=``), in chunks of
  ``prompts_per_batch``.
* ``MetaSam2Backend`` runs Meta's ``sam2`` package (``SAM2ImagePredictor``):
  ``set_image`` once per image, then batched ``predict`` calls.

A prompt is one instance's box plus its positive interior points; the answer
is SAM2's candidate masks (COCO RLE, full image size) with their predicted
IoUs. Choosing among candidates is the caller's business
(``stages.verify.sam2.choose_candidate``).

torch, transformers and Meta's ``sam2`` are imported lazily, so that importing
this module costs nothing where the ``sam2`` extra is not installed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from orsgen.stages.common.torch_device import resolve_device, resolve_dtype
from orsgen.schemas.records import ImageExample, Rle

INSTALL_HINT = "pip install 'orsgen[sam2]'"
META_INSTALL_HINT = (
    "pip install 'git+https://github.com/facebookresearch/sam2.git' "
    "(Meta's package; the PyPI project named 'sam2' is a third-party upload)"
)

# Upsampled masks are materialised in chunks of at most this many pixels
# (all candidates of all prompts of a chunk): 64 M bools, whatever the image size.
MAX_MASK_ELEMENTS = 1 << 26


# ------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class Sam2Prompt:
    """One SAM2 prompt: an instance's box and positive points.

    Attributes:
        instance_id: the instance the prompt stands for.
        box_xyxy: ``[x0, y0, x1, y1]`` in image pixels (exclusive max).
        points_xy: positive points ``(x, y)`` in image pixel coordinates
            (continuous: the centre of pixel ``(i, j)`` is ``(i + 0.5, j + 0.5)``).
        multimask_output: ask for SAM2's three candidate masks (True) or its
            single-mask output (False).
    """

    instance_id: str
    box_xyxy: tuple[float, float, float, float]
    points_xy: tuple[tuple[float, float], ...]
    multimask_output: bool


@dataclass(frozen=True, slots=True)
class Sam2Prediction:
    """SAM2's answer to one prompt.

    Attributes:
        instance_id: the prompt's instance.
        multimask_output: the prompt's mode.
        masks: candidate masks at full image size (1 or 3).
        pred_ious: SAM2's predicted IoU of each candidate, in [0, 1] for a
            trained model.
    """

    instance_id: str
    multimask_output: bool
    masks: tuple[Rle, ...]
    pred_ious: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Sam2Request:
    """One RunInference element: an image and all of its prompts.

    ``cache_key`` is the image's SAM2 cache key ("" without a cache), carried
    to the result so that the prediction is stored under it.
    """

    example: ImageExample
    prompts: tuple[Sam2Prompt, ...]
    cache_key: str = ""


@dataclass(frozen=True, slots=True)
class Sam2Result:
    """One RunInference output: the image, its prompts and one prediction per prompt."""

    example: ImageExample
    prompts: tuple[Sam2Prompt, ...]
    predictions: tuple[Sam2Prediction, ...]
    cache_key: str = ""


class Sam2Backend(Protocol):
    """What the Beam model handler needs from a backend.

    Only methods (no attributes) are used, so that a backend also works behind
    Beam's multi-process model sharing, which proxies method calls.
    """

    def predict_images(self, items: Sequence[tuple[bytes, Sequence[Sam2Prompt]]]) -> list[list[Sam2Prediction]]:
        """Predicts every prompt of every ``(image bytes, prompts)`` item."""
        ...

    def describe(self) -> dict[str, str]:
        """Backend, model, device and dtype, for provenance."""
        ...


# ------------------------------------------------------------------ helpers


def decode_rgb(image_bytes: bytes) -> np.ndarray:
    """Decodes encoded image bytes to an ``(h, w, 3)`` uint8 RGB array.

    The image was size-checked and fully decoded once at ingest; EXIF
    orientation is not applied, as COCO / SA-1B annotations refer to the
    stored pixel grid.
    """
    with Image.open(io.BytesIO(image_bytes)) as im:
        # A writable copy: torch warns on (and must not write into) read-only arrays.
        return np.array(im.convert("RGB"))


def prompt_arrays(prompts: Sequence[Sam2Prompt]) -> tuple[list[list[float]], list[list[list[float]]], list[list[int]]]:
    """Boxes, points and labels of prompts as nested lists (processor layout).

    Prompts with fewer points are padded by repeating their last point, which
    is a no-op for SAM2 (a repeated positive point adds no information) and
    keeps every label a real one.
    """
    n_pts = max((len(p.points_xy) for p in prompts), default=0)
    boxes = [[float(v) for v in p.box_xyxy] for p in prompts]
    points: list[list[list[float]]] = []
    labels: list[list[int]] = []
    for p in prompts:
        pts = [[float(x), float(y)] for x, y in p.points_xy]
        if pts:
            pts += [pts[-1]] * (n_pts - len(pts))
        points.append(pts)
        labels.append([1] * len(pts))
    return boxes, points, labels


def masks_to_rles(masks: np.ndarray) -> list[Rle]:
    """Encodes ``(n, w, h)`` C-ordered masks (i.e. transposed) as COCO RLEs.

    The caller hands masks transposed so that ``masks.transpose(2, 1, 0)``
    is already the Fortran-ordered ``(h, w, n)`` array pycocotools wants: no
    copy of the full-size masks is made here.
    """
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.astype(np.uint8, copy=False).transpose(2, 1, 0))
    return [Rle.from_coco(r) for r in mask_utils.encode(fortran)]


def _chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _group_by_mode(prompts: Sequence[Sam2Prompt]) -> list[tuple[bool, list[int]]]:
    """Prompt indices grouped by ``multimask_output`` (one decoder mode per call)."""
    groups: dict[bool, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.multimask_output, []).append(i)
    return sorted(groups.items())


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"the SAM2 stage needs torch; install it with {INSTALL_HINT}.") from err
    return torch


# ------------------------------------------------------------------ transformers


class TransformersSam2Backend:
    """SAM2 through transformers' ``Sam2Model`` and ``Sam2Processor``.

    Args:
        model: a local folder (``save_pretrained`` layout) or a hub id such as
            ``facebook/sam2.1-hiera-large``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``,
            ``bfloat16`` or ``float16``.
        prompts_per_batch: prompts per mask-decoder call.
        mask_threshold: logit threshold of the binary masks.

    Raises:
        ImportError: torch / transformers / torchvision are missing.
        OSError: the model cannot be found (transformers' message names it).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prompts_per_batch: int = 64,
        mask_threshold: float = 0.0,
    ) -> None:
        torch = _import_torch()
        try:
            from transformers import Sam2Model, Sam2Processor
        except ImportError as err:
            raise ImportError(
                f"the SAM2 stage needs transformers>=5.23 with torchvision; install them with {INSTALL_HINT}."
            ) from err
        self._torch = torch
        self._model_id = model
        self._device = resolve_device(torch, device, "verify_sam2.device")
        self._dtype = resolve_dtype(torch, dtype, self._device, "verify_sam2.dtype")
        self._prompts_per_batch = int(prompts_per_batch)
        self._mask_threshold = float(mask_threshold)
        self._model = Sam2Model.from_pretrained(model, dtype=self._dtype).to(self._device).eval()
        self._processor = Sam2Processor.from_pretrained(model)

    def describe(self) -> dict[str, str]:
        """Backend, model, device and dtype."""
        return {
            "backend": "transformers",
            "model": self._model_id,
            "device": self._device,
            "dtype": str(self._dtype).removeprefix("torch."),
        }

    # -------------------------------------------------------------- encoder

    def embed(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Runs the image encoder once on a batch of images.

        Args:
            images: ``(h, w, 3)`` uint8 RGB arrays (sizes may differ: the
                processor resizes each to the model's input size).

        Returns:
            The multi-level image embeddings, each with a batch dimension of
            ``len(images)``.
        """
        inputs = self._processor(images=list(images), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self._device, self._dtype)
        with self._torch.inference_mode():
            return list(self._model.get_image_embeddings(pixel_values))

    # -------------------------------------------------------------- decoder

    def _prompt_tensors(self, prompts: Sequence[Sam2Prompt], size_hw: tuple[int, int]) -> dict[str, Any]:
        boxes, points, labels = prompt_arrays(prompts)
        kwargs: dict[str, Any] = {"original_sizes": [list(size_hw)], "input_boxes": [boxes], "return_tensors": "pt"}
        if points and points[0]:
            kwargs["input_points"] = [points]
            kwargs["input_labels"] = [labels]
        enc = self._processor(**kwargs)
        out: dict[str, Any] = {"input_boxes": enc["input_boxes"].to(self._device, self._dtype)}
        if "input_points" in enc:
            out["input_points"] = enc["input_points"].to(self._device, self._dtype)
            out["input_labels"] = enc["input_labels"].to(self._device)
        return out

    def _postprocess(
        self, low_res: Any, scores: Any, prompts: Sequence[Sam2Prompt], size_hw: tuple[int, int]
    ) -> list[Sam2Prediction]:
        """Upsamples low-res logits to the image, binarises, encodes to RLE.

        Works in chunks of prompts so that the full-size masks in memory stay
        under ``MAX_MASK_ELEMENTS`` whatever the image size.
        """
        h, w = size_hw
        n, c = int(low_res.shape[0]), int(low_res.shape[1])
        per = max(1, MAX_MASK_ELEMENTS // max(1, c * h * w))
        score_rows = scores.float().cpu().numpy().astype(np.float64)
        preds: list[Sam2Prediction] = []
        for start in range(0, n, per):
            part = low_res[start : start + per].float()
            full = self._processor.post_process_masks(
                [part], [[h, w]], mask_threshold=self._mask_threshold, binarize=True
            )[0]
            # (p, c, h, w) -> (p*c, w, h) contiguous: its numpy transpose is the
            # Fortran (h, w, p*c) array that pycocotools encodes without a copy.
            arr = full.reshape(-1, h, w).transpose(1, 2).contiguous().to("cpu", self._torch.uint8).numpy()
            rles = masks_to_rles(arr)
            for j in range(arr.shape[0] // c):
                i = start + j
                preds.append(
                    Sam2Prediction(
                        instance_id=prompts[i].instance_id,
                        multimask_output=prompts[i].multimask_output,
                        masks=tuple(rles[j * c : (j + 1) * c]),
                        pred_ious=tuple(float(v) for v in score_rows[i]),
                    )
                )
        return preds

    def decode(self, embeddings: Sequence[Any], size_hw: tuple[int, int], prompts: Sequence[Sam2Prompt]) -> list[Sam2Prediction]:
        """Runs the prompt encoder and mask decoder on one image's embedding.

        Args:
            embeddings: one image's embeddings (batch dimension 1), as sliced
                from ``embed``'s output.
            size_hw: the image's ``(h, w)`` in pixels.
            prompts: the image's prompts, any number.

        Returns:
            One prediction per prompt, in prompt order.
        """
        out: list[Sam2Prediction | None] = [None] * len(prompts)
        for multimask, idx in _group_by_mode(prompts):
            for chunk in _chunks(idx, self._prompts_per_batch):
                sub = [prompts[i] for i in chunk]
                with self._torch.inference_mode():
                    res = self._model(
                        image_embeddings=list(embeddings),
                        multimask_output=multimask,
                        **self._prompt_tensors(sub, size_hw),
                    )
                for i, pred in zip(chunk, self._postprocess(res.pred_masks[0], res.iou_scores[0], sub, size_hw)):
                    out[i] = pred
        return [p for p in out if p is not None]

    def predict_images(self, items: Sequence[tuple[bytes, Sequence[Sam2Prompt]]]) -> list[list[Sam2Prediction]]:
        """One encoder pass over the batch's images, then batched prompts per image.

        Args:
            items: ``(encoded image bytes, prompts)`` per image.

        Returns:
            Per item, one prediction per prompt in prompt order (an empty list
            for an item without prompts, whose image is not even decoded).
        """
        todo = [i for i, (_, prompts) in enumerate(items) if prompts]
        images = {i: decode_rgb(items[i][0]) for i in todo}
        results: list[list[Sam2Prediction]] = [[] for _ in items]
        if not todo:
            return results
        embeddings = self.embed([images[i] for i in todo])
        for b, i in enumerate(todo):
            one = [e[b : b + 1] for e in embeddings]
            h, w = images[i].shape[:2]
            results[i] = self.decode(one, (h, w), items[i][1])
        return results

    def predict_one_prompt_per_call(self, image_bytes: bytes, prompts: Sequence[Sam2Prompt]) -> list[Sam2Prediction]:
        """The naive way: one full forward pass (encoder included) per prompt.

        The baseline of ``benchmarks/bench_sam2.py`` and the reference of the
        test that batched prompts give the same masks.
        """
        image = decode_rgb(image_bytes)
        h, w = image.shape[:2]
        preds: list[Sam2Prediction] = []
        for p in prompts:
            inputs = self._processor(images=[image], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self._device, self._dtype)
            with self._torch.inference_mode():
                res = self._model(
                    pixel_values=pixel_values, multimask_output=p.multimask_output, **self._prompt_tensors([p], (h, w))
                )
            preds.extend(self._postprocess(res.pred_masks[0], res.iou_scores[0], [p], (h, w)))
        return preds


# ------------------------------------------------------------------ Meta's sam2


class MetaSam2Backend:
    """SAM2 through Meta's ``sam2`` package (``SAM2ImagePredictor``).

    Install Meta's package from GitHub (the PyPI project ``sam2`` is a
    third-party upload that pulls CUDA build dependencies and installs an
    extra top-level ``training`` package)::

        pip install 'git+https://github.com/facebookresearch/sam2.git'

    Args:
        model: a hub id (``facebook/sam2.1-hiera-large``) or a local ``.pt``
            checkpoint, which then needs ``model_cfg``.
        model_cfg: Meta's Hydra config name, e.g.
            ``configs/sam2.1/sam2.1_hiera_l.yaml``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bfloat16 autocast on CUDA), ``float32``,
            ``bfloat16`` or ``float16``.
        prompts_per_batch: prompts per ``predict`` call.
        mask_threshold: logit threshold of the binary masks.

    Raises:
        ImportError: Meta's ``sam2`` package is not importable.
        ValueError: a local checkpoint without ``model_cfg``.
    """

    def __init__(
        self,
        model: str,
        *,
        model_cfg: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        prompts_per_batch: int = 64,
        mask_threshold: float = 0.0,
    ) -> None:
        torch = _import_torch()
        try:
            from sam2.build_sam import build_sam2
            from sam2.sam2_image_predictor import SAM2ImagePredictor
        except ImportError as err:
            raise ImportError(
                f"verify_sam2.backend=meta needs Meta's sam2 package: {META_INSTALL_HINT}; "
                "or use verify_sam2.backend=transformers."
            ) from err
        self._torch = torch
        self._model_id = model
        self._device = resolve_device(torch, device, "verify_sam2.device")
        self._dtype = resolve_dtype(torch, dtype, self._device, "verify_sam2.dtype")
        self._prompts_per_batch = int(prompts_per_batch)
        if os.path.isfile(model) or model.endswith((".pt", ".pth")):
            if not model_cfg:
                raise ValueError(
                    f"verify_sam2.model {model!r} is a local checkpoint; set verify_sam2.meta_model_cfg to its "
                    "Hydra config, e.g. configs/sam2.1/sam2.1_hiera_l.yaml."
                )
            sam = build_sam2(model_cfg, model, device=self._device)
            self._predictor = SAM2ImagePredictor(sam, mask_threshold=mask_threshold)
        else:
            self._predictor = SAM2ImagePredictor.from_pretrained(model, device=self._device, mask_threshold=mask_threshold)

    def describe(self) -> dict[str, str]:
        """Backend, model, device and dtype."""
        return {
            "backend": "meta",
            "model": self._model_id,
            "device": self._device,
            "dtype": str(self._dtype).removeprefix("torch."),
        }

    def _autocast(self) -> Any:
        torch = self._torch
        if self._device.startswith("cuda") and self._dtype != torch.float32:
            return torch.autocast("cuda", dtype=self._dtype)
        import contextlib

        return contextlib.nullcontext()

    def _predict_image(self, image: np.ndarray, prompts: Sequence[Sam2Prompt]) -> list[Sam2Prediction]:
        h, w = image.shape[:2]
        out: list[Sam2Prediction | None] = [None] * len(prompts)
        with self._torch.inference_mode(), self._autocast():
            self._predictor.set_image(image)
            for multimask, idx in _group_by_mode(prompts):
                c = 3 if multimask else 1
                per = max(1, min(self._prompts_per_batch, MAX_MASK_ELEMENTS // (c * h * w)))
                for chunk in _chunks(idx, per):
                    sub = [prompts[i] for i in chunk]
                    boxes, points, labels = prompt_arrays(sub)
                    kwargs: dict[str, Any] = {"box": np.asarray(boxes, dtype=np.float32)}
                    if points and points[0]:
                        kwargs["point_coords"] = np.asarray(points, dtype=np.float32)
                        kwargs["point_labels"] = np.asarray(labels, dtype=np.int32)
                    masks, ious, _ = self._predictor.predict(multimask_output=multimask, **kwargs)
                    # predict() squeezes a batch of one away; put it back.
                    masks = np.asarray(masks).reshape(len(sub), -1, h, w)
                    ious = np.asarray(ious, dtype=np.float64).reshape(len(sub), -1)
                    rles = masks_to_rles(np.ascontiguousarray((masks > 0.5).reshape(-1, h, w).transpose(0, 2, 1)))
                    k = masks.shape[1]
                    for j, i in enumerate(chunk):
                        out[i] = Sam2Prediction(
                            instance_id=prompts[i].instance_id,
                            multimask_output=multimask,
                            masks=tuple(rles[j * k : (j + 1) * k]),
                            pred_ious=tuple(float(v) for v in ious[j]),
                        )
        return [p for p in out if p is not None]

    def predict_images(self, items: Sequence[tuple[bytes, Sequence[Sam2Prompt]]]) -> list[list[Sam2Prediction]]:
        """``set_image`` once per image, then batched prompts (see the Protocol)."""
        return [self._predict_image(decode_rgb(b), prompts) if prompts else [] for b, prompts in items]


def load_backend(
    model: str,
    *,
    backend: str = "transformers",
    meta_model_cfg: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    prompts_per_batch: int = 64,
    mask_threshold: float = 0.0,
) -> Sam2Backend:
    """Builds the configured backend (loads the model; call it in ``load_model``).

    Args:
        model: local path or hub id.
        backend: ``transformers`` or ``meta``.
        meta_model_cfg: Meta's Hydra config for a local ``.pt`` checkpoint.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        prompts_per_batch: prompts per decoder call.
        mask_threshold: logit threshold of the binary masks.

    Returns:
        A ready backend.
    """
    if backend == "transformers":
        return TransformersSam2Backend(
            model, device=device, dtype=dtype, prompts_per_batch=prompts_per_batch, mask_threshold=mask_threshold
        )
    if backend == "meta":
        return MetaSam2Backend(
            model,
            model_cfg=meta_model_cfg,
            device=device,
            dtype=dtype,
            prompts_per_batch=prompts_per_batch,
            mask_threshold=mask_threshold,
        )
    raise ValueError(f"unknown SAM2 backend {backend!r}; use 'transformers' or 'meta'.")
