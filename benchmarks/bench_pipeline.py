"""Benchmark: what Beam costs (P2), start-up, and images/s/core of the whole build.

The same build three ways, on the same inputs, in one run:

* ``loop``: a plain Python loop that calls the build's pure stage functions in
  the pipeline's order (ingest, expressions, regions, human samples, splits,
  encode, then one ``write_bucket`` per (split, bucket), the rejects and the
  manifest). No Beam.
* ``beam-1``: ``run_pipeline`` on the Python direct runner (FnApiRunner) in
  this process.
* ``beam-2``: the direct runner with 2 worker processes
  (``--direct_num_workers=2 --direct_running_mode=multi_processing``).

The loop and both Beam runs must write byte-identical data files (WebDataset,
Parquet, rejects): the benchmark checks it, so the loop is the same work.

Inputs come from the demo generator (``pipelines/demo_data.py``), in the real
source formats: COCO-format annotations with COCO-sized busy scenes
(``dense_coco``: 640x480-ish, about 10-25 instances each) and SA-1B-format tar
shards (JPEG + per-image JSON). They are synthetic: no real COCO or SA-1B data
is available offline. The COCO config is ``configs/coco_ors_bench.yaml``'s
expressions / splits / write sections with the demo's input.

Figures:

* images/s/core: images over CPU seconds (user + system of this process and
  its worker processes), so that a shared machine's idle waits do not count;
  wall-clock images/s too.
* overhead: Beam CPU (and wall) over the loop's, same inputs, same run,
  over the whole run and marginal: each way also runs the first
  ``--marginal-from`` images, and the difference over the extra images is
  the per-image cost without what a run pays once. Imports are paid before
  either is timed.
* start-up: a fresh process building a 1-image COCO input, from process start
  to the run's end (``orsgen run``), next to bare Python, ``import
  apache_beam``, Beam alone (a 1-element pipeline on the same runner), the
  pipeline modules' import and the same 1 image through the loop.
* per-image CPU of the loop against the tree before the optimisation
  (``--baseline``, default ``c63fce4``): each tree's own loop and config,
  alternating fresh processes.

    python benchmarks/bench_pipeline.py [--coco-images 200] [--sa1b-images 200] [--marginal-from 50]
        [--repeat 1] [--baseline c63fce4|GIT_REV|none] [--only-baseline] [--skip-workers]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ inputs


def make_inputs(root: Path, n_coco: int, n_sa1b: int, seed: int = 0) -> tuple[Path, Path]:
    """Writes the inputs (once; reused when present) and one config per format.

    Returns:
        ``(coco config path, sa1b config path)``.
    """
    from orsgen.pipelines.demo_data import write_coco, write_sa1b

    stamp = root / f"done-{n_coco}-{n_sa1b}-{seed}"
    per_shard = min(25, n_sa1b)
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_coco(root / "coco", seed, n_coco, dense=True)
        n_shards = max(1, -(-n_sa1b // per_shard))
        write_sa1b(root / "sa1b", seed, n_shards, per_shard)
        stamp.write_text("ok\n")
    bench = yaml.safe_load((REPO / "configs" / "coco_ors_bench.yaml").read_text())
    coco = {
        **{k: v for k, v in bench.items() if k != "inputs"},
        "inputs": [{"name": "coco", "type": "coco", "annotations": "coco/annotations/instances_demo.json",
                    "images": "coco/images"}],
    }
    sa1b = {
        "name": "bench-sa1b",
        "seed": 0,
        "inputs": [{"name": "sa1b", "type": "sa1b", "shards": ["sa1b/sa_*.tar"], "max_images": n_sa1b}],
        "write": {"num_buckets": bench["write"]["num_buckets"]},
    }
    paths = []
    for name, cfg in (("coco", coco), ("sa1b", sa1b)):
        p = root / f"bench_{name}.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(p)
    return paths[0], paths[1]


def one_image_config(coco_cfg: Path) -> Path:
    """The COCO config limited to its first image (for the start-up figure)."""
    data = yaml.safe_load(coco_cfg.read_text())
    data["inputs"][0]["max_images"] = 1
    p = coco_cfg.with_name("bench_coco_1.yaml")
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


#: The tree just before issue 14's per-image optimisation (its benchmark and
#: dense demo scenes exist, the optimisations do not).
BASELINE_REV = "c63fce4"


def _has_revision(rev: str) -> bool:
    try:
        return subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{rev}^{{commit}}"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


# ------------------------------------------------------------------ the plain loop


def plain_loop(cfg: Any, out: str) -> dict[str, int]:
    """The build as a plain loop over the pipeline's stage functions.

    Same functions, same order, same arguments as ``pipelines/build.py``;
    single-input configs only (the benchmark's), so splits are the per-example
    ``splits_stage``.

    Returns:
        The summed counting events (the manifest's inputs).
    """
    from orsgen.pipelines.build import (
        _manifest_fn,
        no_regions_reject,
        refs_stage,
        regions_stage,
        rejects_num_buckets,
        split_num_buckets,
        splits_stage,
    )
    from orsgen.pipelines.transforms import example_events
    from orsgen.schemas.config import Sa1bInput
    from orsgen.schemas.records import ImageExample, Reject
    from orsgen.stages.expressions import expressions_stage, load_templates
    from orsgen.stages.ingest import coco as ingest_coco, sa1b as ingest_sa1b
    from orsgen.stages.write import bucket_of, encode_example, write_group, write_rejects_bucket

    assert len(cfg.inputs) == 1, "the plain loop handles single-input configs"
    inp = cfg.inputs[0]
    input_types = {inp.name: inp.type}
    events: Counter[str] = Counter()
    rejects: list[Any] = []
    vocab: dict[str, Any] = {}

    def reader_items() -> Any:
        if isinstance(inp, Sa1bInput):
            for shard in ingest_sa1b.expand_shards(inp.shards):
                yield from ingest_sa1b.read_sa1b_shard(shard, input_name=inp.name, image_cfg=cfg.image,
                                                       max_images=inp.max_images, written_paths=inp.written_paths)
            return
        categories, items = ingest_coco.plan_input(inp)
        vocab[inp.name] = tuple(categories)
        for item in items:
            if isinstance(item, Reject):
                rejects.append(item)
                events[f"ingest_rejects/{item.level}"] += 1
            else:
                yield from ingest_coco.load_task(item, image_cfg=cfg.image)

    templates = load_templates(cfg.expressions.templates) if cfg.expressions.enabled else None
    stages = [
        (functools.partial(expressions_stage, cfg=cfg, input_types=input_types, templates=templates), (vocab,)),
        (functools.partial(regions_stage, cfg=cfg, input_types=input_types), ()),
        (refs_stage, ()),
        (functools.partial(splits_stage, cfg=cfg), ()),
    ]
    formats = list(cfg.write.formats)
    encoded: list[Any] = []
    for item in reader_items():
        if isinstance(item, Reject):
            rejects.append(item)
            events[f"ingest_rejects/{item.level}"] += 1
            continue
        assert isinstance(item, ImageExample)
        for k, n in example_events("read", item):
            events[k] += n
        ex: Any = item
        for fn, side in stages:
            before = {s.sample_id for s in ex.samples}
            result = fn(ex, *side)
            new, stage_rejects = result[0], result[1]
            for k, n in result[2] if len(result) > 2 else ():
                events[k] += n
            rejects.extend(stage_rejects)
            if new is None:
                for level, n in (("instances", len(ex.instances)), ("refs", len(ex.refs)), ("samples", len(ex.samples))):
                    events[f"dropped_with_image/{level}"] += n
                ex = None
                break
            after = {s.sample_id for s in new.samples}
            keys = {r.source_key for r in stage_rejects if r.level == "sample"}
            events["created/samples"] += len(after - before) + len(keys - before)
            ex = new
        if ex is None:
            continue
        encoded.append(encode_example(ex, formats=formats))
    # The pipeline's write plan: bucket counts per split from the split sizes
    # (write.num_buckets: auto), one group per (split, bucket, num_buckets),
    # no_regions judged after dedupe, rejects bucketed by their number.
    sizes: dict[str, tuple[int, int]] = {}
    for enc in encoded:
        n, b = sizes.get(enc.split, (0, 0))
        sizes[enc.split] = (n + 1, b + enc.size)
    buckets = split_num_buckets(sizes, cfg)
    groups: dict[tuple[str, int, int], list[Any]] = defaultdict(list)
    for enc in encoded:
        nb = buckets[enc.split]
        groups[(enc.split, bucket_of(enc.key, nb), nb)].append(enc)
    stats = []
    w = cfg.write
    for (split, bucket, nb), encs in sorted(groups.items()):
        res = write_group(
            out, split, bucket, encs, w, num_buckets=nb, reject_after_dedupe=functools.partial(no_regions_reject, cfg=cfg)
        )
        for dup, reject in res.dropped:
            rejects.append(reject)
            for level, n in (("instances", dup.n_instances), ("refs", dup.n_refs), ("samples", dup.n_samples)):
                events[f"dropped_with_image/{level}"] += n
        events["written/images"] += len(res.written)
        for level in ("instances", "refs", "samples"):
            events[f"written/{level}"] += sum(getattr(e, f"n_{level}") for e in res.written)
        stats.extend(res.stats)
    nb_r = rejects_num_buckets(len(rejects), cfg)
    by_bucket: dict[int, list[Any]] = defaultdict(list)
    for r in rejects:
        by_bucket[bucket_of(r.source_key, nb_r)].append(r)
    for b, rs in sorted(by_bucket.items()):
        stats.extend(
            write_rejects_bucket(
                out, b, rs, compression=w.parquet_compression, num_buckets=nb_r, max_rows=w.rejects_shard_max_rows,
                memory_max_bytes=w.spill_memory_max_bytes, spill_dir=w.spill_dir,
            )
        )
    _manifest_fn(None, out=out, cfg=cfg, stats=stats, events={k: v for k, v in events.items() if v})
    return dict(events)


# ------------------------------------------------------------------ measuring


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclasses.dataclass
class Timing:
    wall_s: float
    cpu_s: float


def timed(fn: Any, *args: Any, **kwargs: Any) -> Timing:
    c0, t0 = _cpu_s(), time.perf_counter()
    fn(*args, **kwargs)
    return Timing(time.perf_counter() - t0, _cpu_s() - c0)


def _quiet_workers(fn: Any) -> Any:
    """``fn`` with file descriptor 2 sent to /dev/null (Beam's worker processes log every bundle at INFO)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            return fn(*args, **kwargs)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)

    return call


def data_digest(out: Path) -> str:
    """One digest of every data file (WebDataset, Parquet, rejects) under ``out``."""
    h = hashlib.sha256()
    for sub in ("webdataset", "parquet", "rejects"):
        for p in sorted((out / sub).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(out).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def written_images(out: Path) -> int:
    import json

    return int(json.loads((out / "manifest.json").read_text())["counts"]["written"])


def fresh_process(argv: list[str]) -> Timing:
    """Wall and CPU seconds of a fresh process running ``argv`` (start to exit)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, t0 = kids.ru_utime + kids.ru_stime, time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Timing(time.perf_counter() - t0, kids.ru_utime + kids.ru_stime - c0)


#: A trivial 1-element pipeline on the runner ``orsgen run`` uses (in-process
#: FnApiRunner): what Beam alone costs a fresh process, before any orsgen code.
BEAM_ALONE = (
    "import apache_beam as beam\n"
    "from apache_beam.options.pipeline_options import PipelineOptions\n"
    "with beam.Pipeline(options=PipelineOptions(['--runner=FnApiRunner'])) as p:\n"
    "    p | beam.Create([1]) | beam.Map(lambda x: x + 1)\n"
)


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU(s), {model}; Python {platform.python_version()}; "
            f"1-min load average at start {load:.1f}")


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coco-images", type=int, default=200)
    ap.add_argument("--sa1b-images", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1, help="timed repeats of each way (the best is kept)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "orsgen-bench-pipeline",
                    help="scratch folder; generated inputs are kept there and reused")
    ap.add_argument("--marginal-from", type=int, default=50,
                    help="also run each way on the first N images, for the marginal per-image cost (0: skip)")
    ap.add_argument("--skip-workers", action="store_true", help="skip the 2-worker-process run")
    ap.add_argument("--baseline", metavar="GIT_REV", default=BASELINE_REV,
                    help="also compare the plain loop's per-image CPU with this git revision, alternating fresh "
                         f"processes on the COCO-style input (default {BASELINE_REV}, the tree before issue 14's "
                         "optimisation; 'none' skips it; needs a git checkout)")
    ap.add_argument("--only-baseline", action="store_true", help="run only the --baseline comparison")
    args = ap.parse_args()
    started = time.perf_counter()
    print(f"machine: {machine()}")

    t0 = time.perf_counter()
    coco_cfg_path, sa1b_cfg_path = make_inputs(args.work / "inputs", args.coco_images, args.sa1b_images)
    print(f"inputs: {args.coco_images} COCO-format dense demo scenes, {args.sa1b_images} SA-1B-format demo images "
          f"(synthetic, pipelines/demo_data.py) ready in {time.perf_counter() - t0:.1f} s")

    one = one_image_config(coco_cfg_path)
    if args.baseline == BASELINE_REV and not _has_revision(BASELINE_REV):
        print(f"per-image CPU against {BASELINE_REV}: skipped (no git checkout holding it)")
        args.baseline = "none"
    if args.baseline and args.baseline != "none":
        compare_with_revision(args.baseline, args.work, args.coco_images, args.sa1b_images, max(args.repeat, 2))
        if args.only_baseline:
            return
    # Start-up first, while nothing is cached in this process.
    py = sys.executable
    out1 = args.work / "startup"
    shutil.rmtree(out1, ignore_errors=True)
    startup = {
        "bare Python": fresh_process([py, "-c", "pass"]),
        "import apache_beam": fresh_process([py, "-c", "import apache_beam"]),
        "Beam alone: 1-element pipeline": fresh_process([py, "-c", BEAM_ALONE]),
        "import the pipeline modules": fresh_process([py, "-c", "import orsgen.pipelines.run, orsgen.pipelines.build"]),
        "plain loop, 1 image": fresh_process([py, __file__, "--one-loop", str(one), str(out1 / "loop")]),
        "`orsgen run`, 1 image": fresh_process([py, "-m", "orsgen.pipelines.cli", "run", str(one), "--out",
                                                 str(out1 / "beam"), "--quiet"]),
    }
    print("start-up, fresh process from start to exit (1 COCO-style image):")
    for what, t in startup.items():
        print(f"  {what:<30} {t.wall_s:6.2f} s wall {t.cpu_s:6.2f} s CPU")

    from orsgen.pipelines.run import run_pipeline
    from orsgen.schemas.config import load_config

    ways: list[tuple[str, Any]] = [
        ("loop", lambda cfg, out: plain_loop(cfg, str(out))),
        ("beam-1", lambda cfg, out: run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)),
    ]
    if not args.skip_workers:
        ways.append(("beam-2", lambda cfg, out: _quiet_workers(run_pipeline)(
            cfg, str(out), ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
            show_progress=False)))
    rows = []
    for label, path, n_total in (("COCO-style", coco_cfg_path, args.coco_images),
                                 ("SA-1B-format", sa1b_cfg_path, args.sa1b_images)):
        cfg = load_config(path)

        def limited(n: int) -> Any:
            """The config cut to its first ``n`` images."""
            inp = cfg.inputs[0]
            if inp.type == "sa1b":
                # SA-1B's max_images counts per shard: keep whole shards instead.
                shards = sorted(glob.glob(inp.shards[0]))
                per_shard = -(-n_total // len(shards))
                update = {"shards": shards[: max(1, -(-n // per_shard))], "max_images": n if n < per_shard else None}
            else:
                update = {"max_images": n}
            return cfg.model_copy(update={"inputs": [inp.model_copy(update=update)]})

        # Warm-up: imports and the first-call costs of both paths, untimed.
        warm = load_config(one) if label == "COCO-style" else limited(1)
        for way, fn in ways[:2]:
            w = args.work / f"warm-{label}-{way}"
            shutil.rmtree(w, ignore_errors=True)
            fn(warm, w)
        # Each way at two sizes: the difference is the marginal cost of the
        # extra images, free of what a run pays once (graph, runner and worker
        # start-up, per-run writer costs), which the totals include.
        n_small = args.marginal_from if 0 < args.marginal_from < n_total else 0
        sizes = [("full", cfg)] + ([("small", limited(n_small))] if n_small else [])
        res: dict[tuple[str, str], Timing] = {}
        digests: dict[tuple[str, str], str] = {}
        n_images: dict[str, int] = {}
        for r in range(args.repeat):
            for size, size_cfg in sizes:
                for way, fn in ways:
                    out = args.work / f"out-{label}-{way}-{size}-{r}"
                    shutil.rmtree(out, ignore_errors=True)
                    t = timed(fn, size_cfg, out)
                    if (way, size) not in res or t.cpu_s < res[(way, size)].cpu_s:
                        res[(way, size)] = t
                    digests[(way, size)] = data_digest(out)
                    n_images[size] = written_images(out)
                    shutil.rmtree(out, ignore_errors=True)
        for size, _ in sizes:
            if len({d for (w, sz), d in digests.items() if sz == size}) != 1:
                raise SystemExit(f"{label} ({size}): the ways wrote different data files: {digests}")
        base = res[("loop", "full")]

        def marginal_ms(way: str) -> float:
            extra = n_images["full"] - n_images.get("small", 0)
            if "small" not in n_images or extra <= 0:
                return float("nan")
            return (res[(way, "full")].cpu_s - res[(way, "small")].cpu_s) / extra * 1e3

        for way, _ in ways:
            t = res[(way, "full")]
            rows.append((label, way, n_images["full"], n_images.get("small", 0), t, t.cpu_s / base.cpu_s,
                         t.wall_s / base.wall_s, marginal_ms(way), marginal_ms(way) / marginal_ms("loop")))
    print()
    print(f"{'input':<13} {'way':<7} {'images':>6} {'wall s':>7} {'CPU s':>7} {'img/s':>6} {'img/s/core':>10} "
          f"{'CPU vs loop':>11} {'wall vs loop':>12} {'marginal CPU ms/img':>20} {'marginal vs loop':>16}")
    for label, way, n, n_small, t, cpu_ratio, wall_ratio, marg, marg_ratio in rows:
        print(f"{label:<13} {way:<7} {n:>6} {t.wall_s:>7.2f} {t.cpu_s:>7.2f} {n / t.wall_s:>6.1f} "
              f"{n / t.cpu_s:>10.1f} {cpu_ratio:>10.2f}x {wall_ratio:>11.2f}x {marg:>20.1f} {marg_ratio:>15.2f}x")
    print("\nimg/s/core = images / CPU seconds of this process and its workers; CPU/wall vs loop = whole runs "
          "(fixed per-run costs included); marginal = (CPU of the full run - CPU of a run of the first "
          f"{args.marginal_from} images) / the extra images, i.e. the per-image cost without what a run pays once. "
          "Every way wrote byte-identical data files at both sizes. "
          f"Whole benchmark: {time.perf_counter() - started:.0f} s.")


def _one_loop(cfg_path: str, out: str) -> None:
    from orsgen.schemas.config import load_config

    plain_loop(load_config(cfg_path), out)


def _tree_loop_cpu(bench_dir: str, input_root: str, n_coco: str, n_sa1b: str, out: str) -> None:
    """Prints the warm CPU seconds of the plain loop of the tree whose benchmark is in ``bench_dir``.

    That tree's own ``make_inputs`` (its config for the same demo images) and
    ``plain_loop`` (its own stage API) are used, so a revision from before
    later API changes still runs; ``orsgen`` itself comes from ``PYTHONPATH``.
    """
    import importlib
    import json

    sys.path.insert(0, bench_dir)
    bench = importlib.import_module("bench_pipeline")
    from orsgen.schemas.config import load_config

    coco_cfg, _ = bench.make_inputs(Path(input_root), int(n_coco), int(n_sa1b))
    cfg = load_config(coco_cfg)
    warm = cfg.model_copy(update={"inputs": [cfg.inputs[0].model_copy(update={"max_images": 1})]})
    shutil.rmtree(out, ignore_errors=True)
    bench.plain_loop(warm, out + "-warm")
    shutil.rmtree(out + "-warm", ignore_errors=True)
    t = timed(bench.plain_loop, cfg, out)
    print(json.dumps({"cpu_s": t.cpu_s, "wall_s": t.wall_s, "images": written_images(Path(out)),
                      "digest": data_digest(Path(out)), "orsgen": str(Path(sys.modules["orsgen"].__file__).parent)}))
    shutil.rmtree(out, ignore_errors=True)


def compare_with_revision(rev: str, work: Path, n_coco: int, n_sa1b: int, repeat: int) -> None:
    """Per-image CPU of the plain loop at git revision ``rev`` against this tree, alternating runs.

    ``rev``'s tree is exported (``git archive``) to a scratch folder put first
    on ``PYTHONPATH`` of its runs; each tree runs its own benchmark's loop and
    config on the same generated demo images, in fresh processes, one after
    the other, warm (after one untimed image). ``rev`` must hold
    ``benchmarks/bench_pipeline.py`` (c63fce4 or later): its loop follows the
    stage API of its time.
    """
    import json

    base = work / f"tree-{rev}"
    if not (base / "orsgen" / "__init__.py").exists():
        shutil.rmtree(base, ignore_errors=True)
        (base / "orsgen").mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base / "orsgen")], input=archive, check=True)
    rev_bench = base / "orsgen" / "benchmarks"
    if not (rev_bench / "bench_pipeline.py").exists():
        raise SystemExit(f"revision {rev} has no benchmarks/bench_pipeline.py; pick c63fce4 or a later revision.")
    trees = {
        # Its own inputs folder: each tree's make_inputs writes its own config there.
        rev: (str(base), str(rev_bench), work / f"inputs-{rev}", 1),
        "this tree": ("", str(REPO / "benchmarks"), work / "inputs", n_sa1b),
    }
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for _ in range(repeat):
        for label, (env_path, bench_dir, inputs, n_s) in trees.items():
            env = {**os.environ, "PYTHONPATH": env_path}
            got = subprocess.run(
                [sys.executable, __file__, "--tree-loop-cpu", bench_dir, str(inputs), str(n_coco), str(n_s),
                 str(work / "cmp-out")],
                check=True, capture_output=True, text=True, env=env, cwd=REPO,
            ).stdout.strip().splitlines()[-1]
            results[label].append(json.loads(got))
    best = {k: min(v, key=lambda r: r["cpu_s"]) for k, v in results.items()}
    b, t = (best[k]["cpu_s"] / best[k]["images"] * 1e3 for k in (rev, "this tree"))
    same = len({r["digest"] for v in results.values() for r in v}) == 1
    runs = ", ".join(f"{k}: " + " / ".join(f"{r['cpu_s'] / r['images'] * 1e3:.1f}" for r in v) for k, v in results.items())
    print(f"per-image CPU of the plain loop, warm, {best[rev]['images']} dense COCO-style images, each tree with its own "
          f"benchmark config: {rev} {b:.1f} ms, this tree {t:.1f} ms: {b / t:.2f}x less (all runs, ms/image: {runs})")
    print("  data files: " + ("byte-identical" if same else
          f"differ between {rev} and this tree (expected when commits between them change the output or the "
          "config on purpose; byte identity of an optimisation is checked against the tree just before it)"))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one-loop":
        _one_loop(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 7 and sys.argv[1] == "--tree-loop-cpu":
        _tree_loop_cpu(*sys.argv[2:])
    else:
        main()
