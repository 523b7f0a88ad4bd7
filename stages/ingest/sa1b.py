"""SA-1B ingest: streams tar shards into ``ImageExample`` records.

An SA-1B shard (``sa_000000.tar``) holds pairs ``sa_<id>.jpg`` + ``sa_<id>.json``
(member names may carry a leading ``./``). ``read_sa1b_shard`` streams the tar
from any fsspec URL with ``tarfile``'s stream mode (``r|*``): nothing is
extracted to disk, member names are never used as paths, and only the two
halves of a pair that has not yet met are held in memory. An example is
emitted as soon as both halves are there, so output order is tar order.

The shard is untrusted input. Every problem becomes a ``Reject`` with one of
the reason codes below instead of an exception; only a missing fsspec backend
(``ImportError``) or a bug escapes.

Reason codes, by ``Reject.level``:

Shard level (``source_key`` is the shard URL, or ``<url>#<member>``):
    * ``unreadable_shard``: the shard cannot be opened or is not a tar.
    * ``truncated_tar``: the stream broke mid-shard (cut file, corrupt
      header, no end-of-archive marker, an I/O error that is not transient);
      transient errors (reset, timeout, 5xx) are retried instead and, when
      they persist, fail the bundle (``TransientIOError``); what was emitted before
      stays emitted, and pending half pairs become ``unpaired_member``.
    * ``unsafe_member``: an absolute path, a ``..`` component, a backslash,
      or a link/device/FIFO member whose name is not an SA-1B pair name.
    * ``unexpected_member``: a directory or a regular file that is not
      ``sa_<digits>.jpg|json`` at the top level.
    * ``duplicate_member``: a second copy of a pair half; the first is kept.

Image level (``source_key`` is ``<url>#<member>``, ``image_id`` is ``sa1b:<id>``):
    * ``unpaired_member``: one half of a pair never met the other (end of tar,
      truncation, or it waited longer than the pending bound allows).
    * ``unsafe_member``: a link/device/FIFO named like a pair half.
    * ``json_too_large``: the JSON member is above ``MAX_JSON_BYTES``.
    * ``bad_json``: not JSON, or a missing / mistyped field (the message names
      it), or ``image.image_id`` disagrees with the member name.
    * from ``stages.ingest.images.check_image``: ``empty_image``, ``image_too_large``
      (also raised here, unread, when the member is above
      ``image.max_bytes``), ``corrupt_image``, ``image_size_mismatch``.

Instance level (``source_key`` is ``<url>#<json member>/ann:<ann id>``, or
``.../ann:index<i>`` when the id itself is unusable):
    * ``bad_annotation``: not an object, a missing or mistyped field, or a
      repeated annotation id.
    * ``empty_mask``: the mask has no pixels.
    * from ``stages.common.masks.segmentation_to_rle``: ``rle_size_mismatch``,
      ``bad_rle``, ``bad_segmentation``, ``bad_polygon``.
    * ``image_rejected``: an annotation of a pair whose JSON parsed but whose
      image failed ``check_image``; it follows the image's reject.

Accounting: every ``sa_<id>`` stem met in a shard ends as exactly one
``ImageExample`` or exactly one image-level reject, and every annotation of an
emitted image, or of an image rejected after its JSON parsed, as exactly one
``Instance`` or one instance-level reject. The
exception is ``max_images``: reading stops there, and stems not finished by
then produce nothing.
"""

from __future__ import annotations

import glob as _glob
import json
import lzma
import math
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orsgen.schemas.config import ImageConfig
from orsgen.schemas.config.base import display_path
from orsgen.schemas.records import (
    ImageExample,
    ImageRecord,
    Instance,
    Reject,
    RejectLevel,
    Rle,
    Source,
    safe_key,
)
from orsgen.stages.common.transient import ResilientFile
from orsgen.stages.ingest.images import ImageError, check_image
from orsgen.stages.ingest.validate import MAX_TEXT_CHARS, int_problem, value_problem
from orsgen.stages.common.masks import (
    MaskError,
    instance_geometries,
    instance_geometry,
    segmentation_to_rle,
    warm_runs_cache,
)

STAGE = "ingest_sa1b"

UNREADABLE_SHARD = "unreadable_shard"
TRUNCATED_TAR = "truncated_tar"
UNSAFE_MEMBER = "unsafe_member"
UNEXPECTED_MEMBER = "unexpected_member"
DUPLICATE_MEMBER = "duplicate_member"
UNPAIRED_MEMBER = "unpaired_member"
JSON_TOO_LARGE = "json_too_large"
BAD_JSON = "bad_json"
IMAGE_TOO_LARGE = "image_too_large"
BAD_ANNOTATION = "bad_annotation"
EMPTY_MASK = "empty_mask"
IMAGE_REJECTED = "image_rejected"

REASONS = (
    UNREADABLE_SHARD,
    TRUNCATED_TAR,
    UNSAFE_MEMBER,
    UNEXPECTED_MEMBER,
    DUPLICATE_MEMBER,
    UNPAIRED_MEMBER,
    JSON_TOO_LARGE,
    BAD_JSON,
    IMAGE_TOO_LARGE,
    BAD_ANNOTATION,
    EMPTY_MASK,
    IMAGE_REJECTED,
)
"""Reason codes this module emits itself; ``check_image`` and
``segmentation_to_rle`` add their own (listed in the module docstring)."""

MAX_JSON_BYTES = 256 * 1024 * 1024
"""Largest JSON member read; real SA-1B JSONs are a few MB."""

MAX_PENDING_STEMS = 64
"""Half pairs held while waiting for their partner. SA-1B puts the two halves
next to each other, so a handful suffices; the bound keeps a hostile or
shuffled tar from growing memory without limit."""

MAX_PENDING_BYTES = 1024 * 1024 * 1024
"""Bytes of half pairs held at once (see ``MAX_PENDING_STEMS``)."""

# Digits are capped so that int() never meets Python's 4300-digit limit and
# ids stay in int64 range; [0-9] rather than \d keeps out non-ASCII digits.
_MEMBER_RE = re.compile(r"(?:\./)?(sa_([0-9]{1,18}))\.(jpg|json)")

# What a broken stream can raise from tarfile and its decompressors.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    UnicodeDecodeError,
)

_MAX_SHOWN = 200
_MAX_PADDING_RECORDS = 128  # 1.25 MiB of end-of-archive padding checked at most


# ---------------------------------------------------------------- shard listing


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Expands shard URLs and globs into a sorted, deduplicated list of files.

    Works for every fsspec filesystem (local paths, ``gs://``, ``s3://``,
    ``hf://``, ``memory://``...). Local results are returned as plain absolute
    paths, remote ones as full URLs with their protocol.

    Args:
        patterns: URLs or glob patterns, e.g. ``gs://bucket/sa1b/sa_0000*.tar``.

    Returns:
        The matching files (directories are left out), sorted and unique.

    Raises:
        FileNotFoundError: a pattern matches no file.
    """
    urls: set[str] = set()
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if _glob.has_magic(path):
            found = [p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]
        else:
            found = [path] if fs.isfile(path) else []
        if not found:
            raise FileNotFoundError(
                f"shard pattern {pattern!r} matches no file; check the path or glob, "
                "and that the bucket or repository is readable with the current credentials."
            )
        is_local = isinstance(fs, LocalFileSystem)
        urls.update(p if is_local else fs.unstrip_protocol(p) for p in found)
    return sorted(urls)


# ---------------------------------------------------------------- shard reading


def read_sa1b_shard(
    url: str,
    input_name: str,
    image_cfg: ImageConfig,
    max_images: int | None = None,
    *,
    max_pending_stems: int = MAX_PENDING_STEMS,
    max_pending_bytes: int = MAX_PENDING_BYTES,
    written_paths: dict[str, str] | None = None,
) -> Iterator[ImageExample | Reject]:
    """Streams one SA-1B tar shard into examples and rejects.

    Never raises for bad data: an unreadable shard, a cut stream, hostile
    member names, corrupt images and bad annotations all come out as
    ``Reject`` records (reason codes in the module docstring).

    Args:
        url: fsspec URL or local path of the tar (``.tar``, or compressed
            ``.tar.gz`` / ``.tar.bz2`` / ``.tar.xz``).
        input_name: the config input's name; prefixes the example keys.
        image_cfg: image limits (``max_bytes`` also caps the JPEG member read).
        max_images: stop after this many good images (None: read all).
        max_pending_stems: most half pairs held while waiting for a partner;
            the oldest is rejected as ``unpaired_member`` beyond it.
        max_pending_bytes: most bytes of half pairs held at once, same rule.
        written_paths: the input's ``written_paths``: record ``uri`` values and
            reject keys name the shard as the config wrote it (relative to the
            config file's folder), so other folders give the same bytes.

    Yields:
        ``ImageExample`` records in tar order, with ``Reject`` records between
        them. Instance rejects of an image come just before its example.
    """
    if max_images is not None and max_images <= 0:
        return
    shown = display_path(url, written_paths or {})
    try:
        # Transient errors (reset, timeout, 5xx) are retried: at open and at
        # every read, which reopens the object and seeks back. When retries run
        # out TransientIOError (not an OSError) fails the bundle, and the
        # runner retries it: a network blip is never a truncated_tar reject.
        f = ResilientFile(lambda: fsspec.open(url, "rb").open(), url)
    except (OSError, ValueError) as err:
        # ValueError: fsspec's answer to a malformed URL.
        yield _shard_reject(shown, UNREADABLE_SHARD, f"the shard cannot be opened: {_short(err)}")
        return
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|*")
        except _STREAM_ERRORS as err:
            yield _shard_reject(shown, UNREADABLE_SHARD, f"the shard is not a readable tar: {_short(err)}")
            return
        with tf:
            yield from _read_stream(tf, shown, input_name, image_cfg, max_images, max_pending_stems, max_pending_bytes)


@dataclass(slots=True)
class _Half:
    """One half of a pair, read and waiting for its partner."""

    name: str
    data: bytes


@dataclass(slots=True)
class _Pending:
    parts: dict[str, _Half] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(len(h.data) for h in self.parts.values())


def _read_stream(
    tf: tarfile.TarFile,
    url: str,
    input_name: str,
    image_cfg: ImageConfig,
    max_images: int | None,
    max_pending_stems: int,
    max_pending_bytes: int,
) -> Iterator[ImageExample | Reject]:
    pending: dict[str, _Pending] = {}  # insertion order = age, for eviction
    # Stems that already have their one image-level outcome, with the halves
    # met so far: a later member for them is a duplicate or a late partner.
    # One short entry per image of the shard (~11k for SA-1B), no bytes.
    closed: dict[str, set[str]] = {}
    pending_bytes = 0
    n_good = 0
    clean_end = True

    def close(stem: str, part: str) -> None:
        closed.setdefault(stem, set()).add(part)

    while True:
        # Only tarfile work sits inside the try, so an error it catches is
        # always the stream's, never a bug in the code that builds records.
        data = b""
        try:
            member = tf.next()
            if member is None:
                clean_end = _ended_cleanly(tf)
                break
            # Stream mode cannot seek back, yet TarFile keeps every header it
            # has seen; dropping them keeps memory flat over a long shard.
            tf.members.clear()
            action, stem, part, rejects = _plan(member, url, pending, closed)
            if action == "read":
                cap = image_cfg.max_bytes if part == "jpg" else MAX_JSON_BYTES
                if member.size > cap:
                    action = "fail"
                    reason = IMAGE_TOO_LARGE if part == "jpg" else JSON_TOO_LARGE
                    limit = "image.max_bytes" if part == "jpg" else "MAX_JSON_BYTES"
                    rejects = [
                        _image_reject(
                            url,
                            member.name,
                            stem,
                            reason,
                            f"the member is {member.size} bytes, above {limit}={cap}; it was not read.",
                        )
                    ]
                else:
                    data = _read_member(tf, member)
        except _STREAM_ERRORS as err:
            yield _shard_reject(
                url,
                TRUNCATED_TAR,
                f"the tar stream broke after {n_good} good images: {_short(err)}; the rest of the shard is lost.",
            )
            for stem_left, p in pending.items():
                yield _unpaired(url, stem_left, p, "the tar stream broke before its partner arrived.")
            return

        if action == "fail":
            # The stem's one image-level outcome is this reject; its partner,
            # pending or still to come, is dropped without a second one.
            if stem in pending:
                pending_bytes -= pending.pop(stem).nbytes()
            close(stem, part)
        elif action == "late":
            close(stem, part)
        yield from rejects
        if action != "read":
            continue

        entry = pending.setdefault(stem, _Pending())
        entry.parts[part] = _Half(member.name, data)
        pending_bytes += len(data)
        if len(entry.parts) == 2:
            del pending[stem]
            pending_bytes -= entry.nbytes()
            closed[stem] = {"jpg", "json"}
            for item in _build_example(url, input_name, image_cfg, stem, entry.parts["jpg"], entry.parts["json"]):
                yield item
                if isinstance(item, ImageExample):
                    n_good += 1
                    if max_images is not None and n_good >= max_images:
                        return
            continue
        # Evict the oldest half pairs, never the one just added.
        while len(pending) > 1 and (len(pending) > max_pending_stems or pending_bytes > max_pending_bytes):
            old_stem = next(iter(pending))
            old = pending.pop(old_stem)
            pending_bytes -= old.nbytes()
            for p in old.parts:
                close(old_stem, p)
            yield _unpaired(
                url,
                old_stem,
                old,
                f"its partner did not arrive while {max_pending_stems} half pairs / "
                f"{max_pending_bytes} bytes were held; SA-1B tars keep the halves adjacent.",
            )

    if not clean_end:
        yield _shard_reject(
            url,
            TRUNCATED_TAR,
            f"the tar stream stops without an end-of-archive marker after {n_good} good images "
            "(cut at a header, or a corrupt header); the rest of the shard, if any, is lost.",
        )
    why = "the tar ended before its partner arrived." if clean_end else "the tar stream broke before its partner arrived."
    for stem_left, p in pending.items():
        yield _unpaired(url, stem_left, p, why)


def _plan(
    member: tarfile.TarInfo,
    url: str,
    pending: dict[str, _Pending],
    closed: dict[str, set[str]],
) -> tuple[str, str, str, list[Reject]]:
    """Decides what to do with a member from its header alone.

    Returns:
        ``(action, stem, part, rejects)``; action is ``read`` (a pair half to
        read), ``fail`` (the stem fails with ``rejects``), ``late`` (the
        partner of a stem already failed; dropped silently), or ``skip``
        (ignore the member, after yielding ``rejects``).
    """
    name = member.name
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        msg = f"member {_show(name)} escapes the shard root; it was not read."
        return "skip", "", "", [_shard_reject(_member_key(url, name), UNSAFE_MEMBER, msg)]
    m = _MEMBER_RE.fullmatch(name)
    if member.issym() or member.islnk() or member.isdev():
        what = "a link" if (member.issym() or member.islnk()) else "a device or FIFO"
        msg = f"member {_show(name)} is {what}, not a regular file; it was not read."
        if m is None:
            return "skip", "", "", [_shard_reject(_member_key(url, name), UNSAFE_MEMBER, msg)]
        stem, part = m.group(1), m.group(3)
        if stem in closed or (stem in pending and part in pending[stem].parts):
            # The stem already has (or will get) its outcome from another
            # member, so this one is counted at shard level only.
            return "skip", stem, part, [_shard_reject(_member_key(url, name), UNSAFE_MEMBER, msg)]
        return "fail", stem, part, [_image_reject(url, name, stem, UNSAFE_MEMBER, msg)]
    if member.isdir() and name.rstrip("/") in (".", ""):
        # `tar -C dir -cf x.tar .` writes the root itself first; harmless.
        return "skip", "", "", []
    if not member.isreg() or m is None:
        kind = "a directory" if member.isdir() else ("a regular file" if member.isreg() else "an unknown member type")
        msg = (
            f"member {_show(name)} is {kind}, not sa_<digits>.jpg or sa_<digits>.json "
            "at the top level; it was skipped."
        )
        return "skip", "", "", [_shard_reject(_member_key(url, name), UNEXPECTED_MEMBER, msg)]
    stem, part = m.group(1), m.group(3)
    if stem in closed:
        if part in closed[stem]:
            return "skip", stem, part, [_duplicate(url, name)]
        return "late", stem, part, []
    if stem in pending and part in pending[stem].parts:
        return "skip", stem, part, [_duplicate(url, name)]
    return "read", stem, part, []


def _ended_cleanly(tf: tarfile.TarFile) -> bool:
    """Tells a real end-of-archive from a stream that just stopped.

    After the first header, ``TarFile.next()`` returns None instead of raising
    when the stream ends at or inside a header, or when a header is garbage,
    so a cut shard would look complete. The end-of-archive marker is a whole
    zero block followed only by NUL padding; anything else is a broken stream.
    Stream errors while reading the padding propagate to the caller.
    """
    stream = tf.fileobj
    offset = getattr(tf, "offset", None)
    if stream is None or offset is None or not hasattr(stream, "tell"):
        return True  # a tarfile without these internals: trust its verdict
    if stream.tell() - offset != tarfile.BLOCKSIZE:
        return False  # less than one header block was left
    # A garbage header also fills a whole block; real padding is all NUL. Writers
    # pad to their record size (10 KiB by default), so a bounded look suffices.
    for _ in range(_MAX_PADDING_RECORDS):
        chunk = stream.read(tarfile.RECORDSIZE)
        if not chunk:
            return True
        if chunk.strip(b"\0"):
            return False
    return True


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fobj = tf.extractfile(member)
    if fobj is None:  # only regular files are read, so this is a tarfile surprise
        raise tarfile.ReadError(f"member {member.name!r} has no data.")
    data = fobj.read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name!r} holds {len(data)} of {member.size} bytes.")
    return data


# ---------------------------------------------------------------- pairs -> records


class _BadJson(ValueError):
    pass


class _BadAnnotation(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _build_example(
    url: str,
    input_name: str,
    image_cfg: ImageConfig,
    stem: str,
    jpg: _Half,
    js: _Half,
) -> list[ImageExample | Reject]:
    """Turns one complete pair into its example (plus instance rejects) or one reject."""
    try:
        meta, annotations = _parse_json(js.data, stem)
    except _BadJson as err:
        return [_image_reject(url, js.name, stem, BAD_JSON, f"{_show(js.name)}: {err}")]
    problem = value_problem(meta, "image", {"file_name": MAX_TEXT_CHARS})
    if problem is not None:
        return [_image_reject(url, js.name, stem, problem[0], f"{_show(js.name)}: {problem[1]}")]
    image_id = f"sa1b:{meta['image_id']}"
    try:
        info = check_image(jpg.data, image_cfg, expect_wh=(meta["width"], meta["height"]))
    except ImageError as err:
        # The annotations were read: they are inputs, so each is counted with the image.
        out_rejects = [_image_reject(url, jpg.name, stem, err.reason, str(err))]
        for index, ann in enumerate(annotations):
            ann_ref = str(ann["id"]) if isinstance(ann, dict) and _is_int(ann.get("id")) else f"index{index}"
            out_rejects.append(
                _annotation_reject(
                    url, js.name, ann_ref, image_id, IMAGE_REJECTED,
                    f"annotation {ann_ref} of {_show(js.name)} is on an image rejected as {err.reason}.",
                )
            )
        return out_rejects

    # Every mask's compressed counts decoded in one pass: validate_rle then
    # finds their runs cached instead of decoding them one by one.
    warm_runs_cache([_counts_of(ann) for ann in annotations])
    out: list[ImageExample | Reject] = []
    instances: list[Instance] = []
    seen_ids: set[int] = set()
    # Every annotation's checks and mask first, then the boxes and areas of
    # all the masks in one batch (the same values as one instance_geometry
    # call each), then the instances and rejects in annotation order.
    checked: list[tuple[str, _Checked | tuple[str, str]]] = []
    for index, ann in enumerate(annotations):
        ann_ref = f"index{index}"
        try:
            if isinstance(ann, dict) and _is_int(ann.get("id")) and int_problem(ann["id"], "") is None:
                ann_ref = str(ann["id"])
            checked.append((ann_ref, _checked_annotation(ann, height=info.height, width=info.width, seen_ids=seen_ids)))
        except _BadAnnotation as err:
            checked.append((ann_ref, (err.reason, str(err))))
    geometries = iter(instance_geometries([c[0] for _, c in checked if len(c) != 2]))  # type: ignore[misc]
    for ann_ref, c in checked:
        if len(c) != 2:
            try:
                instances.append(_checked_instance(c, image_id, next(geometries)))  # type: ignore[arg-type]
                continue
            except _BadAnnotation as err:
                c = (err.reason, str(err))
        reason, message = c  # type: ignore[misc]
        out.append(_annotation_reject(url, js.name, ann_ref, image_id, reason, f"annotation {ann_ref} of {_show(js.name)}: {message}"))
    # Tar and JSON order are the producer's; sorting by the source id makes
    # the record independent of how the JSON was written.
    instances.sort(key=lambda i: i.source_ann_id)
    record = ImageRecord(
        image_id=image_id,
        source=Source.SA1B.value,
        uri=f"{url}#{jpg.name}",
        width=info.width,
        height=info.height,
        sha256=info.sha256,
        file_name=meta["file_name"],
    )
    out.append(
        ImageExample(
            key=safe_key(f"{input_name}-sa1b_{meta['image_id']}"),
            image=record,
            image_bytes=jpg.data,
            instances=tuple(instances),
            input_name=input_name,
        )
    )
    return out


def _parse_json(data: bytes, stem: str) -> tuple[dict[str, Any], list[Any]]:
    """Parses and checks an SA-1B JSON; raises ``_BadJson`` naming the field."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _BadJson(f"not valid JSON: {_short(err)}") from None
    if not isinstance(doc, dict):
        raise _BadJson(f"the top level must be an object, got {type(doc).__name__}.")
    if "image" not in doc:
        raise _BadJson("has no field 'image'; an SA-1B JSON needs image.image_id, width, height and file_name.")
    image = doc["image"]
    if not isinstance(image, dict):
        raise _BadJson(f"'image' must be an object, got {type(image).__name__}.")
    for key in ("image_id", "width", "height", "file_name"):
        if key not in image:
            raise _BadJson(f"has no field 'image.{key}'; an SA-1B JSON needs image.image_id, width, height and file_name.")
    if not _is_int(image["image_id"]) or image["image_id"] < 0:
        raise _BadJson(f"'image.image_id' must be a non-negative integer, got {_show(image['image_id'])}.")
    for key in ("width", "height"):
        if not _is_int(image[key]) or image[key] <= 0:
            raise _BadJson(f"'image.{key}' must be a positive integer, got {_show(image[key])}.")
    if not isinstance(image["file_name"], str):
        raise _BadJson(f"'image.file_name' must be a string, got {_show(image['file_name'])}.")
    stem_id = int(stem.removeprefix("sa_"))
    if image["image_id"] != stem_id:
        # The key and every id derive from image_id; a mismatch means the pair
        # was mixed up, and trusting either side could collide with another image.
        raise _BadJson(f"'image.image_id' is {image['image_id']} but the member name says {stem_id}.")
    if "annotations" not in doc:
        raise _BadJson("has no field 'annotations'.")
    if not isinstance(doc["annotations"], list):
        raise _BadJson(f"'annotations' must be a list, got {type(doc['annotations']).__name__}.")
    return image, doc["annotations"]


def _to_instance(ann: Any, image_id: str, height: int, width: int, seen_ids: set[int]) -> Instance:
    """Builds one instance; raises ``_BadAnnotation`` with a reason code.

    ``_build_example`` does the same for all of an image's annotations, with the
    masks' boxes and areas computed in one batch.
    """
    checked = _checked_annotation(ann, height=height, width=width, seen_ids=seen_ids)
    g = instance_geometry(checked[0])
    return _checked_instance(checked, image_id, (g["bbox_xywh"], g["bbox_xyxy"], g["area_px"]))


#: ``_checked_annotation``'s result: the mask, its origin, the annotation id,
#: predicted_iou, stability_score, point_coords and crop_box.
_Checked = tuple[Rle, str, int, "float | None", "float | None", tuple[tuple[float, float], ...], "tuple[float, float, float, float] | None"]


def _checked_annotation(ann: Any, *, height: int, width: int, seen_ids: set[int]) -> _Checked:
    """The checks and the mask of one annotation; raises ``_BadAnnotation`` with a reason code."""
    if not isinstance(ann, dict):
        raise _BadAnnotation(BAD_ANNOTATION, f"must be an object, got {type(ann).__name__}.")
    problem = value_problem(ann, "the annotation")
    if problem is not None:
        raise _BadAnnotation(*problem)
    for key in ("id", "segmentation"):
        if key not in ann:
            raise _BadAnnotation(BAD_ANNOTATION, f"has no field {key!r}.")
    ann_id = ann["id"]
    if not _is_int(ann_id):
        raise _BadAnnotation(BAD_ANNOTATION, f"'id' must be an integer, got {_show(ann_id)}.")
    if ann_id in seen_ids:
        raise _BadAnnotation(BAD_ANNOTATION, f"id {ann_id} appears more than once in the image; the first is kept.")
    seen_ids.add(ann_id)

    predicted_iou = _opt_number(ann, "predicted_iou")
    stability_score = _opt_number(ann, "stability_score")
    crop_box: tuple[float, float, float, float] | None = None
    if ann.get("crop_box") is not None:
        cb = ann["crop_box"]
        if not (isinstance(cb, list) and len(cb) == 4 and all(_is_finite(v) for v in cb)):
            raise _BadAnnotation(BAD_ANNOTATION, f"'crop_box' must be [x, y, w, h] numbers, got {_show(cb)}.")
        crop_box = (float(cb[0]), float(cb[1]), float(cb[2]), float(cb[3]))
    point_coords: tuple[tuple[float, float], ...] = ()
    if ann.get("point_coords") is not None:
        pc = ann["point_coords"]
        if not (
            isinstance(pc, list)
            and all(isinstance(p, list) and len(p) == 2 and all(_is_finite(v) for v in p) for p in pc)
        ):
            raise _BadAnnotation(BAD_ANNOTATION, f"'point_coords' must be a list of [x, y] numbers, got {_show(pc)}.")
        point_coords = tuple((float(p[0]), float(p[1])) for p in pc)

    try:
        rle, origin = segmentation_to_rle(ann["segmentation"], height, width)
    except MaskError as err:
        raise _BadAnnotation(err.reason, str(err)) from None
    except UnicodeError:
        # validate_rle encodes counts as ASCII; anything else is not COCO RLE.
        raise _BadAnnotation("bad_rle", "compressed RLE counts hold non-ASCII characters.") from None
    return rle, origin, ann_id, predicted_iou, stability_score, point_coords, crop_box


def _checked_instance(
    checked: _Checked,
    image_id: str,
    geometry: tuple[tuple[float, float, float, float], tuple[float, float, float, float], int],
) -> Instance:
    """The instance of an annotation whose checks passed; raises ``_BadAnnotation`` for an empty mask."""
    bbox_xywh, bbox_xyxy, area_px = geometry
    if area_px == 0:
        raise _BadAnnotation(EMPTY_MASK, "the mask has no pixels.")
    rle, origin, ann_id, predicted_iou, stability_score, point_coords, crop_box = checked
    return Instance(
        instance_id=f"{image_id}/ann:{ann_id}",
        image_id=image_id,
        rle=rle,
        bbox_xywh=bbox_xywh,
        bbox_xyxy=bbox_xyxy,
        area_px=area_px,
        predicted_iou=predicted_iou,
        stability_score=stability_score,
        point_coords=point_coords,
        crop_box=crop_box,
        source_ann_id=ann_id,
        mask_origin=origin,
    )


# ---------------------------------------------------------------- small helpers


def _counts_of(ann: Any) -> Any:
    """``ann["segmentation"]["counts"]`` if the annotation has that shape, else None (checked later)."""
    segm = ann.get("segmentation") if isinstance(ann, dict) else None
    return segm.get("counts") if isinstance(segm, dict) else None


def _is_int(v: Any) -> bool:
    # bool is an int subclass, and JSON true must not pass as an id.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    # Python's json accepts NaN and Infinity, which no score or box may be.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt_number(ann: dict[str, Any], key: str) -> float | None:
    v = ann.get(key)
    if v is None:
        return None
    if not _is_finite(v):
        raise _BadAnnotation(BAD_ANNOTATION, f"{key!r} must be a finite number, got {_show(v)}.")
    return float(v)


def _show(v: Any) -> str:
    """A bounded, printable repr for messages (names and values are untrusted)."""
    s = ascii(v)
    return s if len(s) <= _MAX_SHOWN else s[: _MAX_SHOWN - 3] + "..."


def _short(err: BaseException) -> str:
    s = f"{type(err).__name__}: {err}"
    return s if len(s) <= 2 * _MAX_SHOWN else s[: 2 * _MAX_SHOWN - 3] + "..."


def _member_key(url: str, name: str) -> str:
    # Hostile names may hold control characters or lone surrogates (tarfile
    # decodes with surrogateescape), which would break UTF-8 writers later.
    shown = name if (name.isprintable() and name.isascii()) else ascii(name)[1:-1]
    return f"{url}#{shown[:_MAX_SHOWN]}"


def _shard_reject(source_key: str, reason: str, message: str) -> Reject:
    return Reject(source_key=source_key, stage=STAGE, reason=reason, message=message, level=RejectLevel.SHARD)


def _image_reject(url: str, name: str, stem: str, reason: str, message: str) -> Reject:
    return Reject(
        source_key=_member_key(url, name),
        stage=STAGE,
        reason=reason,
        message=message,
        level=RejectLevel.IMAGE,
        image_id=f"sa1b:{int(stem.removeprefix('sa_'))}",
    )


def _annotation_reject(url: str, name: str, ann_ref: str, image_id: str, reason: str, message: str) -> Reject:
    """An instance-level reject of annotation ``ann_ref`` of the JSON member ``name``."""
    return Reject(
        source_key=f"{_member_key(url, name)}/ann:{ann_ref}",
        stage=STAGE,
        reason=reason,
        message=message,
        level=RejectLevel.INSTANCE,
        image_id=image_id,
    )


def _duplicate(url: str, name: str) -> Reject:
    return _shard_reject(
        _member_key(url, name),
        DUPLICATE_MEMBER,
        f"member {_show(name)} repeats a pair half already met in this shard; the first copy is kept.",
    )


def _unpaired(url: str, stem: str, entry: _Pending, why: str) -> Reject:
    half = next(iter(entry.parts.values()))
    missing = "json" if "jpg" in entry.parts else "jpg"
    return _image_reject(url, half.name, stem, UNPAIRED_MEMBER, f"{_show(half.name)} has no {stem}.{missing}: {why}")
