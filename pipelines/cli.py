"""The ``orsgen`` command line.

    orsgen run CONFIG --out DIR [--set key=value ...] [-- <Beam flags>]
    orsgen demo --out DIR [--seed N] [-- <Beam flags>]

Everything after ``--`` goes to Beam's ``PipelineOptions`` untouched, so
``-- --runner=DataflowRunner --project=... --region=... --temp_location=gs://...``
runs the same graph on Dataflow. Without ``--runner`` the Python direct runner
(``FnApiRunner``, the runner Beam's ``DirectRunner`` ends up using) is named
explicitly, which skips DirectRunner's attempt to download the Prism binary.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

import fsspec
import typer
import yaml
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from orsgen.schemas.config import ConfigError, OrsgenConfig, load_config

app = typer.Typer(
    name="orsgen",
    help="Build open-world referring-segmentation datasets with Apache Beam.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


class _BeamImportNoise(logging.Filter):
    """Drops Beam's import-time warning about optional GCP client libraries.

    Beam logs it on the root logger whenever the gcp extra is not installed,
    which is the normal local setup; it says nothing about the run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_BeamImportNoise())

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


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config file."),
    out: str = typer.Option(..., "--out", help="Output folder or URL (gs://, s3://...)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set regions.min_area_frac=0.01"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress line and no summary."),
    beam_args: Optional[list[str]] = typer.Argument(None, help="Beam flags after --, e.g. -- --runner=DataflowRunner"),
) -> None:
    """Build a dataset from CONFIG into --out."""
    from orsgen.stages.write import OutputConflictError

    try:
        cfg = load_config(config, set_)
    except ConfigError as err:
        _fail(str(err))
    try:
        manifest = run_pipeline(cfg, out, beam_args or [], show_progress=not quiet)
    except (OutputConflictError, FileNotFoundError) as err:
        # FileNotFoundError: a top-level input (shard glob, annotations or refs
        # file) is missing, a config mistake whose message names the path.
        _fail(str(err))
    if not quiet:
        print_summary(manifest, out)


@app.command()
def demo(
    out: Path = typer.Option(..., "--out", help="Folder for the synthetic inputs (inputs/) and the dataset (dataset/)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic scenes."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key."),
    quiet: bool = typer.Option(False, "--quiet"),
    beam_args: Optional[list[str]] = typer.Argument(None, help="Beam flags after --"),
) -> None:
    """Generate a small synthetic input set (SA-1B, COCO, RefCOCO, gRefCOCO) and build from it."""
    from orsgen.pipelines.demo_data import generate_demo_inputs
    from orsgen.stages.write import OutputConflictError

    inputs = out / "inputs"
    cfg_path = inputs / "demo.yaml"
    if not cfg_path.exists():
        generate_demo_inputs(inputs, seed=seed)
    else:
        # The inputs are reused, not regenerated: a different --seed would
        # otherwise be ignored without a word.
        try:
            existing = yaml.safe_load(cfg_path.read_text(encoding="utf-8")).get("seed")
        except (yaml.YAMLError, AttributeError):
            existing = None
        if existing != seed:
            _fail(
                f"{inputs} already holds demo inputs generated with --seed {existing}; "
                f"pass --seed {existing} to build from them again, or choose a new --out for --seed {seed}."
            )
    try:
        cfg = load_config(cfg_path, set_)
    except ConfigError as err:
        _fail(str(err))
    dataset = str(out / "dataset")
    started = time.monotonic()
    try:
        manifest = run_pipeline(cfg, dataset, beam_args or [], show_progress=not quiet)
    except (OutputConflictError, FileNotFoundError) as err:
        _fail(str(err))
    if not quiet:
        print_summary(manifest, dataset)
        console.print(f"done in {time.monotonic() - started:.1f} s; dataset in {dataset}")


from orsgen.pipelines import cli_publish  # noqa: E402,F401
from orsgen.pipelines import cli_preview  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
