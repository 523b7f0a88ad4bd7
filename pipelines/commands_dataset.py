"""``orsgen publish``, ``export``, ``eval`` and ``preview``: tools on a finished dataset.

    orsgen publish DIR --repo-id ORG/NAME [--private] [--revision R] [--dry-run] [--staging DIR]
    orsgen export DIR --format {segzero,visionreasoner,lens,qwen,moondream,refcoco-m} --out OUT [--split S]
    orsgen eval PREDICTIONS --gt DIR [--split S] [--out report.json]
    orsgen preview DIR [--split S] [--n 24] [--kind K ...] --out FILE.png [--html FILE.html]

Registered on the main ``app`` in ``pipelines/cli.py``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from orsgen.pipelines.console import console, fail


def publish(
    directory: str = typer.Argument(..., metavar="DIR", help="Output folder of a run (the one holding manifest.json)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Dataset repo on the Hub: ORG/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if missing)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Prepare the staging folder only; upload nothing."),
    staging: Optional[Path] = typer.Option(None, "--staging", help="Local staging folder (default: DIR-hub beside DIR)."),
    license: Optional[str] = typer.Option(None, "--license", help="Card license id (default: other with SA-1B, else cc-by-4.0)."),
    pretty_name: Optional[str] = typer.Option(None, "--pretty-name", help="Card title (default: the run's name)."),
    link: bool = typer.Option(False, "--link", help="Hard-link shards into the staging folder instead of copying."),
    max_files_per_folder: int = typer.Option(10_000, "--max-files-per-folder", min=1, help="Folder file cap (Hub advice: 10 000)."),
) -> None:
    """Lay a run out for the Hugging Face Hub (card, Parquet, WebDataset) and upload it, resumably."""
    from orsgen.stages.dataset.publish import PublishError, default_staging, prepare_hub_folder, redact, upload_hub_folder
    from orsgen.stages.dataset.read import DatasetReadError

    target = staging or default_staging(directory)
    try:
        prep = prepare_hub_folder(
            directory,
            target,
            repo_id=repo_id,
            license=license,
            pretty_name=pretty_name,
            max_files_per_folder=max_files_per_folder,
            link=link,
        )
    except (PublishError, DatasetReadError) as err:
        fail(str(err))
    verb = "reused" if prep.reused else "prepared"
    console.print(f"{verb} {prep.path}: {prep.n_files} data files, {prep.n_bytes / 1e6:.1f} MB, configs {sorted(prep.configs)}")
    if dry_run:
        console.print("dry run: nothing uploaded. Check it with `datasets.load_dataset(STAGING)`, then publish without --dry-run.")
        return
    try:
        url = upload_hub_folder(prep.path, repo_id, private=private, revision=revision)
    except PublishError as err:
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - hub/network errors: reported without any token
        fail(
            f"upload to {repo_id} failed: {redact(f'{type(err).__name__}: {err}')}. "
            "Run the same command again to resume; files already committed are skipped."
        )
    console.print(f"uploaded: {url}")


def export(
    directory: str = typer.Argument(..., metavar="DIR", help="Output folder of a run."),
    fmt: str = typer.Option(..., "--format", help="segzero, visionreasoner, lens, qwen, moondream or refcoco-m."),
    out: Path = typer.Option(..., "--out", help="New local folder for the export (must not exist)."),
    split: list[str] = typer.Option([], "--split", help="Split(s) to export (repeatable; default: all)."),
) -> None:
    """Write trainer-ready Parquet / JSONL in a seed's own conventions."""
    from orsgen.stages.dataset.export import ExportError, export_dataset
    from orsgen.stages.dataset.read import DatasetReadError

    try:
        summary = export_dataset(directory, fmt, out, split or None)
    except (ExportError, DatasetReadError) as err:
        fail(str(err))
    t = Table(title=f"orsgen export {fmt} -> {out}")
    for col in ("split", "images", "samples", "records", "skipped"):
        t.add_column(col)
    for name, v in summary["splits"].items():
        skipped = ", ".join(f"{k}={n}" for k, n in v["skipped"].items()) or "-"
        t.add_row(name, str(v["images"]), str(v["samples_in"]), str(v["records"]), skipped)
    console.print(t)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}" if isinstance(v, float) else str(v)


def eval_(
    predictions: Path = typer.Argument(..., metavar="PREDICTIONS", help="JSONL: sample_id + segmentation (RLE or polygons; null = no target)."),
    gt: str = typer.Option(..., "--gt", help="Output folder of the run holding the ground truth."),
    split: list[str] = typer.Option([], "--split", help="Split(s) to evaluate (repeatable; default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the full report as JSON here (must not exist)."),
) -> None:
    """Score predictions: cIoU, gIoU, mIoU, N-acc, T-acc, Pr@τ, by kind and split."""
    from orsgen.stages.dataset.evaluate import EvalError, evaluate_files
    from orsgen.stages.dataset.read import DatasetReadError

    if out is not None and out.exists():
        fail(f"{out} already exists; orsgen never overwrites files. Choose a new --out.")
    if not predictions.is_file():
        fail(f"predictions file {predictions} does not exist.")
    try:
        report = evaluate_files(predictions, gt, split or None)
    except (EvalError, DatasetReadError) as err:
        fail(str(err))
    cols = ("n", "cIoU", "gIoU", "mIoU", "N_acc", "T_acc", "Pr@0.5")
    t = Table(title=f"orsgen eval: {predictions.name} vs {gt} ({', '.join(report['splits'])})")
    t.add_column("group")
    for c in cols:
        t.add_column(c)
    groups = [("overall", report["overall"])]
    groups += [(f"split {k}", v) for k, v in report["by_split"].items()]
    groups += [(f"kind {k}", v) for k, v in report["by_kind"].items()]
    if "ood" in report:
        groups += [("ood", report["ood"]), ("in-distribution", report["in_distribution"])]
    for name, m in groups:
        t.add_row(name, *[_fmt(m[c]) for c in cols])
    console.print(t)
    c = report["counts"]
    if c["missing"] or c["unknown"] or c["invalid"]:
        console.print(
            f"[yellow]{c['missing']} sample(s) without a prediction (scored as empty), {c['unknown']} prediction(s) "
            f"for samples not in the evaluated split(s) (ignored), {c['invalid']} invalid prediction(s) (scored as empty; see the report).[/]"
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        console.print(f"report: {out}")


def preview(
    root: str = typer.Argument(..., help="An orsgen output folder (local path or fsspec URL)."),
    out: str = typer.Option(..., "--out", help="Contact sheet to write (PNG)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split (default: all)."),
    n: int = typer.Option(24, "--n", help="How many samples."),
    kind: list[str] = typer.Option([], "--kind", help="Only these kinds (repeatable)."),
    cols: int = typer.Option(4, "--cols", help="Tiles per row."),
    html: Optional[str] = typer.Option(None, "--html", help="HTML page to write (default: beside --out, .html)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    matches: bool = typer.Option(
        False, "--matches", help="Instead of samples, draw the benchmark matches (build image | benchmark image) side by side."
    ),
) -> None:
    """Draw samples of DIR (image, masks, boxes, points, expression, kind) into --out and an HTML page."""
    from orsgen.stages.dataset.preview import PreviewError, write_match_preview, write_preview

    if matches:
        try:
            res = write_match_preview(root, out, n=n, cols=min(cols, 2), overwrite=overwrite)
        except (PreviewError, FileExistsError) as err:
            fail(str(err))
            return
        console.print(f"{res['pairs']} of {res['matched_images']} matched images -> {res['png']}")
        return
    try:
        res = write_preview(
            root, out, split=split, n=n, kinds=kind or None, cols=cols, html_path=html, overwrite=overwrite
        )
    except (PreviewError, FileExistsError) as err:
        fail(str(err))
        return
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(res["by_kind"].items()))
    console.print(f"{res['samples']} samples ({kinds}) -> {res['png']} and {res['html']}")
