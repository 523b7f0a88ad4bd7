"""Checks made before a job goes to a remote runner (Dataflow, Flink, Spark).

A remote worker cannot read the launcher's disk. A local path in the config
would be resolved on the launcher and then fail on every worker, where a
reader turns it into ``unreadable_shard`` rejects and the job "succeeds".
``check_remote_paths`` refuses such a config before submission, with one
sentence per path naming its config key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import fsspec

from orsgen.schemas.config import OrsgenConfig

#: Runners whose workers run on this machine (and so can read its files).
LOCAL_RUNNERS = frozenset({
    "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "PrismRunner",
    "InteractiveRunner", "TestDirectRunner",
})

#: fsspec protocols that only this process or this machine can read.
LOCAL_PROTOCOLS = frozenset({"file", "local", "memory"})

#: Config keys of an input that workers read (``shards`` is a list).
INPUT_PATH_KEYS = ("shards", "annotations", "instances", "refs", "images")


class RemotePathError(ValueError):
    """A config path that the workers of a remote runner could not read."""


def _flag(beam_args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(beam_args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(beam_args):
            return beam_args[i + 1]
    return None


def is_remote_runner(beam_args: Sequence[str]) -> bool:
    """Whether the runner named in Beam flags runs workers elsewhere.

    Args:
        beam_args: pass-through Beam flags.

    Returns:
        False for the local runners (``LOCAL_RUNNERS``, the default) and for a
        portable runner with ``--environment_type=LOOPBACK``; True otherwise.
    """
    runner = _flag(beam_args, "runner")
    if not runner:
        return False
    name = runner.rsplit(".", 1)[-1]
    if name in LOCAL_RUNNERS:
        return False
    return (_flag(beam_args, "environment_type") or "").upper() != "LOOPBACK"


def is_local_url(url: str) -> bool:
    """Whether a path or URL names something only this machine can read."""
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol is None or protocol in LOCAL_PROTOCOLS


def worker_paths(cfg: OrsgenConfig) -> Iterator[tuple[str, str]]:
    """``(config key, path)`` of every path a worker reads or writes."""
    for i, inp in enumerate(cfg.inputs):
        for key in INPUT_PATH_KEYS:
            value = getattr(inp, key, None)
            if isinstance(value, str) and value:
                yield f"inputs.{i}.{key}", value
            elif isinstance(value, list):
                for j, v in enumerate(value):
                    yield f"inputs.{i}.{key}.{j}", v
    if cfg.caption.enabled:
        # Prompts and the response cache are read and written on the workers.
        if cfg.caption.prompts:
            yield "caption.prompts", cfg.caption.prompts
        if cfg.caption.backend.cache and cfg.caption.backend.cache_dir:
            yield "caption.backend.cache_dir", cfg.caption.backend.cache_dir
    v = cfg.verify_sam2
    if v.active and v.cache and v.cache_dir:
        # SAM2's prediction cache is read and written on the (GPU) workers.
        yield "verify_sam2.cache_dir", v.cache_dir


def check_remote_paths(cfg: OrsgenConfig, out: str, beam_args: Sequence[str]) -> None:
    """Refuses launcher-local paths when the runner's workers are remote.

    Args:
        cfg: the validated config.
        out: the output root (``--out``).
        beam_args: pass-through Beam flags.

    Raises:
        RemotePathError: a path only this machine can read, with the config
            key (or ``--out``) that holds it.
    """
    if not is_remote_runner(beam_args):
        return
    runner = _flag(beam_args, "runner")
    problems: list[str] = []
    if is_local_url(out):
        problems.append(f"--out {out!r} is a local path")
    for key, url in worker_paths(cfg):
        if is_local_url(url):
            problems.append(f"{key} {url!r} is a local path")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise RemotePathError(
            f"the workers of {runner} cannot reach this machine's files: {shown}. "
            "Copy the data to an object store the workers can read (gs://, s3://, hf://), point --out and "
            "cache folders at one they can write, and set those keys to it (--set KEY=gs://...), or run with a "
            "local runner."
        )

