"""Benchmark: orsgen's WebDataset writer against a bare ``tarfile`` baseline.

Builds N synthetic examples (real noise JPEGs of about ``--image-kb`` KB and
``--instances`` COCO RLE masks each), then times in one run:

(a) ``stages.write.write_bucket`` with ``formats=["webdataset"]``: key
    sorting, row and JSON encoding, the tar, sha256, tmp + rename, sidecar
    and marker;
(b) the baseline: ``tarfile.addfile`` of the same jpg + json member bytes,
    precomputed outside the timer;
(c) for the breakdown, ``plan_parts`` alone: the sort and the row + JSON
    encoding that (a) does and (b) gets for free. (a) minus (c) is the
    writer's I/O path (tar, sha256, tmp + rename, sidecar, marker).

Each is run ``--reps`` times into fresh folders, interleaved, and the best
time is kept. The target is a writer/baseline throughput ratio of at least 0.7.

    python benchmarks/bench_write.py --n 400 --image-kb 100 --instances 20
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from orsgen.schemas.arrow import example_to_json
from orsgen.schemas.config import WriteConfig
from orsgen.schemas.records import ImageExample, ImageRecord, Instance, Rle, Sample, canonical_json
from orsgen.stages.write import plan_parts, write_bucket


def _noise_jpeg(rng: np.random.Generator, side: int) -> bytes:
    # Smooth-ish noise: JPEG of pure noise is huge, of flat colour tiny.
    small = rng.integers(0, 255, (side // 2, side // 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _side_for(target_bytes: int, rng: np.random.Generator) -> int:
    side = 256
    for _ in range(4):  # a few secant steps: size grows ~ with area
        size = len(_noise_jpeg(rng, side))
        side = max(16, int(side * (target_bytes / size) ** 0.5))
    return side


def make_examples(n: int, image_kb: float, n_instances: int, seed: int = 0) -> list[ImageExample]:
    """Builds ``n`` synthetic examples with real JPEGs and RLE masks."""
    rng = np.random.default_rng(seed)
    side = _side_for(int(image_kb * 1024), rng)
    examples = []
    for i in range(n):
        image_id = f"sa1b:{i}"
        instances = []
        for j in range(n_instances):
            m = np.zeros((side, side), dtype=np.uint8)
            x0, y0 = rng.integers(0, side // 2, 2)
            w, h = rng.integers(4, side // 2, 2)
            m[y0 : y0 + h, x0 : x0 + w] = 1
            m[y0 + h // 3 : y0 + h // 2, x0 : x0 + w // 2] = 0  # a notch: longer RLE counts
            rle = Rle.from_coco(mask_utils.encode(np.asfortranarray(m)))
            instances.append(
                Instance(
                    instance_id=f"{image_id}/ann:{j}",
                    image_id=image_id,
                    rle=rle,
                    bbox_xywh=(float(x0), float(y0), float(w), float(h)),
                    bbox_xyxy=(float(x0), float(y0), float(x0 + w), float(y0 + h)),
                    area_px=int(m.sum()),
                    predicted_iou=float(rng.random()),
                    stability_score=float(rng.random()),
                    point_coords=((float(x0 + 1), float(y0 + 1)),),
                    crop_box=(0.0, 0.0, float(side), float(side)),
                    source_ann_id=j,
                )
            )
        samples = tuple(
            Sample(
                sample_id=f"{image_id}/s{k}",
                image_id=image_id,
                expression=f"the region number {k}",
                kind="phrase",
                target_ids=(instances[k].instance_id,),
                split="train",
                union_rle=instances[k].rle,
            )
            for k in range(min(3, n_instances))
        )
        examples.append(
            ImageExample(
                key=f"sa1b-{i:08d}",
                image=ImageRecord(image_id, "sa1b", f"sa_{i}.jpg", side, side, "0" * 64, f"sa_{i}.jpg"),
                image_bytes=_noise_jpeg(rng, side),
                instances=tuple(instances),
                samples=samples,
                split="train",
                input_name="sa1b",
            )
        )
    return examples


def baseline_tar(path: Path, members: list[tuple[str, bytes]]) -> int:
    """Writes precomputed members with plain ``tarfile``; returns the tar size."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="number of examples (default 400)")
    ap.add_argument("--image-kb", type=float, default=100, help="approximate JPEG size in KB (default 100)")
    ap.add_argument("--instances", type=int, default=20, help="RLE instances per example (default 20)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each; the best is kept (default 5)")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a new temp folder, removed after)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    examples = make_examples(args.n, args.image_kb, args.instances)
    members = []
    for ex in sorted(examples, key=lambda e: e.key):
        members.append((f"{ex.key}.jpg", ex.image_bytes))
        members.append((f"{ex.key}.json", canonical_json(example_to_json(ex))))
    img_mb = sum(len(ex.image_bytes) for ex in examples) / 1e6
    json_kb = sum(len(d) for n, d in members if n.endswith(".json")) / len(examples) / 1e3
    print(f"built {len(examples)} examples in {time.perf_counter() - t0:.1f} s: "
          f"{img_mb / len(examples) * 1e3:.0f} KB jpg + {json_kb:.1f} KB json each")

    cfg = WriteConfig(formats=["webdataset"], shard_max_images=10**6, shard_max_bytes=10**12, num_buckets=1)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_write_"))
    best_w = best_b = best_e = float("inf")
    tar_bytes = 0
    try:
        for r in range(args.reps):
            out = scratch / f"orsgen-{r}"
            t = time.perf_counter()
            stats = write_bucket(str(out), "train", 0, examples, cfg)
            best_w = min(best_w, time.perf_counter() - t)
            tar_bytes = sum(s.n_bytes for s in stats)

            base = scratch / f"baseline-{r}.tar"
            t = time.perf_counter()
            baseline_tar(base, members)
            best_b = min(best_b, time.perf_counter() - t)
            shutil.rmtree(out)
            base.unlink()

            t = time.perf_counter()
            plan_parts(examples, cfg.shard_max_images, cfg.shard_max_bytes)
            best_e = min(best_e, time.perf_counter() - t)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    mb = tar_bytes / 1e6
    io_path = max(best_w - best_e, 1e-9)
    rows = [
        ("(a) orsgen write_bucket (webdataset)", best_w),
        ("(b) baseline tarfile.addfile", best_b),
        ("(c) of (a): sort + row/JSON encoding", best_e),
        ("(a)-(c): writer I/O path", io_path),
    ]
    print(f"\n{'step':<40}{'best s':>8}{'MB/s':>9}")
    for label, secs in rows:
        print(f"{label:<40}{secs:>8.3f}{mb / secs:>9.0f}")
    print(f"\nratio writer/baseline: {best_b / best_w:.2f}x (target >= 0.70)")
    print(f"ratio I/O path/baseline: {best_b / io_path:.2f}x (encoding excluded, as in the baseline)")
    print(f"{mb:.1f} MB of tar, {len(examples)} examples, best of {args.reps}")


if __name__ == "__main__":
    main()
