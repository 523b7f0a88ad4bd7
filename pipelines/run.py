"""Running the build pipeline: Beam options, input checks, progress and the summary.

``run_pipeline`` is what ``orsgen run`` and ``orsgen demo`` call, and what
tests and notebooks call to build a dataset from a validated config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
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
    """Beam ``PipelineOptions`` from pass-through flags, with our default runner.

    A ``CachedViewOptions``: the same options, with ``view_as`` memoized
    (~0.15 s of CPU less per run; see its docstring).
    """
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    # Imported here: Beam is imported only when a run needs it.
    from orsgen.pipelines.transforms import CachedViewOptions

    return CachedViewOptions(args)


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


class WorkerFailedError(RuntimeError):
    """A Beam SDK worker process of the local runner exited with an error.

    The multi-processing direct runner waits for its workers forever when one
    dies (at start-up, or killed); ``run_pipeline`` notices the exit and stops
    waiting. The pipeline's own threads may still be blocked, so a command
    line should exit the process after reporting it.
    """


class _QuietOutputConflicts(logging.Filter):
    """Drops Beam's ERROR-with-traceback log of an ``OutputConflictError``.

    The conflict is a user-facing sentence that ``orsgen run`` prints once
    (rc=2); Beam would log it first with a worker traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "OutputConflictError":
            return False
        try:
            return "OutputConflictError" not in record.getMessage()
        except (TypeError, ValueError):  # a record whose arguments do not fit its format
            return True


_QUIET = _QuietOutputConflicts()
_BEAM_ERROR_LOGGERS = (
    "apache_beam.runners.common",
    "apache_beam.runners.worker.sdk_worker",
    "apache_beam.runners.worker.bundle_processor",
    "apache_beam.runners.portability.fn_api_runner.fn_runner",
    "apache_beam.runners.portability.fn_api_runner.worker_handlers",
)


def _quiet_beam_conflict_logs() -> None:
    for name in _BEAM_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


#: Exit messages of SDK worker processes that died in this process's runs.
_WORKER_FAILURES: list[str] = []


@contextlib.contextmanager
def _watch_subprocess_workers() -> Iterator[None]:
    """Records SDK worker processes of the direct runner that exit with an error.

    Beam's ``SubprocessSdkWorker.run`` raises in its own thread when its
    worker exits non-zero, and nothing tells the runner, which then waits
    for that worker's connection forever. Wrapping ``run`` records the exit.
    """
    try:
        from apache_beam.runners.portability import local_job_service
    except ImportError:  # pragma: no cover - Beam is a core dependency
        yield
        return
    cls = local_job_service.SubprocessSdkWorker
    original = cls.run

    def run(self: Any) -> None:
        try:
            original(self)
        except Exception as err:
            # Recorded, not re-raised: run_pipeline reports it as one sentence
            # (the worker's own stderr already says why it failed).
            _WORKER_FAILURES.append(str(err))

    cls.run = run
    try:
        yield
    finally:
        cls.run = original


def check_output_compatible(cfg: OrsgenConfig, out: str) -> None:
    """Refuses to write into an output made by a different config.

    Shard names are the same for any config, so mixing two runs in one folder
    would silently combine datasets; a rerun of the same config is fine (it
    skips completed shards).

    Raises:
        OutputConflictError: ``out`` holds a manifest of another config, or
            one built from other review verdicts than ``review.decisions`` holds now.
    """
    from orsgen.stages.write.plan import MANIFEST_NAME, OutputConflictError

    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    if not fs.exists(path):
        return
    with fs.open(path, "rb") as f:
        try:
            old = json.load(f)
        except json.JSONDecodeError:
            raise OutputConflictError(
                f"{out}/{MANIFEST_NAME} exists but is not valid JSON; move it away or choose a new --out."
            ) from None
    if old.get("config_sha256") != cfg.sha256():
        raise OutputConflictError(
            f"{out} already holds a dataset built from another config (config_sha256 "
            f"{str(old.get('config_sha256'))[:12]}..., this run {cfg.sha256()[:12]}...). "
            "Choose a new --out; orsgen never overwrites an existing dataset."
        )
    old_digest = ((old.get("counts") or {}).get("screening") or {}).get("decisions_sha256")
    if cfg.review.decisions and old_digest is not None:
        # The config names the decisions by path; verdicts added since are new input.
        from orsgen.stages.screening import decisions_digest, latest_decisions, read_decisions

        if decisions_digest(latest_decisions(read_decisions(cfg.review.decisions))) != old_digest:
            raise OutputConflictError(
                f"{out} was built from other review verdicts than {cfg.review.decisions} holds now; "
                "choose a new --out to apply the new verdicts (orsgen never overwrites an existing dataset)."
            )


def run_pipeline(
    cfg: OrsgenConfig,
    out: str,
    beam_args: list[str] | None = None,
    *,
    show_progress: bool = True,
    worker_grace_s: float = 5.0,
) -> dict[str, Any]:
    """Builds and runs the pipeline, then returns the manifest.

    Before anything is written the output is claimed for this run and config
    (``stages.write.ownership``): a concurrent run or another config is
    refused, temp files of killed runs are removed, and an output that is
    already complete is returned at once, without running anything (no model
    request is sent).

    Args:
        cfg: validated config.
        out: output root (local path or fsspec URL).
        beam_args: Beam flags (``--runner``, ``--direct_num_workers``...).
        show_progress: draw a rich progress line while the job runs.
        worker_grace_s: after a local SDK worker process dies, wait this long
            for the runner to fail by itself before giving up on it.

    Returns:
        The parsed ``manifest.json``.

    Raises:
        OutputConflictError: the output belongs to another config or run, or
            something not orsgen's is in the way.
        WorkerFailedError: a worker process of the local multi-processing
            runner died (e.g. at start-up).
        ReconciliationError: the manifest was written but some level's
            ``inputs = written + rejected`` fails (the message says which
            and by how much).
    """
    from orsgen.schemas.config.redact import install_log_redaction, register_secret_env
    from orsgen.pipelines.remote import check_remote_paths, is_remote_runner
    from orsgen.pipelines.worker_env import check_worker_packaging
    from orsgen.stages.write.ownership import claim_output

    # Before anything is read or staged: a remote worker cannot read local
    # paths, and must get orsgen and gcsfs from the flags or its image.
    check_remote_paths(cfg, out, beam_args or [])
    if is_remote_runner(beam_args or []):
        check_worker_packaging(beam_args or [])
    install_log_redaction()
    _quiet_beam_conflict_logs()
    register_secret_env(cfg.caption.backend.api_key_env)
    check_inputs_exist(cfg)
    # What the claim below cannot see: an output built from other review
    # verdicts (the config names the decisions by path, so its sha256 is the same).
    check_output_compatible(cfg, out)
    index = None
    if cfg.decontaminate.matching:
        from orsgen.stages.decontaminate import prepare_index

        # Benchmark files are read (or the index file loaded) before the job
        # starts: a missing or malformed one is a ConfigError naming its key.
        index = prepare_index(cfg.decontaminate, cfg.splits.train_splits)
    fs, root = fsspec.core.url_to_fs(out)
    # The claim checks the manifest's and run.json's config identity; Beam is
    # imported only after it, so a refusal or a complete output costs no import.
    with claim_output(out, cfg.sha256()) as claim:
        if claim.complete and claim.manifest is not None:
            return claim.manifest
        import apache_beam as beam

        from orsgen.pipelines.build import MANIFEST, build_pipeline

        options = pipeline_options(beam_args or [])
        logging.getLogger("apache_beam").setLevel(logging.WARNING)

        error: list[BaseException] = []

        def work() -> None:
            try:
                with beam.Pipeline(options=options) as p:
                    build_pipeline(p, cfg, out, index=index)
            except BaseException as err:  # re-raised in the main thread below
                error.append(err)

        with _watch_subprocess_workers():
            n_failed = len(_WORKER_FAILURES)
            thread = threading.Thread(target=work, name="orsgen-pipeline", daemon=True)
            thread.start()
            if show_progress:
                _progress(thread, fs, root, n_failed)
            failed_at: float | None = None
            while thread.is_alive():
                thread.join(timeout=0.2)
                if len(_WORKER_FAILURES) > n_failed:
                    failed_at = failed_at or time.monotonic()
                    if time.monotonic() - failed_at > worker_grace_s:
                        raise WorkerFailedError(
                            f"a Beam worker process exited ({_WORKER_FAILURES[n_failed]}), so the run cannot finish; "
                            "its error is printed above. Check that the worker's Python environment can import orsgen "
                            "and apache_beam, then run again (completed shards are kept)."
                        )
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


def _progress(thread: threading.Thread, fs: Any, root: str, n_failed: int = 0) -> None:
    """Shows elapsed time and completed shards until the job ends.

    Shards are counted by their completion markers, which works for any runner
    writing to any filesystem (workers of a remote runner are not in-process).
    """
    meta = f"{root.rstrip('/')}/_meta/shards"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task("building dataset", total=None)
        while thread.is_alive() and len(_WORKER_FAILURES) <= n_failed:
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


