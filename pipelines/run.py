"""Running the build pipeline: Beam options, input checks, progress and the summary.

``run_pipeline`` is what ``orsgen run`` and ``orsgen demo`` call, and what
tests and notebooks call to build a dataset from a validated config.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import fsspec
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from orsgen.pipelines.console import console
from orsgen.schemas.config import OrsgenConfig

DEFAULT_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: list[str]) -> Any:
    """Beam ``PipelineOptions`` from pass-through flags, with our default runner."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    return PipelineOptions(args)


def check_inputs_exist(cfg: OrsgenConfig) -> None:
    """Fails before the job starts when a top-level input file is missing.

    Inside the job the same mistake surfaces as a worker error wrapped in
    Beam's traceback; here it is one sentence naming the config key.
    (SA-1B shard globs are expanded, and checked, while the graph is built.)

    Args:
        cfg: validated config.

    Raises:
        FileNotFoundError: an ``annotations``, ``instances`` or ``refs`` file
            does not exist.
    """
    for i, inp in enumerate(cfg.inputs):
        for key in ("annotations", "instances", "refs"):
            url = getattr(inp, key, None)
            if not url:
                continue
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                raise FileNotFoundError(
                    f"the {key} file {url!r} of input {inp.name!r} does not exist; "
                    f"fix inputs.{i}.{key} in the config (relative paths are resolved against the YAML file's folder)."
                )


def run_pipeline(cfg: OrsgenConfig, out: str, beam_args: list[str] | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """Builds and runs the pipeline, then returns the manifest.

    Args:
        cfg: validated config.
        out: output root (local path or fsspec URL).
        beam_args: Beam flags (``--runner``, ``--direct_num_workers``...).
        show_progress: draw a rich progress line while the job runs.

    Returns:
        The parsed ``manifest.json``.
    """
    import apache_beam as beam

    from orsgen.pipelines.build import MANIFEST, build_pipeline, check_output_compatible

    check_inputs_exist(cfg)
    check_output_compatible(cfg, out)
    index = None
    if cfg.decontaminate.matching:
        from orsgen.stages.decontaminate import prepare_index

        # Benchmark files are read (or the index file loaded) before the job
        # starts: a missing or malformed one is a ConfigError naming its key.
        index = prepare_index(cfg.decontaminate, cfg.splits.train_splits)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    options = pipeline_options(beam_args or [])
    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    error: list[BaseException] = []

    def work() -> None:
        try:
            with beam.Pipeline(options=options) as p:
                build_pipeline(p, cfg, out, index=index)
        except BaseException as err:  # re-raised in the main thread below
            error.append(err)

    thread = threading.Thread(target=work, name="orsgen-pipeline", daemon=True)
    thread.start()
    if show_progress:
        _progress(thread, fs, root)
    thread.join()
    if error:
        raise error[0]
    with fs.open(f"{root.rstrip('/')}/{MANIFEST}", "rb") as f:
        return json.load(f)


def _progress(thread: threading.Thread, fs: Any, root: str) -> None:
    """Shows elapsed time and completed shards until the job ends.

    Shards are counted by their completion markers, which works for any runner
    writing to any filesystem (workers of a remote runner are not in-process).
    """
    meta = f"{root.rstrip('/')}/_meta/shards"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task("building dataset", total=None)
        while thread.is_alive():
            try:
                done = len(fs.glob(f"{meta}/**/*.done")) if fs.exists(meta) else 0
            except OSError:
                done = 0
            prog.update(task, description=f"building dataset: {done} shard(s) complete")
            thread.join(timeout=0.5)


def print_summary(manifest: dict[str, Any], out: str) -> None:
    """Prints the manifest's funnel as rich tables."""
    counts = manifest.get("counts", {})
    t = Table(title=f"orsgen: {manifest.get('name')} -> {out}")
    for col in ("level", "inputs", "written", "rejected", "reconciled"):
        t.add_column(col)
    for level, c in counts.get("levels", {}).items():
        t.add_row(level, str(c["inputs"]), str(c["written"]), str(c["rejected"]), "yes" if c["reconciled"] else "NO")
    console.print(t)
    splits = manifest.get("splits", {})
    if splits:
        s = Table(title="splits")
        s.add_column("split")
        s.add_column("images")
        s.add_column("samples")
        s.add_column("by kind")
        for name, v in sorted(splits.items()):
            kinds = ", ".join(f"{k}={n}" for k, n in sorted(v.get("samples_by_kind", {}).items()))
            s.add_row(name, str(v.get("images", 0)), str(v.get("samples", 0)), kinds)
        console.print(s)
    reasons = counts.get("rejected_by_reason", {})
    if reasons:
        r = Table(title="rejects by reason")
        r.add_column("level/reason")
        r.add_column("count")
        for k, n in reasons.items():
            r.add_row(k, str(n))
        console.print(r)


