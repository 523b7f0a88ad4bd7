"""Cost of a full SA-1B pass on Dataflow, from the rates in benchmarks/cost_rates.json.

    python benchmarks/cost_model.py [--rates benchmarks/cost_rates.json] [--images N]
        [--cpu-workers 500] [--gpus 64] [--gpu-usd-per-hour X] [--markdown]

Every input is labelled in the rates file: ``measured`` (by
``benchmarks/bench_cost_rates.py`` on this machine), CITED (a public figure,
with its source), DERIVED, or ASSUMED. Prices are the ones found, with their
date and status; no GPU list price was found, so GPU dollars are printed only
when ``--gpu-usd-per-hour`` is given.

What it computes, for the ``sa1b.yaml`` (regions only) and ``sa1b_ors.yaml``
(plus the VLM caption stage) recipes:

* worker-hours (CPU): sum of the measured per-image CPU-seconds of the stages
  the recipe runs, times the Beam overhead factor, over the vCPUs of a worker;
* GPU-hours (VLM): tokens per image (measured image tokens, estimated text
  and output tokens) over the cited tokens/s per GPU (conservative and
  optimistic figures);
* shuffle TB: measured bytes per image crossing the one shuffle before writing;
* dollars at the stated prices, and wall time for the stated worker and GPU counts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REGIONS_STAGES = ("ingest", "expressions", "regions", "human_samples", "splits", "encode", "write")


@dataclass(frozen=True)
class Row:
    recipe: str
    worker_hours: float
    vcpu_hours: float
    gpu_hours_lo: float | None
    gpu_hours_hi: float | None
    shuffle_tb: float
    cpu_usd: float
    shuffle_usd: float
    gpu_usd_lo: float | None
    gpu_usd_hi: float | None
    cpu_wall_h: float
    gpu_wall_h_lo: float | None
    gpu_wall_h_hi: float | None


def vlm_tokens_per_image(rates: dict) -> float:
    """Input + output tokens per image of the two caption rounds (see the rates file's labels)."""
    vlm = rates["measured"]["vlm"]["per_task_round1"]
    a = rates["vlm_assumptions"]
    out = a["output_tokens_per_request"]
    total = 0.0
    for task in ("cors_ground", "ders_describe"):
        t = vlm[task]
        total += t["requests_per_image"] * (t["image_tokens_per_request"] + t["text_tokens_per_request_est"] + out[task])
    like = vlm[a["round2_image_tokens_like"]]
    round2_in = like["image_tokens_per_request"] + like["text_tokens_per_request_est"]
    total += a["cors_verify_requests_per_image"] * (round2_in + out["cors_verify"])
    n_regr = vlm["ders_describe"]["requests_per_image"] * a["reground_requests_per_describe"]
    total += n_regr * (round2_in + out["reground"])
    return total


def compute(rates: dict, images: int, cpu_workers: int, gpus: int, gpu_usd_h: float | None) -> list[Row]:
    m = rates["measured"]
    cpu = m["cpu_s_per_image"]
    ca = rates["cpu_assumptions"]
    w = rates["workers"]
    p = rates["prices_usd"]
    overhead = ca["beam_overhead_factor"]
    worker_usd_h = w["cpu_vcpus"] * p["vcpu_hour"] + w["cpu_memory_gb"] * p["memory_gb_hour"] + w["disk_gb"] * p["pd_standard_gb_hour"]
    shuffle_gb = m["shuffle_bytes_per_image"] * images / 1e9
    rows = []
    recipes: list[tuple[str, str | None]] = [("sa1b.yaml", None)]
    recipes += [(f"sa1b_ors.yaml, {m}", m) for m in rates["gpu"]["vlm_total_tokens_per_s_per_gpu"]]
    recipes += [("SAM2 verify (encoder only)", "sam2")]
    for recipe, model in recipes:
        cpu_s = sum(cpu[s] for s in REGIONS_STAGES)
        lo = hi = None
        if model == "sam2":
            cpu_s = 0.0  # on top of a recipe's CPU work; only the GPU side is new
            fps = next(iter(rates["gpu"]["sam2_images_per_s_per_gpu"].values()))["value"]
            lo = hi = images / fps / 3600
        elif model is not None:
            cpu_s += cpu["caption_plan_round1"] * (2 if ca["caption_round2_cpu_like_round1"] else 1)
            tps = rates["gpu"]["vlm_total_tokens_per_s_per_gpu"][model]
            tokens = vlm_tokens_per_image(rates) * images
            lo = tokens / tps["optimistic"] / 3600 if tps.get("optimistic") else None
            hi = tokens / tps["conservative"] / 3600
        vcpu_h = cpu_s * overhead * images / 3600
        worker_h = vcpu_h / w["cpu_vcpus"]
        rows.append(Row(
            recipe=recipe,
            worker_hours=worker_h,
            vcpu_hours=vcpu_h,
            gpu_hours_lo=lo,
            gpu_hours_hi=hi,
            shuffle_tb=0.0 if model == "sam2" else shuffle_gb / 1000,
            cpu_usd=worker_h * worker_usd_h,
            shuffle_usd=0.0 if model == "sam2" else shuffle_gb * p["shuffle_gb"],
            gpu_usd_lo=(lo * gpu_usd_h) if (lo is not None and gpu_usd_h) else None,
            gpu_usd_hi=(hi * gpu_usd_h) if (hi is not None and gpu_usd_h) else None,
            cpu_wall_h=worker_h / cpu_workers,
            gpu_wall_h_lo=(lo / gpus) if lo is not None else None,
            gpu_wall_h_hi=(hi / gpus) if hi is not None else None,
        ))
    return rows


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _range(lo: float | None, hi: float | None, fmt: str = "{:,.0f}") -> str:
    if lo is None and hi is None:
        return "–"
    if lo is None or lo == hi:
        return _f(hi, fmt)
    return f"{_f(lo, fmt)}–{_f(hi, fmt)}"


def render(rows: list[Row], rates: dict, images: int, cpu_workers: int, gpus: int, gpu_usd_h: float | None) -> str:
    w = rates["workers"]
    head = (
        f"| recipe | worker-hours ({w['cpu_machine']}) | A100 GPU-hours | shuffle TB "
        f"| CPU $ | shuffle $ | GPU $ | wall h, {cpu_workers} workers | wall h, {gpus} GPUs |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        gpu_usd = _range(r.gpu_usd_lo, r.gpu_usd_hi) if gpu_usd_h else ("–" if r.gpu_hours_hi is None else "no sourced price")
        lines.append(
            f"| {r.recipe} | {r.worker_hours:,.0f} | {_range(r.gpu_hours_lo, r.gpu_hours_hi)} | {r.shuffle_tb:,.1f} "
            f"| {r.cpu_usd:,.0f} | {r.shuffle_usd:,.0f} | {gpu_usd} | {r.cpu_wall_h:,.1f} "
            f"| {_range(r.gpu_wall_h_lo, r.gpu_wall_h_hi, '{:,.0f}')} |"
        )
    p = rates["prices_usd"]
    lines += [
        "",
        f"{images:,} images. Prices: vCPU-h ${p['vcpu_hour']}, memory GB-h ${p['memory_gb_hour']}, PD GB-h "
        f"${p['pd_standard_gb_hour']}, Shuffle GB ${p['shuffle_gb']} ({p['date_seen']}; {p['source']})",
        f"GPU-hours: range = optimistic–conservative cited A100 throughput (no optimistic figure for 72B); tokens per image "
        f"{vlm_tokens_per_image(rates):,.0f} (image tokens measured with Qwen2.5-VL's processor, text tokens "
        "estimated, output tokens assumed). SAM2: encoder only, a lower bound (the per-prompt decoder is not counted). "
        "Wall time = hours / workers (or GPUs), assuming full use.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", type=Path, default=ROOT / "benchmarks" / "cost_rates.json")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--cpu-workers", type=int, default=None)
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--gpu-usd-per-hour", type=float, default=None, help="a GPU price you have checked (none is sourced)")
    args = ap.parse_args()
    rates = json.loads(args.rates.read_text())
    if "measured" not in rates:
        raise SystemExit(f"{args.rates} has no 'measured' section; run benchmarks/bench_cost_rates.py first.")
    images = args.images or rates["dataset"]["images"]
    cpu_workers = args.cpu_workers or rates["workers"]["cpu_workers"]
    gpus = args.gpus or rates["workers"]["gpus"]
    gpu_usd = args.gpu_usd_per_hour if args.gpu_usd_per_hour is not None else rates["prices_usd"]["gpu_hour"]
    rows = compute(rates, images, cpu_workers, gpus, gpu_usd)
    print(render(rows, rates, images, cpu_workers, gpus, gpu_usd))


if __name__ == "__main__":
    main()
