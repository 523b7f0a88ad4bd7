"""Qwen-VL's image resize rule, shared by the captioners' box conversion and the exports.

Qwen2-VL / Qwen2.5-VL processors resize every image so that both sides are
multiples of the patch-merge factor and the pixel count lies in a budget;
boxes in "absolute pixels" refer to that resized image. One implementation
keeps the captioner and the LENS export from drifting apart.
"""

from __future__ import annotations

import math

MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    max_aspect_ratio: float | None = MAX_ASPECT_RATIO,
) -> tuple[int, int]:
    """Mirrors ``qwen_vl_utils.smart_resize`` (and transformers' Qwen2-VL copy).

    Both sides become multiples of ``factor`` (at least ``factor``), the pixel
    count lands in ``[min_pixels, max_pixels]``, and the aspect ratio is kept
    as closely as possible.

    Args:
        height: image height in px.
        width: image width in px.
        factor: side multiple in px (28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
        min_pixels: smallest pixel budget.
        max_pixels: largest pixel budget.
        max_aspect_ratio: refuse longer/shorter side ratios above this, as
            Qwen's processors do; None computes a size for any ratio (the
            captioner's box mapping must never fail on an odd image).

    Returns:
        ``(resized_height, resized_width)`` in px.

    Raises:
        ValueError: the aspect ratio is above ``max_aspect_ratio``.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size {width}x{height} must be positive.")
    if max_aspect_ratio is not None and max(height, width) / min(height, width) > max_aspect_ratio:
        raise ValueError(
            f"aspect ratio of {width}x{height} is above {max_aspect_ratio:g}, which Qwen's resize rule refuses."
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
