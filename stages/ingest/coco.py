"""Reads COCO instances and RefCOCO-family refs into ``ImageExample`` records.

Three inputs share this reader:

* ``CocoInput``: an ``instances_*.json`` (``images``, ``annotations``,
  ``categories``) plus an image folder or URL prefix;
* ``RefcocoInput``: RefCOCO / RefCOCO+ / RefCOCOg ``refs(<splitBy>).p`` (a
  Python 2 pickle, read only through ``stages.ingest.safe_pickle``) or a JSON list of
  the same refs, plus the COCO instances they point into;
* ``GrefcocoInput``: gRefCOCO ``grefs(unc).json`` (or ``.p``), whose refs may
  have several targets or none (``ann_id == [-1]``).

The work is split in two so that Beam can spread it:

1. ``plan_input`` reads the one big JSON (and refs file) of an input, checks
   the structure and returns the category vocabulary and one light, hashable
   ``CocoImageTask`` per image (no image bytes, annotations as canonical
   JSON), plus the rejects found on the way;
2. ``load_task`` runs on a worker per task: it reads and checks the image
   bytes, converts every annotation to compressed RLE and returns the
   ``ImageExample`` with its instance- and ref-level rejects.

Files are read through ``fsspec``, so local paths, ``gs://``, ``s3://`` and
``http(s)://`` all work. Bad data never raises: it becomes a ``Reject`` with
one of the reason codes below. A missing top-level file (annotations, refs) is
a config mistake and raises ``FileNotFoundError``; an image read error other
than "not found" (network, permissions) also raises, so that Beam retries it.

Accounting: an image-level reject stands for the image and everything on it
(its annotations and refs get no rejects of their own). In ``refcoco`` /
``grefcoco`` mode only images with at least one kept ref are read, and
problems of the instances file that cannot be tied to such an image are not
reported (the file holds all of COCO train2014).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from orsgen.schemas.config import CocoInput, GrefcocoInput, ImageConfig, RefcocoInput
from orsgen.schemas.config.base import display_path
from orsgen.schemas.records import (
    Category,
    ImageExample,
    ImageRecord,
    Instance,
    Presence,
    Ref,
    RefSentence,
    Reject,
    RejectLevel,
    Rle,
    safe_key,
)
from orsgen.stages.ingest.images import ImageError, check_image
from orsgen.stages.common.masks import (
    MaskError,
    instance_geometries,
    instance_geometry,
    rasterize_polygons,
    segmentation_to_rle,
)
from orsgen.stages.common.transient import retry_transient
from orsgen.stages.ingest.safe_pickle import UnsafePickleError, restricted_loads
from orsgen.stages.ingest.validate import (
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    PLAIN_NUMBERS,
    int_problem,
    show,
    split_problem,
    value_problem,
)

#: ``Reject.stage`` of every reject this module makes.
STAGE = "ingest_coco"

# ---------------------------------------------------------------- reason codes
# Shard level: a whole input file.
#: The annotations / instances file is not JSON, or lacks ``images``,
#: ``annotations`` or ``categories`` lists. No tasks come from the input.
UNREADABLE_ANNOTATIONS = "unreadable_annotations"
#: The refs file is neither JSON nor a valid pickle, or is not a list of refs.
UNREADABLE_REFS = "unreadable_refs"
#: The refs pickle names a global or a persistent id (it could run code).
UNSAFE_PICKLE = "unsafe_pickle"
#: A ``categories`` entry lacks an int ``id`` / str ``name``, or repeats an id.
#: Its annotations then fail with ``unknown_category``.
BAD_CATEGORY = "bad_category"

# Image level. check_image adds ``empty_image``, ``image_too_large``,
# ``corrupt_image`` and ``image_size_mismatch``.
#: An ``images`` entry lacks an int ``id``, a str ``file_name`` or positive
#: int ``width`` / ``height``.
BAD_JSON = "bad_json"
#: An ``images`` entry repeats the id of an earlier one (the first is kept).
DUPLICATE_IMAGE = "duplicate_image"
#: ``file_name`` would escape the image prefix (``..``, absolute, backslash,
#: ``:``, ``%``, ``?``, ``#``, control characters, empty segments).
UNSAFE_PATH = "unsafe_path"
#: The image file does not exist under the prefix.
MISSING_IMAGE = "missing_image"

# Instance level. segmentation_to_rle adds ``bad_polygon``, ``bad_rle``,
# ``bad_segmentation``, ``rle_size_mismatch`` and ``empty_mask``.
#: An annotation is not an object, or lacks / mistypes ``id``, ``image_id``,
#: ``category_id``, ``segmentation`` or ``iscrowd``.
BAD_ANNOTATION = "bad_annotation"
#: An annotation repeats the id of an earlier one (the first is kept).
DUPLICATE_ANNOTATION = "duplicate_annotation"
#: An annotation's ``image_id`` is not in ``images`` (COCO mode only).
ORPHAN_ANNOTATION = "orphan_annotation"
#: An annotation's ``category_id`` is not in ``categories``.
UNKNOWN_CATEGORY = "unknown_category"
#: Mask decoded to zero pixels (also raised by segmentation_to_rle).
EMPTY_MASK = "empty_mask"
#: Polygon coordinates that are not finite or lie far outside the image
#: (also raised by segmentation_to_rle for polygons of fewer than 3 points).
BAD_POLYGON = "bad_polygon"

# Ref level.
#: A ref lacks / mistypes ``ref_id``, ``image_id``, ``split``, ``ann_id``,
#: ``category_id`` or ``sentences``, or contradicts itself (``no_target``).
BAD_REF = "bad_ref"
#: A ref repeats the ``ref_id`` of an earlier one (the first is kept).
DUPLICATE_REF = "duplicate_ref"
#: A ref's ``image_id`` is not in the instances ``images``.
ORPHAN_REF = "orphan_ref"
#: A ref's ``ann_id`` is not an annotation of its image.
MISSING_ANNOTATION = "missing_annotation"
#: A ref's target annotation exists but was rejected at load time (bad
#: segmentation, ...); the ref is dropped rather than kept with fewer targets.
TARGET_REJECTED = "target_rejected"
#: An annotation whose image was rejected (missing, corrupt, bad entry): it is
#: an input all the same, so it is counted, as a reject that points at the
#: image's reject.
IMAGE_REJECTED = "image_rejected"

_SOURCE_BY_TYPE = {"coco": "coco", "refcoco": "refcoco", "grefcoco": "grefcoco"}
_UNSAFE_CHARS = frozenset("\\:%?#")


@dataclass(frozen=True, slots=True)
class CocoImageTask:
    """Everything needed to load one image, without its bytes.

    Light and hashable so that Beam can reshuffle it cheaply.

    Attributes:
        input_name: the config input it came from (prefixes output keys).
        source: ``coco``, ``refcoco`` or ``grefcoco``.
        coco_image_id: the COCO image id.
        file_name: COCO ``file_name`` (checked to stay inside the prefix).
        width: width in pixels from the annotations file.
        height: height in pixels from the annotations file.
        image_uri: where the bytes are read from (prefix + ``/`` + file_name).
        annotations_json: canonical JSON (sorted keys, no spaces) of the list
            of this image's raw COCO annotation dicts, sorted by id.
        refs: refs on this image, sorted by ref id (empty for COCO).
        categories_json: canonical JSON of ``{"<id>": {"name", "supercategory"}}``
            for the known categories the annotations use.
        annotations_url: the annotations / instances file (for reject keys).
        refs_url: the refs file, or "" for COCO (for reject keys).
        image_uri_shown: ``image_uri`` as the config wrote its prefix (relative
            to the config file's folder when it was given relative), which is
            what the record's ``uri`` and reject keys hold ("" = image_uri).
    """

    input_name: str
    source: str
    coco_image_id: int
    file_name: str
    width: int
    height: int
    image_uri: str
    annotations_json: str
    refs: tuple[Ref, ...]
    categories_json: str
    annotations_url: str = ""
    refs_url: str = ""
    image_uri_shown: str = ""


# ---------------------------------------------------------------- small helpers


def _as_int(value: Any) -> int | None:
    """``value`` if it is an int (bools excluded), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _reject(source_key: str, reason: str, message: str, level: RejectLevel, image_id: int | None = None) -> Reject:
    return Reject(
        source_key=source_key,
        stage=STAGE,
        reason=reason,
        message=message,
        level=level,
        image_id=f"coco:{image_id}" if image_id is not None else "",
    )


def _short(value: Any, limit: int = 80) -> str:
    # Bounded: a hostile value (deep, huge or self-similar) never gets a full repr.
    return show(value, limit)


#: Per-field character limits of the strings of each record kind (see ``validate``).
_CATEGORY_LIMITS = {"name": MAX_NAME_CHARS, "supercategory": MAX_NAME_CHARS}
_IMAGE_LIMITS = {"file_name": MAX_TEXT_CHARS}
_REF_LIMITS = {"raw": MAX_TEXT_CHARS, "sent": MAX_TEXT_CHARS, "file_name": MAX_TEXT_CHARS}


def _in_int64(value: Any) -> int | None:
    """``value`` if it is an int within int64, else None."""
    v = _as_int(value)
    return v if v is not None and int_problem(v, "") is None else None


def unsafe_file_name_problem(file_name: Any) -> str | None:
    r"""Says why ``file_name`` cannot be joined to an image prefix, or None if it can.

    A file name must be a relative POSIX path that stays inside the prefix
    for every fsspec backend: no absolute path, no ``.``/``..``/empty segment,
    and none of ``\\ : % ? #`` (backslash paths, URL schemes and fsspec
    ``::`` chaining, percent-encoded ``..``, URL query and fragment) nor
    control characters.

    Args:
        file_name: the ``images[].file_name`` value.

    Returns:
        A sentence naming the problem, or None for a safe name.
    """
    if not isinstance(file_name, str) or not file_name:
        return f"file_name must be a non-empty string, got {_short(file_name)}."
    if file_name.startswith("/"):
        return f"file_name {_short(file_name)} is an absolute path."
    bad = sorted({c for c in file_name if c in _UNSAFE_CHARS or ord(c) < 32 or ord(c) == 127})
    if bad:
        return f"file_name {_short(file_name)} holds the characters {bad!r}, which could leave the image prefix."
    if any(part in ("", ".", "..") for part in file_name.split("/")):
        return f"file_name {_short(file_name)} has an empty, '.' or '..' path segment."
    return None


def _join_uri(prefix: str, file_name: str) -> str:
    return prefix.rstrip("/") + "/" + file_name if prefix else file_name


def _read_top_level(url: str, what: str) -> bytes:
    """Reads a whole top-level input file; a missing one is a config error."""
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the {what} file {url!r} does not exist; fix the input's path in the config."
        ) from None


def _parse_json(data: bytes) -> Any:
    """Parses JSON bytes; raises ValueError (or RecursionError) on bad JSON."""
    return json.loads(data)


# ---------------------------------------------------------------- COCO instances


@dataclass(slots=True)
class _Instances:
    """What ``_parse_instances`` learnt about a COCO instances file."""

    categories: dict[int, Category]
    images: dict[int, tuple[str, int, int]]  # id -> (file_name, width, height)
    image_rejects: dict[int, Reject]  # known ids whose entry is rejected
    loose_image_rejects: list[tuple[int | None, Reject]]  # rejects not standing for a known id
    all_image_ids: set[int]
    anns_by_image: dict[int, list[dict[str, Any]]]
    ann_rejects: list[tuple[int | None, Reject]]  # (image id if known, reject)
    shard_rejects: list[Reject]


def _parse_instances(url: str, shown: str = "") -> _Instances | Reject:
    """Reads and checks the structure of a COCO instances file.

    Returns:
        The parsed file, or one shard-level ``unreadable_annotations`` reject.
    """
    data = _read_top_level(url, "annotations")
    url = shown or url  # reject keys name the file as the config wrote it
    try:
        doc = _parse_json(data)
    except (ValueError, RecursionError) as err:
        return _reject(url, UNREADABLE_ANNOTATIONS, f"the annotations file is not valid JSON: {err}", RejectLevel.SHARD)
    missing = (
        ["images", "annotations", "categories"]
        if not isinstance(doc, dict)
        else [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    )
    if missing:
        return _reject(
            url,
            UNREADABLE_ANNOTATIONS,
            f"the annotations file must be a JSON object with the lists {missing} (COCO instances format); "
            f"got {type(doc).__name__}.",
            RejectLevel.SHARD,
        )

    shard_rejects: list[Reject] = []
    categories: dict[int, Category] = {}
    for i, cat in enumerate(doc["categories"]):
        cid = _in_int64(cat.get("id")) if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        sup = cat.get("supercategory", "") if isinstance(cat, dict) else None
        key = f"{url}#category:{cid}" if cid is not None else f"{url}#category_index:{i}"
        problem = value_problem(cat, f"categories[{i}]", _CATEGORY_LIMITS)
        if problem is not None:
            shard_rejects.append(_reject(key, problem[0], problem[1], RejectLevel.SHARD))
        elif cid is None or not isinstance(name, str) or not isinstance(sup, str):
            shard_rejects.append(
                _reject(
                    key,
                    BAD_CATEGORY,
                    f"category entry {_short(cat)} needs an int id, a str name and a str supercategory.",
                    RejectLevel.SHARD,
                )
            )
        elif not any(map(str.isalnum, name)):
            # Expressions say the category's name ("the cups", "no zebra"): a
            # blank name has no words to say (inflect fails on it), and one
            # of only marks, underscores or zero-width characters ("_", "()",
            # U+200B) would be written as "all _S".
            shard_rejects.append(
                _reject(
                    key,
                    BAD_CATEGORY,
                    f"category id {cid} has the name {_short(name)}, with no letter or digit; give it a name, "
                    "or remove the category (its annotations are rejected as unknown_category).",
                    RejectLevel.SHARD,
                )
            )
        elif cid in categories:
            shard_rejects.append(
                _reject(
                    key,
                    BAD_CATEGORY,
                    f"category id {cid} appears more than once; the first is kept.",
                    RejectLevel.SHARD,
                )
            )
        else:
            categories[cid] = Category(id=cid, name=name, supercategory=sup)

    images: dict[int, tuple[str, int, int]] = {}
    image_rejects: dict[int, Reject] = {}
    loose_image_rejects: list[tuple[int | None, Reject]] = []
    all_image_ids: set[int] = set()
    for i, img in enumerate(doc["images"]):
        iid = _in_int64(img.get("id")) if isinstance(img, dict) else None
        problem = value_problem(img, f"images[{i}]", _IMAGE_LIMITS)
        if problem is not None and (iid is None or iid in all_image_ids):
            loose_image_rejects.append(
                (iid, _reject(f"{url}#image_index:{i}", problem[0], problem[1], RejectLevel.IMAGE, iid))
            )
            continue
        if iid is None:
            loose_image_rejects.append(
                (
                    None,
                    _reject(
                        f"{url}#image_index:{i}",
                        BAD_JSON,
                        f"images[{i}] has no int id: {_short(img)}.",
                        RejectLevel.IMAGE,
                    ),
                )
            )
            continue
        key = f"{url}#image:{iid}"
        if iid in all_image_ids:
            loose_image_rejects.append(
                (
                    iid,
                    _reject(
                        f"{url}#image_index:{i}",
                        DUPLICATE_IMAGE,
                        f"image id {iid} appears more than once; the first entry is kept.",
                        RejectLevel.IMAGE,
                        iid,
                    ),
                )
            )
            continue
        all_image_ids.add(iid)
        if problem is not None:
            image_rejects[iid] = _reject(key, problem[0], problem[1], RejectLevel.IMAGE, iid)
            continue
        file_name, width, height = img.get("file_name"), _as_int(img.get("width")), _as_int(img.get("height"))
        if not isinstance(file_name, str) or width is None or height is None or width <= 0 or height <= 0:
            image_rejects[iid] = _reject(
                key,
                BAD_JSON,
                f"image {iid} needs a str file_name and positive int width and height, got "
                f"file_name={_short(file_name)}, width={_short(img.get('width'))}, height={_short(img.get('height'))}.",
                RejectLevel.IMAGE,
                iid,
            )
            continue
        problem = unsafe_file_name_problem(file_name)
        if problem is not None:
            image_rejects[iid] = _reject(key, UNSAFE_PATH, problem, RejectLevel.IMAGE, iid)
            continue
        images[iid] = (file_name, width, height)

    anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    ann_rejects: list[tuple[int | None, Reject]] = []
    seen_ann_ids: set[int] = set()
    for i, ann in enumerate(doc["annotations"]):
        aid = _in_int64(ann.get("id")) if isinstance(ann, dict) else None
        img_id = _in_int64(ann.get("image_id")) if isinstance(ann, dict) else None
        key = f"{url}#ann:{aid}" if aid is not None else f"{url}#ann_index:{i}"
        problem = value_problem(ann, f"annotations[{i}]")
        if problem is not None:
            ann_rejects.append((img_id, _reject(key if aid not in seen_ann_ids else f"{url}#ann_index:{i}",
                                                problem[0], problem[1], RejectLevel.INSTANCE, img_id)))
            if aid is not None:
                seen_ann_ids.add(aid)
            continue
        if aid is None or img_id is None:
            ann_rejects.append(
                (
                    img_id,
                    _reject(
                        key,
                        BAD_ANNOTATION,
                        f"annotations[{i}] needs int id and image_id: {_short(ann)}.",
                        RejectLevel.INSTANCE,
                        img_id,
                    ),
                )
            )
            continue
        if aid in seen_ann_ids:
            ann_rejects.append(
                (
                    img_id,
                    _reject(
                        f"{url}#ann_index:{i}",
                        DUPLICATE_ANNOTATION,
                        f"annotation id {aid} appears more than once; the first is kept.",
                        RejectLevel.INSTANCE,
                        img_id,
                    ),
                )
            )
            continue
        seen_ann_ids.add(aid)
        if img_id not in all_image_ids:
            ann_rejects.append(
                (
                    img_id,
                    _reject(
                        key,
                        ORPHAN_ANNOTATION,
                        f"annotation {aid} points at image {img_id}, which is not in images.",
                        RejectLevel.INSTANCE,
                        img_id,
                    ),
                )
            )
            continue
        anns_by_image[img_id].append(ann)

    return _Instances(
        categories=categories,
        images=images,
        image_rejects=image_rejects,
        loose_image_rejects=loose_image_rejects,
        all_image_ids=all_image_ids,
        anns_by_image=dict(anns_by_image),
        ann_rejects=ann_rejects,
        shard_rejects=shard_rejects,
    )


def _make_task(
    cfg: CocoInput | RefcocoInput | GrefcocoInput,
    source: str,
    inst: _Instances,
    image_id: int,
    refs: tuple[Ref, ...],
) -> CocoImageTask:
    file_name, width, height = inst.images[image_id]
    anns = sorted(inst.anns_by_image.get(image_id, []), key=lambda a: a["id"])
    used = {_as_int(a.get("category_id")) for a in anns}
    cats = {
        str(c.id): {"name": c.name, "supercategory": c.supercategory}
        for cid, c in inst.categories.items()
        if cid in used
    }
    return CocoImageTask(
        input_name=cfg.name,
        source=source,
        coco_image_id=image_id,
        file_name=file_name,
        width=width,
        height=height,
        image_uri=_join_uri(cfg.images, file_name),
        annotations_json=_dumps(anns),
        refs=refs,
        categories_json=_dumps(cats),
        annotations_url=display_path(cfg.annotations if isinstance(cfg, CocoInput) else cfg.instances, cfg.written_paths),
        refs_url="" if isinstance(cfg, CocoInput) else display_path(cfg.refs, cfg.written_paths),
        image_uri_shown=display_path(_join_uri(cfg.images, file_name), cfg.written_paths),
    )


# ---------------------------------------------------------------- refs


def _read_refs(url: str, shown: str = "") -> list[Any] | Reject:
    """Reads a refs file: JSON (``.json`` or sniffed) or a restricted pickle."""
    data = _read_top_level(url, "refs")
    path = url.split("?", 1)[0].lower()
    url = shown or url  # reject keys name the file as the config wrote it
    head = data.lstrip()[:1]
    as_json = path.endswith(".json") or (not path.endswith((".p", ".pkl", ".pickle")) and head in (b"[", b"{"))
    if as_json:
        try:
            doc = _parse_json(data)
        except (ValueError, RecursionError) as err:
            return _reject(url, UNREADABLE_REFS, f"the refs file is not valid JSON: {err}", RejectLevel.SHARD)
    else:
        try:
            doc = restricted_loads(data)
        except UnsafePickleError as err:
            return _reject(url, UNSAFE_PICKLE, f"the refs pickle was refused: {err}", RejectLevel.SHARD)
        except pickle.UnpicklingError as err:
            return _reject(url, UNREADABLE_REFS, f"the refs file is not a valid pickle: {err}", RejectLevel.SHARD)
    if isinstance(doc, dict) and isinstance(doc.get("refs"), list):
        doc = doc["refs"]
    if not isinstance(doc, list):
        return _reject(
            url,
            UNREADABLE_REFS,
            f"the refs file must hold a list of refs, got {type(doc).__name__}.",
            RejectLevel.SHARD,
        )
    return doc


def _int_list(value: Any) -> list[int] | None:
    """An int or a list/tuple of ints as a list; None for anything else."""
    if _as_int(value) is not None:
        return [value]
    if isinstance(value, (list, tuple)) and all(_as_int(v) is not None for v in value):
        return list(value)
    return None


def _parse_sentences(value: Any) -> tuple[RefSentence, ...] | str:
    if not isinstance(value, (list, tuple)) or not value:
        return f"sentences must be a non-empty list, got {_short(value)}."
    out = []
    for s in value:
        if not isinstance(s, dict):
            return f"a sentence must be an object, got {_short(s)}."
        sent_id = _as_int(s.get("sent_id"))
        raw, sent = s.get("raw"), s.get("sent")
        raw = raw if isinstance(raw, str) else sent
        sent = sent if isinstance(sent, str) else raw
        if sent_id is None or not isinstance(raw, str) or not isinstance(sent, str):
            return f"a sentence needs an int sent_id and a str raw or sent, got {_short(s)}."
        out.append(RefSentence(sent_id=sent_id, raw=raw, sent=sent))
    return tuple(out)


def _parse_ref(r: dict[str, Any], multi_target: bool, dataset: str) -> Ref | str:
    """Checks one raw ref; returns the ``Ref`` or a sentence saying what is wrong."""
    ref_id, image_id, split = _as_int(r.get("ref_id")), _as_int(r.get("image_id")), r.get("split")
    if ref_id is None or image_id is None or not isinstance(split, str):
        return (
            f"a ref needs int ref_id and image_id and a str split, got ref_id={_short(r.get('ref_id'))}, "
            f"image_id={_short(r.get('image_id'))}, split={_short(split)}."
        )
    ann_ids = _int_list(r.get("ann_id"))
    if ann_ids is None:
        return f"ann_id must be an int or a list of ints, got {_short(r.get('ann_id'))}."
    if ann_ids in ([], [-1]):
        ann_ids = []
    elif any(a < 0 for a in ann_ids) or len(set(ann_ids)) != len(ann_ids):
        return f"ann_id {ann_ids} mixes -1 (no target) with targets, or repeats an id."
    no_target = r.get("no_target")
    if no_target is not None and not isinstance(no_target, bool):
        return f"no_target must be a bool, got {_short(no_target)}."
    if no_target is True and ann_ids:
        return f"no_target is true but ann_id lists targets {ann_ids}."
    if not multi_target and len(ann_ids) != 1:
        return (
            f"a RefCOCO ref has exactly one target, got ann_id={_short(r.get('ann_id'))}; "
            "use an input of type grefcoco for multi-target and no-target refs."
        )
    cat_ids = _int_list(r.get("category_id"))
    if cat_ids is None:
        return f"category_id must be an int or a list of ints, got {_short(r.get('category_id'))}."
    cat_ids = [c for c in cat_ids if c != -1] if ann_ids else []
    if ann_ids and not cat_ids:
        return f"a ref with targets {ann_ids} needs a category_id."
    sentences = _parse_sentences(r.get("sentences"))
    if isinstance(sentences, str):
        return sentences
    return Ref(
        ref_id=ref_id,
        image_id=f"coco:{image_id}",
        ann_ids=tuple(ann_ids),
        category_ids=tuple(cat_ids),
        split=split,
        sentences=sentences,
        dataset=dataset,
    )


# ---------------------------------------------------------------- planning


def _plan_coco(cfg: CocoInput, inst: _Instances) -> list[CocoImageTask | Reject]:
    out: list[CocoImageTask | Reject] = []
    chosen = sorted(set(inst.images) | set(inst.image_rejects))
    if cfg.max_images is not None:
        chosen = chosen[: cfg.max_images]
    chosen_set = set(chosen)
    out.extend(r for _, r in inst.loose_image_rejects)
    for iid in chosen:
        if iid in inst.image_rejects:
            image_reject = inst.image_rejects[iid]
            out.append(image_reject)
            # Its annotations are inputs too: each one is counted as a reject.
            for ann in sorted(inst.anns_by_image.get(iid, []), key=lambda a: a["id"]):
                out.append(_annotation_with_image(cfg.annotations, ann["id"], iid, image_reject.reason))
        else:
            out.append(_make_task(cfg, "coco", inst, iid, ()))
    # Rejects of annotations on skipped (max_images) images are left out: those
    # images are not inputs of this run.
    for img_id, rej in inst.ann_rejects:
        if img_id is None or img_id not in inst.all_image_ids or img_id in chosen_set:
            out.append(rej)
    return out


def _annotation_with_image(annotations_url: str, ann_id: Any, image_id: int, image_reason: str) -> Reject:
    """The instance-level reject of an annotation whose image was rejected."""
    return _reject(
        f"{annotations_url}#ann:{ann_id}",
        IMAGE_REJECTED,
        f"annotation {ann_id} is on image {image_id}, which was rejected ({image_reason}); see the image's reject.",
        RejectLevel.INSTANCE,
        image_id,
    )


def _image_failed(task: CocoImageTask, image_reject: Reject) -> list[Reject]:
    """The image's reject followed by one reject per annotation on it."""
    anns = sorted(json.loads(task.annotations_json), key=lambda a: a["id"])
    return [image_reject] + [
        _annotation_with_image(task.annotations_url, a["id"], task.coco_image_id, image_reject.reason) for a in anns
    ]


def _plan_refs(cfg: RefcocoInput | GrefcocoInput, source: str, inst: _Instances) -> list[CocoImageTask | Reject]:
    refs_shown = display_path(cfg.refs, cfg.written_paths)
    instances_shown = display_path(cfg.instances, cfg.written_paths)
    raw_refs = _read_refs(cfg.refs, refs_shown)
    if isinstance(raw_refs, Reject):
        return [raw_refs]
    multi_target = source == "grefcoco"
    keep_splits = set(cfg.splits) if cfg.splits is not None else None
    out: list[CocoImageTask | Reject] = []
    refs_by_image: dict[int, list[Ref]] = defaultdict(list)
    seen: set[int] = set()
    for i, r in enumerate(raw_refs):
        if (
            isinstance(r, dict)
            and keep_splits is not None
            and isinstance(r.get("split"), str)
            and r["split"] not in keep_splits
        ):
            continue  # filtered by config, not a problem of the data
        rid = _in_int64(r.get("ref_id")) if isinstance(r, dict) else None
        img = _in_int64(r.get("image_id")) if isinstance(r, dict) else None
        key = f"{refs_shown}#ref:{rid}" if rid is not None else f"{refs_shown}#ref_index:{i}"
        if not isinstance(r, dict):
            out.append(_reject(key, BAD_REF, f"refs[{i}] is not an object: {_short(r)}.", RejectLevel.REF))
            continue
        problem = value_problem(r, f"refs[{i}]", _REF_LIMITS)
        if problem is None and isinstance(r.get("split"), str):
            problem = split_problem(r["split"])
        if problem is not None:
            rid_ok, img_ok = _in_int64(r.get("ref_id")), _in_int64(r.get("image_id"))
            out.append(
                _reject(
                    f"{refs_shown}#ref:{rid_ok}" if rid_ok is not None else f"{refs_shown}#ref_index:{i}",
                    problem[0],
                    problem[1],
                    RejectLevel.REF,
                    img_ok,
                )
            )
            continue
        if keep_splits is not None and not isinstance(r.get("split"), str):
            out.append(
                _reject(key, BAD_REF, f"ref split must be a str, got {_short(r.get('split'))}.", RejectLevel.REF, img)
            )
            continue
        parsed = _parse_ref(r, multi_target, cfg.dataset)
        if isinstance(parsed, str):
            out.append(_reject(key, BAD_REF, parsed, RejectLevel.REF, img))
            continue
        if parsed.ref_id in seen:
            out.append(
                _reject(
                    f"{refs_shown}#ref_index:{i}",
                    DUPLICATE_REF,
                    f"ref id {parsed.ref_id} appears more than once; the first is kept.",
                    RejectLevel.REF,
                    img,
                )
            )
            continue
        seen.add(parsed.ref_id)
        refs_by_image[img].append(parsed)  # type: ignore[index]  # img is an int once parsed

    out.extend(r for iid, r in inst.loose_image_rejects if iid in refs_by_image)
    ann_rejects_by_image: dict[int | None, list[Reject]] = defaultdict(list)
    for img_id, rej in inst.ann_rejects:
        ann_rejects_by_image[img_id].append(rej)
    n_images = 0
    for iid in sorted(refs_by_image):
        refs = sorted(refs_by_image[iid], key=lambda x: x.ref_id)
        if iid not in inst.all_image_ids:
            out.extend(
                _reject(
                    f"{refs_shown}#ref:{ref.ref_id}",
                    ORPHAN_REF,
                    f"ref {ref.ref_id} points at image {iid}, which is not in the instances file {instances_shown!r}.",
                    RejectLevel.REF,
                    iid,
                )
                for ref in refs
            )
            continue
        if cfg.max_images is not None and n_images >= cfg.max_images:
            break
        if iid in inst.image_rejects:
            image_reject = inst.image_rejects[iid]
            out.append(image_reject)
            # As for a loaded image: its annotations are inputs, counted with it.
            for ann in sorted(inst.anns_by_image.get(iid, []), key=lambda a: a["id"]):
                out.append(_annotation_with_image(cfg.instances, ann["id"], iid, image_reject.reason))
            out.extend(ann_rejects_by_image.get(iid, ()))
            n_images += 1
            continue
        ann_ids = {a["id"] for a in inst.anns_by_image.get(iid, [])}
        kept: list[Ref] = []
        for ref in refs:
            missing = [a for a in ref.ann_ids if a not in ann_ids]
            if missing:
                out.append(
                    _reject(
                        f"{refs_shown}#ref:{ref.ref_id}",
                        MISSING_ANNOTATION,
                        f"ref {ref.ref_id} targets annotations {missing}, which are not annotations "
                        f"of image {iid} in {instances_shown!r}.",
                        RejectLevel.REF,
                        iid,
                    )
                )
            else:
                kept.append(ref)
        if not kept:
            continue
        out.append(_make_task(cfg, source, inst, iid, tuple(kept)))
        out.extend(ann_rejects_by_image.get(iid, ()))
        n_images += 1
    return out


def plan_input(
    cfg: CocoInput | RefcocoInput | GrefcocoInput,
) -> tuple[list[Category], list[CocoImageTask | Reject]]:
    """Reads an input's annotation files and plans one task per image.

    Runs once per input (it reads the one big JSON, and the refs file). Tasks
    are sorted by COCO image id; ``max_images`` keeps the first ones.

    Args:
        cfg: a COCO, RefCOCO-family or gRefCOCO input.

    Returns:
        ``(categories, items)``: the category vocabulary sorted by id, and the
        tasks mixed with the shard-, image-, instance- and ref-level rejects
        found while planning.

    Raises:
        FileNotFoundError: the annotations / instances or refs file is missing.
        TypeError: ``cfg`` is not one of the three input types.
    """
    if not isinstance(cfg, (CocoInput, RefcocoInput, GrefcocoInput)):
        raise TypeError(f"ingest_coco reads coco, refcoco and grefcoco inputs, got {type(cfg).__name__}.")
    source = _SOURCE_BY_TYPE[cfg.type]
    url = cfg.annotations if isinstance(cfg, CocoInput) else cfg.instances
    inst = _parse_instances(url, display_path(url, cfg.written_paths))
    if isinstance(inst, Reject):
        return [], [inst]
    categories = [inst.categories[c] for c in sorted(inst.categories)]
    items: list[CocoImageTask | Reject] = list(inst.shard_rejects)
    if isinstance(cfg, CocoInput):
        items.extend(_plan_coco(cfg, inst))
    else:
        items.extend(_plan_refs(cfg, source, inst))
    return categories, items


# ---------------------------------------------------------------- loading


def _read_capped(f: Any, max_bytes: int) -> bytes:
    """The first ``max_bytes + 1`` bytes of an open local file (all of it if shorter).

    ``f.read(max_bytes + 1)`` alone allocates the whole cap (64 MiB by
    default) for every image before shrinking it; asking for the file's size
    plus one byte reads the same bytes. A file longer than its ``st_size``
    (one that grows, a pipe) fills the buffer asked for and is read on to the
    cap, so the result never depends on the size hint.
    """
    want = min(os.fstat(f.fileno()).st_size, max_bytes) + 1
    data = f.read(want)
    if len(data) == want and want <= max_bytes:
        data += f.read(max_bytes + 1 - want)
    return data


def _read_image(uri: str, max_bytes: int) -> bytes:
    # Read one byte past the cap so check_image can refuse it without
    # loading an arbitrarily large file.
    def read() -> bytes:
        if uri.startswith("/") and "::" not in uri:
            # A plain absolute local path: fsspec's local file would open the
            # same path with open() after ~0.2 ms of its own Python per image.
            with open(uri, "rb") as f:
                return _read_capped(f, max_bytes)
        with fsspec.open(uri, "rb") as f:
            return f.read(max_bytes + 1)

    # A transient object-store error is retried, then fails the bundle; it
    # never becomes a missing_image reject.
    return retry_transient(read, what=f"reading {uri}")


def _polygon_clearly_in_range(poly: list[Any], width: int, height: int) -> bool:
    """True when every coordinate is a plain finite int or float within the bounds.

    The fast path of ``_polygon_range_problem`` (C-level min/max instead of a
    Python loop per coordinate): True only where the per-coordinate loop would
    find no problem; anything else (bools, other types, NaN, inf, huge ints,
    a coordinate out of bounds) answers False and goes through the loop, which
    names the problem.
    """
    try:
        if not set(map(type, poly)) <= PLAIN_NUMBERS:
            return False
        # No NaN or inf (a sum of finite values that overflows only sends the
        # polygon to the loop), so min and max below are exact.
        if not math.isfinite(sum(poly)):
            return False
        xs, ys = poly[0::2], poly[1::2]
        if xs and not (-width <= min(xs) and max(xs) <= 2 * width):
            return False
        return not ys or (-height <= min(ys) and max(ys) <= 2 * height)
    except (OverflowError, TypeError, ValueError):
        return False


def _polygon_range_problem(segm: Any, width: int, height: int) -> str | None:
    """Says why polygon coordinates are unsafe to rasterise, or None.

    pycocotools rasterises a polygon by walking its edges at 5x scale in C
    ints: a coordinate such as 1e9 overflows and crashes the process (it
    segfaults), and NaN/inf give garbage. COCO polygons overshoot the image by
    a pixel or so at most, so anything beyond one image size outside it is
    refused before pycocotools sees it.
    """
    if not isinstance(segm, list):
        return None
    for poly in segm:
        if not isinstance(poly, list):
            continue  # segmentation_to_rle names the type error
        if _polygon_clearly_in_range(poly, width, height):
            continue  # the loop below would find nothing
        for j, v in enumerate(poly):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            lim = width if j % 2 == 0 else height
            if not (-lim <= v <= 2 * lim):  # also False for NaN
                axis = "x" if j % 2 == 0 else "y"
                return (
                    f"polygon {axis} coordinate {v!r} is not finite or lies more than one image size outside "
                    f"the {width}x{height} image."
                )
    return None


#: The clean-polygon path (``_clean_polygons``) takes images of at most this
#: many pixels a side: every coordinate it accepts is then a plain int or
#: float of magnitude at most 2 ** 25, which a double holds exactly.
_CLEAN_POLYGON_MAX_SIDE = 1 << 24


def _clean_polygons(segm: list[Any], width: int, height: int) -> bool:
    """True when a polygon segmentation passes every check before rasterising.

    One pass per polygon (item types, a finite sum, the coordinate bounds)
    instead of the three of ``_polygon_range_problem``, ``segmentation_to_rle``'s
    type check and ``polygons_to_rle``'s, which True implies pass:

    * every polygon is a ``list`` of plain ints and floats (no bools), at least
      6 of them and an even number, with a finite sum: so every coordinate is
      finite, ``_polygon_clearly_in_range``'s and ``_is_number_list``'s type
      tests hold and ``polygons_to_rle``'s length check passes;
    * x within ``[-width, 2 * width]`` and y within ``[-height, 2 * height]``:
      ``_polygon_range_problem`` finds nothing, and every ``float(v)`` lies
      within ``polygons_to_rle``'s bound ``2 * max(height, width) + 1``;
    * int sides of at most ``_CLEAN_POLYGON_MAX_SIDE``: every coordinate's
      magnitude is at most 2 ** 25, so pycocotools' ``np.array(p, dtype=double)``
      of the list as it is holds the same doubles as of the ``float`` copies
      ``polygons_to_rle`` passes (``rasterize_polygons``).

    Anything else answers False and takes the checks, which name the problem.
    """
    if not (
        segm
        and type(width) is int
        and type(height) is int
        and 0 < width <= _CLEAN_POLYGON_MAX_SIDE
        and 0 < height <= _CLEAN_POLYGON_MAX_SIDE
    ):
        return False
    try:
        for p in segm:
            if type(p) is not list or len(p) < 6 or len(p) % 2 or not set(map(type, p)) <= PLAIN_NUMBERS:
                return False
            # A finite sum means no NaN or inf, so min and max are exact.
            if not math.isfinite(sum(p)):
                return False
            xs, ys = p[0::2], p[1::2]
            if not (-width <= min(xs) and max(xs) <= 2 * width and -height <= min(ys) and max(ys) <= 2 * height):
                return False
    except OverflowError:  # an int too large for the float sum: the checks name it
        return False
    return True


#: ``_annotation_mask``'s result for an annotation whose checks passed.
_Masked = tuple[Rle, str, int, dict[str, str], bool]


def _annotation_mask(
    ann: dict[str, Any],
    task: CocoImageTask,
    categories: dict[int, dict[str, str]],
) -> _Masked | tuple[str, str]:
    """The checks and the mask of one raw annotation.

    Returns:
        ``(rle, mask_origin, category_id, category, iscrowd)``, or
        ``(reason, message)`` for a reject.
    """
    aid = ann["id"]
    cid = _as_int(ann.get("category_id"))
    if cid is None:
        return BAD_ANNOTATION, f"annotation {aid} needs an int category_id, got {_short(ann.get('category_id'))}."
    if "segmentation" not in ann:
        return BAD_ANNOTATION, f"annotation {aid} has no segmentation."
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or (not isinstance(iscrowd, (int, bool))):
        return BAD_ANNOTATION, f"annotation {aid} iscrowd must be 0 or 1, got {_short(iscrowd)}."
    cat = categories.get(cid)
    if cat is None:
        return UNKNOWN_CATEGORY, f"annotation {aid} has category_id {cid}, which is not in categories."
    segm = ann["segmentation"]
    clean = type(segm) is list and _clean_polygons(segm, task.width, task.height)
    if not clean:
        problem = _polygon_range_problem(segm, task.width, task.height)
        if problem is not None:
            return BAD_POLYGON, f"annotation {aid}: {problem}"
    try:
        if clean:
            rle, origin = rasterize_polygons(segm, task.height, task.width), "polygon"
        else:
            rle, origin = segmentation_to_rle(segm, task.height, task.width)
    except MaskError as err:
        return err.reason, f"annotation {aid}: {err}"
    except (ValueError, TypeError, OverflowError) as err:
        # pycocotools / ASCII decoding errors on malformed counts or sizes.
        return "bad_segmentation", f"annotation {aid} segmentation cannot be converted: {type(err).__name__}: {err}"
    return rle, origin, cid, cat, bool(iscrowd)


def _masked_instance(
    aid: int,
    task: CocoImageTask,
    masked: _Masked,
    geometry: tuple[tuple[float, float, float, float], tuple[float, float, float, float], int],
) -> Instance | tuple[str, str]:
    """The instance of an annotation whose checks passed, from its mask's geometry, or an ``empty_mask`` reject."""
    bbox_xywh, bbox_xyxy, area_px = geometry
    if area_px == 0:
        return EMPTY_MASK, f"annotation {aid} mask has no pixels."
    rle, origin, cid, cat, iscrowd = masked
    return Instance(
        f"coco:{task.coco_image_id}/ann:{aid}",
        f"coco:{task.coco_image_id}",
        rle,
        bbox_xywh,
        bbox_xyxy,
        area_px,
        cid,
        cat["name"],
        cat["supercategory"],
        iscrowd,
        source_ann_id=aid,
        mask_origin=origin,
    )


def _annotation_to_instance(
    ann: dict[str, Any],
    task: CocoImageTask,
    categories: dict[int, dict[str, str]],
) -> Instance | tuple[str, str]:
    """Converts one raw annotation; returns the instance or ``(reason, message)``.

    ``load_task`` does the same for all of an image's annotations, with the
    masks' boxes and areas computed in one batch.
    """
    masked = _annotation_mask(ann, task, categories)
    if len(masked) == 2:
        return masked  # type: ignore[return-value]
    g = instance_geometry(masked[0])  # type: ignore[arg-type]
    return _masked_instance(ann["id"], task, masked, (g["bbox_xywh"], g["bbox_xyxy"], g["area_px"]))  # type: ignore[arg-type]


def load_task(task: CocoImageTask, image_cfg: ImageConfig) -> list[ImageExample | Reject]:
    """Reads one image and converts its annotations.

    Args:
        task: a task from ``plan_input``.
        image_cfg: image size limits and verification mode.

    Returns:
        On success the ``ImageExample`` first, then the instance-level rejects
        of its bad annotations and the ref-level ``target_rejected`` rejects of
        refs that lost a target. If the image itself fails, one image-level
        reject (``missing_image`` or a ``check_image`` reason) followed by one
        ``image_rejected`` instance reject per annotation on the image.

    Raises:
        OSError: reading the image failed for a reason other than "not found"
            (network, permissions), so that the runner retries.
    """
    image_id = f"coco:{task.coco_image_id}"
    shown_uri = task.image_uri_shown or task.image_uri
    try:
        data = _read_image(task.image_uri, image_cfg.max_bytes)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return _image_failed(
            task,
            _reject(
                shown_uri,
                MISSING_IMAGE,
                f"image {task.coco_image_id} file {shown_uri!r} does not exist.",
                RejectLevel.IMAGE,
                task.coco_image_id,
            ),
        )
    try:
        info = check_image(data, image_cfg, expect_wh=(task.width, task.height))
    except ImageError as err:
        return _image_failed(
            task,
            _reject(
                shown_uri, err.reason, f"image {task.coco_image_id}: {err}", RejectLevel.IMAGE, task.coco_image_id
            ),
        )

    categories = {int(k): v for k, v in json.loads(task.categories_json).items()}
    rejects: list[Reject] = []
    instances: list[Instance] = []
    presence: list[Presence] = []
    anns = sorted(json.loads(task.annotations_json), key=lambda a: a["id"])
    masked = [_annotation_mask(ann, task, categories) for ann in anns]
    # Boxes and areas of all the masks in one batch (the same values as one
    # instance_geometry call each); rejects keep the annotations' order.
    geometries = iter(instance_geometries([m[0] for m in masked if len(m) != 2]))  # type: ignore[misc]
    for ann, m in zip(anns, masked):
        result = m if len(m) == 2 else _masked_instance(ann["id"], task, m, next(geometries))  # type: ignore[arg-type]
        if isinstance(result, Instance):
            instances.append(result)
        else:
            reason, message = result
            key = f"{task.annotations_url}#ann:{ann['id']}"
            rejects.append(_reject(key, reason, message, RejectLevel.INSTANCE, task.coco_image_id))
            cid = _as_int(ann.get("category_id"))
            if cid is not None and cid in categories:
                # The object is there even though its mask is unusable: the
                # expressions stage must still see it (uniqueness, negatives).
                cat = categories[cid]
                presence.append(
                    Presence(cid, cat["name"], cat.get("supercategory") or "", ann.get("iscrowd") == 1, key)
                )
    kept_ann_ids = {i.source_ann_id for i in instances}
    refs: list[Ref] = []
    for ref in task.refs:
        lost = [a for a in ref.ann_ids if a not in kept_ann_ids]
        if lost:
            rejects.append(
                _reject(
                    f"{task.refs_url or task.input_name}#ref:{ref.ref_id}",
                    TARGET_REJECTED,
                    f"ref {ref.ref_id} targets annotations {lost}, which were rejected; see their instance rejects.",
                    RejectLevel.REF,
                    task.coco_image_id,
                )
            )
        else:
            refs.append(ref)
    record = ImageRecord(
        image_id=image_id,
        source=task.source,
        uri=shown_uri,
        width=info.width,
        height=info.height,
        sha256=info.sha256,
        file_name=task.file_name,
    )
    example = ImageExample(
        key=safe_key(f"{task.input_name}-coco_{task.coco_image_id}"),
        image=record,
        image_bytes=data,
        instances=tuple(instances),
        refs=tuple(refs),
        input_name=task.input_name,
        presence=tuple(presence),
    )
    return [example, *rejects]


def read_input(
    cfg: CocoInput | RefcocoInput | GrefcocoInput,
    image_cfg: ImageConfig,
) -> Iterator[ImageExample | Reject | Category]:
    """Plans and loads a whole input in this process (tests and small runs).

    Args:
        cfg: a COCO, RefCOCO-family or gRefCOCO input.
        image_cfg: image size limits and verification mode.

    Yields:
        The categories first, then for each planned item in order its reject,
        or the results of ``load_task``.
    """
    categories, items = plan_input(cfg)
    yield from categories
    for item in items:
        if isinstance(item, Reject):
            yield item
        else:
            yield from load_task(item, image_cfg)
