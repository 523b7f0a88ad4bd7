"""SAM2 prompting cost: one encoder pass + batched prompts per image vs one call per mask.

Both sides run the same transformers ``Sam2Model`` (random weights: speed does
not depend on them) through ``stages.verify.backend.TransformersSam2Backend``,
on the same images and prompts, in one run:

* orsgen: ``predict_images``: the image encoder once per image
  (``get_image_embeddings``), then every prompt through the prompt encoder and
  mask decoder only, ``--prompts-per-batch`` at a time;
* baseline: ``predict_one_prompt_per_call``: one full forward pass (image
  encoder included) per mask, as a per-mask predictor call does.

Each image gets ``--masks`` prompts (box + two interior points, the filter's
prompt). The script checks that both sides return the same masks, then prints
seconds per image, masks/s and the speed-up ratio (target: >= 10x at >= 20
masks per image).

    python benchmarks/bench_sam2.py [--preset base] [--images 2] [--masks 32] [--baseline-masks 8]
    python benchmarks/bench_sam2.py --gpu [--images 16] [--masks 32]

``--preset base`` is transformers' default SAM2 config (31 M parameters,
1024 px input), whose encoder dominates as on the real hiera checkpoints.
``--gpu`` runs a ``hiera-large``-sized model (the architecture of
``facebook/sam2.1-hiera-large``) in bfloat16 on CUDA and also prints the
absolute masks/s and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from orsgen.stages.common.masks import encode_mask, interior_points, rle_area, rle_bbox_xywh, rle_iou, xywh_to_xyxy
from orsgen.stages.verify.backend import Sam2Prompt, TransformersSam2Backend

# Random SAM2 checkpoints are a test helper, not part of the product package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sam2_random import save_random_sam2  # noqa: E402


def make_image(rng: np.random.Generator, w: int, h: int, n: int) -> tuple[bytes, list[Sam2Prompt]]:
    """A textured JPEG with ``n`` ellipse objects, and one prompt per object."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = rng.normal(128, 30, size=(h, w, 3))
    prompts = []
    for i in range(n):
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        ax, ay = rng.uniform(8, w / 6), rng.uniform(8, h / 6)
        m = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
        img[m] = rng.uniform(0, 255, size=3)
        rle = encode_mask(m)
        if rle_area(rle) == 0:
            continue
        p1, p2 = interior_points(rle)
        box = xywh_to_xyxy(rle_bbox_xywh(rle))
        prompts.append(Sam2Prompt(f"obj{i}", box, ((p1[0] + 0.5, p1[1] + 0.5), (p2[0] + 0.5, p2[1] + 0.5)), False))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, choices=["tiny", "base", "hiera-large"],
                    help="model size (default: base on CPU, hiera-large with --gpu)")
    ap.add_argument("--images", type=int, default=None, help="images (default 2 on CPU, 16 with --gpu)")
    ap.add_argument("--masks", type=int, default=32, help="prompts per image (>= 20 for the target)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--prompts-per-batch", type=int, default=64)
    ap.add_argument("--images-per-batch", type=int, default=4, help="--gpu throughput pass: images per encoder batch")
    ap.add_argument("--baseline-masks", type=int, default=8,
                    help="masks of the first image the slow per-mask baseline runs on: each of its calls is "
                         "independent, so its cost per mask is measured on a subset")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bfloat16, hiera-large-sized model; print masks/s and memory")
    args = ap.parse_args()

    import torch

    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; run without --gpu for the CPU comparison.")
    preset = args.preset or ("hiera-large" if args.gpu else "base")
    n_images = args.images or (16 if args.gpu else 2)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    images = [make_image(rng, args.width, args.height, args.masks) for _ in range(n_images)]
    n_masks = sum(len(p) for _, p in images)

    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_sam2(f"{tmp}/sam2-{preset}", preset=preset, seed=0)
        backend = TransformersSam2Backend(str(path), device=device, dtype="auto", prompts_per_batch=args.prompts_per_batch)
    desc = backend.describe()
    n_params = sum(p.numel() for p in backend._model.parameters())  # noqa: SLF001 - benchmark introspection
    print(f"model: preset {preset} ({n_params / 1e6:.1f} M parameters), {desc['device']} {desc['dtype']}; "
          f"{n_images} images of {args.width}x{args.height}, {args.masks} masks each ({n_masks} masks)")

    def sync() -> None:
        if args.gpu:
            torch.cuda.synchronize()

    # Warm-up (lazy initialisation, kernels, allocator) outside the timings.
    backend.predict_images([(images[0][0], images[0][1][:2])])
    backend.predict_one_prompt_per_call(images[0][0], images[0][1][:1])
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()

    # Rounds alternate the two sides image by image, so that load from other
    # processes hits both alike; medians over rounds are reported.
    per_mask_b, per_mask_n, same, total, worst = [], [], 0, 0, 1.0
    for image_bytes, prompts in images:
        sync()
        t0 = time.perf_counter()
        batched = backend.predict_images([(image_bytes, prompts)])[0]
        sync()
        per_mask_b.append((time.perf_counter() - t0) / len(prompts))
        sub = prompts[: max(1, args.baseline_masks)]
        sync()
        t0 = time.perf_counter()
        naive = backend.predict_one_prompt_per_call(image_bytes, sub)
        sync()
        per_mask_n.append((time.perf_counter() - t0) / len(sub))
        # Random weights give many logits near the threshold, where summation
        # order (batched vs single matmuls) can flip a pixel: report exact
        # matches and the worst IoU between the two sides' masks.
        same += sum(a.masks == b.masks for a, b in zip(batched, naive))
        total += len(naive)
        worst = min([worst] + [rle_iou(a.masks[0], b.masks[0]) for a, b in zip(batched, naive)])
    b_mask, n_mask = float(np.median(per_mask_b)), float(np.median(per_mask_n))
    ratios = [n / b for n, b in zip(per_mask_n, per_mask_b)]
    print(f"orsgen   (1 encoder pass + batched prompts per image): {b_mask * args.masks:8.3f} s/image  "
          f"{1 / b_mask:8.2f} masks/s")
    print(f"baseline (1 full forward pass per mask, {args.baseline_masks} masks/image timed): "
          f"{n_mask * args.masks:8.3f} s/image  {1 / n_mask:8.2f} masks/s")
    print(f"same masks: {same}/{total} identical, worst IoU between the two {worst:.4f}")
    print(f"speed-up: {float(np.median(ratios)):.1f}x at {args.masks} masks/image "
          f"(per image: {', '.join(f'{r:.1f}x' for r in ratios)}; target >= 10x)")
    if args.gpu:
        # Throughput as the pipeline runs it: encoder batches of several images.
        k = max(1, args.images_per_batch)
        sync()
        t0 = time.perf_counter()
        for i in range(0, n_images, k):
            backend.predict_images(images[i : i + k])
        sync()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"GPU: {torch.cuda.get_device_name()}, {desc['dtype']}, {k} images per encoder batch: "
              f"{n_masks / dt:.1f} masks/s ({n_images / dt:.2f} images/s at {args.masks} masks), "
              f"peak memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
