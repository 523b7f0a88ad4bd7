"""The SA-1B cost model runs on the committed rates file and says what is not sourced."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("cost_model", ROOT / "benchmarks" / "cost_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_cost_model_prints_every_figure_from_the_committed_rates():
    cm = _module()
    rates = json.loads((ROOT / "benchmarks" / "cost_rates.json").read_text())
    rows = cm.compute(rates, images=11_000_000, cpu_workers=500, gpus=64, gpu_usd_h=None)
    by = {r.recipe: r for r in rows}
    regions = by["sa1b.yaml"]
    assert regions.worker_hours > 0 and regions.shuffle_tb > 0 and regions.gpu_hours_hi is None
    vlm = [r for r in rows if r.recipe.startswith("sa1b_ors.yaml")]
    assert vlm and all(r.gpu_hours_hi > 0 and r.worker_hours > regions.worker_hours for r in vlm)
    # Doubling the images doubles the work.
    twice = {r.recipe: r for r in cm.compute(rates, images=22_000_000, cpu_workers=500, gpus=64, gpu_usd_h=None)}
    assert twice["sa1b.yaml"].worker_hours == pytest.approx(2 * regions.worker_hours)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_model.py")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "no sourced price" in out and "NOT OFFICIAL" in out and "| sa1b.yaml |" in out


def test_cost_model_refuses_a_rates_file_without_measurements(tmp_path):
    rates = json.loads((ROOT / "benchmarks" / "cost_rates.json").read_text())
    del rates["measured"]
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(rates))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_model.py"), "--rates", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "run benchmarks/bench_cost_rates.py first" in res.stderr


def test_cost_model_says_what_a_rerun_after_a_crash_costs():
    cm = _module()
    rates = json.loads((ROOT / "benchmarks" / "cost_rates.json").read_text())
    rows = cm.compute(rates, images=11_000_000, cpu_workers=500, gpus=64, gpu_usd_h=2.0)
    by = {r.recipe: r for r in cm.rerun(rates, rows)}
    plain = by["sa1b.yaml"]
    full = next(r for r in rows if r.recipe == "sa1b.yaml")
    # Every group written: only the recomputed CPU stages; none written: the write and its shuffle too.
    assert 0 < plain.share_lo < plain.share_hi <= 1.0 + 1e-9
    assert plain.worker_hours_lo < plain.worker_hours_hi == pytest.approx(full.worker_hours)
    # The GPU work is never paid twice: with any GPU price the VLM recipes' rerun is a small share.
    vlm = [r for name, r in by.items() if name.startswith("sa1b_ors.yaml")]
    assert vlm and all(r.share_hi < 0.05 for r in vlm)
    assert by["SAM2 verify (encoder only)"].usd_hi == 0
    # Without a GPU price the share is not made up.
    unpriced = cm.rerun(rates, cm.compute(rates, images=11_000_000, cpu_workers=500, gpus=64, gpu_usd_h=None))
    assert all(r.share_lo is None for r in unpriced if r.recipe.startswith("sa1b_ors.yaml"))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_model.py")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert re.search(r"A rerun after a crash costs ~[\d.]+%–[\d.]+% of a full run of sa1b\.yaml", out)
