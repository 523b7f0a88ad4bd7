"""``orsgen preview``: a contact sheet and an HTML page of an output's samples.

    orsgen preview DIR [--split S] [--n 24] [--kind K ...] --out FILE.png [--html FILE.html]
"""

from __future__ import annotations

from typing import Optional

import typer

from orsgen.pipelines.cli import _fail, app, console


@app.command()
def preview(
    root: str = typer.Argument(..., help="An orsgen output folder (local path or fsspec URL)."),
    out: str = typer.Option(..., "--out", help="Contact sheet to write (PNG)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split (default: all)."),
    n: int = typer.Option(24, "--n", help="How many samples."),
    kind: list[str] = typer.Option([], "--kind", help="Only these kinds (repeatable)."),
    cols: int = typer.Option(4, "--cols", help="Tiles per row."),
    html: Optional[str] = typer.Option(None, "--html", help="HTML page to write (default: beside --out, .html)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Draw samples of DIR (image, masks, boxes, points, expression, kind) into --out and an HTML page."""
    from orsgen.stages.dataset.preview import PreviewError, write_preview

    try:
        res = write_preview(
            root, out, split=split, n=n, kinds=kind or None, cols=cols, html_path=html, overwrite=overwrite
        )
    except (PreviewError, FileExistsError) as err:
        _fail(str(err))
        return
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(res["by_kind"].items()))
    console.print(f"{res['samples']} samples ({kinds}) -> {res['png']} and {res['html']}")
