"""Target overlays for the VLM: a translucent fill, the mask's contour and its box.

The DeRS recipe shows the VLM the image with the target highlighted, so that it
describes *that* region and not its neighbour; the CoRS verification pass shows
every mask of one label at once. Only each mask's bounding box is decoded
(``stages.common.masks.decode_crop``); the image itself is decoded once.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from orsgen.schemas.records import Rle
from orsgen.stages.common.masks import decode_crop, rle_area


class OverlayError(ValueError):
    """The image cannot be drawn on (undecodable, or its size disagrees with the mask)."""

    reason = "caption_image_failed"


@dataclass(frozen=True, slots=True)
class OverlayStyle:
    """How a target is drawn.

    Attributes:
        fill_rgb: colour of the translucent fill and the contour.
        fill_alpha: opacity of the fill, 0..1 (0 draws no fill).
        contour_px: contour thickness in pixels (0 draws none).
        box_rgb: colour of the box.
        box_px: box line thickness in pixels (0 draws no box).
        image_format: ``JPEG`` (smaller requests) or ``PNG`` (lossless).
        jpeg_quality: JPEG quality, 1..100.
    """

    fill_rgb: tuple[int, int, int] = (255, 0, 0)
    fill_alpha: float = 0.45
    contour_px: int = 2
    box_rgb: tuple[int, int, int] = (0, 255, 0)
    box_px: int = 2
    image_format: str = "JPEG"
    jpeg_quality: int = 90


def decode_rgb(image_bytes: bytes) -> np.ndarray:
    """Decodes encoded image bytes into an ``(h, w, 3)`` uint8 RGB array.

    Raises:
        OverlayError: the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            return np.asarray(im.convert("RGB")).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise OverlayError(f"cannot decode the image to draw an overlay: {err}") from None


def encode_rgb(arr: np.ndarray, style: OverlayStyle = OverlayStyle()) -> bytes:
    """Encodes an RGB array as JPEG or PNG bytes (deterministic settings)."""
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if style.image_format.upper() == "PNG":
        im.save(buf, format="PNG", optimize=False)
    else:
        im.save(buf, format="JPEG", quality=int(style.jpeg_quality))
    return buf.getvalue()


def draw_targets(
    rgb: np.ndarray,
    targets: Sequence[tuple[Rle, Sequence[float]]],
    style: OverlayStyle = OverlayStyle(),
) -> np.ndarray:
    """Draws masks and boxes onto a copy of an RGB array.

    Args:
        rgb: ``(h, w, 3)`` uint8 image.
        targets: ``(mask, box_xyxy)`` pairs; each mask's size must be ``(h, w)``;
            boxes are pixels ``[x0, y0, x1, y1]`` (exclusive max).
        style: colours and line widths.

    Returns:
        A new array with every fill, then every contour, then every box drawn
        (so that boxes stay visible over neighbouring fills).

    Raises:
        OverlayError: a mask's size disagrees with the image.
    """
    h, w = rgb.shape[:2]
    out = rgb.copy()
    fill = np.asarray(style.fill_rgb, dtype=np.float32)
    crops = []
    for rle, _box in targets:
        if tuple(rle.size) != (h, w):
            raise OverlayError(f"mask size {list(rle.size)} disagrees with the image size [{h}, {w}].")
        if rle_area(rle) == 0:
            crops.append(None)
            continue
        # One pixel of padding lets the contour close along the mask's border.
        crop, (ox, oy) = decode_crop(rle, pad_px=1)
        crops.append((crop, ox, oy))
    for c in crops:
        if c is None or style.fill_alpha <= 0:
            continue
        crop, ox, oy = c
        view, sel = _window(out, crop, ox, oy)
        px = view[sel].astype(np.float32)
        view[sel] = np.clip((1.0 - style.fill_alpha) * px + style.fill_alpha * fill + 0.5, 0, 255).astype(np.uint8)
    for c in crops:
        if c is None or style.contour_px <= 0:
            continue
        crop, ox, oy = c
        contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        # Contours are drawn in image coordinates; cv2 clips what falls outside.
        shifted = [cnt + np.array([[[ox, oy]]], dtype=cnt.dtype) for cnt in contours]
        cv2.drawContours(out, shifted, -1, tuple(int(v) for v in style.fill_rgb), int(style.contour_px))
    for _rle, box in targets:
        if style.box_px <= 0:
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        p0 = (int(round(x0)), int(round(y0)))
        # Exclusive max: the last pixel row/column inside the box is x1 - 1.
        p1 = (max(int(round(x1)) - 1, p0[0]), max(int(round(y1)) - 1, p0[1]))
        cv2.rectangle(out, p0, p1, tuple(int(v) for v in style.box_rgb), int(style.box_px))
    return out


def _window(img: np.ndarray, crop: np.ndarray, ox: int, oy: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``img`` under a (possibly padded, partly outside) crop, and the crop's pixels there."""
    h, w = img.shape[:2]
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + crop.shape[1], w), min(oy + crop.shape[0], h)
    view = img[y0:y1, x0:x1]
    sel = crop[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return view, sel


def render_overlay(
    image_bytes: bytes,
    targets: Sequence[tuple[Rle, Sequence[float]]],
    style: OverlayStyle = OverlayStyle(),
) -> bytes:
    """Decodes an image, draws the targets and encodes the result.

    Args:
        image_bytes: the encoded source image.
        targets: ``(mask, box_xyxy)`` pairs in the image's pixel frame.
        style: colours, widths and the output format.

    Returns:
        The encoded overlay image (same size as the source).

    Raises:
        OverlayError: the image is undecodable or a mask does not fit it.
    """
    return encode_rgb(draw_targets(decode_rgb(image_bytes), targets, style), style)
