"""The samples of a review: read from the Parquet shards, rendered for the page.

``ReviewIndex`` holds the annotations of the reviewed splits (never their
image bytes) and where each image lies (shard, row group, row), so the page
can ask for any sample by its position; an image is read on demand, one row
group at a time, through a small cache.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from orsgen.schemas.arrow import EXAMPLE_SCHEMA, instance_from_row, sample_from_row
from orsgen.schemas.records import Instance, Sample
from orsgen.stages.dataset.preview import OVERLAY_ALPHA, PALETTE, PreviewItem, target_masks
from orsgen.stages.dataset.read import DatasetReadError, resolve_splits, shards
from orsgen.stages.write.plan import bucket_of

_NO_IMAGE = [c for c in EXAMPLE_SCHEMA.names if c != "image"]


class ReviewError(ValueError):
    """Nothing to review (no Parquet shards, unknown split, bad --shard)."""


@dataclass(frozen=True)
class ImageRef:
    """Where one image's row lies, and what the page shows of it."""

    key: str
    split: str
    url: str
    row_group: int
    row: int
    width: int
    height: int
    instances: dict[str, Instance]


@dataclass(frozen=True)
class ReviewItem:
    """One sample to review."""

    index: int
    sample: Sample
    image: ImageRef


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (0 <= K < N) as ``(K, N)``; None for None.

    Raises:
        ReviewError: not of that form.
    """
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not (n >= 1 and 0 <= k < n):
        raise ReviewError(f"--shard {text!r} must be K/N with 0 <= K < N, e.g. --shard 0/2 and --shard 1/2 for two reviewers.")
    return k, n


class ReviewIndex:
    """The samples of some splits of an output folder, in split, shard, row order.

    Args:
        root: the output folder.
        splits: splits to review (None: all).
        shard: ``(k, n)``: only images whose key falls in bucket ``k`` of
            ``n`` (``bucket_of``), so ``n`` reviewers get disjoint sets.
        kinds: only these sample kinds (None: all).

    Raises:
        ReviewError: no manifest, an unknown split, no Parquet shards, or no samples.
    """

    def __init__(
        self,
        root: str,
        splits: Sequence[str] | None = None,
        *,
        shard: tuple[int, int] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> None:
        self.root = root
        try:
            self.splits = resolve_splits(root, list(splits) if splits else None)
        except DatasetReadError as err:
            raise ReviewError(str(err)) from None
        self.items: list[ReviewItem] = []
        self.by_id: dict[str, int] = {}
        for split in self.splits:
            refs = shards(root, "parquet", split)
            if not refs:
                raise ReviewError(
                    f"split {split!r} of {root} has no Parquet shards; review reads Parquet, so build with write.formats including parquet."
                )
            for ref in refs:
                with fsspec.open(ref.url, "rb") as f:
                    pf = pq.ParquetFile(f)
                    for g in range(pf.num_row_groups):
                        for r, row in enumerate(pf.read_row_group(g, columns=_NO_IMAGE).to_pylist()):
                            if shard is not None and bucket_of(row["key"], shard[1]) != shard[0]:
                                continue
                            insts = {i["instance_id"]: instance_from_row(i) for i in row["instances"] or ()}
                            img = ImageRef(row["key"], row["split"] or split, ref.url, g, r, int(row["width"]), int(row["height"]), insts)
                            for s in row["samples"] or ():
                                sample = sample_from_row(s)
                                if kinds and sample.kind not in kinds:
                                    continue
                                if sample.sample_id in self.by_id:
                                    continue  # ids are unique in a dataset; never show one twice
                                self.by_id[sample.sample_id] = len(self.items)
                                self.items.append(ReviewItem(len(self.items), sample, img))
        if not self.items:
            raise ReviewError(f"no samples to review in split(s) {self.splits} of {root}" + (f" (shard {shard[0]}/{shard[1]})" if shard else "") + ".")
        self._cache: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def image_bytes(self, item: ReviewItem) -> bytes:
        """The encoded image of ``item`` (read one row group at a time, cached)."""
        ref = item.image
        key = (ref.url, ref.row_group)
        with self._lock:
            images = self._cache.get(key)
            if images is None:
                with fsspec.open(ref.url, "rb") as f:
                    images = pq.ParquetFile(f).read_row_group(ref.row_group, columns=["image"]).column("image").to_pylist()
                self._cache[key] = images
                while len(self._cache) > 2:  # two row groups (each <= write.parquet_row_group_max_bytes): memory stays bounded
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return images[ref.row]

    def render(self, item: ReviewItem, *, overlay: bool = True, max_px: int = 1024) -> bytes:
        """The image scaled to fit ``max_px``, with target masks, boxes and points drawn; JPEG bytes."""
        with Image.open(io.BytesIO(self.image_bytes(item))) as im:
            rgb = im.convert("RGB")
        scale = min(1.0, max_px / max(rgb.width, rgb.height))
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        if overlay:
            s = item.sample
            prev = PreviewItem(item.image.key, item.image.split, b"", item.image.width, item.image.height, s, item.image.instances)
            arr = np.asarray(rgb, dtype=np.float64).copy()
            for k, m in enumerate(target_masks(prev, size)):
                colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float64)
                arr[m] = arr[m] * (1 - OVERLAY_ALPHA) + colour * OVERLAY_ALPHA
            rgb = Image.fromarray(np.rint(arr).astype(np.uint8))
            draw = ImageDraw.Draw(rgb)
            sx, sy = size[0] / item.image.width, size[1] / item.image.height
            for k, t in enumerate(s.targets):
                colour = PALETTE[k % len(PALETTE)]
                x0, y0, x1, y1 = t.bbox_xyxy
                draw.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=colour, width=3)
                cx, cy, r = (t.point_1[0] + 0.5) * sx, (t.point_1[1] + 0.5) * sy, 5
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(0, 0, 0))
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def summary(self, item: ReviewItem) -> dict[str, Any]:
        """What the page lists for one sample (plain JSON values; the page escapes them)."""
        s = item.sample
        return {
            "i": item.index,
            "sample_id": s.sample_id,
            "split": item.image.split,
            "key": item.image.key,
            "kind": s.kind,
            "expression": s.expression,
            "template": s.template,
            "generator": s.generator,
            "n_targets": len(s.target_ids),
            "width": item.image.width,
            "height": item.image.height,
            "targets": [
                {
                    "instance_id": t.instance_id,
                    "category": (item.image.instances.get(t.instance_id).category_name if t.instance_id in item.image.instances else None),
                    "bbox_xyxy": [round(v, 1) for v in t.bbox_xyxy],
                }
                for t in s.targets
            ],
        }
