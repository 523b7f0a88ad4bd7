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
  alternating fresh processes; then both trees with the baseline's
  ``write.num_buckets`` (the same work: ``auto`` buckets came with issue 10)
  and both with one bucket (the per-image work without small shards' cost).
* the C work under the per-image cost: the loop once more under cProfile,
  the own time of GEOS, OpenCV, libjpeg, pycocotools, Arrow and file system
  calls, next to what 3x less than the baseline would need.
* optionally (``--baseline-beam d18b842``), the issue's own measure against
  the tree it was filed against: the Beam run's marginal CPU per image.

    python benchmarks/bench_pipeline.py [--coco-images 200] [--sa1b-images 200] [--marginal-from 50]
        [--repeat 1] [--baseline c63fce4|GIT_REV|none] [--baseline-beam d18b842|GIT_REV|none]
        [--only-baseline] [--skip-workers]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import hashlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

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


#: The tree issue 14 was filed against (its "today"): the last commit before
#: the work on issues 9-16 began.
FILED_REV = "d18b842"

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


#: Rounds of the start-up measurements (the best of them is printed).
STARTUP_ROUNDS = 3

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
    ap.add_argument("--only-baseline", action="store_true",
                    help="run only the --baseline and --baseline-beam comparisons")
    ap.add_argument("--baseline-beam", metavar="GIT_REV", default="none",
                    help="also compare the Beam run's marginal per-image CPU with this revision, the issue's own "
                         f"measure (e.g. {FILED_REV}, the tree issue 14 was filed against; default none: it adds "
                         "about 1.5 minutes at --repeat 2, 2 at --repeat 3). It prints two lines: both trees with "
                         "write.num_buckets 128, and this tree with its own config")
    args = ap.parse_args()
    started = time.perf_counter()
    print(f"machine: {machine()}")

    t0 = time.perf_counter()
    coco_cfg_path, sa1b_cfg_path = make_inputs(args.work / "inputs", args.coco_images, args.sa1b_images)
    print(f"inputs: {args.coco_images} COCO-format dense demo scenes, {args.sa1b_images} SA-1B-format demo images "
          f"(synthetic, pipelines/demo_data.py) ready in {time.perf_counter() - t0:.1f} s")

    one = one_image_config(coco_cfg_path)
    baseline_ms: float | None = None
    if args.baseline == BASELINE_REV and not _has_revision(BASELINE_REV):
        print(f"per-image CPU against {BASELINE_REV}: skipped (no git checkout holding it)")
        args.baseline = "none"
    if args.baseline_beam != "none":
        compare_beam_with_revision(args.baseline_beam, args.work, args.coco_images,
                                   min(args.marginal_from, args.coco_images - 1), max(args.repeat, 2))
    if args.baseline and args.baseline != "none":
        baseline_ms, _ = compare_with_revision(args.baseline, args.work, args.coco_images, args.sa1b_images,
                                               max(args.repeat, 2))
    if args.only_baseline:
        return
    # Start-up first, while nothing is cached in this process.
    py = sys.executable
    out1 = args.work / "startup"
    shutil.rmtree(out1, ignore_errors=True)
    commands = {
        "bare Python": [py, "-c", "pass"],
        "import apache_beam": [py, "-c", "import apache_beam"],
        "Beam alone: 1-element pipeline": [py, "-c", BEAM_ALONE],
        "import the pipeline modules": [py, "-c", "import orsgen.pipelines.run, orsgen.pipelines.build"],
        "plain loop, 1 image": [py, __file__, "--one-loop", str(one), str(out1 / "loop")],
        "`orsgen run`, 1 image": [py, "-m", "orsgen.pipelines.cli", "run", str(one), "--out", str(out1 / "beam"),
                                  "--quiet"],
    }
    # Best of three rounds of all rows: the first process to load a library
    # pays the cold file cache (one round made "Beam alone" look cheaper than
    # "import apache_beam"). The loop and run rows write to fresh folders.
    startup: dict[str, Timing] = {}
    for _ in range(STARTUP_ROUNDS):
        shutil.rmtree(out1, ignore_errors=True)
        for what, argv in commands.items():
            t = fresh_process(argv)
            if what not in startup or t.wall_s < startup[what].wall_s:
                startup[what] = t
    print(f"start-up, fresh process from start to exit (1 COCO-style image; best of {STARTUP_ROUNDS}):")
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
          f"Whole benchmark so far: {time.perf_counter() - started:.0f} s.")
    print()
    loop_row = next(r for r in rows if r[0] == "COCO-style" and r[1] == "loop")
    print_c_work(load_config(coco_cfg_path), args.work, loop_row[4].cpu_s / loop_row[2] * 1e3, baseline_ms)
    print(f"Whole benchmark: {time.perf_counter() - started:.0f} s.")


#: Where the plain loop's CPU goes, by library, for the floor under the
#: per-image cost: C calls whose results are the output bytes (or that must
#: run to accept an input), measured with cProfile. Python builtins, numpy
#: and hashlib are not counted: their work could in principle be done with
#: fewer calls, so they are not part of a floor.
FLOOR_GROUPS = ("GEOS (shapely)", "OpenCV", "libjpeg (Pillow decode)", "file I/O (system calls)",
                "Arrow / Parquet", "pycocotools")


def classify_profile_entry(filename: str, name: str) -> str | None:
    """The library a cProfile entry's own time (``tottime``) belongs to, or ``None``.

    C functions appear with filename ``~`` and a description (``<findContours>``,
    ``<method 'decode' of 'ImagingDecoder' objects>``). shapely's array
    functions are numpy ufuncs and pycocotools' are Cython functions: cProfile
    lists neither, so ``c_work`` calls them through wrappers whose code claims
    the file ``<GEOS>`` or ``<pycocotools>``.
    """
    if filename == "~":
        bare = name.strip("<>")
        if name.endswith("_scalar>") or "shapely.lib" in name:
            return "GEOS (shapely)"
        if " " not in bare:
            import cv2

            if hasattr(cv2, bare):
                return "OpenCV"
        if "ImagingDecoder" in name or "PIL._imaging" in name:
            return "libjpeg (Pillow decode)"
        if "_io.Buffered" in name or "io.open" in name or "posix." in name or "FileIO" in name:
            return "file I/O (system calls)"
        if "pyarrow" in name:
            return "Arrow / Parquet"
        return None
    if filename == "<GEOS>":
        return "GEOS (shapely)"
    if filename == "<pycocotools>":
        return "pycocotools"
    if "/pyarrow/" in filename.replace("\\", "/"):
        # pyarrow's Python layer is thin; its work is in C++ called from it.
        return "Arrow / Parquet"
    return None


@contextlib.contextmanager
def library_wrappers() -> Iterator[None]:
    """Routes shapely's GEOS ufuncs and pycocotools' Cython functions through profiled wrappers.

    Each wrapper is a one-line Python function whose code object names the
    library as its file, so its own time in cProfile is the library's time
    (plus a call's overhead). Callers look these functions up as module
    attributes at call time (``lib.buffer``, ``_mask.encode``) or hold an
    alias in an orsgen module: both are replaced, and restored afterwards.
    """
    import numpy as np
    import pycocotools._mask as cmask
    import pycocotools.mask as pmask
    import shapely.lib

    def wrap(fn: Any, label: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        call.__code__ = call.__code__.replace(co_filename=label, co_name=getattr(fn, "__name__", "call"))
        return call

    saved: list[tuple[Any, str, Any]] = []
    targets = [(shapely.lib, "<GEOS>", lambda v: isinstance(v, np.ufunc))]
    targets += [(m, "<pycocotools>", lambda v: type(v).__name__ == "cython_function_or_method") for m in (cmask, pmask)]
    wrapped: dict[int, Any] = {}
    for module, label, pick in targets:
        for key, value in list(vars(module).items()):
            if pick(value):
                saved.append((module, key, value))
                wrapped[id(value)] = wrap(value, label)
                setattr(module, key, wrapped[id(value)])
    # orsgen's own module-level aliases of those functions (bound at import,
    # e.g. ``_is_valid = shapely.lib.is_valid``) go through the wrappers too.
    for name, module in list(sys.modules.items()):
        if name == "orsgen" or name.startswith("orsgen."):
            for key, value in list(vars(module).items()):
                if id(value) in wrapped:
                    saved.append((module, key, value))
                    setattr(module, key, wrapped[id(value)])
    try:
        yield
    finally:
        for module, key, value in saved:
            setattr(module, key, value)


def c_work(cfg: Any, out: str) -> tuple[float, int, dict[str, float]]:
    """The plain loop once under cProfile, its own time summed per library.

    Returns:
        ``(profiled CPU seconds, images written, {group: seconds})``.
    """
    import cProfile
    import pstats

    prof = cProfile.Profile()
    with library_wrappers():
        c0 = _cpu_s()
        prof.enable()
        try:
            plain_loop(cfg, out)
        finally:
            prof.disable()
        cpu = _cpu_s() - c0
    groups: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(prof).stats.items():
        group = classify_profile_entry(filename, name)
        if group is not None:
            groups[group] += tottime
    return cpu, written_images(Path(out)), dict(groups)


def print_c_work(cfg: Any, work: Path, loop_ms: float, baseline_ms: float | None) -> None:
    """Prints the C floor under the plain loop's per-image CPU (and what 3x below the baseline needs)."""
    out = work / "out-c-work"
    shutil.rmtree(out, ignore_errors=True)
    cpu, n, groups = c_work(cfg, str(out))
    shutil.rmtree(out, ignore_errors=True)
    floor = sum(groups.get(g, 0.0) for g in FLOOR_GROUPS)
    print(f"C work under the per-image cost (the loop on the {n} COCO-style images once more, under cProfile: "
          f"{cpu / n * 1e3:.1f} ms/image profiled, {loop_ms:.1f} ms/image unprofiled):")
    for g in FLOOR_GROUPS:
        print(f"  {g:<26} {groups.get(g, 0.0) / n * 1e3:6.2f} ms/image")
    print(f"  {'together':<26} {floor / n * 1e3:6.2f} ms/image: calls whose results are the output bytes "
          "(outlines, interior points, masks, shards) or that accept an input (JPEG decode)")
    print(f"  everything else            {loop_ms - floor / n * 1e3:6.2f} ms/image of the unprofiled loop "
          "(Python, numpy, hashing)")
    if baseline_ms:
        need = baseline_ms / 3
        print(f"  3x less than the baseline's {baseline_ms:.1f} ms/image needs {need:.1f} ms/image; the C work alone "
              f"is {floor / n * 1e3:.1f} ms/image ({floor / n * 1e3 / need:.2f}x of that budget)")


def _one_loop(cfg_path: str, out: str) -> None:
    from orsgen.schemas.config import load_config

    plain_loop(load_config(cfg_path), out)


def _tree_loop_cpu(bench_dir: str, input_root: str, n_coco: str, n_sa1b: str, out: str, buckets: str = "own") -> None:
    """Prints the warm CPU seconds of the plain loop of the tree whose benchmark is in ``bench_dir``.

    That tree's own ``make_inputs`` (its config for the same demo images) and
    ``plain_loop`` (its own stage API) are used, so a revision from before
    later API changes still runs; ``orsgen`` itself comes from ``PYTHONPATH``.
    ``buckets`` other than ``"own"`` sets ``write.num_buckets`` (an int).
    """
    import importlib
    import json

    sys.path.insert(0, bench_dir)
    bench = importlib.import_module("bench_pipeline")
    from orsgen.schemas.config import load_config

    coco_cfg, _ = bench.make_inputs(Path(input_root), int(n_coco), int(n_sa1b))
    cfg = load_config(coco_cfg)
    if buckets != "own":
        cfg = cfg.model_copy(update={"write": cfg.write.model_copy(update={"num_buckets": int(buckets)})})
    warm = cfg.model_copy(update={"inputs": [cfg.inputs[0].model_copy(update={"max_images": 1})]})
    shutil.rmtree(out, ignore_errors=True)
    bench.plain_loop(warm, out + "-warm")
    shutil.rmtree(out + "-warm", ignore_errors=True)
    t = timed(bench.plain_loop, cfg, out)
    print(json.dumps({"cpu_s": t.cpu_s, "wall_s": t.wall_s, "images": written_images(Path(out)),
                      "digest": data_digest(Path(out)), "orsgen": str(Path(sys.modules["orsgen"].__file__).parent)}))
    shutil.rmtree(out, ignore_errors=True)


def export_tree(rev: str, work: Path) -> Path:
    """``rev``'s tree as ``WORK/tree-REV/orsgen`` (``git archive``, once); returns ``WORK/tree-REV``."""
    base = work / f"tree-{rev}"
    if not (base / "orsgen" / "__init__.py").exists():
        shutil.rmtree(base, ignore_errors=True)
        (base / "orsgen").mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base / "orsgen")], input=archive, check=True)
    return base


def _tree_beam_cpu(input_root: str, n_images: str, out: str, buckets: str = "128") -> None:
    """Prints the CPU of ``orsgen run``'s pipeline on the first ``n_images`` COCO-style images, warm.

    Works with whichever ``orsgen`` is first on ``PYTHONPATH``, from the tree
    issue 14 was filed against (``run_pipeline`` in ``pipelines/cli.py``, no
    ``num_buckets: auto``) to today's. ``buckets`` is ``write.num_buckets``:
    ``"128"`` (the value ``configs/coco_ors_bench.yaml`` had then) or
    ``"own"`` (the benchmark config's, ``auto`` today).
    """
    import json

    try:
        from orsgen.pipelines.run import run_pipeline
    except ImportError:  # the tree before the layout of issue 9
        from orsgen.pipelines.cli import run_pipeline  # type: ignore[no-redef]
    from orsgen.schemas.config import load_config

    root = Path(input_root)
    data = yaml.safe_load((root / "bench_coco.yaml").read_text())
    if buckets != "own":
        data["write"]["num_buckets"] = int(buckets)
    for n, name in ((1, "warm"), (int(n_images), "timed")):
        data["inputs"][0]["max_images"] = n
        # Beside the generated configs: input paths are relative to the YAML's folder.
        cfg_path = root / f"beam-cmp-{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        target = Path(out + f"-{name}")
        shutil.rmtree(target, ignore_errors=True)
        t = timed(run_pipeline, load_config(cfg_path), str(target), ["--runner=FnApiRunner"], show_progress=False)
        images = written_images(target)
        shutil.rmtree(target, ignore_errors=True)
        cfg_path.unlink()
    print(json.dumps({"cpu_s": t.cpu_s, "images": images, "orsgen": str(Path(sys.modules["orsgen"].__file__).parent)}))


def compare_beam_with_revision(rev: str, work: Path, n_full: int, n_small: int, repeat: int) -> None:
    """Marginal CPU per image of the Beam run at ``rev`` against this tree: the issue's own measure.

    Issue 14 measured the pipeline itself (``orsgen run``: 1 image vs 80) on
    the tree it was filed against; this does the same on the benchmark's
    COCO-style images for ``rev`` and this tree: (CPU of ``n_full`` images -
    CPU of ``n_small``) / the extra images, each size in a fresh warm process,
    trees alternating, best of ``repeat``. ``rev`` needs no benchmark of its own.

    ``rev`` runs with ``write.num_buckets: 128``, its benchmark config's
    value. This tree runs twice: with 128 too (the same work), and with its
    own benchmark config (``auto``: buckets follow the split sizes). With 128
    buckets, 50 -> 200 images also means about 70 more bucket groups, each
    writing six files, so the marginal figure then carries a per-shard cost
    that a run of thousands of images spreads to almost nothing.
    """
    import json

    base = export_tree(rev, work)
    inputs = work / "inputs"
    # (label, PYTHONPATH, write.num_buckets)
    ways = [(rev, str(base), "128"), ("this tree", "", "128"), ("this tree, own config", "", "own")]
    best: dict[tuple[str, int], float] = {}
    images: dict[tuple[str, int], int] = {}
    rounds: list[dict[tuple[str, int], float]] = []
    for _ in range(repeat):
        rounds.append({})
        for n in (n_small, n_full):
            for label, env_path, buckets in ways:
                env = {**os.environ, "PYTHONPATH": env_path}
                got = json.loads(subprocess.run(
                    [sys.executable, __file__, "--tree-beam-cpu", str(inputs), str(n), str(work / "beam-cmp"), buckets],
                    check=True, capture_output=True, text=True, env=env, cwd=REPO,
                ).stdout.strip().splitlines()[-1])
                best[(label, n)] = min(best.get((label, n), float("inf")), got["cpu_s"])
                rounds[-1][(label, n)] = got["cpu_s"]
                images[(label, n)] = got["images"]
    marginal = {
        label: (best[(label, n_full)] - best[(label, n_small)]) / (images[(label, n_full)] - images[(label, n_small)]) * 1e3
        for label, _, _ in ways
    }
    for label, what in (("this tree", "write.num_buckets 128 for both"),
                        ("this tree, own config", f"{rev} with 128, this tree with its own config (auto)")):
        # The VM's speed drifts within minutes: each round's own ratio (its
        # runs back to back) shows how far the best-of figure can be trusted.
        ratios = sorted(
            (r[(rev, n_full)] - r[(rev, n_small)]) / (r[(label, n_full)] - r[(label, n_small)]) for r in rounds
        )
        print(f"marginal CPU per image of the Beam run (in-process direct runner, {n_small} -> {n_full} COCO-style "
              f"images, {what}, best of {repeat}): {rev} {marginal[rev]:.1f} ms, this tree "
              f"{marginal[label]:.1f} ms: {marginal[rev] / marginal[label]:.2f}x less "
              f"(per round: {' / '.join(f'{x:.2f}x' for x in ratios)}; median {statistics.median(ratios):.2f}x)")


def compare_with_revision(rev: str, work: Path, n_coco: int, n_sa1b: int, repeat: int) -> tuple[float, float]:
    """Per-image CPU of the plain loop at git revision ``rev`` against this tree, alternating runs.

    ``rev``'s tree is exported (``git archive``) to a scratch folder put first
    on ``PYTHONPATH`` of its runs; each tree runs its own benchmark's loop and
    config on the same generated demo images, in fresh processes, one after
    the other, warm (after one untimed image). ``rev`` must hold
    ``benchmarks/bench_pipeline.py`` (c63fce4 or later): its loop follows the
    stage API of its time.

    Returns:
        ``(rev's ms per image, this tree's ms per image)``, best runs.
    """
    import json

    base = export_tree(rev, work)
    rev_bench = base / "orsgen" / "benchmarks"
    if not (rev_bench / "bench_pipeline.py").exists():
        raise SystemExit(f"revision {rev} has no benchmarks/bench_pipeline.py; pick c63fce4 or a later revision.")
    # (label, PYTHONPATH, benchmark folder, inputs folder, SA-1B images, write.num_buckets). Besides each
    # tree's own config, both trees with rev's bucket count (the same work as
    # rev's own run: ``auto`` buckets came with issue 10, and at 200 images
    # 128 buckets make shards of one or two images, whose fixed cost is
    # several ms per image) and both with one bucket per split (the
    # per-image work, without that fixed cost). Rev's count is known once
    # its first run has written its config.
    rev_run = (str(base), str(rev_bench), work / f"inputs-{rev}", 1)
    own_run = ("", str(REPO / "benchmarks"), work / "inputs", n_sa1b)
    ways: list[tuple[str, tuple[str, str, Path, int], str]] = [
        (rev, rev_run, "own"), ("this tree", own_run, "own"), ("this tree@rev", own_run, "rev"),
        (f"{rev}@1", rev_run, "1"), ("this tree@1", own_run, "1"),
    ]
    rev_buckets = ""
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in ways}
    for _ in range(repeat):
        for label, (env_path, bench_dir, inputs, n_s), buckets in ways:
            if buckets == "rev":
                if not rev_buckets:
                    continue
                buckets = rev_buckets
            env = {**os.environ, "PYTHONPATH": env_path}
            got = subprocess.run(
                [sys.executable, __file__, "--tree-loop-cpu", bench_dir, str(inputs), str(n_coco), str(n_s),
                 str(work / "cmp-out"), buckets],
                check=True, capture_output=True, text=True, env=env, cwd=REPO,
            ).stdout.strip().splitlines()[-1]
            results[label].append(json.loads(got))
            if label == rev and not rev_buckets:
                rev_nb = yaml.safe_load((inputs / "bench_coco.yaml").read_text())["write"]["num_buckets"]
                own_nb = yaml.safe_load((work / "inputs" / "bench_coco.yaml").read_text())["write"]["num_buckets"]
                rev_buckets = str(rev_nb) if isinstance(rev_nb, int) and rev_nb != own_nb else ""

    def ms(r: dict[str, Any]) -> float:
        return r["cpu_s"] / r["images"] * 1e3

    best = {k: min(ms(r) for r in v) for k, v in results.items() if v}
    print(f"per-image CPU of the plain loop, warm, {results[rev][0]['images']} dense COCO-style images, ms/image, "
          "all runs: " + ", ".join(f"{k}: " + " / ".join(f"{ms(r):.1f}" for r in v) for k, v in results.items() if v))
    for old, new, what in (
        (rev, "this tree", "each tree with its own benchmark config"),
        (rev, "this tree@rev", f"the same work, both with {rev}'s write.num_buckets {rev_buckets}"),
        (f"{rev}@1", "this tree@1", "the per-image work: both with write.num_buckets 1"),
    ):
        if not results.get(new):
            continue
        pairs = sorted(ms(x) / ms(y) for x, y in zip(results[old], results[new]))
        print(f"  {what}: {rev} {best[old]:.1f} ms, this tree {best[new]:.1f} ms: {best[old] / best[new]:.2f}x less "
              f"(per back-to-back pair: {' / '.join(f'{x:.2f}x' for x in pairs)}, median {statistics.median(pairs):.2f}x)")
    b, t = best[rev], best["this tree"]
    same = len({r["digest"] for k in (rev, "this tree") for r in results[k]}) == 1
    print("  data files: " + ("byte-identical" if same else
          f"differ between {rev} and this tree (expected when commits between them change the output or the "
          "config on purpose; byte identity of an optimisation is checked against the tree just before it)"))
    return b, t


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one-loop":
        _one_loop(sys.argv[2], sys.argv[3])
    elif len(sys.argv) in (5, 6) and sys.argv[1] == "--tree-beam-cpu":
        _tree_beam_cpu(*sys.argv[2:])
    elif len(sys.argv) in (7, 8) and sys.argv[1] == "--tree-loop-cpu":
        _tree_loop_cpu(*sys.argv[2:])
    else:
        main()
