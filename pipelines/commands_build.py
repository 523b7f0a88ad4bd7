"""``orsgen run`` and ``orsgen demo``: build a dataset (registered in ``pipelines/cli.py``).

    orsgen run CONFIG --out DIR [--set key=value ...] [-- <Beam flags>]
    orsgen demo --out DIR [--seed N] [--set key=value ...] [-- <Beam flags>]
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import typer
import yaml

from orsgen.pipelines.console import console, fail
from orsgen.pipelines.run import UNRECONCILED_EXIT, ReconciliationError, print_summary, run_pipeline
from orsgen.schemas.config import ConfigError, OrsgenConfig, load_config


#: Beam's suffix on a worker's error message.
_BEAM_STEP = re.compile(r"\s*\[while running '[^']*'\]\s*$")


def _build(cfg: OrsgenConfig, out: str, beam_args: list[str], quiet: bool) -> dict:
    """Runs the pipeline; user-fixable failures become one sentence and rc=2.

    A conflict with the output (another config, a concurrent run, a folder
    or link in the way) may be raised inside a Beam worker, where Beam wraps
    it; it is found in the exception chain. A dead worker process is rc=1,
    and the process exits at once: the runner's own threads would wait for
    the worker forever.
    """
    from orsgen.pipelines.caption import VlmUnreachableError
    from orsgen.pipelines.console import fail_and_exit_now
    from orsgen.pipelines.remote import RemotePathError
    from orsgen.pipelines.run import WorkerFailedError
    from orsgen.pipelines.worker_env import WorkerPackagingError
    from orsgen.stages.expressions.templates import TemplateError
    from orsgen.stages.expressions.vocabulary import VocabularyError
    from orsgen.stages.write import OutputConflictError

    try:
        return run_pipeline(cfg, out, beam_args, show_progress=not quiet)
    except (
        OutputConflictError,
        FileNotFoundError,
        RemotePathError,
        WorkerPackagingError,
        VlmUnreachableError,
        TemplateError,
        VocabularyError,
        ConfigError,
    ) as err:
        # FileNotFoundError: a top-level input (shard glob, annotations or refs
        # file) is missing, a config mistake whose message names the path.
        # RemotePathError: a local path with a remote runner (names the key);
        # WorkerPackagingError: remote workers would lack orsgen or gcsfs.
        # VlmUnreachableError: the caption server could not be reached;
        # ConfigError: a decontamination benchmark file is missing or malformed.
        fail(_BEAM_STEP.sub("", str(err)))
    except ReconciliationError as err:
        _unreconciled(err, out, quiet)
    except WorkerFailedError as err:
        fail_and_exit_now(str(err), code=1)
    except Exception as err:
        conflict = _find_in_chain(err, OutputConflictError)
        if conflict is not None:
            fail(str(conflict))
        raise
    raise AssertionError("unreachable")


def _find_in_chain(err: BaseException, kind: type) -> BaseException | None:
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            # Beam appends "[while running 'Step']" to a worker's error; the
            # sentence is the user's, the step name is noise.
            text = _BEAM_STEP.sub("", str(e))
            return kind(text) if text != str(e) else e
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
    # Beam's runner may re-raise a worker's error as text only.
    name = kind.__name__
    text = str(err)
    if name in text:
        tail = text.split(name, 1)[1].lstrip(": ")
        msg = _BEAM_STEP.sub("", tail.splitlines()[0]) if tail.strip() else ""
        return kind(msg) if msg else None
    return None


def run(
    config: Path = typer.Argument(..., help="YAML config file."),
    out: str = typer.Option(..., "--out", help="Output folder or URL (gs://, s3://...)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set regions.min_area_frac=0.01"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress line and no summary."),
    beam_args: Optional[list[str]] = typer.Argument(None, help="Beam flags after --, e.g. -- --runner=DataflowRunner"),
) -> None:
    """Build a dataset from CONFIG into --out."""
    try:
        cfg = load_config(config, set_)
    except ConfigError as err:
        fail(str(err))
    manifest = _build(cfg, out, beam_args or [], quiet)
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
    manifest = _build(cfg, dataset, beam_args or [], quiet)
    if not quiet:
        print_summary(manifest, dataset)
        console.print(f"done in {time.monotonic() - started:.1f} s; dataset in {dataset}")


def _unreconciled(err: "ReconciliationError", out: str, quiet: bool) -> None:
    """Shows the funnel, then fails with the reconciliation sentence and a non-zero exit."""
    if not quiet:
        print_summary(err.manifest, out)
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=UNRECONCILED_EXIT)
