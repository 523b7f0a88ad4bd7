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
* dollars at the stated prices, and wall time for the stated worker and GPU counts;
* what a rerun after a crash costs (``rerun``): the CPU stages that a rerun
  recomputes for every image (ingest, expressions, regions, splits, encoding,
  the caption stage's request planning), and between none and all of the
  write and its shuffle (completed groups are skipped before the shuffle);
  no GPU-hours for images whose SAM2 predictions and VLM answers are cached
  (``OUT/_cache/sam2``, ``OUT/_cache/vlm``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REGIONS_STAGES = ("ingest", "expressions", "regions", "human_samples", "splits", "encode", "write")

#: What a rerun recomputes for every image, cached or not (README "What a rerun
#: after a crash recomputes"); ``write`` (and the shuffle) only for unfinished groups.
RERUN_STAGES = ("ingest", "expressions", "regions", "human_samples", "splits", "encode")


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


def _worker_usd_h(rates: dict) -> float:
    w = rates["workers"]
    p = rates["prices_usd"]
    return w["cpu_vcpus"] * p["vcpu_hour"] + w["cpu_memory_gb"] * p["memory_gb_hour"] + w["disk_gb"] * p["pd_standard_gb_hour"]


def compute(rates: dict, images: int, cpu_workers: int, gpus: int, gpu_usd_h: float | None) -> list[Row]:
    m = rates["measured"]
    cpu = m["cpu_s_per_image"]
    ca = rates["cpu_assumptions"]
    w = rates["workers"]
    p = rates["prices_usd"]
    overhead = ca["beam_overhead_factor"]
    worker_usd_h = _worker_usd_h(rates)
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


@dataclass(frozen=True)
class RerunRow:
    """A rerun after a crash, once every image's GPU work is cached.

    ``*_lo`` is a crash after every group was written (only the recomputed
    CPU stages run again); ``*_hi`` a crash before any group was written (the
    write and its shuffle run again too). GPU-hours are 0 either way.
    ``share_*`` is the rerun's dollars over the full run's (CPU, shuffle and,
    with a GPU price, GPU dollars).
    """

    recipe: str
    worker_hours_lo: float
    worker_hours_hi: float
    shuffle_tb_hi: float
    usd_lo: float
    usd_hi: float
    share_lo: float | None
    share_hi: float | None
    full_gpu_hours_lo: float | None
    full_gpu_hours_hi: float | None


def rerun(rates: dict, rows: list[Row]) -> list[RerunRow]:
    """What a rerun after a crash costs, per row of ``compute``.

    Without a GPU price the share of a recipe that uses GPUs is None (its
    dominant cost, the GPU-hours, is not priced; the rerun spends none).
    """
    cpu = rates["measured"]["cpu_s_per_image"]
    ca = rates["cpu_assumptions"]
    w = rates["workers"]
    usd_h = _worker_usd_h(rates)
    per_wh = ca["beam_overhead_factor"] / 3600 / w["cpu_vcpus"]
    out = []
    for r in rows:
        if r.recipe.startswith("SAM2"):
            # Only its GPU side is counted above; a rerun spends none of it.
            out.append(RerunRow(r.recipe, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0 if r.gpu_usd_hi else None,
                                0.0 if r.gpu_usd_hi else None, r.gpu_hours_lo, r.gpu_hours_hi))
            continue
        full_cpu_s = sum(cpu[s] for s in REGIONS_STAGES)
        cpu_lo = sum(cpu[s] for s in RERUN_STAGES)
        if r.gpu_hours_hi is not None:
            # The caption stage plans its requests again (their images are part
            # of the cache key); the answers come from OUT/_cache/vlm.
            plan = cpu["caption_plan_round1"] * (2 if ca["caption_round2_cpu_like_round1"] else 1)
            full_cpu_s += plan
            cpu_lo += plan
        images = r.worker_hours / (full_cpu_s * per_wh)
        wh_lo = cpu_lo * per_wh * images
        wh_hi = (cpu_lo + cpu["write"]) * per_wh * images
        usd_lo, usd_hi = wh_lo * usd_h, wh_hi * usd_h + r.shuffle_usd
        full_lo = full_hi = r.cpu_usd + r.shuffle_usd
        share_lo: float | None = usd_lo / full_hi
        share_hi: float | None = usd_hi / full_lo
        if r.gpu_hours_hi is not None:
            if r.gpu_usd_hi is None:
                share_lo = share_hi = None
            else:
                share_lo = usd_lo / (full_hi + r.gpu_usd_hi)
                share_hi = usd_hi / (full_lo + (r.gpu_usd_lo if r.gpu_usd_lo is not None else r.gpu_usd_hi))
        out.append(RerunRow(r.recipe, wh_lo, wh_hi, r.shuffle_tb, usd_lo, usd_hi, share_lo, share_hi,
                            r.gpu_hours_lo, r.gpu_hours_hi))
    return out


def _pct(v: float) -> str:
    if v == 0:
        return "0%"
    return f"{v:.2%}" if v < 0.001 else f"{v:.1%}" if v < 0.1 else f"{v:.0%}"


def render_rerun(rows: list[RerunRow]) -> str:
    """The rerun table and its summary lines."""
    lines = [
        "| recipe | rerun worker-hours | rerun GPU-hours (full run) | rerun shuffle TB | rerun CPU + shuffle $ "
        "| share of the full run's $ |",
        "|" + "---|" * 6,
    ]
    for r in rows:
        gpu = "–" if r.full_gpu_hours_hi is None else f"0 ({_range(r.full_gpu_hours_lo, r.full_gpu_hours_hi)})"
        share = "needs a GPU price" if r.share_lo is None else f"{_pct(r.share_lo)}–{_pct(r.share_hi)}"
        if r.share_lo is not None and r.share_lo == r.share_hi:
            share = _pct(r.share_lo)
        lines.append(
            f"| {r.recipe} | {_range(r.worker_hours_lo, r.worker_hours_hi)} | {gpu} "
            f"| {_range(0.0, r.shuffle_tb_hi, '{:,.1f}')} | {_range(r.usd_lo, r.usd_hi)} | {share} |"
        )
    plain = rows[0]
    lines += [
        "",
        f"A rerun after a crash costs ~{_pct(plain.share_lo)}–{_pct(plain.share_hi)} of a full run of {plain.recipe} "
        "(low: every group was written and is skipped; high: none was, so the write and its shuffle, most of this "
        "recipe's dollars, run again), and 0 GPU-hours for every image whose SAM2 predictions (OUT/_cache/sam2) "
        "and VLM answers (OUT/_cache/vlm) are cached: the GPU work, which dominates the VLM and SAM2 recipes, is not "
        f"paid twice. What it recomputes for every image is CPU only: {', '.join(RERUN_STAGES)}, and the caption "
        "stage's request planning.",
    ]
    return "\n".join(lines)


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
    print()
    print("Rerun after a crash, every image's GPU work cached:")
    print()
    print(render_rerun(rerun(rates, rows)))


if __name__ == "__main__":
    main()
