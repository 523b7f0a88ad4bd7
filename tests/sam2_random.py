"""Randomly initialised SAM2 checkpoints built from configs, for tests and benchmarks.

No weights can be downloaded where orsgen is developed and tested, so the
SAM2 stage is exercised with real transformers ``Sam2Model`` code at random
weights. Speed does not depend on the weights, so the ``hiera-large`` preset
(the architecture of ``facebook/sam2.1-hiera-large``) measures real
throughput; the masks are of course meaningless.

    python tests/sam2_random.py /tmp/tiny-sam2 --preset tiny

writes a ``save_pretrained`` folder (model + processor) that
``verify_sam2.model`` accepts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PRESETS = ("tiny", "base", "hiera-large")


def _hiera(
    image_size: int,
    dims: list[int],
    blocks: list[int],
    heads: list[int],
    windows: list[int],
    global_blocks: list[int],
    background: list[int],
) -> dict[str, Any]:
    return {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": dims[0],
        "num_attention_heads": heads[0],
        "image_size": [image_size, image_size],
        "blocks_per_stage": blocks,
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": heads,
        "window_size_per_stage": windows,
        # A global-attention block must not be a stage's first (pooling) block:
        # transformers then computes a zero window and fails with ZeroDivisionError.
        "global_attention_blocks": global_blocks,
        "window_positional_embedding_background_size": background,
    }


def sam2_config(preset: str = "tiny") -> Any:
    """A ``Sam2Config`` for a preset.

    Args:
        preset: ``tiny`` (128 px input, ~0.1 M parameters, for tests),
            ``base`` (transformers' default config: hiera-tiny-like trunk at
            1024 px, ~31 M parameters) or ``hiera-large`` (the architecture of
            ``facebook/sam2.1-hiera-large``: 1024 px, ~217 M parameters, the
            image model without Meta's video memory modules).

    Returns:
        The config.

    Raises:
        ValueError: an unknown preset.
    """
    from transformers import Sam2Config

    if preset == "base":
        return Sam2Config()
    if preset == "tiny":
        size, hidden = 128, 32
        vision = {
            "backbone_config": _hiera(size, [8, 16, 32, 64], [1, 2, 2, 1], [1, 1, 1, 1], [4, 4, 4, 4], [4], [4, 4]),
            "backbone_channel_list": [64, 32, 16, 8],
            "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
            "fpn_hidden_size": hidden,
        }
        return Sam2Config(
            vision_config=vision,
            prompt_encoder_config={"hidden_size": hidden, "image_size": size, "patch_size": 16},
            mask_decoder_config={"hidden_size": hidden, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
        )
    if preset == "hiera-large":
        # sam2.1_hiera_l.yaml: embed_dim 144, num_heads 2, stages [2, 6, 36, 4],
        # global_att_blocks [23, 33, 43], window_spec [8, 4, 16, 8].
        vision = {
            "backbone_config": _hiera(
                1024, [144, 288, 576, 1152], [2, 6, 36, 4], [2, 4, 8, 16], [8, 4, 16, 8], [23, 33, 43], [7, 7]
            ),
            "backbone_channel_list": [1152, 576, 288, 144],
        }
        return Sam2Config(vision_config=vision)
    raise ValueError(f"unknown SAM2 preset {preset!r}; use one of {', '.join(PRESETS)}.")


def input_size(preset: str) -> int:
    """The square input size in pixels of a preset."""
    return 128 if preset == "tiny" else 1024


def build_random_sam2(preset: str = "tiny", seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised ``(Sam2Model, Sam2Processor)`` pair.

    Args:
        preset: see ``sam2_config``.
        seed: torch seed of the initialisation.

    Returns:
        The model (eval mode, float32, CPU) and a processor whose input size
        matches the model.
    """
    import torch
    from transformers import Sam2ImageProcessor, Sam2Model, Sam2Processor

    torch.manual_seed(seed)
    model = Sam2Model(sam2_config(preset)).eval()
    size = input_size(preset)
    processor = Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": size, "width": size}))
    return model, processor


def save_random_sam2(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Writes a random checkpoint (model + processor) with ``save_pretrained``.

    Args:
        path: the folder to create.
        preset: see ``sam2_config``.
        seed: torch seed of the initialisation.

    Returns:
        The folder, usable as ``verify_sam2.model``.
    """
    model, processor = build_random_sam2(preset, seed)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python tests/sam2_random.py PATH [--preset P] [--seed N]``."""
    ap = argparse.ArgumentParser(description="Write a randomly initialised SAM2 checkpoint (for tests and benchmarks).")
    ap.add_argument("path")
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(save_random_sam2(args.path, args.preset, args.seed))


if __name__ == "__main__":
    main()
