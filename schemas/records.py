"""The record schema of orsgen, defined once.

Frozen dataclasses cross every stage boundary. ``schemas.arrow`` holds the one
pyarrow schema that mirrors them for Parquet, and ``tests/test_schemas.py``
keeps the two in sync.

Conventions (COCO's, so that every tool of the field reads them):

* masks are COCO compressed RLE: ``{"size": [h, w], "counts": str}``;
* ``bbox_xywh`` is COCO's ``[x, y, w, h]`` in absolute pixels;
* ``bbox_xyxy`` is ``[x0, y0, x1, y1]`` in absolute pixels (exclusive max);
* points are ``(x, y)`` pixel coordinates;
* ``qwen_box`` is ``[x0, y0, x1, y1]`` normalised to 0..1000 (Qwen3-VL style).
"""

from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


def pickled_by_slots(cls: Any) -> Any:
    """Gives a frozen slots dataclass faster ``__getstate__`` / ``__setstate__`` with the same state.

    ``dataclass(slots=True, frozen=True)`` pickles through ``dataclasses``'
    own pair, which calls ``dataclasses.fields()`` on every call: about half
    of what pickling an ``ImageExample`` (some fifty records) costs. Beam
    pickles records where they cross a stage boundary and, to estimate
    element sizes, samples of every ``PCollection``. These return the same
    list of field values in field order (so the same pickle bytes) and set
    the slots directly, as ``dataclasses``' own do; tests/test_schemas.py
    checks both against ``dataclasses``' on every record type.
    """
    names = tuple(f.name for f in dataclasses.fields(cls))
    values = operator.attrgetter(*names)
    setters = tuple(getattr(cls, name).__set__ for name in names)

    if len(names) == 1:

        def __getstate__(self: Any) -> list[Any]:
            return [values(self)]

    else:

        def __getstate__(self: Any) -> list[Any]:
            return list(values(self))

    def __setstate__(self: Any, state: list[Any]) -> None:
        for set_slot, value in zip(setters, state):
            set_slot(self, value)

    cls.__getstate__ = __getstate__
    cls.__setstate__ = __setstate__
    if not hasattr(cls, "__post_init__") and all(f.init for f in dataclasses.fields(cls)):
        # dataclasses.replace passes every field to __init__, which only sets
        # them: copying the slots is the same record (``replace_record``).
        _FIELD_INDEX[cls] = {name: i for i, name in enumerate(names)}
    return cls


#: Field name -> position in the state, for the records ``replace_record`` copies by their slots.
_FIELD_INDEX: dict[type, dict[str, int]] = {}


def replace_record(obj: Any, /, **changes: Any) -> Any:
    """``dataclasses.replace(obj, **changes)``, faster for the records whose ``__init__`` only sets fields.

    A ``pickled_by_slots`` record whose ``__init__`` only sets its fields (no ``__post_init__``,
    no ``init=False`` field) is copied by its slots with ``changes`` applied:
    the same record as ``replace`` makes, sharing the same field values, at
    about 40% of the cost (the splits stage copies every sample). Anything
    else, an unknown field name included, goes to ``dataclasses.replace``
    (and its errors).
    """
    cls = type(obj)
    index = _FIELD_INDEX.get(cls)
    if index is None or not changes.keys() <= index.keys():
        return dataclasses.replace(obj, **changes)
    state = obj.__getstate__()
    for name, value in changes.items():
        state[index[name]] = value
    new = object.__new__(cls)
    new.__setstate__(state)
    return new


def slots_constructor(cls: Any) -> Any:
    """A function ``make(*values)`` equal to ``cls(*values)`` of every field in order, its slots set directly.

    For a frozen slots dataclass whose ``__init__`` only sets its fields (no
    ``__post_init__``, every field in ``__init__``): the frozen ``__init__``
    pays an ``object.__setattr__`` call per field, about half of making a
    small record that a stage makes hundreds of per image. The function is
    written out per class (as ``dataclasses`` writes ``__init__``) so each
    field costs one slot-setter call, and takes every field positionally.

    Raises:
        TypeError: ``cls`` has a ``__post_init__`` or a field outside ``__init__``.
    """
    fields = dataclasses.fields(cls)
    if hasattr(cls, "__post_init__") or not all(f.init for f in fields):
        raise TypeError(f"{cls.__name__}'s __init__ does more than set its fields; call {cls.__name__}(...) instead.")
    names = [f.name for f in fields]
    args = ", ".join(names)
    body = "".join(f"    _set{i}(obj, {name})\n" for i, name in enumerate(names))
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set{i}": getattr(cls, name).__set__ for i, name in enumerate(names)})
    exec(f"def make({args}):\n    obj = _new(_cls)\n{body}    return obj\n", namespace)  # noqa: S102 - field names only
    make = namespace["make"]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    make.__doc__ = f"``{cls.__name__}({args})``, its slots set directly (``slots_constructor``)."
    return make


class ExpressionKind(StrEnum):
    """Kinds of referring expressions (ORS-Bench types plus human and no-target)."""

    CATEGORY_SINGLE = "category_single"
    CATEGORY_MULTI = "category_multi"
    PHRASE = "phrase"
    DESCRIPTION = "description"
    HUMAN = "human"
    NO_TARGET = "no_target"


class Source(StrEnum):
    """Where an image and its annotations come from."""

    SA1B = "sa1b"
    COCO = "coco"
    REFCOCO = "refcoco"
    GREFCOCO = "grefcoco"


class RejectLevel(StrEnum):
    """The unit a reject stands for; reconciliation is kept per level."""

    SHARD = "shard"
    IMAGE = "image"
    INSTANCE = "instance"
    REF = "ref"
    SAMPLE = "sample"


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class Rle:
    """A COCO compressed RLE mask.

    Attributes:
        size: ``(h, w)`` of the image the mask lives in, in pixels.
        counts: the compressed counts string (COCO's LEB128-like encoding).
    """

    size: tuple[int, int]
    counts: str

    def to_coco(self) -> dict[str, Any]:
        """Returns the dict pycocotools expects (``counts`` as bytes)."""
        return {"size": [int(self.size[0]), int(self.size[1])], "counts": self.counts.encode("ascii")}

    def to_json(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict (``counts`` as str)."""
        return {"size": [int(self.size[0]), int(self.size[1])], "counts": self.counts}

    @classmethod
    def from_coco(cls, rle: dict[str, Any]) -> "Rle":
        """Builds from a pycocotools / JSON compressed RLE dict."""
        counts = rle["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        h, w = rle["size"]
        return cls(size=(int(h), int(w)), counts=str(counts))


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class Category:
    """One entry of a source's category vocabulary (COCO ``categories``)."""

    id: int
    name: str
    supercategory: str = ""


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One source image.

    Attributes:
        image_id: stable id such as ``sa1b:123`` or ``coco:391895``.
        source: where it comes from (``Source``).
        uri: where the bytes were read from (tar member, path or URL).
        width: width in pixels.
        height: height in pixels.
        sha256: hex digest of the encoded image bytes.
        file_name: the source's own file name.
    """

    image_id: str
    source: str
    uri: str
    width: int
    height: int
    sha256: str
    file_name: str = ""


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class Instance:
    """One region / annotated instance of an image.

    Attributes:
        instance_id: stable id unique in the image, e.g. ``sa1b:123/ann:456``.
        image_id: the image it belongs to.
        rle: the mask.
        bbox_xywh: COCO box ``[x, y, w, h]`` in pixels.
        bbox_xyxy: ``[x0, y0, x1, y1]`` in pixels.
        area_px: mask area in pixels.
        category_id: COCO category id, or None for class-agnostic regions (SA-1B).
        category_name: category name, or None.
        supercategory: COCO supercategory, or None.
        iscrowd: COCO crowd flag.
        predicted_iou: SA-1B / SAM score, or None.
        stability_score: SA-1B / SAM score, or None.
        point_coords: SA-1B prompt points ``[(x, y), ...]``.
        crop_box: SA-1B crop box ``[x, y, w, h]``, or None.
        source_ann_id: the annotation id in the source file.
        mask_origin: how the mask was encoded at the source (``polygon``,
            ``rle``, ``uncompressed_rle``) or rewritten (``sam2_refined``).
    """

    instance_id: str
    image_id: str
    rle: Rle
    bbox_xywh: tuple[float, float, float, float]
    bbox_xyxy: tuple[float, float, float, float]
    area_px: int
    category_id: int | None = None
    category_name: str | None = None
    supercategory: str | None = None
    iscrowd: bool = False
    predicted_iou: float | None = None
    stability_score: float | None = None
    point_coords: tuple[tuple[float, float], ...] = ()
    crop_box: tuple[float, float, float, float] | None = None
    source_ann_id: int | None = None
    mask_origin: str = "rle"


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class RefSentence:
    """One human sentence of a RefCOCO-family ref."""

    sent_id: int
    raw: str
    sent: str


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class Ref:
    """A RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO referring annotation.

    Attributes:
        ref_id: the dataset's ref id.
        image_id: orsgen image id (``coco:<id>``).
        ann_ids: source annotation ids of the targets; empty means no target
            (gRefCOCO's ``[-1]``).
        category_ids: category ids of the targets.
        split: the dataset's own split (train/val/testA/testB/...).
        sentences: the human sentences.
        dataset: e.g. ``refcoco_unc`` or ``grefcoco_unc``.
    """

    ref_id: int
    image_id: str
    ann_ids: tuple[int, ...]
    category_ids: tuple[int, ...]
    split: str
    sentences: tuple[RefSentence, ...]
    dataset: str


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class TargetGeometry:
    """Trainer targets of one target instance of a sample.

    Attributes:
        instance_id: the target instance.
        bbox_xyxy: absolute pixel box ``[x0, y0, x1, y1]``.
        point_1: first interior point ``(x, y)`` (distance-transform maximum).
        point_2: second interior point ``(x, y)`` (Seg-Zero rule).
        qwen_box: ``[x0, y0, x1, y1]`` normalised to 0..1000.
    """

    instance_id: str
    bbox_xyxy: tuple[float, float, float, float]
    point_1: tuple[int, int]
    point_2: tuple[int, int]
    qwen_box: tuple[int, int, int, int]


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class Sample:
    """One referring sample: an expression and the instances it refers to.

    Attributes:
        sample_id: stable id, unique in the dataset.
        image_id: the image the expression refers into.
        expression: the referring expression text.
        kind: an ``ExpressionKind`` value.
        target_ids: instance ids of the targets (empty for ``no_target``).
        split: split name, or "" before split assignment.
        generator: what produced the expression (``refcoco``, ``template``,
            ``vlm``).
        template: the template / prompt id and version, or "".
        model: the model that wrote or verified it, or "".
        union_rle: the union mask of the targets, or None before targets are
            computed (an empty mask for ``no_target``).
        union_svg: normalised SVG path of the union, or "".
        targets: per-target trainer geometry.
        sam2_ious: per-target IoU of SAM2's re-prediction, when verified.
        reground_box: re-grounded box (xyxy px) from the DeRS check, or None.
        reground_iou: IoU of that box with the target box, or None.
        screened: True when a person accepted it in ``orsgen review`` and the
            build applied that decision (``review.decisions``).
        metadata: free-form provenance, JSON-serialisable.
    """

    sample_id: str
    image_id: str
    expression: str
    kind: str
    target_ids: tuple[str, ...]
    split: str = ""
    generator: str = ""
    template: str = ""
    model: str = ""
    union_rle: Rle | None = None
    union_svg: str = ""
    targets: tuple[TargetGeometry, ...] = ()
    sam2_ious: tuple[float, ...] = ()
    reground_box: tuple[float, float, float, float] | None = None
    reground_iou: float | None = None
    screened: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


#: Reject messages and source keys are cut to these many characters.
MAX_REJECT_MESSAGE_CHARS = 2000
MAX_REJECT_KEY_CHARS = 1000


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class Reject:
    """A record that did not make it into the output, and why.

    Attributes:
        source_key: where it came from (shard URL + member, image id, ...).
        stage: the stage that rejected it (``ingest_sa1b``, ``regions``, ...).
        reason: a short reason code (``corrupt_image``, ``dropped_small``).
        message: a human-readable sentence with the details.
        level: the unit it stands for (``RejectLevel``).
        image_id: the image it belongs to, when known.
    """

    source_key: str
    stage: str
    reason: str
    message: str
    level: str = RejectLevel.IMAGE
    image_id: str = ""

    def __post_init__(self) -> None:
        # Every reject message leaves the process (rejects Parquet, logs), and
        # some quote untrusted or remote text (a server's error body may echo
        # the API key): secrets are scrubbed, the length is bounded, and
        # characters UTF-8 cannot hold (lone surrogates) are escaped.
        from orsgen.schemas.config.redact import redact_text

        for name, limit in (("message", MAX_REJECT_MESSAGE_CHARS), ("source_key", MAX_REJECT_KEY_CHARS)):
            value = getattr(self, name)
            if not isinstance(value, str):
                continue
            clean = redact_text(value)
            if len(clean) > limit:
                clean = clean[: limit - 3] + "..."
            try:
                clean.encode("utf-8")
            except UnicodeEncodeError:
                clean = clean.encode("utf-8", "backslashreplace").decode("utf-8")
            if clean != value:
                object.__setattr__(self, name, clean)


class Verdict(StrEnum):
    """A reviewer's verdict on one sample (``orsgen review``)."""

    ACCEPT = "accept"
    REJECT = "reject"
    SKIP = "skip"


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class ReviewDecision:
    """One verdict of a human reviewer, as saved in ``DIR/_review/decisions.parquet``.

    Attributes:
        sample_id: the sample judged.
        verdict: a ``Verdict`` value.
        reason: why it was rejected (a reason code or free text); "" otherwise.
        reviewer: who judged it.
        time_ms: when, in milliseconds since the Unix epoch (UTC).
        split: the sample's split in the reviewed dataset.
        kind: the sample's ``ExpressionKind`` value.
        template: the sample's template / prompt id, or "".
    """

    sample_id: str
    verdict: str
    reason: str
    reviewer: str
    time_ms: int
    split: str = ""
    kind: str = ""
    template: str = ""


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class Presence:
    """An object known to be in the image whose annotation was rejected.

    Its mask is unusable, but the object is there: it still counts for the
    uniqueness of expressions, the extent of a category and negatives. Kept
    on the example for the expressions stage only; never written.

    Attributes:
        category_id: the annotation's category id.
        category_name: its category name.
        supercategory: its supercategory ("" if none).
        iscrowd: the annotation's crowd flag.
        source_key: the annotation's reject ``source_key``.
    """

    category_id: int
    category_name: str
    supercategory: str = ""
    iscrowd: bool = False
    source_key: str = ""


@pickled_by_slots
@dataclass(frozen=True, slots=True)
class ImageExample:
    """The unit that flows through the pipeline: an image with everything on it.

    Attributes:
        key: output key, unique in the dataset, without dots.
        image: the image record.
        image_bytes: the encoded image (JPEG/PNG) bytes.
        instances: its instances / regions.
        refs: RefCOCO-family refs on it.
        samples: referring samples built so far.
        split: assigned split, or "".
        input_name: the config input it came from.
        presence: objects whose annotations were rejected at ingest (see
            ``Presence``); context for the expressions stage, never written.
    """

    key: str
    image: ImageRecord
    image_bytes: bytes
    instances: tuple[Instance, ...] = ()
    refs: tuple[Ref, ...] = ()
    samples: tuple[Sample, ...] = ()
    split: str = ""
    input_name: str = ""
    presence: tuple[Presence, ...] = ()

    def replace(self, **changes: Any) -> "ImageExample":
        """Returns a copy with ``changes`` applied (the record is frozen): ``dataclasses.replace``."""
        return replace_record(self, **changes)


def to_jsonable(obj: Any) -> Any:
    """Converts records (and tuples/enums inside) to plain JSON values.

    Args:
        obj: a record, a container of records, or a plain value.

    Returns:
        The same content as dicts, lists, str, int, float, bool and None.
    """
    if isinstance(obj, Rle):
        return obj.to_json()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, StrEnum):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, bytes):
        raise TypeError("bytes are not JSON values; store them beside the JSON (e.g. the jpg field).")
    return obj


def canonical_json(obj: Any) -> bytes:
    """Serialises ``obj`` to deterministic JSON bytes (sorted keys, no spaces)."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def safe_key(text: str) -> str:
    """Turns an id into a WebDataset-safe key: no dots, slashes or colons.

    WebDataset treats everything after the first dot of a member name as the
    extension, so keys must not contain dots.

    Args:
        text: any id, e.g. ``refcoco_unc-coco:391895``.

    Returns:
        The id with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``.
    """
    return "".join(c if (c.isascii() and (c.isalnum() or c in "_-")) else "_" for c in text)
