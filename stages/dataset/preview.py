"""Preview of an orsgen output: a contact sheet (PNG) and an HTML page of samples.

Each tile shows one sample: the image, each target's mask tinted in its own
colour, the target boxes, the two Seg-Zero interior points (filled dot:
``point_1``, ring: ``point_2``), and below it the sample's kind and expression.
The HTML page lists the same samples with their tiles, ids, targets and
trainer geometry, so a reviewer can read what the picture shows.

Samples are read from the Parquet shards, or from the WebDataset shards when
there is no Parquet output (both found through the manifest), in sorted shard
and row order, and picked round-robin across kinds so that every kind shows.
Without ``--split`` the sheet draws from every split, each in proportion to
its sample count in the manifest (at least one tile per non-empty split when
``n`` allows), and says which splits it drew. An output with regions but no
samples yet (SA-1B before captioning) shows its regions instead: one tile
per region with its mask, box, interior points and id.
Everything here is pure and deterministic; ``pipelines/commands_dataset.py`` is the
command.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import posixpath
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from orsgen.schemas.arrow import example_from_row
from orsgen.schemas.records import ExpressionKind, ImageExample, Instance, Sample
from orsgen.stages.ingest.images import draft_decodable

#: Kinds in the order the sheet cycles through them.
KIND_ORDER = (
    str(ExpressionKind.CATEGORY_SINGLE),
    str(ExpressionKind.CATEGORY_MULTI),
    str(ExpressionKind.PHRASE),
    str(ExpressionKind.DESCRIPTION),
    str(ExpressionKind.HUMAN),
    str(ExpressionKind.NO_TARGET),
)
KIND_COLOURS: dict[str, tuple[int, int, int]] = {
    "category_single": (46, 125, 50),
    "category_multi": (0, 121, 107),
    "phrase": (21, 101, 192),
    "description": (94, 53, 177),
    "human": (173, 20, 87),
    "no_target": (97, 97, 97),
    "region": (120, 85, 40),
}
#: Target colours (one per target, cycling): saturated and distinct.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 200),
    (0, 230, 255),
    (255, 200, 0),
    (60, 255, 60),
    (255, 90, 40),
    (150, 110, 255),
)
OVERLAY_ALPHA = 0.5
CAPTION_PX = 64
PAD_PX = 6


class PreviewError(ValueError):
    """Nothing to preview (no shards, unknown split, no samples)."""


@dataclass(frozen=True)
class PreviewItem:
    """One sample to draw, with what drawing it needs.

    Attributes:
        key: the example key.
        split: its split.
        image_bytes: the encoded image.
        width: image width in pixels.
        height: image height in pixels.
        sample: the sample.
        instances: the example's instances by id (for per-target masks).
    """

    key: str
    split: str
    image_bytes: bytes
    width: int
    height: int
    sample: Sample
    instances: dict[str, Instance]


@dataclass(frozen=True)
class TileLayout:
    """Where a tile's image lies, so a test can find a pixel of the source.

    Attributes:
        x0: left of the tile in the sheet.
        y0: top of the tile in the sheet.
        image_x0: left of the image inside the tile.
        image_y0: top of the image inside the tile.
        image_w: drawn image width in pixels.
        image_h: drawn image height in pixels.
        scale: drawn pixels per source pixel.
    """

    x0: int
    y0: int
    image_x0: int
    image_y0: int
    image_w: int
    image_h: int
    scale: float


# ---------------------------------------------------------------- reading


def iter_examples(root: str, split: str | None = None) -> Iterator[ImageExample]:
    """Examples of an output folder in a fixed order: split, shard, row.

    Shards are found through the manifest (``stages.dataset.read``), so the folder
    layout of whichever orsgen version wrote them does not matter. Parquet is
    read when the run wrote it, else the WebDataset tars.

    Args:
        root: the output folder (any fsspec URL).
        split: one split, or None for all.

    Raises:
        PreviewError: no manifest, an unknown split, or no shards.
    """
    from orsgen.stages.dataset.read import DatasetReadError, list_splits, shards

    try:
        have = list_splits(root)
    except DatasetReadError as err:
        raise PreviewError(f"{root} is not an orsgen output folder: {err}") from None
    if split is not None and split not in have:
        raise PreviewError(f"no Parquet or WebDataset shards found for split {split!r} of {root}; it has {have}.")
    for sp in [split] if split is not None else have:
        pq_shards = shards(root, "parquet", sp)
        if pq_shards:
            for ref in pq_shards:
                with fsspec.open(ref.url, "rb") as f:
                    pf = pq.ParquetFile(f)
                    for batch in pf.iter_batches(batch_size=64):
                        for row in batch.to_pylist():
                            yield example_from_row(row)
        else:
            for ref in shards(root, "webdataset", sp):
                yield from _tar_examples(ref.url)


def _tar_examples(url: str) -> Iterator[ImageExample]:
    pending: dict[str, dict[str, bytes]] = {}
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member)
            if data is None:
                continue
            pending.setdefault(key, {})[ext] = data.read()
            item = pending[key]
            if "json" in item and "jpg" in item:
                row = json.loads(item["json"])
                row["image"] = item["jpg"]
                del pending[key]
                yield example_from_row(row)


def pick_items(
    examples: Iterator[ImageExample],
    n: int,
    kinds: Sequence[str] | None = None,
) -> list[PreviewItem]:
    """Up to ``n`` samples, round-robin across kinds (``KIND_ORDER``), in reading order.

    Each kind takes at most one sample per example, and an image's
    expression shows once, so the sheet shows many images. Reading stops as soon as every wanted kind has ``n`` samples, so a
    large split is not read to the end.

    Args:
        examples: examples in a fixed order.
        n: how many samples.
        kinds: only these kinds (None: all).
    """
    wanted = list(kinds) if kinds else list(KIND_ORDER)
    by_kind: dict[str, list[PreviewItem]] = defaultdict(list)
    # RefCOCO and gRefCOCO share images and sentences: show each pair once.
    shown: set[tuple[str, str]] = set()
    for ex in examples:
        insts = {i.instance_id: i for i in ex.instances}
        taken: set[str] = set()
        for s in ex.samples:
            seen_key = (ex.image.image_id, s.expression.lower())
            if s.kind not in wanted or s.kind in taken or len(by_kind[s.kind]) >= n or seen_key in shown:
                continue
            taken.add(s.kind)
            shown.add(seen_key)
            by_kind[s.kind].append(
                PreviewItem(ex.key, ex.split, ex.image_bytes, ex.image.width, ex.image.height, s, insts)
            )
        if all(len(by_kind[k]) >= n for k in wanted):
            break
    order = [k for k in wanted if k in KIND_ORDER] + sorted(k for k in by_kind if k not in KIND_ORDER)
    out: list[PreviewItem] = []
    depth = 0
    while len(out) < n and any(depth < len(by_kind[k]) for k in order):
        for k in order:
            if depth < len(by_kind[k]) and len(out) < n:
                out.append(by_kind[k][depth])
        depth += 1
    return out


#: The pseudo-kind of a region tile (an output without samples).
REGION_KIND = "region"


def pick_regions(examples: Iterator[ImageExample], n: int, per_image: int = 3) -> list[PreviewItem]:
    """Up to ``n`` regions as tiles (mask, box, interior points, id), ``per_image`` per image at most.

    For outputs with regions but no samples: each region becomes a one-target
    pseudo-sample of kind ``region`` whose text is its id and area. The largest
    regions of an image come first.
    """
    from orsgen.stages.common.targets import target_geometry

    out: list[PreviewItem] = []
    for ex in examples:
        insts = {i.instance_id: i for i in ex.instances}
        ranked = sorted(ex.instances, key=lambda i: (-i.area_px, i.instance_id))[:per_image]
        for inst in ranked:
            if len(out) >= n:
                return out
            geo = target_geometry(inst, ex.image.width, ex.image.height)
            label = inst.category_name or "region"
            sample = Sample(
                sample_id=inst.instance_id,
                image_id=ex.image.image_id,
                expression=f"{label} {inst.instance_id} ({inst.area_px} px)",
                kind=REGION_KIND,
                target_ids=(inst.instance_id,),
                split=ex.split,
                union_rle=inst.rle,
                targets=(geo,),
            )
            out.append(PreviewItem(ex.key, ex.split, ex.image_bytes, ex.image.width, ex.image.height, sample, insts))
    return out


def split_quotas(weights: dict[str, int], n: int) -> dict[str, int]:
    """Splits ``n`` tiles over splits in proportion to ``weights`` (largest remainder).

    Every split with a positive weight gets at least one tile while ``n``
    allows (the smallest held-out split still shows); ties go to the split
    that sorts first.
    """
    live = sorted(k for k, w in weights.items() if w > 0)
    if not live or n <= 0:
        return {}
    total = sum(weights[k] for k in live)
    shares = {k: n * weights[k] / total for k in live}
    quota = {k: int(shares[k]) for k in live}
    rest = n - sum(quota.values())
    for k in sorted(live, key=lambda k: (-(shares[k] - int(shares[k])), k))[:rest]:
        quota[k] += 1
    if n >= len(live):
        # A split too small for its share still shows once, paid by the largest.
        for k in live:
            if quota[k] == 0:
                donor = max(live, key=lambda d: (quota[d], -live.index(d)))
                quota[donor] -= 1
                quota[k] = 1
    return {k: q for k, q in quota.items() if q > 0}


def _split_weights(root: str, kinds: Sequence[str] | None, regions: bool) -> dict[str, int]:
    """Samples (of ``kinds``) per split from the manifest; images when drawing regions."""
    from orsgen.stages.dataset.read import DatasetReadError, list_splits, load_manifest

    try:
        splits = load_manifest(root).get("splits") or {}
    except DatasetReadError as err:
        raise PreviewError(f"{root} is not an orsgen output folder: {err}") from None
    out = {}
    for sp in list_splits(root):
        v = splits.get(sp, {})
        if regions:
            out[sp] = int(v.get("images", 0))
        elif kinds:
            out[sp] = sum(int(c) for k, c in (v.get("samples_by_kind") or {}).items() if k in kinds)
        else:
            out[sp] = int(v.get("samples", 0))
    return out


def pick_across_splits(
    root: str, n: int, kinds: Sequence[str] | None = None, split: str | None = None
) -> tuple[list[PreviewItem], dict[str, int], bool]:
    """What the sheet draws: samples of one split, or of all splits in proportion.

    Returns:
        ``(items, tiles per split, regions)``; ``regions`` is True when the
        output has no samples (of ``kinds``) and its regions were drawn instead.

    Raises:
        PreviewError: no manifest, an unknown split, or nothing to draw.
    """
    if split is not None:
        items = pick_items(iter_examples(root, split), n, kinds)
        regions = not items
        if regions:
            items = pick_regions(iter_examples(root, split), n)
        return items, ({split: len(items)} if items else {}), regions
    weights = _split_weights(root, kinds, regions=False)
    regions = not any(weights.values())
    if regions:
        weights = _split_weights(root, None, regions=True)
    items: list[PreviewItem] = []
    drawn: dict[str, int] = {}
    for sp, q in sorted(split_quotas(weights, n).items()):
        got = pick_regions(iter_examples(root, sp), q) if regions else pick_items(iter_examples(root, sp), q, kinds)
        if got:
            items.extend(got)
            drawn[sp] = len(got)
    return items, drawn, regions


# ---------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width_px: int, max_lines: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if draw.textlength(trial, font=font) <= width_px or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines


def scaled_image(item: PreviewItem, tile_w: int, image_h: int) -> tuple[np.ndarray, float]:
    """The item's image as RGB uint8, scaled to fit ``tile_w`` x ``image_h``."""
    with Image.open(io.BytesIO(item.image_bytes)) as im:
        rgb = im.convert("RGB")
    scale = min(tile_w / rgb.width, image_h / rgb.height)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return np.asarray(rgb.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8), scale


def target_masks(item: PreviewItem, size_wh: tuple[int, int]) -> list[np.ndarray]:
    """Each target's mask, resized (nearest) to ``size_wh``; the union when instances are missing."""
    rles = [item.instances[t].rle for t in item.sample.target_ids if t in item.instances]
    if len(rles) != len(item.sample.target_ids) and item.sample.union_rle is not None:
        rles = [item.sample.union_rle]
    out = []
    for rle in rles:
        full = mask_utils.decode(rle.to_coco()).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(full * 255).resize(size_wh, Image.Resampling.NEAREST)) > 127)
    return out


def render_tile(item: PreviewItem, tile_w: int = 300, image_h: int = 225) -> tuple[Image.Image, TileLayout]:
    """Draws one sample.

    Args:
        item: the sample and its image.
        tile_w: tile width in pixels.
        image_h: height of the image area in pixels (the caption goes below).

    Returns:
        ``(tile, layout)``; ``layout`` has x0 = y0 = 0 (the sheet moves it).
    """
    base, scale = scaled_image(item, tile_w, image_h)
    ih, iw = base.shape[:2]
    arr = base.astype(np.float64)
    for k, m in enumerate(target_masks(item, (iw, ih))):
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float64)
        arr[m] = arr[m] * (1 - OVERLAY_ALPHA) + colour * OVERLAY_ALPHA
    tile = Image.new("RGB", (tile_w, image_h + CAPTION_PX), (255, 255, 255))
    ox, oy = (tile_w - iw) // 2, (image_h - ih) // 2
    tile.paste(Image.fromarray(np.rint(arr).astype(np.uint8)), (ox, oy))
    draw = ImageDraw.Draw(tile)
    s = item.sample
    for k, t in enumerate(s.targets):
        colour = PALETTE[k % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in t.bbox_xyxy)
        draw.rectangle([ox + x0, oy + y0, ox + x1 - 1, oy + y1 - 1], outline=colour, width=2)
        for j, (px, py) in enumerate((t.point_1, t.point_2)):
            cx, cy = ox + (px + 0.5) * scale, oy + (py + 0.5) * scale
            r = 4
            if j == 0:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(0, 0, 0))
            else:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=2)
    small, big = _font(11), _font(13)
    kind_colour = KIND_COLOURS.get(s.kind, (60, 60, 60))
    label = s.kind if s.target_ids else f"{s.kind} (empty mask)"
    ty = image_h + 3
    lw = draw.textlength(label, font=small)
    draw.rounded_rectangle([PAD_PX - 2, ty, PAD_PX + lw + 4, ty + 14], radius=4, fill=kind_colour)
    draw.text((PAD_PX + 1, ty + 1), label, fill=(255, 255, 255), font=small)
    n = len(s.target_ids)
    meta = f"{n} target{'s' if n != 1 else ''}  |  {item.split}"
    draw.text((PAD_PX + lw + 12, ty + 1), meta, fill=(110, 110, 110), font=small)
    for i, line in enumerate(_wrap(draw, f"\u201c{s.expression}\u201d", big, tile_w - 2 * PAD_PX, 3)):
        draw.text((PAD_PX, ty + 17 + 15 * i), line, fill=(20, 20, 20), font=big)
    layout = TileLayout(0, 0, ox, oy, iw, ih, scale)
    return tile, layout


def render_sheet(
    items: Sequence[PreviewItem], cols: int = 4, tile_w: int = 300, image_h: int = 225
) -> tuple[Image.Image, list[Image.Image], list[TileLayout]]:
    """A contact sheet of ``items``, ``cols`` tiles per row.

    Returns:
        ``(sheet, tiles, layouts)``; each layout's ``x0, y0`` place its tile.

    Raises:
        PreviewError: no items.
    """
    if not items:
        raise PreviewError("no samples to preview; check --split and --kind, or that the dataset has samples.")
    cols = max(1, min(cols, len(items)))
    rows = -(-len(items) // cols)
    th = image_h + CAPTION_PX
    gap = 4
    sheet = Image.new("RGB", (cols * tile_w + (cols + 1) * gap, rows * th + (rows + 1) * gap), (225, 225, 225))
    tiles, layouts = [], []
    for i, item in enumerate(items):
        tile, lay = render_tile(item, tile_w, image_h)
        x0 = gap + (i % cols) * (tile_w + gap)
        y0 = gap + (i // cols) * (th + gap)
        sheet.paste(tile, (x0, y0))
        tiles.append(tile)
        layouts.append(TileLayout(x0, y0, lay.image_x0, lay.image_y0, lay.image_w, lay.image_h, lay.scale))
    return sheet, tiles, layouts


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def render_html(items: Sequence[PreviewItem], tiles: Sequence[Image.Image], sheet_name: str, title: str) -> str:
    """A self-contained HTML page listing the samples (tiles embedded as data URIs)."""
    e = html.escape
    rows = []
    for i, (item, tile) in enumerate(zip(items, tiles)):
        s = item.sample
        # JPEG keeps the page small; the PNG sheet is the lossless picture.
        data = base64.b64encode(_jpeg(tile)).decode("ascii")
        targets = "<br>".join(
            f"<code>{e(t.instance_id)}</code> box {[round(v, 1) for v in t.bbox_xyxy]} "
            f"p1 {list(t.point_1)} p2 {list(t.point_2)} qwen {list(t.qwen_box)}"
            for t in s.targets
        ) or "<i>none</i>"
        rows.append(
            f"<tr><td>{i + 1}</td><td><img src=\"data:image/jpeg;base64,{data}\" width=\"{tile.width}\" "
            f"alt=\"{e(s.expression)}\"></td><td><span class=\"kind\" style=\"background:rgb{KIND_COLOURS.get(s.kind, (60, 60, 60))}\">"
            f"{e(s.kind)}</span><p class=\"expr\">{e(s.expression)}</p>"
            f"<p>split <b>{e(item.split)}</b> · key <code>{e(item.key)}</code><br>sample <code>{e(s.sample_id)}</code><br>"
            f"generator <code>{e(s.generator)}</code> template <code>{e(s.template or '-')}</code></p>"
            f"<p>{targets}</p></td></tr>"
        )
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>"
        + e(title)
        + "</title><style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td{border-top:1px solid #ddd;padding:6px;vertical-align:top}.kind{color:#fff;border-radius:4px;"
        "padding:1px 6px;font-size:85%}.expr{font-size:120%;margin:.4em 0}code{font-size:85%}</style></head><body>\n"
        f"<h1>{e(title)}</h1><p>{len(items)} samples · contact sheet: <a href=\"{e(sheet_name)}\">{e(sheet_name)}</a>. "
        "Tinted: target masks; boxes: target boxes; filled dot / ring: interior points 1 / 2.</p>\n"
        "<table>\n" + "\n".join(rows) + "\n</table></body></html>\n"
    )


def _write_atomic(path: str, data: bytes, overwrite: bool) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another --out or pass --overwrite to replace it.")
    parent = posixpath.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(p)}.tmp-{os.getpid()}")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, p)


def write_preview(
    root: str,
    out_png: str,
    *,
    split: str | None = None,
    n: int = 24,
    kinds: Sequence[str] | None = None,
    cols: int = 4,
    html_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Renders the contact sheet and the HTML page of an output folder.

    Args:
        root: the orsgen output folder.
        out_png: the sheet's path (PNG).
        split: one split, or None for all (in proportion to their sample counts).
        n: how many samples (>= 1).
        kinds: only these kinds (None: all).
        cols: tiles per row.
        html_path: the page's path; None puts it beside the PNG (``.html``).
        overwrite: replace existing files (otherwise an existing file is an error).

    Returns:
        ``{"png", "html", "samples", "by_kind", "splits", "regions"}``:
        ``splits`` counts the tiles drawn from each split, ``regions`` is
        True when the output had no samples and its regions were drawn.

    Raises:
        PreviewError: nothing to preview.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    if n < 1:
        raise PreviewError(f"--n must be at least 1, got {n}.")
    items, drawn, regions = pick_across_splits(root, n, kinds, split)
    sheet, tiles, _layouts = render_sheet(items, cols)
    html_path = html_path or (os.path.splitext(out_png)[0] + ".html")
    what = "regions (no samples yet)" if regions else "samples"
    title = f"orsgen preview: {root} ({what} from " + ", ".join(f"{k}={v}" for k, v in drawn.items()) + ")"
    _write_atomic(out_png, _png(sheet), overwrite)
    page = render_html(items, tiles, posixpath.basename(out_png), title)
    _write_atomic(html_path, page.encode("utf-8"), overwrite)
    by_kind: dict[str, int] = defaultdict(int)
    for it in items:
        by_kind[it.sample.kind] += 1
    return {
        "png": out_png,
        "html": html_path,
        "samples": len(items),
        "by_kind": dict(by_kind),
        "splits": drawn,
        "regions": regions,
    }


# ---------------------------------------------------------------- benchmark matches

#: Written by the decontamination stage (``pipelines/decontaminate.py``).
MATCHES_FILE = "_meta/decontaminate/matches.jsonl"
#: Largest image file read for a match tile.
MAX_MATCH_IMAGE_BYTES = 64 << 20


def _resolve_uri(uri: str, inputs_root: str | None) -> str:
    # Build uris are written as the config wrote them (portable outputs), so a
    # relative one is relative to the config's folder, not to this process.
    if not uri or inputs_root is None or "://" in uri or uri.startswith(("/", "coco:")):
        return uri
    return posixpath.join(inputs_root.rstrip("/"), uri)


def _load_match_image(uri: str) -> Image.Image | None:
    """The picture behind a build ``uri`` or a benchmark ``ref``, or None when it cannot be shown.

    Handles plain paths and URLs, and SA-1B tar members (``shard.tar#member``).
    fsspec chaining (``::``) and ``coco:<id>`` refs (no picture) are not read.
    """
    if not uri or "::" in uri or uri.startswith("coco:"):
        return None
    path, _, member = uri.partition("#")
    try:
        with fsspec.open(path, "rb") as f:
            if member and path.endswith(".tar"):
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    for info in tar:
                        if info.name == member and info.isfile() and info.size <= MAX_MATCH_IMAGE_BYTES:
                            data = tar.extractfile(info).read()  # type: ignore[union-attr]
                            break
                    else:
                        return None
            elif member:
                return None  # e.g. an earlier output's ``#split/image_id``: no direct picture
            else:
                data = f.read(MAX_MATCH_IMAGE_BYTES + 1)
                if len(data) > MAX_MATCH_IMAGE_BYTES:
                    return None
        im = Image.open(io.BytesIO(data))
        if draft_decodable(data):  # draft mode on a lossless JPEG overruns Pillow's buffer
            im.draft("RGB", (600, 600))
        return im.convert("RGB")
    except (OSError, ValueError, tarfile.TarError, Image.DecompressionBombError):
        return None


def _fit(im: Image.Image | None, w: int, h: int, label: str) -> Image.Image:
    tile = Image.new("RGB", (w, h), (235, 235, 235))
    if im is None:
        ImageDraw.Draw(tile).text((8, h // 2 - 8), label, fill=(90, 90, 90), font=_font(13))
        return tile
    im = im.copy()
    im.thumbnail((w, h))
    tile.paste(im, ((w - im.width) // 2, (h - im.height) // 2))
    return tile


def render_match_pair(
    record: dict[str, Any], tile_w: int = 300, image_h: int = 225, *, inputs_root: str | None = None
) -> Image.Image:
    """One matched pair side by side: the build image (left), the benchmark image (right), and a caption.

    ``inputs_root``: the folder relative input paths of the build's config are
    relative to (the config file's folder); None reads them from the working directory.
    """
    pad = PAD_PX
    out = Image.new("RGB", (2 * tile_w + 3 * pad, image_h + CAPTION_PX + 2 * pad), "white")
    left = _fit(_load_match_image(_resolve_uri(str(record.get("uri", "")), inputs_root)), tile_w, image_h, "build image not readable")
    right = _fit(_load_match_image(_resolve_uri(str(record.get("benchmark_ref", "")), inputs_root)), tile_w, image_h, f"no picture: {str(record.get('benchmark_ref', ''))[:40]}")
    out.paste(left, (pad, pad))
    out.paste(right, (2 * pad + tile_w, pad))
    kind = str(record.get("kind", ""))
    how = f"{kind} d={record.get('distance')}" if kind == "phash" else kind
    lines = [
        f"{record.get('image_id')} [{record.get('split')}] {record.get('action')}",
        f"= {record.get('benchmark')} ({how}): {posixpath.basename(str(record.get('benchmark_ref', '')))}",
    ]
    draw = ImageDraw.Draw(out)
    font = _font(13)
    for i, line in enumerate(lines):
        draw.text((pad, image_h + 2 * pad + i * 18), line[:90], fill=(20, 20, 20), font=font)
    return out


def read_match_records(root: str) -> list[dict[str, Any]]:
    """The records of an output's matches file.

    Raises:
        PreviewError: the output has no matches file (decontamination was off).
    """
    fs, p = fsspec.core.url_to_fs(root)
    path = f"{p.rstrip('/')}/{MATCHES_FILE}"
    if not fs.exists(path):
        raise PreviewError(f"{root} has no {MATCHES_FILE}; build with decontaminate.sources to list benchmark matches.")
    with fs.open(path, "rb") as f:
        lines = f.read().decode("utf-8").splitlines()
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except ValueError as err:
        raise PreviewError(f"{path} is not valid JSON lines ({err}); rebuild the output.") from None


def write_match_preview(
    root: str, out_png: str, *, n: int = 24, cols: int = 2, overwrite: bool = False, inputs_root: str | None = None
) -> dict[str, Any]:
    """Draws the benchmark matches of an output side by side into one PNG.

    One pair per matched image (its nearest match), in image id order.

    Returns:
        ``{"png", "pairs", "matched_images"}``.

    Raises:
        PreviewError: no matches file, or no matches in it.
        FileExistsError: ``out_png`` exists and ``overwrite`` is False.
    """
    if n < 1:
        raise PreviewError(f"--n must be at least 1, got {n}.")
    records = read_match_records(root)
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: (str(r.get("image_id")), int(r.get("distance") or 0), str(r.get("benchmark")))):
        best.setdefault(str(r.get("image_id")), r)
    if not best:
        raise PreviewError(f"{root} lists no benchmark matches: nothing to draw.")
    chosen = [best[k] for k in sorted(best)][:n]
    pairs = [render_match_pair(r, inputs_root=inputs_root) for r in chosen]
    cols = max(1, min(cols, len(pairs)))
    rows = (len(pairs) + cols - 1) // cols
    pw, ph = pairs[0].size
    sheet = Image.new("RGB", (cols * pw, rows * ph), (250, 250, 250))
    for i, im in enumerate(pairs):
        sheet.paste(im, ((i % cols) * pw, (i // cols) * ph))
    _write_atomic(out_png, _png(sheet), overwrite)
    return {"png": out_png, "pairs": len(pairs), "matched_images": len(best)}
