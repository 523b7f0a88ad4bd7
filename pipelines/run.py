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

#: Exit code of ``orsgen run`` / ``demo`` when the manifest does not reconcile
#: (2 is a user mistake; this is a bug in orsgen or a stage).
UNRECONCILED_EXIT = 3


class ReconciliationError(RuntimeError):
    """The finished manifest's ``inputs = written + rejected`` fails at some level.

    Attributes:
        manifest: the manifest as written (kept on disk for inspection).
    """

    def __init__(self, message: str, manifest: dict[str, Any]) -> None:
        super().__init__(message)
        self.manifest = manifest


def reconciliation_problem(manifest: dict[str, Any]) -> str | None:
    """One sentence naming every level that does not reconcile and by how much, or None.

    Args:
        manifest: a parsed ``manifest.json``.
    """
    levels = manifest.get("counts", {}).get("levels", {})
    off = []
    for level, c in levels.items():
        inputs, written, rejected = int(c["inputs"]), int(c["written"]), int(c["rejected"])
        diff = written + rejected - inputs
        if diff:
            more = f"{diff} more than" if diff > 0 else f"{-diff} fewer than"
            off.append(
                f"at the {level} level written {written} + rejected {rejected} = {written + rejected} is {more} "
                f"the {inputs} inputs"
            )
    if not levels:
        return "the manifest has no counts.levels, so nothing can be reconciled; this output is not a complete run."
    if not off:
        return None
    return (
        "the manifest does not reconcile: " + "; ".join(off) + ". The output is kept for inspection; "
        "this is a bug in orsgen, please report it with the manifest."
    )


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

    Raises:
        ReconciliationError: the manifest was written but some level's
            ``inputs = written + rejected`` fails (the message says which
            and by how much).
    """
    import apache_beam as beam

    from orsgen.pipelines.build import MANIFEST, build_pipeline, check_output_compatible

    from orsgen.pipelines.remote import check_remote_paths, is_remote_runner
    from orsgen.pipelines.worker_env import check_worker_packaging

    # Before anything is read or staged: a remote worker cannot read local
    # paths, and must get orsgen and gcsfs from the flags or its image.
    check_remote_paths(cfg, out, beam_args or [])
    if is_remote_runner(beam_args or []):
        check_worker_packaging(beam_args or [])
    check_inputs_exist(cfg)
    check_output_compatible(cfg, out)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    options = pipeline_options(beam_args or [])
    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    error: list[BaseException] = []

    def work() -> None:
        try:
            with beam.Pipeline(options=options) as p:
                build_pipeline(p, cfg, out)
        except BaseException as err:  # re-raised in the main thread below
            error.append(err)

    thread = threading.Thread(target=work, name="orsgen-pipeline", daemon=True)
    thread.start()
    if show_progress:
        _progress(thread, fs, root)
    thread.join()
    if error:
        raise _clear_error(error[0])
    with fs.open(f"{root.rstrip('/')}/{MANIFEST}", "rb") as f:
        manifest = json.load(f)
    problem = reconciliation_problem(manifest)
    if problem is not None:
        raise ReconciliationError(problem, manifest)
    return manifest


def _clear_error(err: BaseException) -> BaseException:
    """The one-sentence error of an unreachable VLM server, however the runner wrapped it.

    In-process runners re-raise the DoFn's ``VlmUnreachableError``; others
    wrap it in a ``RuntimeError`` holding the worker traceback as text.
    """
    from orsgen.pipelines.caption import VlmUnreachableError

    if isinstance(err, VlmUnreachableError):
        return err
    import re

    m = re.search(r"(caption: \d+ of \d+ VLM requests could not reach the model server.*?finish with these samples rejected\.)", str(err), re.S)
    if m:
        return VlmUnreachableError(m.group(1))
    return err


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
    screening = (counts.get("screening") or {}).get("splits") or {}
    if screening:
        sc = Table(title="human screening (review.decisions)")
        for col in ("split", "samples", "accepted", "rejected", "skipped", "held out (unscreened)", "written"):
            sc.add_column(col)
        for name, v in screening.items():
            sc.add_row(name, *(str(v.get(k, 0)) for k in ("samples", "accepted", "human_rejected", "skipped", "unscreened", "written")))
        console.print(sc)
        unmatched = (counts["screening"].get("decisions") or {}).get("unmatched", 0)
        if unmatched:
            console.print(
                f"[yellow]{unmatched} review verdict(s) name samples this build does not hold; "
                "were they given on a build of another config or other inputs?[/]"
            )
    reasons = counts.get("rejected_by_reason", {})
    if reasons:
        r = Table(title="rejects by reason")
        r.add_column("level/reason")
        r.add_column("count")
        for k, n in reasons.items():
            r.add_row(k, str(n))
        console.print(r)


