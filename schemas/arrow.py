"""The one pyarrow schema of orsgen's Parquet output, and row converters.

One row per image (the RefCOCO-M-on-the-Hub layout): the image bytes, its
instances with COCO RLE masks, its RefCOCO-family refs and a nested ``samples``
list that carries every referring sample with its trainer targets. Splits are
image-disjoint, so a row never straddles two splits.

``tests/test_schemas.py`` checks that every struct here names exactly the
fields of its dataclass in ``schemas.records``.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _json_str
from typing import Any

import pyarrow as pa

from orsgen.schemas.records import (
    ImageExample,
    ImageRecord,
    Instance,
    Ref,
    RefSentence,
    Reject,
    ReviewDecision,
    Rle,
    Sample,
    TargetGeometry,
)

RLE_TYPE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
BOX_TYPE = pa.list_(pa.float64())
POINT_TYPE = pa.list_(pa.int32())

INSTANCE_TYPE = pa.struct(
    [
        pa.field("instance_id", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("rle", RLE_TYPE),
        pa.field("bbox_xywh", BOX_TYPE),
        pa.field("bbox_xyxy", BOX_TYPE),
        pa.field("area_px", pa.int64()),
        pa.field("category_id", pa.int64()),
        pa.field("category_name", pa.string()),
        pa.field("supercategory", pa.string()),
        pa.field("iscrowd", pa.bool_()),
        pa.field("predicted_iou", pa.float64()),
        pa.field("stability_score", pa.float64()),
        pa.field("point_coords", pa.list_(pa.list_(pa.float64()))),
        pa.field("crop_box", BOX_TYPE),
        pa.field("source_ann_id", pa.int64()),
        pa.field("mask_origin", pa.string()),
    ]
)

SENTENCE_TYPE = pa.struct(
    [pa.field("sent_id", pa.int64()), pa.field("raw", pa.string()), pa.field("sent", pa.string())]
)

REF_TYPE = pa.struct(
    [
        pa.field("ref_id", pa.int64()),
        pa.field("image_id", pa.string()),
        pa.field("ann_ids", pa.list_(pa.int64())),
        pa.field("category_ids", pa.list_(pa.int64())),
        pa.field("split", pa.string()),
        pa.field("sentences", pa.list_(SENTENCE_TYPE)),
        pa.field("dataset", pa.string()),
    ]
)

TARGET_TYPE = pa.struct(
    [
        pa.field("instance_id", pa.string()),
        pa.field("bbox_xyxy", BOX_TYPE),
        pa.field("point_1", POINT_TYPE),
        pa.field("point_2", POINT_TYPE),
        pa.field("qwen_box", POINT_TYPE),
    ]
)

SAMPLE_TYPE = pa.struct(
    [
        pa.field("sample_id", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("expression", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("target_ids", pa.list_(pa.string())),
        pa.field("split", pa.string()),
        pa.field("generator", pa.string()),
        pa.field("template", pa.string()),
        pa.field("model", pa.string()),
        pa.field("union_rle", RLE_TYPE),
        pa.field("union_svg", pa.string()),
        pa.field("targets", pa.list_(TARGET_TYPE)),
        pa.field("sam2_ious", pa.list_(pa.float64())),
        pa.field("reground_box", BOX_TYPE),
        pa.field("reground_iou", pa.float64()),
        pa.field("screened", pa.bool_()),
        # Free-form provenance as a JSON string: a struct would need a fixed shape.
        pa.field("metadata", pa.string()),
    ]
)

# Image-level columns first, so that the dataset viewer shows them up front.
IMAGE_COLUMNS = ("image_id", "source", "uri", "width", "height", "sha256", "file_name")

EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("file_name", pa.string()),
        pa.field("split", pa.string()),
        pa.field("input_name", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("instances", pa.list_(INSTANCE_TYPE)),
        pa.field("refs", pa.list_(REF_TYPE)),
        pa.field("samples", pa.list_(SAMPLE_TYPE)),
    ],
    metadata={b"orsgen.schema": b"example/1"},
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("source_key", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string()),
        pa.field("level", pa.string()),
        pa.field("image_id", pa.string()),
    ],
    metadata={b"orsgen.schema": b"reject/1"},
)

DECISION_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("reviewer", pa.string()),
        # Milliseconds since the epoch, UTC: readers see a real timestamp.
        pa.field("time_ms", pa.timestamp("ms", tz="UTC")),
        pa.field("split", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("template", pa.string()),
    ],
    metadata={b"orsgen.schema": b"decision/1"},
)

# Which dataclass each struct mirrors: the sync test walks this table.
STRUCT_OF: dict[type, pa.DataType] = {
    Rle: RLE_TYPE,
    Instance: INSTANCE_TYPE,
    RefSentence: SENTENCE_TYPE,
    Ref: REF_TYPE,
    TargetGeometry: TARGET_TYPE,
    Sample: SAMPLE_TYPE,
}


#: What ``json.dumps(obj, sort_keys=True, separators=(",", ":"))`` builds on
#: every call, made once (an encoder keeps no state between ``encode`` calls).
_METADATA_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _rle_row(rle: Rle | None) -> dict[str, Any] | None:
    return None if rle is None else {"size": [int(rle.size[0]), int(rle.size[1])], "counts": rle.counts}


def _opt_list(v: Any) -> list[Any] | None:
    return None if v is None else list(map(float, v))


def instance_to_row(inst: Instance) -> dict[str, Any]:
    """Converts an ``Instance`` to a row of ``INSTANCE_TYPE``."""
    return {
        "instance_id": inst.instance_id,
        "image_id": inst.image_id,
        "rle": _rle_row(inst.rle),
        "bbox_xywh": list(map(float, inst.bbox_xywh)),
        "bbox_xyxy": list(map(float, inst.bbox_xyxy)),
        "area_px": int(inst.area_px),
        "category_id": inst.category_id,
        "category_name": inst.category_name,
        "supercategory": inst.supercategory,
        "iscrowd": bool(inst.iscrowd),
        "predicted_iou": inst.predicted_iou,
        "stability_score": inst.stability_score,
        "point_coords": [[float(x), float(y)] for x, y in inst.point_coords],
        "crop_box": _opt_list(inst.crop_box),
        "source_ann_id": inst.source_ann_id,
        "mask_origin": inst.mask_origin,
    }


def ref_to_row(ref: Ref) -> dict[str, Any]:
    """Converts a ``Ref`` to a row of ``REF_TYPE``."""
    return {
        "ref_id": int(ref.ref_id),
        "image_id": ref.image_id,
        "ann_ids": [int(a) for a in ref.ann_ids],
        "category_ids": [int(c) for c in ref.category_ids],
        "split": ref.split,
        "sentences": [{"sent_id": s.sent_id, "raw": s.raw, "sent": s.sent} for s in ref.sentences],
        "dataset": ref.dataset,
    }


def target_to_row(t: TargetGeometry) -> dict[str, Any]:
    """Converts a ``TargetGeometry`` to a row of ``TARGET_TYPE``."""
    return {
        "instance_id": t.instance_id,
        "bbox_xyxy": list(map(float, t.bbox_xyxy)),
        "point_1": list(map(int, t.point_1)),
        "point_2": list(map(int, t.point_2)),
        "qwen_box": list(map(int, t.qwen_box)),
    }


def sample_to_row(s: Sample) -> dict[str, Any]:
    """Converts a ``Sample`` to a row of ``SAMPLE_TYPE``."""
    return {
        "sample_id": s.sample_id,
        "image_id": s.image_id,
        "expression": s.expression,
        "kind": str(s.kind),
        "target_ids": list(s.target_ids),
        "split": s.split,
        "generator": s.generator,
        "template": s.template,
        "model": s.model,
        "union_rle": _rle_row(s.union_rle),
        "union_svg": s.union_svg,
        "targets": [target_to_row(t) for t in s.targets],
        "sam2_ious": list(map(float, s.sam2_ious)),
        "reground_box": _opt_list(s.reground_box),
        "reground_iou": s.reground_iou,
        "screened": bool(s.screened),
        "metadata": _METADATA_JSON.encode(s.metadata),
    }


def example_to_row(ex: ImageExample) -> dict[str, Any]:
    """Converts an ``ImageExample`` to a row of ``EXAMPLE_SCHEMA``."""
    img = ex.image
    return {
        "key": ex.key,
        "image_id": img.image_id,
        "source": img.source,
        "uri": img.uri,
        "width": int(img.width),
        "height": int(img.height),
        "sha256": img.sha256,
        "file_name": img.file_name,
        "split": ex.split,
        "input_name": ex.input_name,
        "image": ex.image_bytes,
        "instances": [instance_to_row(i) for i in ex.instances],
        "refs": [ref_to_row(r) for r in ex.refs],
        "samples": [sample_to_row(s) for s in ex.samples],
    }


# ------------------------------------------------- the example's JSON, written directly
#
# ``example_json_bytes`` writes what ``json.dumps(row, sort_keys=True,
# separators=(",", ":"), ensure_ascii=False)`` writes for the row
# ``example_to_row`` makes (without ``image``), straight from the records:
# no row dicts, no per-dict key sort. Each object is one ``%`` format whose
# keys are its struct's field names in sorted order (built from the structs
# above, so a field added there and not here fails loudly); every value is
# the same conversion as in the ``*_to_row`` functions, written the way
# json's C encoder writes it: strings by the same C function
# (``encode_basestring``), floats by ``float.__repr__`` with NaN/Infinity,
# ints by ``int.__repr__``, anything unusual by ``json.dumps`` itself.
# tests/test_write.py compares the bytes with json.dumps of the rows.

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_float_repr = float.__repr__
_int_repr = int.__repr__


def _j(v: Any) -> str:
    """JSON of one value as json.dumps writes it inside the row."""
    c = v.__class__
    if c is str:
        return _json_str(v)
    if v is None:
        return "null"
    if c is int:
        return _int_repr(v)
    if c is float:
        r = _float_repr(v)
        return _NON_FINITE.get(r, r)
    return _CANONICAL(v)


def _j_floats(values: Any) -> str:
    """JSON of ``list(map(float, values))``."""
    if values.__class__ is tuple:  # the records' own fields: two common shapes written directly
        if not values:
            return "[]"
        if len(values) == 4:  # a box: one %-format when all four are exact floats
            a, b, c, d = values
            if a.__class__ is float and b.__class__ is float and c.__class__ is float and d.__class__ is float:
                # %r of an exact float is float.__repr__, as below.
                return _non_finite_as_json("[%r,%r,%r,%r]" % values)
    return _non_finite_as_json("[" + ",".join(map(_float_repr, map(float, values))) + "]")


def _non_finite_as_json(text: str) -> str:
    """Float reprs written as json.dumps writes them: ``nan``, ``inf`` -> ``NaN``, ``Infinity``."""
    if "n" in text:  # nan, inf, -inf: the only float reprs with an "n"
        text = text.replace("nan", "NaN").replace("inf", "Infinity")
    return text


def _j_ints(values: Any) -> str:
    """JSON of ``list(map(int, values))``."""
    return "[" + ",".join(map(_int_repr, map(int, values))) + "]"


def _object_format(fields: Any, skip: tuple[str, ...] = ()) -> str:
    return "{" + ",".join(f'"{n}":%s' for n in sorted(f.name for f in fields if f.name not in skip)) + "}"


_RLE_JSON = _object_format(RLE_TYPE)
_TARGET_JSON = _object_format(TARGET_TYPE)
_SAMPLE_JSON = _object_format(SAMPLE_TYPE)
_INSTANCE_JSON = _object_format(INSTANCE_TYPE)
_SENTENCE_JSON = _object_format(SENTENCE_TYPE)
_REF_JSON = _object_format(REF_TYPE)
_EXAMPLE_JSON = _object_format(EXAMPLE_SCHEMA, skip=("image",))


def _rle_json(rle: Rle | None) -> str:
    if rle is None:
        return "null"
    size = rle.size
    return _RLE_JSON % (_j(rle.counts), "[" + _int_repr(int(size[0])) + "," + _int_repr(int(size[1])) + "]")


def _target_json(t: TargetGeometry) -> str:
    return _TARGET_JSON % (_j_floats(t.bbox_xyxy), _j(t.instance_id), _j_ints(t.point_1), _j_ints(t.point_2), _j_ints(t.qwen_box))


def _metadata_json(metadata: Any) -> str:
    """``_METADATA_JSON.encode(metadata)``, by one C encoder made once.

    ``JSONEncoder.encode`` makes the same C encoder (``c_make_encoder``, with
    the encoder's own arguments) on every call; this one is kept. Its markers
    dict (the circular-reference check) is empty again after every call that
    returns; after one that raises it may not be, so the value is encoded
    again by ``encode`` itself, which raises its own error, and the markers
    are cleared.
    """
    try:
        return "".join(_metadata_chunks(metadata, 0))
    except Exception:
        _METADATA_MARKERS.clear()
        return _METADATA_JSON.encode(metadata)


_METADATA_MARKERS: dict[int, Any] = {}
if json.encoder.c_make_encoder is not None:
    _metadata_chunks = json.encoder.c_make_encoder(
        _METADATA_MARKERS,
        _METADATA_JSON.default,
        json.encoder.encode_basestring_ascii,  # ensure_ascii, as _METADATA_JSON
        _METADATA_JSON.indent,
        _METADATA_JSON.key_separator,
        _METADATA_JSON.item_separator,
        _METADATA_JSON.sort_keys,
        _METADATA_JSON.skipkeys,
        _METADATA_JSON.allow_nan,
    )
else:  # no C accelerator: the encoder's own (Python) path
    _metadata_json = _METADATA_JSON.encode  # noqa: F811


def _sample_json(s: Sample, memo: dict[int, str], image_id: str, image_id_json: str) -> str:
    # ``memo``: the JSON of each TargetGeometry and Rle object already written
    # for this example (samples share targets, and a one-target sample's
    # union is its instance's mask), by identity; every sample of an example
    # has the example's image id string (``image_id``, written once).
    box = s.reground_box
    rle = s.union_rle
    return _SAMPLE_JSON % (
        _j(s.expression),
        _j(s.generator),
        image_id_json if s.image_id is image_id else _j(s.image_id),
        _json_str(str(s.kind)),
        _json_str(_metadata_json(s.metadata)),
        _j(s.model),
        "null" if box is None else _j_floats(box),
        _j(s.reground_iou),
        _j_floats(s.sam2_ious),
        _j(s.sample_id),
        "true" if s.screened else "false",
        _j(s.split),
        "[" + ",".join(map(_j, s.target_ids)) + "]",
        "[" + ",".join([memo.get(id(t)) or memo.setdefault(id(t), _target_json(t)) for t in s.targets]) + "]",
        _j(s.template),
        "null" if rle is None else memo.get(id(rle)) or memo.setdefault(id(rle), _rle_json(rle)),
        _j(s.union_svg),
    )


def _instance_json(inst: Instance, memo: dict[int, str] | None = None) -> str:
    crop = inst.crop_box
    rle = inst.rle
    return _INSTANCE_JSON % (
        _int_repr(int(inst.area_px)),
        _j_floats(inst.bbox_xywh),
        _j_floats(inst.bbox_xyxy),
        _j(inst.category_id),
        _j(inst.category_name),
        "null" if crop is None else _j_floats(crop),
        _j(inst.image_id),
        _j(inst.instance_id),
        "true" if inst.iscrowd else "false",
        _j(inst.mask_origin),
        "[" + ",".join([_j_floats((x, y)) for x, y in inst.point_coords]) + "]",
        _j(inst.predicted_iou),
        _rle_json(rle) if memo is None or rle is None else memo.setdefault(id(rle), _rle_json(rle)),
        _j(inst.source_ann_id),
        _j(inst.stability_score),
        _j(inst.supercategory),
    )


def _ref_json(ref: Ref) -> str:
    sentences = [_SENTENCE_JSON % (_j(s.raw), _j(s.sent), _j(s.sent_id)) for s in ref.sentences]
    return _REF_JSON % (
        _j_ints(ref.ann_ids),
        _j_ints(ref.category_ids),
        _j(ref.dataset),
        _j(ref.image_id),
        _int_repr(int(ref.ref_id)),
        "[" + ",".join(sentences) + "]",
        _j(ref.split),
    )


def example_json_bytes(ex: ImageExample) -> bytes:
    """The WebDataset ``json`` member: canonical JSON of ``example_to_json(ex)``.

    The same bytes as ``json.dumps(example_to_json(ex), sort_keys=True,
    separators=(",", ":"), ensure_ascii=False).encode("utf-8")``, written
    from the records in about three quarters of the time (no row dicts are
    built, no keys sorted). The same value errors are raised, though with
    several bad values the first one raised may differ.
    """
    img = ex.image
    image_id = img.image_id
    image_id_json = _j(image_id)
    memo: dict[int, str] = {}  # id() -> JSON of the Rle and TargetGeometry objects written (all alive in ex)
    text = _EXAMPLE_JSON % (
        _j(img.file_name),
        _int_repr(int(img.height)),
        image_id_json,
        _j(ex.input_name),
        "[" + ",".join([_instance_json(i, memo) for i in ex.instances]) + "]",
        _j(ex.key),
        "[" + ",".join(map(_ref_json, ex.refs)) + "]",
        "[" + ",".join([_sample_json(s, memo, image_id, image_id_json) for s in ex.samples]) + "]",
        _j(img.sha256),
        _j(img.source),
        _j(ex.split),
        _j(img.uri),
        _int_repr(int(img.width)),
    )
    return text.encode("utf-8")


def reject_to_row(r: Reject) -> dict[str, Any]:
    """Converts a ``Reject`` to a row of ``REJECT_SCHEMA``."""
    return {
        "source_key": r.source_key,
        "stage": r.stage,
        "reason": r.reason,
        "message": r.message,
        "level": str(r.level),
        "image_id": r.image_id,
    }


def decision_to_row(d: ReviewDecision) -> dict[str, Any]:
    """Converts a ``ReviewDecision`` to a row of ``DECISION_SCHEMA``."""
    return {
        "sample_id": d.sample_id,
        "verdict": str(d.verdict),
        "reason": d.reason,
        "reviewer": d.reviewer,
        "time_ms": int(d.time_ms),
        "split": d.split,
        "kind": d.kind,
        "template": d.template,
    }


def decision_from_row(row: dict[str, Any]) -> ReviewDecision:
    """Inverse of ``decision_to_row`` (``time_ms`` may come back as a datetime)."""
    t = row["time_ms"]
    if hasattr(t, "timestamp"):
        t = round(t.timestamp() * 1000)
    return ReviewDecision(
        sample_id=row["sample_id"],
        verdict=row["verdict"],
        reason=row.get("reason") or "",
        reviewer=row.get("reviewer") or "",
        time_ms=int(t or 0),
        split=row.get("split") or "",
        kind=row.get("kind") or "",
        template=row.get("template") or "",
    )


def _rle_from_row(row: dict[str, Any] | None) -> Rle | None:
    return None if row is None else Rle(size=(int(row["size"][0]), int(row["size"][1])), counts=row["counts"])


def _box(v: Any) -> tuple[float, float, float, float] | None:
    return None if v is None else tuple(float(x) for x in v)  # type: ignore[return-value]


def instance_from_row(row: dict[str, Any]) -> Instance:
    """Inverse of ``instance_to_row``."""
    rle = _rle_from_row(row["rle"])
    assert rle is not None
    return Instance(
        instance_id=row["instance_id"],
        image_id=row["image_id"],
        rle=rle,
        bbox_xywh=_box(row["bbox_xywh"]),  # type: ignore[arg-type]
        bbox_xyxy=_box(row["bbox_xyxy"]),  # type: ignore[arg-type]
        area_px=int(row["area_px"]),
        category_id=row["category_id"],
        category_name=row["category_name"],
        supercategory=row["supercategory"],
        iscrowd=bool(row["iscrowd"]),
        predicted_iou=row["predicted_iou"],
        stability_score=row["stability_score"],
        point_coords=tuple((float(p[0]), float(p[1])) for p in row["point_coords"] or ()),
        crop_box=_box(row["crop_box"]),
        source_ann_id=row["source_ann_id"],
        mask_origin=row["mask_origin"],
    )


def ref_from_row(row: dict[str, Any]) -> Ref:
    """Inverse of ``ref_to_row``."""
    return Ref(
        ref_id=int(row["ref_id"]),
        image_id=row["image_id"],
        ann_ids=tuple(int(a) for a in row["ann_ids"]),
        category_ids=tuple(int(c) for c in row["category_ids"]),
        split=row["split"],
        sentences=tuple(RefSentence(int(s["sent_id"]), s["raw"], s["sent"]) for s in row["sentences"]),
        dataset=row["dataset"],
    )


def target_from_row(row: dict[str, Any]) -> TargetGeometry:
    """Inverse of ``target_to_row``."""
    return TargetGeometry(
        instance_id=row["instance_id"],
        bbox_xyxy=_box(row["bbox_xyxy"]),  # type: ignore[arg-type]
        point_1=(int(row["point_1"][0]), int(row["point_1"][1])),
        point_2=(int(row["point_2"][0]), int(row["point_2"][1])),
        qwen_box=tuple(int(v) for v in row["qwen_box"]),  # type: ignore[arg-type]
    )


def sample_from_row(row: dict[str, Any]) -> Sample:
    """Inverse of ``sample_to_row``."""
    return Sample(
        sample_id=row["sample_id"],
        image_id=row["image_id"],
        expression=row["expression"],
        kind=row["kind"],
        target_ids=tuple(row["target_ids"]),
        split=row["split"],
        generator=row["generator"],
        template=row["template"],
        model=row["model"],
        union_rle=_rle_from_row(row["union_rle"]),
        union_svg=row["union_svg"],
        targets=tuple(target_from_row(t) for t in row["targets"]),
        sam2_ious=tuple(float(v) for v in row["sam2_ious"]),
        reground_box=_box(row["reground_box"]),
        reground_iou=row["reground_iou"],
        # Shards written before the field existed have no such key.
        screened=bool(row.get("screened") or False),
        metadata=json.loads(row["metadata"]) if row["metadata"] else {},
    )


def example_from_row(row: dict[str, Any]) -> ImageExample:
    """Inverse of ``example_to_row``: rebuilds the record from a Parquet row."""
    return ImageExample(
        key=row["key"],
        image=ImageRecord(**{c: row[c] for c in IMAGE_COLUMNS}),
        image_bytes=row["image"],
        instances=tuple(instance_from_row(i) for i in row["instances"]),
        refs=tuple(ref_from_row(r) for r in row["refs"]),
        samples=tuple(sample_from_row(s) for s in row["samples"]),
        split=row["split"],
        input_name=row["input_name"],
    )


def example_to_json(ex: ImageExample) -> dict[str, Any]:
    """The WebDataset ``json`` field: every column but the image bytes.

    The same content as the Parquet row (so both outputs carry the same
    annotations), with the image stored beside it as the ``jpg`` field.
    """
    row = example_to_row(ex)
    del row["image"]
    return row
