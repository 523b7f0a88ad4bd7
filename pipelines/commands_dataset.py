"""``orsgen publish``, ``export``, ``eval``, ``preview`` and ``review``: tools on a finished dataset.

    orsgen publish DIR --repo-id ORG/NAME [--private] [--revision R] [--dry-run] [--staging DIR]
    orsgen export DIR --format {segzero,visionreasoner,lens,qwen,moondream,refcoco-m} --out OUT [--split S]
                  [--variant V] [--keep-no-target]
    orsgen eval PREDICTIONS --gt DIR [--split S] [--protocol {orsgen,segzero,visionreasoner,visionreasoner-nonobj}] [--out report.json]
    orsgen preview DIR [--split S] [--n 24] [--kind K ...] --out FILE.png [--html FILE.html]
    orsgen review DIR [--split S ...] [--port P] [--reviewer NAME] [--shard K/N] | --summary

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


_FORMAT_HELP = (
    "segzero (Seg-Zero: --variant current = save_to_disk DatasetDict, solution a JSON list of bbox_2d/point_2d on "
    "840x840, inclusive boxes; v1 = Parquet, <box>..</box><points>..</points>, single target), "
    "visionreasoner (as segzero current; no-target skipped unless --keep-no-target), "
    "lens (LENS GSTrainDataset JSONL, one folder per split, union mask), "
    "qwen (--variant qwen3vl = 0-1000 grid with Python round(), clamped; qwen2.5vl = absolute pixels on the "
    "smart_resize'd image, clamped to size-1), "
    "moondream (SVG path relative to its bbox, 960 grid), "
    "refcoco-m (--variant hub = moondream/refcoco-m's exact features, one 'validation' split, no no-target; "
    "extended = plus orsgen's link fields)."
)


def export(
    directory: str = typer.Argument(..., metavar="DIR", help="Output folder of a run."),
    fmt: str = typer.Option(..., "--format", help=_FORMAT_HELP),
    out: Path = typer.Option(..., "--out", help="New local folder for the export (must not exist)."),
    split: list[str] = typer.Option([], "--split", help="Split(s) to export (repeatable; default: all; refcoco-m hub: exactly one)."),
    variant: Optional[str] = typer.Option(
        None, "--variant", help="Consumer version: segzero current|v1, qwen qwen3vl|qwen2.5vl, refcoco-m hub|extended (default: the first)."
    ),
    keep_no_target: bool = typer.Option(
        False,
        "--keep-no-target",
        help="visionreasoner: also write no-target samples as solution '[]' (its reward scores '[]' 2.0 and an invented box 4.0).",
    ),
) -> None:
    """Write trainer-ready data in a consumer's own conventions (see the README's *Exports for trainers*)."""
    from orsgen.stages.dataset.export import ExportError, export_dataset
    from orsgen.stages.dataset.read import DatasetReadError

    if keep_no_target and fmt == "visionreasoner":
        console.print(
            "[yellow]--keep-no-target: VisionReasoner's reward (verl/utils/reward_score/vision_reasoner.py) cannot score an "
            "empty ground truth: np.split fails on [] and the accuracy term is 0 for every answer, so the correct '[]' "
            "scores 2.0 and an invented box 4.0. Training on these rows rewards hallucination.[/]"
        )
    try:
        summary = export_dataset(directory, fmt, out, split or None, variant=variant, keep_no_target=keep_no_target)
    except (ExportError, DatasetReadError) as err:
        fail(str(err))
    title = f"orsgen export {fmt}" + (f" ({summary['variant']})" if summary.get("variant") else "") + f" -> {out}"
    t = Table(title=title)
    for col in ("split", "images", "samples", "records", "skipped"):
        t.add_column(col)
    for name, v in summary["splits"].items():
        skipped = ", ".join(f"{k}={n}" for k, n in v["skipped"].items()) or "-"
        t.add_row(name, str(v["images"]), str(v["samples_in"]), str(v["records"]), skipped)
    console.print(t)
    if "hub_split" in summary:
        console.print(f"orsgen split {summary['hub_split']['validation']!r} written as RefCOCO-M's 'validation' split.")


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}" if isinstance(v, float) else str(v)


def eval_(
    predictions: Path = typer.Argument(..., metavar="PREDICTIONS", help="JSONL: sample_id + segmentation (RLE or polygons; null = no target)."),
    gt: str = typer.Option(..., "--gt", help="Output folder of the run holding the ground truth."),
    split: list[str] = typer.Option([], "--split", help="Split(s) to evaluate (repeatable; default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the full report as JSON here (must not exist)."),
    protocol: str = typer.Option(
        "orsgen",
        "--protocol",
        help="Empty-vs-empty samples: orsgen (IoU 1, GRES), segzero (skipped, as Seg-Zero's evaluation.py), "
        "visionreasoner (IoU 0, as its calculate_iou_with_bbox.py), visionreasoner-nonobj (IoU 1, its _nonobj script).",
    ),
) -> None:
    """Score predictions: cIoU, gIoU, mIoU, N-acc, T-acc, Pr@τ, by kind and split."""
    from orsgen.stages.dataset.evaluate import EvalError, evaluate_files
    from orsgen.stages.dataset.read import DatasetReadError

    if out is not None and out.exists():
        fail(f"{out} already exists; orsgen never overwrites files. Choose a new --out.")
    if not predictions.is_file():
        fail(f"predictions file {predictions} does not exist.")
    try:
        report = evaluate_files(predictions, gt, split or None, protocol)
    except (EvalError, DatasetReadError) as err:
        fail(str(err))
    cols = ("n", "cIoU", "gIoU", "mIoU", "N_acc", "T_acc", "Pr@0.5")
    t = Table(title=f"orsgen eval ({protocol}): {predictions.name} vs {gt} ({', '.join(report['splits'])})")
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
    if protocol == "segzero" and report["overall"].get("skipped_empty_union"):
        console.print(f"segzero protocol: {report['overall']['skipped_empty_union']} sample(s) with empty prediction and ground truth skipped.")
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
    split: Optional[str] = typer.Option(
        None, "--split", help="Only this split (default: every split, in proportion to its samples)."
    ),
    n: int = typer.Option(24, "--n", help="How many samples."),
    kind: list[str] = typer.Option([], "--kind", help="Only these kinds (repeatable)."),
    cols: int = typer.Option(4, "--cols", help="Tiles per row."),
    html: Optional[str] = typer.Option(None, "--html", help="HTML page to write (default: beside --out, .html)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    matches: bool = typer.Option(
        False, "--matches", help="Instead of samples, draw the benchmark matches (build image | benchmark image) side by side."
    ),
    inputs_root: Optional[str] = typer.Option(
        None,
        "--inputs-root",
        help="With --matches: the folder the build config's relative input paths are relative to (its YAML file's folder; default: the current directory).",
    ),
) -> None:
    """Draw samples of DIR (image, masks, boxes, points, expression, kind) into --out and an HTML page."""
    from orsgen.stages.dataset.preview import PreviewError, write_match_preview, write_preview

    if matches:
        try:
            res = write_match_preview(root, out, n=n, cols=min(cols, 2), overwrite=overwrite, inputs_root=inputs_root)
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
    splits = ", ".join(f"{k}={v}" for k, v in res["splits"].items())
    what = "regions (the output has no samples yet)" if res["regions"] else "samples"
    console.print(f"{res['samples']} {what} ({kinds}) from splits {splits} -> {res['png']} and {res['html']}")


def review(
    root: str = typer.Argument(..., metavar="DIR", help="An orsgen output folder (the one holding manifest.json)."),
    split: list[str] = typer.Option([], "--split", help="Split(s) to review (repeatable; default: all)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port of the review page (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default keeps the page on this machine."),
    reviewer: Optional[str] = typer.Option(None, "--reviewer", help="Your name, saved with every verdict (default: your login)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: review only images of bucket K of N, so N reviewers get disjoint sets."),
    kind: list[str] = typer.Option([], "--kind", help="Only these sample kinds (repeatable)."),
    summary: bool = typer.Option(False, "--summary", help="Print acceptance rates by kind, template and reason, and exit."),
) -> None:
    """Screen samples in the browser (a, r, s keys); verdicts go to DIR/_review/decisions.parquet at once."""
    from orsgen.stages.screening import DecisionsError, decisions_path, read_decisions, summarize

    if summary:
        try:
            decisions = read_decisions(decisions_path(root))
        except (FileNotFoundError, DecisionsError) as err:
            fail(f"{err}" if isinstance(err, DecisionsError) else f"{root} has no review decisions yet; run `orsgen review {root}` first.")
        _print_review_summary(summarize(decisions), root)
        return

    import getpass

    from orsgen.stages.dataset.review import ReviewError, ReviewStoreError, make_server, parse_shard

    try:
        name = reviewer or getpass.getuser()
    except (KeyError, OSError):
        name = "reviewer"
    try:
        server = make_server(root, splits=split or None, reviewer=name, host=host, port=port, shard=parse_shard(shard), kinds=kind or None)
    except (ReviewError, ReviewStoreError, DecisionsError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot listen on {host}:{port} ({err}); pass another --port.")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning: listening on {host}: anyone who can reach it can read the data and record verdicts.[/]")
    progress = server.session.progress()
    console.print(
        f"reviewing {progress['total']} samples of {', '.join(server.session.index.splits)} "
        f"({progress['decided']} decided already) as {name}\n"
        f"open {server.url} in a browser; verdicts go to {server.session.log.folder}/{server.session.log.prefix}-*.parquet\n"
        "Ctrl+C stops the server (nothing is lost)."
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    console.print(f"{len(server.session.log)} verdict(s) saved this session in {server.session.log.folder}")


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _print_review_summary(s: dict[str, Any], root: str) -> None:
    t = s["total"]
    console.print(
        f"review of {root}: {t['decided']} sample(s) decided: {t['accepted']} accepted, {t['rejected']} rejected, "
        f"{t['skipped']} skipped; acceptance rate {_pct(t['acceptance_rate'])} (accepted / (accepted + rejected))"
    )
    for group, title in (("by_split", "split"), ("by_kind", "kind"), ("by_template", "template"), ("by_reviewer", "reviewer")):
        table = Table(title=f"by {title}")
        for col in (title, "decided", "accepted", "rejected", "skipped", "acceptance"):
            table.add_column(col)
        for k, v in s[group].items():
            table.add_row(k, str(v["decided"]), str(v["accepted"]), str(v["rejected"]), str(v["skipped"]), _pct(v["acceptance_rate"]))
        console.print(table)
    if s["by_reason"]:
        table = Table(title="rejections by reason")
        table.add_column("reason")
        table.add_column("count")
        table.add_column("share")
        n = sum(s["by_reason"].values())
        for k, v in s["by_reason"].items():
            table.add_row(k, str(v), _pct(v / n))
        console.print(table)
