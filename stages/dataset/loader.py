"""PyTorch datasets over an orsgen output: WebDataset shards and Parquet.

* ``WebDatasetSamples``: an ``IterableDataset`` that streams the tar shards of
  a split (local or any fsspec URL: ``gs://``, ``s3://``, ``hf://``) with the
  ``webdataset`` library's tar readers. Shards are split first across
  distributed ranks, then across the ``DataLoader`` workers of each rank, so
  every worker reads distinct shards (webdataset's ``split_by_node`` then
  ``split_by_worker`` order). With ``equalize=True`` (DDP training) the
  shards are balanced over the rank x worker slots from the manifest's sizes
  (``cover_plan``) and every worker yields the same count, padding with
  repeats of its own items: every sample is seen at least once per epoch,
  and every rank runs the same number of batches, so DDP never hangs on a
  rank that ran out of data (too few shards, uneven shards).
* ``ParquetSamples``: a map-style ``Dataset`` over the Parquet shards through
  Hugging Face ``datasets`` (memory-mapped Arrow, O(1) random access, shared
  by forked workers); pair it with ``DistributedSampler`` for DDP.

Both yield one item per referring sample (``unit="sample"``, default) or per
image (``unit="image"``). Masks are decoded lazily, per item and only for that
item's union mask: ``mask="full"`` gives the ``(h, w)`` bool tensor,
``mask="crop"`` only its bounding-box crop plus the crop's origin (decoded
straight from the runs, never the full image), ``mask="rle"`` the COCO RLE
dict, ``mask="none"`` nothing.

torch is an optional extra: nothing else in orsgen imports this module, and
importing it without torch raises an ImportError that names the extra to
install (``pip install 'orsgen[train]'``).
"""

from __future__ import annotations

import heapq
import io
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from orsgen.schemas.records import ExpressionKind, Rle
from orsgen.stages.common.masks import decode_crop, rle_area
from orsgen.stages.dataset.read import load_manifest, parquet_files, shard_sizes, tar_files

try:
    import torch
    from torch.utils.data import Dataset, IterableDataset
except ImportError as _err:  # pragma: no cover - torch is installed in dev
    raise ImportError("orsgen.stages.dataset.loader needs torch: pip install 'orsgen[train]'") from _err

log = logging.getLogger(__name__)

MASK_MODES = ("full", "crop", "rle", "none")
UNITS = ("sample", "image")


# ------------------------------------------------------------------ items


def decode_image(data: bytes) -> Any:
    """Encoded bytes -> RGB ``PIL.Image`` (EXIF orientation ignored, as the masks assume)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


def decode_mask(rle: dict[str, Any], mode: str) -> dict[str, Any]:
    """The item fields of a union mask in one of ``MASK_MODES``.

    Args:
        rle: COCO RLE dict (``size`` [h, w], ``counts`` str).
        mode: ``full`` -> ``{"mask": bool tensor (h, w)}``; ``crop`` ->
            ``{"mask_crop": bool tensor, "mask_origin": (x0, y0)}`` (empty
            crop for an empty mask); ``rle`` -> ``{"mask_rle": rle}``;
            ``none`` -> ``{}``.
    """
    if mode == "none":
        return {}
    if mode == "rle":
        return {"mask_rle": rle}
    r = Rle.from_coco(rle)
    if mode == "full":
        m = mask_utils.decode(r.to_coco()).astype(bool)
        return {"mask": torch.from_numpy(m)}
    if mode == "crop":
        if rle_area(r) == 0:
            return {"mask_crop": torch.zeros((0, 0), dtype=torch.bool), "mask_origin": (0, 0)}
        crop, origin = decode_crop(r)
        return {"mask_crop": torch.from_numpy(crop), "mask_origin": origin}
    raise ValueError(f"mask mode {mode!r} is not one of {MASK_MODES}.")


def sample_item(row: dict[str, Any], s: dict[str, Any], image: Any, mask: str) -> dict[str, Any]:
    """One training item from a row (image-level fields) and one of its samples.

    Returns:
        ``key``, ``sample_id``, ``image_id``, ``split``, ``expression``,
        ``kind``, ``no_target``, ``width``, ``height``, ``image`` (PIL or
        bytes), ``boxes`` (float32 ``(n, 4)`` xyxy px), ``points`` (int64
        ``(n, 2, 2)``: point_1, point_2 per target), ``qwen_boxes`` (int64
        ``(n, 4)``, 0-1000), ``target_ids`` and the mask fields of ``mask``.
    """
    targets = s.get("targets") or []
    h, w = int(row["height"]), int(row["width"])
    rle = s.get("union_rle") or {"size": [h, w], "counts": _empty_counts(h, w)}
    item = {
        "key": row["key"],
        "sample_id": s["sample_id"],
        "image_id": s["image_id"],
        "split": s.get("split") or row.get("split", ""),
        "expression": s["expression"],
        "kind": s["kind"],
        "no_target": s["kind"] == ExpressionKind.NO_TARGET or not targets,
        "width": w,
        "height": h,
        "image": image,
        "boxes": torch.tensor([t["bbox_xyxy"] for t in targets], dtype=torch.float32).reshape(-1, 4),
        "points": torch.tensor([[t["point_1"], t["point_2"]] for t in targets], dtype=torch.int64).reshape(-1, 2, 2),
        "qwen_boxes": torch.tensor([t["qwen_box"] for t in targets], dtype=torch.int64).reshape(-1, 4),
        "target_ids": list(s.get("target_ids") or ()),
    }
    item.update(decode_mask(rle, mask))
    return item


def _empty_counts(h: int, w: int) -> str:
    return Rle.from_coco(mask_utils.frPyObjects({"size": [h, w], "counts": [h * w]}, h, w)).counts


def collate_lists(batch: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """A ``collate_fn`` that keeps every field as a list (images and masks differ in size)."""
    return {k: [b[k] for b in batch] for k in batch[0]} if batch else {}


def _check(unit: str, mask: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r} is not one of {UNITS}.")
    if mask not in MASK_MODES:
        raise ValueError(f"mask {mask!r} is not one of {MASK_MODES}.")


# ------------------------------------------------------------------ sharding


def worker_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` of the calling process.

    Explicit ``rank`` / ``world_size`` win; else ``torch.distributed`` (when
    initialised) or the ``RANK`` / ``WORLD_SIZE`` variables, as
    ``webdataset.utils.pytorch_worker_info`` reads them; workers come from
    ``torch.utils.data.get_worker_info``.
    """
    import webdataset as wds

    r, ws, worker, nw = wds.utils.pytorch_worker_info()
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size}).")
        r, ws = rank, world_size
    return r, ws, worker, nw


def assign_shards(
    shards: Sequence[str],
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[str]:
    """The shards one worker of one rank reads: ``shards[rank::world][worker::workers]``.

    Every shard goes to exactly one (rank, worker); with fewer shards than
    ranks x workers some get none (see ``equalize``).
    """
    return list(shards)[rank::world_size][worker::num_workers]


def cover_plan(sizes: Sequence[int], n_slots: int) -> list[list[int]]:
    """Shards per slot for ``equalize=True``: longest-processing-time-first.

    Shards are taken largest first (ties: lower index first) and each goes to
    the least-loaded slot (ties: lower slot), so slot loads differ by at most
    one shard. Computed from the manifest's sizes alone, it is the same on
    every rank and worker.

    Args:
        sizes: items per shard.
        n_slots: ranks x workers.

    Returns:
        For each slot, the indices of its shards (in shard order).
    """
    if n_slots < 1:
        raise ValueError(f"n_slots must be at least 1, got {n_slots}.")
    heap = [(0, k) for k in range(n_slots)]
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, k = heapq.heappop(heap)
        slots[k].append(i)
        heapq.heappush(heap, (load + sizes[i], k))
    return [sorted(s) for s in slots]


class WebDatasetSamples(IterableDataset):
    """Streams the WebDataset shards of a split as training items (``IterableDataset``).

    Args:
        root: the output folder of a run (any fsspec URL), or None when
            ``urls`` are given.
        split: the split (with ``root``).
        urls: tar URLs instead of ``root`` + ``split``.
        shard_items: items per shard file name (needed by ``equalize`` and
            ``len()`` with ``urls``; read from the manifest with ``root``).
        unit: ``sample`` (one item per referring sample) or ``image``.
        mask: one of ``MASK_MODES``.
        decode_images: give PIL images (False: the encoded bytes).
        rank, world_size: override the distributed rank (default: from
            ``torch.distributed`` or ``RANK`` / ``WORLD_SIZE``).
        equalize: for DDP training. The R x W (rank, worker) slots get the
            shards by ``cover_plan``; with ``q`` the largest slot's items,
            every worker yields exactly ``q`` items per epoch: its own once,
            then repeats of its own from the start (a slot without items
            repeats another slot's), marked ``padded=True``. So every sample
            is seen at least once per epoch, every rank yields ``W * q`` items
            in the same number of batches, and the padding is at most
            ``(R*W - 1) * s_max`` items (``s_max``: the largest shard). Off
            (evaluation): shards split by rank then worker, as webdataset's
            ``split_by_node`` / ``split_by_worker``, each sample exactly once.
        num_workers: the ``DataLoader``'s ``num_workers`` (0 counts as 1);
            ``len()`` needs it with ``equalize``, and iteration checks it.
        shuffle_shards: reshuffle per epoch (same on every rank: seeded by
            ``seed`` and the epoch): the shard order, and with ``equalize``
            which slot gets which set of shards.
        seed: shuffle seed.
        transform: applied to every item.
    """

    def __init__(
        self,
        root: str | None = None,
        split: str | None = None,
        *,
        urls: Sequence[str] | None = None,
        shard_items: dict[str, int] | None = None,
        unit: str = "sample",
        mask: str = "full",
        decode_images: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        equalize: bool = False,
        num_workers: int | None = None,
        shuffle_shards: bool = False,
        seed: int = 0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        _check(unit, mask)
        if (root is None) == (urls is None):
            raise ValueError("give either root and split, or urls.")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if root is not None:
            if split is None:
                raise ValueError("give the split to read with root.")
            urls = tar_files(root, split)
            if not urls:
                raise ValueError(f"split {split!r} of {root} has no WebDataset shards.")
            sizes = shard_sizes(root, split, "webdataset")
            shard_items = {k: v["n_samples" if unit == "sample" else "n_images"] for k, v in sizes.items()}
        self.urls = sorted(urls or ())
        self.shard_items = dict(shard_items or {})
        self.unit, self.mask, self.decode_images = unit, mask, decode_images
        self.rank, self.world_size = rank, world_size
        self.equalize, self.shuffle_shards, self.seed = bool(equalize), shuffle_shards, seed
        self.num_workers = num_workers
        self.transform = transform
        self.epoch = 0
        if equalize and not self._sizes_known():
            raise ValueError("equalize needs the items per shard: read from a root with a manifest, or pass shard_items.")

    def _sizes_known(self) -> bool:
        return all(_name(u) in self.shard_items for u in self.urls)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with spawn / forkserver (ranks launched by
        # torch.multiprocessing.spawn, Python 3.14's default) do not inherit
        # torch.distributed's state, and without RANK / WORLD_SIZE they would
        # all read as rank 0 of 1. The rank seen here, in the parent that
        # pickles the dataset for them, travels with it.
        state = self.__dict__.copy()
        if state["rank"] is None and state["world_size"] is None:
            rank, world, _, _ = worker_info()
            if world > 1:
                state["rank"], state["world_size"] = rank, world
        return state

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch (reshuffles when ``shuffle_shards``); call it on every rank."""
        self.epoch = int(epoch)

    def _rng(self, *parts: Any) -> random.Random:
        return random.Random(":".join(str(p) for p in (self.seed, self.epoch, *parts)))

    def _ordered(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            self._rng().shuffle(urls)
        return urls

    def plan(self, world_size: int, num_workers: int) -> tuple[list[list[str]], int]:
        """``equalize``'s plan: the shards of each slot ``rank * W + worker``, and ``q``.

        Raises:
            ValueError: the shard sizes are unknown.
        """
        if not self._sizes_known():
            raise ValueError("equalize needs the items per shard: read from a root with a manifest, or pass shard_items.")
        sizes = [self.shard_items[_name(u)] for u in self.urls]
        n_slots = world_size * max(num_workers, 1)
        bins = [[self.urls[i] for i in b] for b in cover_plan(sizes, n_slots)]
        if self.shuffle_shards:
            # Which slot reads which set changes per epoch; loads stay balanced.
            self._rng("slots").shuffle(bins)
            bins = [sorted(b, key=lambda u: self._rng("order", u).random()) for b in bins]
        q = max((sum(self.shard_items[_name(u)] for u in b) for b in bins), default=0)
        return bins, q

    def _workers(self) -> int:
        if self.num_workers is None:
            raise TypeError(
                "len() of an equalize=True dataset depends on the DataLoader's workers: "
                "pass num_workers= (the DataLoader's num_workers) to WebDatasetSamples."
            )
        return max(self.num_workers, 1)

    def __len__(self) -> int:
        """Items this rank yields per epoch (needs the shard sizes; with ``equalize``, ``num_workers``)."""
        if not self._sizes_known():
            raise TypeError("the length is unknown without the items per shard (pass root, or shard_items).")
        rank, world, _, _ = worker_info(self.rank, self.world_size)
        if self.equalize:
            nw = self._workers()
            return nw * self.plan(world, nw)[1]
        return sum(self.shard_items[_name(u)] for u in self._ordered()[rank::world])

    def _stream(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        import fsspec
        import webdataset as wds

        for url in urls:
            with fsspec.open(url, "rb") as f:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": f}])
                for raw in wds.tariterators.group_by_keys(files):
                    yield from self._items(raw)

    def _items(self, raw: dict[str, Any], padded: bool | None = None) -> Iterator[Any]:
        row = json.loads(raw["json"])
        image = decode_image(raw["jpg"]) if self.decode_images else raw["jpg"]
        if self.unit == "image":
            items = [{**row, "image": image}]
        else:
            items = [sample_item(row, s, image, self.mask) for s in row.get("samples") or ()]
        for item in items:
            if padded is not None:
                item["padded"] = padded
            yield self.transform(item) if self.transform else item

    def _cover(self, urls: Sequence[str], quota: int, donor: bool = False) -> Iterator[Any]:
        # Own items once, then cyclic repeats of them (flagged) up to the quota;
        # a donor's items are all padding for the slot that borrows them.
        import fsspec
        import webdataset as wds

        n, padded = 0, donor
        while n < quota:
            before = n
            for url in urls:
                with fsspec.open(url, "rb") as f:
                    files = wds.tariterators.tar_file_expander([{"url": url, "stream": f}])
                    for raw in wds.tariterators.group_by_keys(files):
                        for item in self._items(raw, padded):
                            yield item
                            n += 1
                            if n >= quota:
                                return
            if n == before:
                raise RuntimeError(f"shards {list(urls)[:3]} hold no item although the manifest says they do; rebuild the manifest.")
            padded = True

    def __iter__(self) -> Iterator[Any]:
        rank, world, worker, nworkers = worker_info(self.rank, self.world_size)
        if not self.equalize:
            urls = self._ordered()
            mine = assign_shards(urls, rank, world, worker, nworkers)
            if worker == 0 and len(urls[rank::world]) < nworkers:
                log.warning(
                    "rank %d has %d shard(s) for %d DataLoader workers: some workers idle. "
                    "Write more, smaller shards (write.shard_max_images) or use fewer workers.",
                    rank, len(urls[rank::world]), nworkers,
                )
            yield from self._stream(mine)
            return
        if self.num_workers is not None and max(self.num_workers, 1) != nworkers:
            raise ValueError(
                f"WebDatasetSamples(num_workers={self.num_workers}) but the DataLoader runs {nworkers} worker(s); "
                "pass the DataLoader's num_workers to both."
            )
        bins, q = self.plan(world, nworkers)
        if q == 0:
            return
        k = rank * nworkers + worker
        mine = bins[k]
        if sum(self.shard_items[_name(u)] for u in mine) == 0:
            # A slot without items (fewer shards than slots) pads from a
            # donor, spread over the slots that have items.
            donors = [b for b in bins if sum(self.shard_items[_name(u)] for u in b) > 0]
            yield from self._cover(donors[k % len(donors)], q, donor=True)
            return
        yield from self._cover(mine, q)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ------------------------------------------------------------------ Parquet


class ParquetSamples(Dataset):
    """Map-style dataset over the Parquet shards of a split (``torch.utils.data.Dataset``).

    Rows are read through Hugging Face ``datasets`` (``load_dataset("parquet")``
    converts the shards once to memory-mapped Arrow in ``cache_dir``), so
    ``__getitem__`` is O(1) and forked ``DataLoader`` workers share the pages.
    An index maps item ``i`` to ``(row, sample)``.

    Args:
        root: the output folder of a run (local path).
        split: the split.
        unit: ``sample`` or ``image``.
        mask: one of ``MASK_MODES``.
        decode_images: give PIL images (False: bytes).
        cache_dir: ``datasets`` cache folder (None: its default).
        transform: applied to every item.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        unit: str = "sample",
        mask: str = "full",
        decode_images: bool = True,
        cache_dir: str | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        import datasets
        import pyarrow.compute as pc

        _check(unit, mask)
        files = parquet_files(root, split)
        if not files:
            raise ValueError(f"split {split!r} of {root} has no Parquet shards.")
        load_manifest(root)  # fails early with a clear message on a non-orsgen folder
        self.ds = datasets.load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir)
        self.unit, self.mask, self.decode_images, self.transform = unit, mask, decode_images, transform
        if unit == "image":
            self.rows = np.arange(len(self.ds), dtype=np.int64)
            self.sample_idx = np.zeros(len(self.ds), dtype=np.int32)
        else:
            counts = [
                pc.list_value_length(batch.column("samples")).to_numpy(zero_copy_only=False)
                for batch in self.ds.with_format("arrow").select_columns(["samples"]).iter(batch_size=1024)
            ]
            n_per_row = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
            self.rows = np.repeat(np.arange(len(n_per_row), dtype=np.int64), n_per_row)
            starts = np.cumsum(n_per_row) - n_per_row
            self.sample_idx = (np.arange(len(self.rows), dtype=np.int64) - np.repeat(starts, n_per_row)).astype(np.int32)

    def __len__(self) -> int:
        return int(len(self.rows))

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is outside a dataset of {len(self)} items.")
        row = self.ds[int(self.rows[i])]
        image = decode_image(row["image"]) if self.decode_images else row["image"]
        if self.unit == "image":
            item = {**{k: v for k, v in row.items() if k != "image"}, "image": image}
        else:
            item = sample_item(row, row["samples"][int(self.sample_idx[i])], image, self.mask)
        return self.transform(item) if self.transform else item
