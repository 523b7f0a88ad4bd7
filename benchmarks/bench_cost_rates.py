"""Measures the per-image rates of the SA-1B cost model (writes benchmarks/cost_rates.json).

    python benchmarks/bench_cost_rates.py [--images 6] [--out benchmarks/cost_rates.json]

What is measured here, on this machine, and what is not:

* **CPU-seconds per image per stage** (``time.process_time`` of this
  process, one thread): ingest (tar streaming, JPEG check, RLE parsing),
  expressions, regions, human samples, splits, caption request planning
  (overlays, resizes, JPEG encodes), encode (the pre-shuffle record), and a
  write of the encoded bytes into a tar. The input is SA-1B-format shards
  built from the demo generator's SA-1B scenes (``pipelines/demo_data.py``)
  scaled to SA-1B geometry: 2250 x 1500 JPEGs with photo-like noise and 100
  RLE masks per image (the demo's regions upscaled, plus generated ones).
* **Shuffle bytes per image**: the pickled size of the encoded record that
  crosses the one shuffle before writing (Beam pickles such objects).
* **VLM image tokens per request**: Qwen2.5-VL's real image processor
  (``transformers``' ``Qwen2VLImageProcessor``) configured with the values
  of Qwen2.5-VL's published ``preprocessor_config.json`` (patch 14, merge 2,
  min_pixels 3136, max_pixels 12845056) on the images the client actually
  sends (resized to ``caption.backend.max_image_side_px`` of
  ``configs/sa1b_ors.yaml``). **Text tokens are estimated**: no Qwen
  tokenizer can be downloaded here, so the rendered real prompts' UTF-8
  bytes are divided by 4 (a common rate for English byte-level BPE; not
  measured). Output tokens are estimates from the answer formats.
* **GPU throughput** is not measured (no GPU is lent to this task): the cost
  model takes it from cited public figures (``cost_rates.json``, ``gpu``).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import pickle
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SA1B_W, SA1B_H = 2250, 1500
MASKS_PER_IMAGE = 100


def _sa1b_scale_shard(out: Path, n_images: int, seed: int = 0) -> Path:
    """An SA-1B-format tar at SA-1B geometry from the demo generator's scenes."""
    from orsgen.pipelines.demo_data import Sa1bRegion, _jpeg, _json, _tar, demo_sa1b_image, sa1b_json

    rng = np.random.default_rng(seed)
    members = []
    for image_id in range(1, n_images + 1):
        image, _objects, regions = demo_sa1b_image(seed, image_id)
        big = cv2.resize(image, (SA1B_W, SA1B_H), interpolation=cv2.INTER_LINEAR)
        # Photo-like entropy, so that JPEG size and decode cost resemble SA-1B's.
        noise = rng.normal(0, 10, big.shape)
        big = np.clip(big.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        out_regions = []
        for r in regions:
            m = cv2.resize(r.mask.astype(np.uint8), (SA1B_W, SA1B_H), interpolation=cv2.INTER_NEAREST).astype(bool)
            if m.any():
                out_regions.append(Sa1bRegion(m, r.predicted_iou, r.stability_score, (0, 0, SA1B_W, SA1B_H), r.kind))
        while len(out_regions) < MASKS_PER_IMAGE:
            m = np.zeros((SA1B_H, SA1B_W), np.uint8)
            cx, cy = int(rng.integers(50, SA1B_W - 50)), int(rng.integers(50, SA1B_H - 50))
            ax, ay = int(rng.integers(10, 300)), int(rng.integers(10, 300))
            cv2.ellipse(m, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
            out_regions.append(Sa1bRegion(m.astype(bool), float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.85, 1.0)),
                                          (0, 0, SA1B_W, SA1B_H), "object"))
        members.append((f"sa_{image_id}.jpg", _jpeg(big)))
        members.append((f"sa_{image_id}.json", _json(sa1b_json(image_id, SA1B_W, SA1B_H, out_regions))))
    path = out / "sa_000000.tar"
    path.write_bytes(_tar(members))
    return path


def _timed(fn, items):
    t = time.process_time()
    out = [fn(x) for x in items]
    return out, time.process_time() - t


def measure(n_images: int) -> dict:
    from orsgen.pipelines.build import expressions_stage, refs_stage, regions_stage, splits_stage
    from orsgen.pipelines.caption import CaptionContext, plan_round1
    from orsgen.schemas.config import load_config
    from orsgen.schemas.records import ImageExample
    from orsgen.stages.ingest.sa1b import read_sa1b_shard
    from orsgen.stages.write import encode_example

    tmp = Path(tempfile.mkdtemp(prefix="orsgen-cost-"))
    shard = _sa1b_scale_shard(tmp, n_images)
    cfg = load_config(ROOT / "configs" / "sa1b_ors.yaml", [f"inputs.0.shards=[{shard}]"])
    types = {i.name: i.type for i in cfg.inputs}
    cpu: dict[str, float] = {}

    t = time.process_time()
    examples = [e for e in read_sa1b_shard(str(shard), "sa1b", cfg.image) if isinstance(e, ImageExample)]
    cpu["ingest"] = time.process_time() - t
    assert len(examples) == n_images, "the synthetic shard did not read back"
    jpeg_bytes = sum(len(e.image_bytes) for e in examples) / n_images

    stages = [
        ("expressions", lambda ex: expressions_stage(ex, {}, cfg=cfg, input_types=types, templates=None)),
        ("regions", functools.partial(regions_stage, cfg=cfg, input_types=types)),
        ("human_samples", refs_stage),
        ("splits", functools.partial(splits_stage, cfg=cfg)),
    ]
    xs = examples
    for name, fn in stages:
        res, cpu[name] = _timed(fn, xs)
        xs = [r[0] for r in res if r[0] is not None]
    ctx = CaptionContext.from_config(cfg.caption)
    plans, cpu["caption_plan_round1"] = _timed(lambda ex: plan_round1(ex, ctx), xs)
    reqs = [r for p in plans for r in p[0]]
    encoded, cpu["encode"] = _timed(lambda ex: encode_example(ex, list(cfg.write.formats)), xs)
    shuffle_bytes = [len(pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)) for e in encoded]
    t = time.process_time()
    with tarfile.open(tmp / "out.tar", "w") as tf:
        for e in encoded:
            for ext, data in (("jpg", e.image), ("json", e.json)):
                info = tarfile.TarInfo(f"{e.key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    cpu["write"] = time.process_time() - t

    tokens = _vlm_tokens(cfg, reqs, len(xs))
    return {
        "measured_on": {
            "images": n_images,
            "image_wh": [SA1B_W, SA1B_H],
            "masks_per_image": MASKS_PER_IMAGE,
            "jpeg_bytes_per_image": round(jpeg_bytes),
            "regions_kept_per_image": round(sum(len(x.instances) for x in xs) / max(1, len(xs)), 1),
            "python": sys.version.split()[0],
            "note": "process_time of one thread on this machine (2 shared cores, loaded); SA-1B-format shards "
                    "from the demo generator's scenes scaled to SA-1B geometry",
        },
        "cpu_s_per_image": {k: round(v / n_images, 4) for k, v in cpu.items()},
        "shuffle_bytes_per_image": round(sum(shuffle_bytes) / len(shuffle_bytes)),
        "vlm": tokens,
    }


def _vlm_tokens(cfg, reqs, n_images: int) -> dict:
    """Image tokens from Qwen2.5-VL's real image processor; text tokens estimated (see module docstring)."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(
        patch_size=14, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": 3136, "longest_edge": 12845056},  # Qwen2.5-VL's preprocessor_config.json
    )
    by_task: dict[str, dict[str, float]] = {}
    for r in reqs:
        image_tokens = 0
        for data in r.images:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            thw = proc(images=[img], return_tensors="np")["image_grid_thw"][0]
            image_tokens += int(np.prod(thw)) // 4 + 2  # merged patches + vision start/end
        text_tokens = (len(r.system.encode()) + len(r.user.encode())) / 4  # ESTIMATE: bytes / 4
        d = by_task.setdefault(r.task, {"requests": 0, "image_tokens": 0, "text_tokens_est": 0})
        d["requests"] += 1
        d["image_tokens"] += image_tokens
        d["text_tokens_est"] += text_tokens
    out = {}
    for task, d in sorted(by_task.items()):
        n = d["requests"]
        out[task] = {
            "requests_per_image": round(n / n_images, 2),
            "image_tokens_per_request": round(d["image_tokens"] / n),
            "text_tokens_per_request_est": round(d["text_tokens_est"] / n),
        }
    return {
        "processor": "transformers Qwen2VLImageProcessor, Qwen2.5-VL hub values (patch 14, merge 2, min_pixels 3136, max_pixels 12845056)",
        "client_max_image_side_px": cfg.caption.backend.max_image_side_px,
        "per_task_round1": out,
        "text_tokens_method": "ESTIMATE: UTF-8 bytes of the rendered real prompts / 4 (no Qwen tokenizer offline)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "cost_rates.json",
                    help="rates file; only its 'measured' section is replaced")
    args = ap.parse_args()
    measured = measure(args.images)
    rates = json.loads(args.out.read_text()) if args.out.exists() else {}
    rates["measured"] = measured
    args.out.write_text(json.dumps(rates, indent=2) + "\n")
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
