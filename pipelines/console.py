"""Console output shared by the CLI commands: one rich console on stderr, one way to fail."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

console = Console(stderr=True)


class _BeamImportNoise(logging.Filter):
    """Drops Beam's import-time warning about optional GCP client libraries.

    Beam logs it on the root logger whenever the gcp extra is not installed,
    which is the normal local setup; it says nothing about the run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_BeamImportNoise())


def fail(msg: str) -> None:
    """Prints ``error: MSG`` and exits with code 2 (the CLI's code for a user mistake).

    Secrets (by name and by value, see ``schemas.config.redact``) are scrubbed
    from the message, and it is printed literally (no rich markup).

    Raises:
        typer.Exit: always, with code 2.
    """
    from orsgen.schemas.config.redact import redact_text

    console.print("[bold red]error:[/] ", end="")
    console.print(redact_text(msg), markup=False, highlight=False)
    raise typer.Exit(code=2)


def fail_and_exit_now(msg: str, code: int = 1) -> None:
    """Prints ``error: MSG`` and ends the process at once with ``code``.

    For failures that leave non-daemon threads of a runner blocked (a dead
    worker process), where a normal exit would wait for them forever.
    """
    import os
    import sys

    from orsgen.schemas.config.redact import redact_text

    console.print("[bold red]error:[/] ", end="")
    console.print(redact_text(msg), markup=False, highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
