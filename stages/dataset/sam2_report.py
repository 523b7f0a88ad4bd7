"""The SAM2 verification report: counts, IoU histograms and worst-case sheets.

Written under ``<out>/reports/verify_sam2/``:

* ``report.json``: outcome counts (cleaner: refined / kept / flagged /
  dropped, with the reasons; filter: targets and samples passed / failed),
  the histogram counts, and the worst cases with their ids and IoUs;
* ``iou_histogram.png``: IoU histograms (cleaner: refined vs original mask;
  filter: target mask vs SAM2's) with the configured thresholds drawn in;
* ``worst_clean.png`` / ``worst_filter.png``: preview sheets of the
  lowest-IoU instances, the original mask outlined in green and SAM2's mask
  in magenta.

The accumulator is a plain mergeable value, so that Beam can combine it
across workers (``CombineGlobally``) without ever holding all outcomes.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from orsgen.schemas.config import VerifySam2Config
from orsgen.stages.common.masks import decode_crop
from orsgen.stages.verify.backend import decode_rgb
from orsgen.stages.verify.sam2 import CLEAN, FILTER, SAMPLE, Sam2Outcome

REPORT_DIR = "reports/verify_sam2"
GREEN = (40, 220, 40)
MAGENTA = (255, 0, 255)
_KINDS = (CLEAN, FILTER, SAMPLE)


def _worst_key(o: Sam2Outcome) -> tuple[float, str, str]:
    # NaN never happens for clean/filter outcomes; ids break ties deterministically.
    return (o.iou, o.image_key, o.item_id)


@dataclass
class ReportAccumulator:
    """Mergeable report state: counts, histograms and the worst cases.

    Attributes:
        bins: histogram bins over [0, 1].
        worst_n: worst cases kept per kind (``clean`` and ``filter``).
        counts: ``kind/action`` -> n.
        reasons: ``kind/reason`` -> n for refinements not accepted.
        hists: kind -> bin counts.
        worst: kind -> outcomes, lowest IoU first, at most ``worst_n``.
    """

    bins: int = 20
    worst_n: int = 24
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    hists: dict[str, list[int]] = field(default_factory=dict)
    worst: dict[str, list[Sam2Outcome]] = field(default_factory=dict)

    def add(self, o: Sam2Outcome) -> "ReportAccumulator":
        """Counts one outcome (returns self, for folding)."""
        k = f"{o.kind}/{o.action}"
        self.counts[k] = self.counts.get(k, 0) + 1
        if o.reason:
            r = f"{o.kind}/{o.reason}"
            self.reasons[r] = self.reasons.get(r, 0) + 1
        if not math.isnan(o.iou):
            hist = self.hists.setdefault(o.kind, [0] * self.bins)
            hist[min(self.bins - 1, max(0, int(o.iou * self.bins)))] += 1
        if o.kind in (CLEAN, FILTER) and self.worst_n > 0:
            lst = self.worst.setdefault(o.kind, [])
            lst.append(o)
            if len(lst) > 2 * self.worst_n:
                self._trim(o.kind)
        return self

    def _trim(self, kind: str) -> None:
        self.worst[kind] = sorted(self.worst[kind], key=_worst_key)[: self.worst_n]

    def merge(self, other: "ReportAccumulator") -> "ReportAccumulator":
        """Adds another accumulator into this one (returns self)."""
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        for k, n in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + n
        for kind, hist in other.hists.items():
            mine = self.hists.setdefault(kind, [0] * self.bins)
            for i, n in enumerate(hist):
                mine[i] += n
        for kind, lst in other.worst.items():
            self.worst.setdefault(kind, []).extend(lst)
        for kind in list(self.worst):
            self._trim(kind)
        return self

    def finish(self) -> "ReportAccumulator":
        """Trims the worst lists to ``worst_n`` in their final order."""
        for kind in list(self.worst):
            self._trim(kind)
        return self


def summarize(acc: ReportAccumulator, cfg: VerifySam2Config) -> dict[str, Any]:
    """The ``report.json`` content (without rendering anything).

    Args:
        acc: the combined accumulator.
        cfg: the stage config (thresholds are echoed next to the counts).

    Returns:
        A JSON-serialisable dict.
    """
    acc.finish()
    c = acc.counts

    def n(kind: str, action: str) -> int:
        return c.get(f"{kind}/{action}", 0)

    edges = [round(i / acc.bins, 6) for i in range(acc.bins + 1)]
    return {
        "model": cfg.model,
        "backend": cfg.backend,
        "cleaner": {
            "enabled": cfg.clean.enabled,
            "iou_band": list(cfg.clean.iou_band),
            "pred_iou_thresh": cfg.clean.pred_iou_thresh,
            "on_reject": cfg.clean.on_reject,
            "instances": sum(n(CLEAN, a) for a in ("refined", "kept", "flagged", "dropped")),
            "refined": n(CLEAN, "refined"),
            "kept": n(CLEAN, "kept"),
            "flagged": n(CLEAN, "flagged"),
            "dropped": n(CLEAN, "dropped"),
            "not_accepted_by_reason": {k.split("/", 1)[1]: v for k, v in sorted(acc.reasons.items()) if k.startswith(CLEAN)},
        },
        "filter": {
            "enabled": cfg.filter.enabled,
            "iou_thresh": cfg.filter.iou_thresh,
            "targets_passed": n(FILTER, "passed"),
            "targets_failed": n(FILTER, "failed"),
            "samples_passed": n(SAMPLE, "passed"),
            "samples_rejected": n(SAMPLE, "failed"),
        },
        "histograms": {"bin_edges": edges, **{k: acc.hists[k] for k in _KINDS if k in acc.hists}},
        "worst_cases": {
            kind: [
                {"image_key": o.image_key, "instance_id": o.item_id, "action": o.action, "iou": round(o.iou, 6),
                 "pred_iou": round(o.pred_iou, 6), "reason": o.reason}
                for o in acc.worst.get(kind, [])
            ]
            for kind in (CLEAN, FILTER)
        },
    }


# ------------------------------------------------------------------ drawing


def _window(box: Sequence[float], w: int, h: int, pad_frac: float = 0.2, min_side_px: int = 24) -> tuple[int, int, int, int]:
    """The crop window around a box: padded, at least ``min_side_px``, inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w = max(bw * (1 + 2 * pad_frac), min_side_px) / 2
    half_h = max(bh * (1 + 2 * pad_frac), min_side_px) / 2
    wx0, wy0 = max(0, int(math.floor(cx - half_w))), max(0, int(math.floor(cy - half_h)))
    wx1, wy1 = min(w, int(math.ceil(cx + half_w))), min(h, int(math.ceil(cy + half_h)))
    return wx0, wy0, max(wx1, wx0 + 1), max(wy1, wy0 + 1)


def _font() -> Any:
    return ImageFont.load_default()


def render_tile(image: np.ndarray, o: Sam2Outcome, tile_px: int = 192) -> Image.Image:
    """One preview tile: the crop around the instance with both outlines.

    Args:
        image: the full ``(h, w, 3)`` RGB image.
        o: a ``clean`` or ``filter`` outcome carrying both masks.
        tile_px: tile side in pixels (a caption strip is added below).

    Returns:
        An RGB tile of ``tile_px`` x ``tile_px + 28`` pixels.
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _window(o.box_xyxy, w, h)
    crop = image[y0:y1, x0:x1]
    scale = tile_px / max(crop.shape[0], crop.shape[1])
    nw, nh = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    view = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    canvas = np.full((tile_px, tile_px, 3), 32, dtype=np.uint8)
    ox, oy = (tile_px - nw) // 2, (tile_px - nh) // 2
    canvas[oy : oy + nh, ox : ox + nw] = view
    for rle, colour in ((o.predicted, MAGENTA), (o.original, GREEN)):
        if rle is None:
            continue
        m, _ = decode_crop(rle, (x0, y0, x1, y1))
        m = cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, [c + np.array([ox, oy]) for c in contours], -1, colour, 2 if colour == GREEN else 1)
    tile = Image.new("RGB", (tile_px, tile_px + 28), (16, 16, 16))
    tile.paste(Image.fromarray(canvas), (0, 0))
    draw = ImageDraw.Draw(tile)
    pred = "" if math.isnan(o.pred_iou) else f" pred {o.pred_iou:.2f}"
    draw.text((4, tile_px + 2), f"IoU {o.iou:.2f}{pred} {o.action}", fill=(235, 235, 235), font=_font())
    ident = o.item_id if len(o.item_id) <= 34 else "..." + o.item_id[-31:]
    draw.text((4, tile_px + 15), ident, fill=(170, 170, 170), font=_font())
    return tile


def render_tiles(image_bytes: bytes, outcomes: Iterable[Sam2Outcome], tile_px: int = 192) -> list[tuple[Sam2Outcome, bytes]]:
    """Tiles for the worst cases of one image, as PNG bytes (small, picklable)."""
    image = decode_rgb(image_bytes)
    out = []
    for o in outcomes:
        buf = io.BytesIO()
        render_tile(image, o, tile_px).save(buf, format="PNG")
        out.append((o, buf.getvalue()))
    return out


def render_sheet(tiles: Sequence[tuple[Sam2Outcome, bytes]], title: str, columns: int = 6) -> bytes:
    """A grid of tiles, lowest IoU first, with a title; PNG bytes.

    Args:
        tiles: ``(outcome, tile PNG)`` pairs (any order; sorted here).
        title: the header line.
        columns: tiles per row.
    """
    ordered = sorted(tiles, key=lambda t: _worst_key(t[0]))
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for _, b in ordered]
    tw, th = (imgs[0].size if imgs else (192, 220))
    cols = max(1, min(columns, len(imgs) or 1))
    rows = max(1, math.ceil(len(imgs) / cols))
    gap, head = 4, 24
    sheet = Image.new("RGB", (cols * (tw + gap) + gap, head + rows * (th + gap) + gap), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 6), title if imgs else f"{title}: no cases", fill=(255, 255, 255), font=_font())
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        sheet.paste(im, (gap + c * (tw + gap), head + r * (th + gap)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def histogram_png(summary: dict[str, Any]) -> bytes:
    """The IoU histograms of ``summary`` as one PNG (matplotlib, Agg canvas).

    Raises:
        ImportError: matplotlib is missing (it comes with the ``sam2`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the SAM2 report draws with matplotlib; install it with pip install 'orsgen[sam2]'.") from err
    hists = summary["histograms"]
    edges = np.asarray(hists["bin_edges"])
    panels = [
        (CLEAN, "cleaner: IoU(SAM2, original polygon)", summary["cleaner"]["iou_band"]),
        (FILTER, "filter: IoU(SAM2, target mask)", [summary["filter"]["iou_thresh"]]),
    ]
    # A fresh Figure on its own canvas: no pyplot global state, safe in workers.
    fig = Figure(figsize=(9, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (kind, title, lines) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        counts = np.asarray(hists.get(kind, [0] * (len(edges) - 1)))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a7bd0", edgecolor="white")
        for v in lines:
            ax.axvline(float(v), color="#d04a4a", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(f"{title}\n(n={int(counts.sum())})", fontsize=9)
        ax.set_xlabel("IoU", fontsize=8)
        ax.set_ylabel("instances", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    # No software / date metadata, so that equal inputs give equal bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def report_files(summary: dict[str, Any], tiles: Sequence[tuple[Sam2Outcome, bytes]]) -> dict[str, bytes]:
    """All report files as ``name -> bytes``.

    Args:
        summary: from ``summarize``.
        tiles: rendered worst-case tiles of every kind.
    """
    files = {
        "report.json": (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        "iou_histogram.png": histogram_png(summary),
    }
    titles = {
        CLEAN: "verify_sam2: worst cleaner cases (green: original, magenta: SAM2)",
        FILTER: "verify_sam2: worst filter cases (green: target mask, magenta: SAM2)",
    }
    for kind, enabled in ((CLEAN, summary["cleaner"]["enabled"]), (FILTER, summary["filter"]["enabled"])):
        if enabled:
            files[f"worst_{kind}.png"] = render_sheet([t for t in tiles if t[0].kind == kind], titles[kind])
    return files


def write_report(out: str, files: dict[str, bytes]) -> list[str]:
    """Writes the report files atomically under ``<out>/reports/verify_sam2/``.

    Each file goes to a hidden temporary name and is renamed into place. A
    file that already exists with the same bytes (a rerun) is left alone; a
    different one is an error, since orsgen never overwrites a file it did not
    just write.

    Args:
        out: the output root (local path or fsspec URL).
        files: ``name -> bytes``.

    Returns:
        The written (or already present) paths.

    Raises:
        FileExistsError: a report file exists with other content.
    """
    fs, root = fsspec.core.url_to_fs(out)
    folder = posixpath.join(root.rstrip("/"), REPORT_DIR)
    fs.makedirs(folder, exist_ok=True)
    paths = []
    for name, data in sorted(files.items()):
        final = posixpath.join(folder, name)
        paths.append(final)
        if fs.exists(final):
            if fs.cat_file(final) == data:
                continue
            raise FileExistsError(
                f"{final} already exists with other content; orsgen never overwrites files. "
                "Choose a new --out, or move the old report away and run again."
            )
        tmp = posixpath.join(folder, f".{name}.tmp-{secrets.token_hex(8)}")
        fs.pipe_file(tmp, data)
        try:
            fs.mv(tmp, final)
        except BaseException:
            if fs.exists(tmp):
                fs.rm_file(tmp)
            raise
    return paths
