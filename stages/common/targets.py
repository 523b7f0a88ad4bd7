"""Trainer targets of a sample: union mask, boxes, interior points, Qwen boxes, SVG.

Trainers of the Seg-Zero / LENS / GenSeg-R1 / Qwen3-VL-Seg family consume a
box plus two interior points per target; Moondream-style trainers consume a
normalised SVG path. Every sample carries all of them, computed once here.

Several samples of one image often share targets ("the cups", "the leftmost
cup", "the red cup" ...). A ``TargetCache`` made once per image lets
``attach_targets`` compute each instance's points once and each target set's
union mask and SVG path once, whatever the number of samples that use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from orsgen.schemas.records import Instance, Rle, Sample, TargetGeometry
from orsgen.stages.common import masks
from orsgen.stages.common.masks import (
    ApartCrops,
    CompactCrop,
    MaskError,
    PaddedCrop,
    decode_crop,
    interior_points,
    outline_parts,
    padded_distance_transforms,
    rle_to_geometries,
    rle_union,
    svg_paths,
)


#: Default simplification tolerance of the SVG path, in pixels.
SVG_TOLERANCE_PX = 1.0


class TargetError(ValueError):
    """A sample's targets cannot be resolved; ``reason`` is the reject reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def qwen_box(bbox_xyxy: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalises an absolute pixel box to Qwen3-VL's 0..1000 integer grid.

    Args:
        bbox_xyxy: ``[x0, y0, x1, y1]`` in pixels.
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        ``(x0, y0, x1, y1)`` as ints in 0..1000 (rounded half up).
    """
    x0, y0, x1, y1 = bbox_xyxy

    def norm(v: float, size: int) -> int:
        return max(0, min(1000, int(v / size * 1000 + 0.5)))

    return (norm(x0, width), norm(y0, height), norm(x1, width), norm(y1, height))


def target_geometry(
    inst: Instance,
    width: int,
    height: int,
    crop: PaddedCrop | None = None,
    points: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> TargetGeometry:
    """Box, interior points and Qwen box of one target instance.

    ``crop`` is ``decode_crop(inst.rle, pad_px=1)`` if already decoded;
    ``points`` is ``interior_points(inst.rle)`` if already computed.
    """
    p1, p2 = points if points is not None else interior_points(inst.rle, crop=crop)
    return TargetGeometry(
        instance_id=inst.instance_id,
        bbox_xyxy=tuple(float(v) for v in inst.bbox_xyxy),  # type: ignore[arg-type]
        point_1=p1,
        point_2=p2,
        qwen_box=qwen_box(inst.bbox_xyxy, width, height),
    )


class TargetCache:
    """Trainer targets already computed for one image, reused across its samples.

    Keys hold everything a value depends on (the instance's id, mask and box;
    the masks of a target set; the image size and SVG tolerance), so a hit
    returns exactly what a fresh computation would. Make one per image (or
    per stage call): it grows with the image's distinct targets and target
    sets, and is dropped with the image.
    """

    __slots__ = ("_crops", "_geoms", "_points", "_shapes")

    def __init__(self) -> None:
        self._crops: dict[tuple[Any, ...], PaddedCrop] = {}
        self._geoms: dict[tuple[Any, ...], TargetGeometry] = {}
        self._points: dict[tuple[Any, ...], tuple[tuple[int, int], tuple[int, int]]] = {}
        self._shapes: dict[tuple[Any, ...], tuple[Rle, str]] = {}

    def crop(self, rle: Rle) -> PaddedCrop:
        """``decode_crop(rle, pad_px=1)``, decoded once per mask (points and polygon share it)."""
        key = (rle.counts, rle.size)
        got = self._crops.get(key)
        if got is None:
            got = self._crops[key] = decode_crop(rle, pad_px=1)
        return got

    def outline_crop(self, targets: Sequence[Instance]) -> PaddedCrop | CompactCrop | ApartCrops | None:
        """The pixels ``rle_to_geometries`` traces for the union of ``targets``' masks.

        One target's union is its own mask (the same crop); several targets'
        crops, decoded once each for their points, are traced each alone
        when the targets lie apart (``ApartCrops``), or else put together on
        the rows and columns they span (``compact_crop``), instead of
        decoding the union's window (``outline_parts``). None (trace the
        union itself) when the masks differ in size: their union is then
        pycocotools' empty 0×0 mask, which the crops do not show (ingest
        rejects such masks first).
        """
        if len(targets) == 1:
            return self.crop(targets[0].rle)
        size = targets[0].rle.size
        if any(t.rle.size != size for t in targets):
            return None
        return outline_parts([self.crop(t.rle) for t in targets])

    def geometry(self, inst: Instance, width: int, height: int) -> TargetGeometry:
        """``target_geometry(inst, width, height)``, computed once per instance."""
        key = (inst.instance_id, inst.rle.counts, inst.rle.size, tuple(inst.bbox_xyxy), width, height)
        got = self._geoms.get(key)
        if got is None:
            points = self._points.get((inst.rle.counts, inst.rle.size))
            got = self._geoms[key] = target_geometry(inst, width, height, self.crop(inst.rle), points)
        return got

    def _fill_points(self, targets: Sequence[Instance]) -> None:
        """Stores ``interior_points`` of each target mask not stored yet, the distance transforms in mosaics.

        A mask whose points cannot be computed (an empty mask) is left to
        ``geometry``, which raises its error as before.
        """
        todo: dict[tuple[Any, ...], Rle] = {}
        for t in targets:
            key = (t.rle.counts, t.rle.size)
            if key not in self._points:
                todo.setdefault(key, t.rle)
        if not todo:
            return
        # A mosaic's worth of crops at a time: its transform is dropped once
        # their points are stored, so the transient memory stays one mosaic.
        chunk: list[tuple[tuple[Any, ...], Rle, PaddedCrop]] = []
        area = 0
        for key, rle in todo.items():
            crop = self.crop(rle)
            if chunk and area + crop[0].size > masks.MOSAIC_MAX_PX:
                self._points_of(chunk)
                chunk, area = [], 0
            chunk.append((key, rle, crop))
            area += crop[0].size
        self._points_of(chunk)

    def _points_of(self, chunk: Sequence[tuple[tuple[Any, ...], Rle, PaddedCrop]]) -> None:
        """Stores the points of ``(key, mask, crop)`` items, their distance transforms from one mosaic."""
        dists = padded_distance_transforms([crop[0] for _, _, crop in chunk])
        for (key, rle, crop), dist in zip(chunk, dists):
            try:
                self._points[key] = interior_points(rle, crop=crop, distance=dist)
            except MaskError:
                continue

    def prepare(
        self,
        target_sets: Sequence[Sequence[str]],
        instances: Mapping[str, Instance],
        width: int,
        height: int,
        tolerance_px: float = SVG_TOLERANCE_PX,
    ) -> None:
        """Computes the union masks and SVG paths of many target sets at once.

        Their outlines go through ``rle_to_geometries`` together (one GEOS call
        per step for the whole image instead of per target set); what is
        stored is what ``union_and_svg`` would compute for each set alone. Sets
        that ``target_fields`` refuses (unknown or empty targets) and empty
        sets are left to it.
        """
        lists = []
        for ids in target_sets:
            if not ids or any(t not in instances for t in ids):
                continue
            targets = [instances[t] for t in ids]
            if not any(t.area_px <= 0 for t in targets):
                lists.append(targets)
        self._fill_points([t for targets in lists for t in targets])
        self._fill_shapes(lists, width, height, tolerance_px)

    def _fill_shapes(
        self, target_lists: Sequence[Sequence[Instance]], width: int, height: int, tolerance_px: float
    ) -> None:
        """Stores the union mask and SVG path of each target list not stored yet, outlines in one batch."""
        todo: list[tuple[tuple[Any, ...], Rle, PaddedCrop | CompactCrop | ApartCrops | None]] = []
        keys: set[tuple[Any, ...]] = set()
        for targets in target_lists:
            key = self._shape_key(targets, width, height, tolerance_px)
            if key in self._shapes or key in keys:
                continue
            union = rle_union([t.rle for t in targets], size=(height, width))
            if not targets:
                self._shapes[key] = (union, "")
                continue
            keys.add(key)
            todo.append((key, union, self.outline_crop(targets)))
        outlines = rle_to_geometries([(union, crop) for _, union, crop in todo], tolerance_px)
        for (key, union, _), svg in zip(todo, svg_paths(outlines, width, height)):
            self._shapes[key] = (union, svg)

    @staticmethod
    def _shape_key(targets: Sequence[Instance], width: int, height: int, tolerance_px: float) -> tuple[Any, ...]:
        return (tuple((t.rle.counts, t.rle.size) for t in targets), width, height, tolerance_px)

    def union_and_svg(self, targets: Sequence[Instance], width: int, height: int, tolerance_px: float) -> tuple[Rle, str]:
        """The union mask and SVG path of ``targets``, computed once per target set."""
        key = self._shape_key(targets, width, height, tolerance_px)
        got = self._shapes.get(key)
        if got is None:
            self._fill_shapes([targets], width, height, tolerance_px)
            got = self._shapes[key]
        return got


def target_fields(
    target_ids: Sequence[str],
    instances: Mapping[str, Instance],
    width: int,
    height: int,
    *,
    image_id: str = "",
    svg_tolerance_px: float = SVG_TOLERANCE_PX,
    cache: TargetCache | None = None,
) -> tuple[Rle, str, tuple[TargetGeometry, ...]]:
    """The trainer-target fields of a sample with ``target_ids``: ``(union_rle, union_svg, targets)``.

    What ``attach_targets`` sets, for a caller that builds the ``Sample``
    itself (once, instead of building it and then a changed copy).

    Raises:
        TargetError: as ``attach_targets``.
    """
    missing = [t for t in target_ids if t not in instances]
    if missing:
        raise TargetError("missing_target", f"targets {missing} are not instances of image {image_id}.")
    targets = [instances[t] for t in target_ids]
    for t in targets:
        if t.area_px <= 0:
            raise TargetError("empty_mask", f"target {t.instance_id} has an empty mask.")
    if cache is None:
        cache = TargetCache()
    union, svg = cache.union_and_svg(targets, width, height, svg_tolerance_px)
    geoms = tuple(cache.geometry(t, width, height) for t in targets)
    return union, svg, geoms


def attach_targets(
    sample: Sample,
    instances: Mapping[str, Instance],
    width: int,
    height: int,
    *,
    svg_tolerance_px: float = SVG_TOLERANCE_PX,
    cache: TargetCache | None = None,
) -> Sample:
    """Fills a sample's trainer targets from its ``target_ids``.

    Args:
        sample: the sample; ``target_ids`` name instances of its image.
        instances: the image's instances by id.
        width: image width in pixels.
        height: image height in pixels.
        svg_tolerance_px: simplification tolerance of the SVG path, in pixels.
        cache: the image's ``TargetCache``; samples that share targets then
            share their computation (the result is the same with or without).

    Returns:
        The sample with ``union_rle``, ``union_svg`` and ``targets`` set; a
        ``no_target`` sample gets an empty union mask and no targets.

    Raises:
        TargetError: a target id is unknown (``missing_target``) or its mask
            is empty (``empty_mask``).
    """
    union, svg, geoms = target_fields(
        sample.target_ids, instances, width, height, image_id=sample.image_id, svg_tolerance_px=svg_tolerance_px, cache=cache
    )
    return dataclasses.replace(sample, union_rle=union, union_svg=svg, targets=geoms)
