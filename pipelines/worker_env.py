"""What a remote Beam worker needs installed, and a check that the Beam flags provide it.

How Beam 2.77 installs what it is given (``sdks/python/container/boot.go``,
``piputil.go``):

* ``--sdk_container_image``: the image already holds everything; nothing is
  installed at start. The recommended way (``containers/``).
* ``--extra_package WHEEL``: ``pip install --no-deps WHEEL`` then ``pip install
  WHEEL``: the wheel's base dependencies are resolved from PyPI on the
  worker, its extras never are, so gcsfs (the ``gcp`` extra) would be missing
  and a ``gs://`` read fails with ``ImportError``.
* ``--requirements_file FILE``: the launcher downloads each listed package
  (``pip download --no-deps``, manylinux wheels) and stages it; the worker
  installs them from the staged files, then resolves what is still missing
  from PyPI.

So a worker without the container needs both: the wheel and
``containers/requirements-worker.txt`` (orsgen's dependencies plus the
``gcp`` extra, without apache-beam, which the SDK image has). That file is
generated from ``pyproject.toml`` by ``python -m orsgen.pipelines.worker_env``
and a test keeps it in sync.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Extras a CPU worker needs: object-store filesystems.
WORKER_EXTRAS = ("gcp",)

#: Installed by the Beam SDK image itself; never listed (the stager drops it too).
PROVIDED = ("apache-beam",)

_NAME = re.compile(r"^\s*([A-Za-z0-9_.-]+)")


class WorkerPackagingError(ValueError):
    """The Beam flags would start remote workers without orsgen or its dependencies."""


def _name(req: str) -> str:
    m = _NAME.match(req)
    return (m.group(1) if m else req).lower().replace("_", "-")


def worker_requirements(pyproject: Path, extras: Iterable[str] = WORKER_EXTRAS) -> list[str]:
    """orsgen's dependencies plus those of ``extras``, as requirement lines.

    Self-references (``orsgen[vlm,sam2]``) are expanded; packages the SDK image
    provides (``PROVIDED``) are left out.

    Args:
        pyproject: the repository's ``pyproject.toml``.
        extras: optional-dependency groups to include.

    Returns:
        Requirement lines, deduplicated, in file order.
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(reqs: Iterable[str], stack: tuple[str, ...]) -> None:
        for req in reqs:
            name = _name(req)
            if name == project["name"]:
                inner = re.search(r"\[([^\]]*)\]", req)
                for extra in (inner.group(1).split(",") if inner else []):
                    extra = extra.strip()
                    if extra and extra not in stack:
                        add(optional.get(extra, []), (*stack, extra))
                continue
            if name in PROVIDED or req in seen:
                continue
            seen.add(req)
            out.append(req)

    add(project.get("dependencies", []), ())
    for extra in extras:
        add(optional.get(extra, []), (extra,))
    return out


def _flag_values(beam_args: Sequence[str], name: str) -> list[str]:
    vals = []
    for i, a in enumerate(beam_args):
        if a.startswith(f"--{name}="):
            vals.append(a.split("=", 1)[1])
        elif a == f"--{name}" and i + 1 < len(beam_args):
            vals.append(beam_args[i + 1])
    return vals


def check_worker_packaging(beam_args: Sequence[str]) -> None:
    """Refuses Beam flags that would start remote workers lacking orsgen or gcsfs.

    Call only for a remote runner. Accepted: a container image
    (``--sdk_container_image``), a ``--setup_file``, or a wheel
    (``--extra_package``) together with a ``--requirements_file``.

    Args:
        beam_args: the pass-through Beam flags.

    Raises:
        WorkerPackagingError: with the flags to add.
    """
    if _flag_values(beam_args, "sdk_container_image") or _flag_values(beam_args, "worker_harness_container_image"):
        return
    if _flag_values(beam_args, "setup_file"):
        return
    wheels = _flag_values(beam_args, "extra_package") + _flag_values(beam_args, "extra_packages")
    if wheels and _flag_values(beam_args, "requirements_file"):
        return
    if wheels:
        raise WorkerPackagingError(
            "--extra_package installs the orsgen wheel without its extras, so remote workers would lack gcsfs; "
            "add --requirements_file=containers/requirements-worker.txt, or use a worker image "
            "(--sdk_container_image, see containers/ and the README's Dataflow section)."
        )
    raise WorkerPackagingError(
        "remote workers would start without orsgen: pass a worker image (--sdk_container_image=..., built from "
        "containers/cpu.Dockerfile or gpu.Dockerfile), or the wheel and its requirements "
        "(--extra_package=dist/orsgen-<version>-py3-none-any.whl --requirements_file=containers/requirements-worker.txt); "
        "see the README's Dataflow section."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Prints ``containers/requirements-worker.txt`` (``python -m orsgen.pipelines.worker_env``)."""
    root = Path(__file__).resolve().parents[1]
    extras = list(argv if argv is not None else sys.argv[1:]) or list(WORKER_EXTRAS)
    sys.stdout.write(render(worker_requirements(root / "pyproject.toml", extras)))
    return 0


def render(reqs: Sequence[str]) -> str:
    """The requirements file's text."""
    head = (
        "# Generated from pyproject.toml by `python -m orsgen.pipelines.worker_env`; do not edit.\n"
        "# orsgen's dependencies and its gcp extra for Dataflow workers started without the\n"
        "# orsgen container: pass with --extra_package=dist/orsgen-*.whl (apache-beam is in the SDK image).\n"
    )
    return head + "".join(f"{r}\n" for r in reqs)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
