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

    Raises:
        typer.Exit: always, with code 2.
    """
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code=2)
