"""Benchmark: orsgen's shard writer against a bare ``tarfile`` baseline.

Builds N synthetic examples (real noise JPEGs of about ``--image-kb`` KB and
``--instances`` COCO RLE masks each), then times in one run:

(a) ``stages.write.encode_example`` over all examples, for
    ``["webdataset"]`` and for both formats: the row + JSON (+ Arrow row)
    encoding. In the pipeline this is the "Encode" map, which runs on every
    worker in parallel before the shuffle, so it is reported per example and
    kept out of the writer's ratio;
(b) ``stages.write.write_bucket`` on the pre-encoded examples with
    ``formats=["webdataset"]``: key sorting, planning, the tar, sha256,
    tmp + rename, sidecar and marker (the serial per-bucket part);
(c) the baseline: ``tarfile.addfile`` of the same jpg + json member bytes,
    precomputed outside the timer;
(d) for information, ``write_bucket`` on pre-encoded examples with both
    formats (the tar plus the Parquet file of the same examples).

Each is run ``--reps`` times into fresh folders, interleaved, and the best
time is kept. The target is a (b)/(c) throughput ratio of at least 0.7.

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
from orsgen.stages.write import encode_example, write_bucket


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


def _best(best: dict[str, float], name: str, secs: float) -> None:
    best[name] = min(best.get(name, float("inf")), secs)


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

    wds_only, both = ["webdataset"], ["webdataset", "parquet"]
    cfg_w = WriteConfig(formats=wds_only, shard_max_images=10**6, shard_max_bytes=10**12, num_buckets=1)
    cfg_b = cfg_w.model_copy(update={"formats": both})
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_write_"))
    best: dict[str, float] = {}
    tar_bytes = both_bytes = 0
    enc_w = enc_b = []
    try:
        for r in range(args.reps):
            t = time.perf_counter()
            enc_w = [encode_example(ex, wds_only) for ex in examples]
            _best(best, "enc_w", time.perf_counter() - t)
            t = time.perf_counter()
            enc_b = [encode_example(ex, both) for ex in examples]
            _best(best, "enc_b", time.perf_counter() - t)

            out = scratch / f"orsgen-{r}"
            t = time.perf_counter()
            stats = write_bucket(str(out), "train", 0, enc_w, cfg_w)
            _best(best, "write_w", time.perf_counter() - t)
            tar_bytes = sum(s.n_bytes for s in stats)
            shutil.rmtree(out)

            base = scratch / f"baseline-{r}.tar"
            t = time.perf_counter()
            baseline_tar(base, members)
            _best(best, "base", time.perf_counter() - t)
            base.unlink()

            out = scratch / f"orsgen-both-{r}"
            t = time.perf_counter()
            stats = write_bucket(str(out), "train", 0, enc_b, cfg_b)
            _best(best, "write_b", time.perf_counter() - t)
            both_bytes = sum(s.n_bytes for s in stats)
            shutil.rmtree(out)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    n = len(examples)
    mb, mb_both = tar_bytes / 1e6, both_bytes / 1e6
    print("\n(a) parallel encode step (the pipeline's \"Encode\" map: runs on all workers, before the shuffle)")
    for label, key in (("webdataset only", "enc_w"), ("webdataset + parquet", "enc_b")):
        print(f"    {label:<22}{best[key] * 1e3 / n:>7.3f} ms/example  ({best[key]:.3f} s for {n})")
    print("    (the Parquet row is built by the writer from the JSON member: nothing Parquet-only crosses the shuffle)")
    rows = [
        ("(b) write_bucket, pre-encoded, webdataset", best["write_w"], mb),
        ("(c) baseline tarfile.addfile, same bytes", best["base"], mb),
        ("(d) write_bucket, pre-encoded, both formats", best["write_b"], mb_both),
    ]
    print(f"\n{'step':<46}{'best s':>8}{'MB':>8}{'MB/s':>9}")
    for label, secs, size in rows:
        print(f"{label:<46}{secs:>8.3f}{size:>8.1f}{size / secs:>9.0f}")
    ratio = best["base"] / best["write_w"]
    print(f"\nratio (b)/(c) writer/baseline throughput: {ratio:.2f}x (target >= 0.70: {'met' if ratio >= 0.7 else 'NOT met'})")
    print(f"{n} examples, best of {args.reps}; (d) MB counts the tar and the Parquet file")


if __name__ == "__main__":
    main()
