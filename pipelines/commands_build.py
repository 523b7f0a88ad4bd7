"""``orsgen run`` and ``orsgen demo``: build a dataset (registered in ``pipelines/cli.py``).

    orsgen run CONFIG --out DIR [--set key=value ...] [-- <Beam flags>]
    orsgen demo --out DIR [--seed N] [--set key=value ...] [-- <Beam flags>]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
import yaml

from orsgen.pipelines.console import console, fail
from orsgen.pipelines.run import print_summary, run_pipeline
from orsgen.schemas.config import ConfigError, load_config


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
        fail(str(err))
    try:
        manifest = run_pipeline(cfg, out, beam_args or [], show_progress=not quiet)
    except (OutputConflictError, FileNotFoundError, ConfigError) as err:
        # FileNotFoundError: a top-level input (shard glob, annotations or refs
        # file) is missing, a config mistake whose message names the path;
        # ConfigError: a decontamination benchmark file is missing or malformed.
        fail(str(err))
    if not quiet:
        print_summary(manifest, out)


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
            fail(
                f"{inputs} already holds demo inputs generated with --seed {existing}; "
                f"pass --seed {existing} to build from them again, or choose a new --out for --seed {seed}."
            )
    try:
        cfg = load_config(cfg_path, set_)
    except ConfigError as err:
        fail(str(err))
    dataset = str(out / "dataset")
    started = time.monotonic()
    try:
        manifest = run_pipeline(cfg, dataset, beam_args or [], show_progress=not quiet)
    except (OutputConflictError, FileNotFoundError, ConfigError) as err:
        fail(str(err))
    if not quiet:
        print_summary(manifest, dataset)
        console.print(f"done in {time.monotonic() - started:.1f} s; dataset in {dataset}")
