"""A persistent, content-addressed cache of SAM2 predictions.

SAM2 verification is, with the VLM, the dominant cost of a full SA-1B pass
(GPU time), so a rerun after a crash must not send an image through SAM2
again when its predictions are already known. The key is the sha256 of
everything that determines SAM2's answer for one image:

* the sha256 of the encoded image bytes (computed from the bytes, never taken
  from the record, so a wrong digest cannot make two images share an entry);
* the prompts exactly as sent (instance id, box, points, multimask mode);
* the model identity (``model_fingerprint``): backend, checkpoint path or hub
  id, Meta's config name, and for a local checkpoint the names and sizes of
  its files (plus the bytes of its small config files); the settings that
  change the masks (``device``, ``dtype``, ``mask_threshold``);
* ``CACHE_FORMAT``, bumped whenever the entry layout or the meaning of a
  prediction changes.

Batch sizes (``images_per_batch``, ``prompts_per_batch``) and model sharing
are throughput settings and are not part of the key.

An entry stores exactly what the apply step consumes: per prompt, SAM2's
candidate masks (COCO RLE) and predicted IoUs, as gzipped JSON. Python's
JSON writes floats by ``repr``, which reads back to the same double, so a
replayed prediction is bit-identical and the rerun's output and report are
byte-identical.

Entries live at ``ROOT/ab/cdef....json.gz`` (normally ``OUT/_cache/sam2``;
fsspec: local, ``gs://``, ``s3://``). Writes are atomic: a local entry goes to
a unique temporary name and is renamed; an object-store object appears whole
when its upload completes. Concurrent writers of one key write the same
predictions, so the last rename wins harmlessly. Only successful inferences
are stored: a failed batch (a dead letter) leaves no entry, so a later run
tries again. A missing entry is a miss; an unreadable, torn or foreign one is
a miss too (logged and counted), and the next store replaces it. Transient
object-store errors are retried with backoff and then fail the bundle
(``retry_transient``), never turning into misses or rejects.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from orsgen.schemas.records import Rle
from orsgen.stages.common.cache_files import KeyedFileCache, publish_entry
from orsgen.stages.common.transient import retry_transient
from orsgen.stages.verify.backend import Sam2Prediction, Sam2Prompt

log = logging.getLogger(__name__)

#: Version of the key material and the entry layout.
CACHE_FORMAT = 1

#: Local checkpoint files up to this size are hashed whole (configs); larger
#: ones (weights) by name and size only, so a worker does not read GBs at setup.
SMALL_FILE_MAX_BYTES = 1 << 20



def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def model_fingerprint(
    model: str,
    *,
    backend: str,
    meta_model_cfg: str | None,
    device: str,
    dtype: str,
    mask_threshold: float,
) -> dict[str, Any]:
    """The settings that determine SAM2's masks for a given image and prompt.

    For a local checkpoint (a folder or a ``.pt`` file) the names and sizes
    of its files are included, and the bytes of its small files (the model
    and processor configs), so a checkpoint replaced in place misses. A hub
    id is taken as it is: pin a revision in a local copy if the hub model may
    change under the same id.

    Args:
        model: checkpoint path or hub id (``verify_sam2.model``).
        backend: ``transformers`` or ``meta``.
        meta_model_cfg: Meta's config name, or None.
        device: the configured device (``auto``, ``cpu``, ``cuda``...).
        dtype: the configured dtype.
        mask_threshold: the logit threshold of the binary masks.

    Returns:
        A JSON-serialisable dict.
    """
    files: list[list[Any]] = []
    if os.path.isdir(model):
        for dirpath, dirnames, filenames in os.walk(model):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                files.append(_file_entry(path, os.path.relpath(path, model)))
    elif os.path.isfile(model):
        files.append(_file_entry(model, os.path.basename(model)))
    return {
        "backend": backend,
        "model": model,
        "model_files": files,
        "meta_model_cfg": meta_model_cfg,
        "device": device,
        "dtype": dtype,
        "mask_threshold": float(mask_threshold),
    }


def _file_entry(path: str, rel: str) -> list[Any]:
    size = os.path.getsize(path)
    if size <= SMALL_FILE_MAX_BYTES:
        with open(path, "rb") as f:
            return [rel.replace(os.sep, "/"), size, hashlib.sha256(f.read()).hexdigest()]
    return [rel.replace(os.sep, "/"), size, None]


def fingerprint_of(cfg: Any) -> dict[str, Any]:
    """``model_fingerprint`` of a ``VerifySam2Config``."""
    return model_fingerprint(
        cfg.model,
        backend=cfg.backend,
        meta_model_cfg=cfg.meta_model_cfg,
        device=cfg.device,
        dtype=cfg.dtype,
        mask_threshold=cfg.mask_threshold,
    )


def _prompt_material(p: Sam2Prompt) -> list[Any]:
    return [p.instance_id, [float(v) for v in p.box_xyxy], [[float(x), float(y)] for x, y in p.points_xy], bool(p.multimask_output)]


def sam2_cache_key(image_bytes: bytes, prompts: Sequence[Sam2Prompt], fingerprint: dict[str, Any]) -> str:
    """The content address of one image's SAM2 predictions.

    Args:
        image_bytes: the encoded image, as sent to SAM2.
        prompts: the image's prompts, in the order sent.
        fingerprint: ``model_fingerprint(...)``.

    Returns:
        64 hex characters.
    """
    material = {
        "format": CACHE_FORMAT,
        "image_sha256": hashlib.sha256(image_bytes).hexdigest(),
        "prompts": [_prompt_material(p) for p in prompts],
        "model": fingerprint,
    }
    return hashlib.sha256(_json_bytes(material)).hexdigest()


def _prediction_to_json(p: Sam2Prediction) -> dict[str, Any]:
    return {
        "instance_id": p.instance_id,
        "multimask_output": bool(p.multimask_output),
        "masks": [m.to_json() for m in p.masks],
        "pred_ious": [float(v) for v in p.pred_ious],
    }


def _prediction_from_json(d: dict[str, Any], prompt: Sam2Prompt) -> Sam2Prediction:
    """One stored prediction, checked against the prompt it must answer."""
    if d["instance_id"] != prompt.instance_id or bool(d["multimask_output"]) != prompt.multimask_output:
        raise ValueError("entry answers other prompts")
    masks = d["masks"]
    ious = d["pred_ious"]
    if not isinstance(masks, list) or not isinstance(ious, list) or not masks or len(masks) != len(ious):
        raise ValueError("entry has no masks or a score per mask missing")
    rles = []
    for m in masks:
        h, w = m["size"]
        if not isinstance(m["counts"], str) or not (isinstance(h, int) and isinstance(w, int)) or h < 0 or w < 0:
            raise ValueError("entry holds a malformed RLE")
        rles.append(Rle(size=(h, w), counts=m["counts"]))
    scores = []
    for v in ious:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError("entry holds a non-numeric score")
        scores.append(float(v))
    return Sam2Prediction(
        instance_id=prompt.instance_id,
        multimask_output=prompt.multimask_output,
        masks=tuple(rles),
        pred_ious=tuple(scores),
    )


class Sam2ResultCache(KeyedFileCache):
    """SAM2 predictions stored as one small gzipped JSON file per image.

    Args:
        root: folder or fsspec URL, e.g. ``OUT/_cache/sam2``.

    Attributes:
        hits, misses, writes, corrupt: counters of this instance.
    """

    SUFFIX = ".json.gz"
    WHAT = "SAM2 cache"

    def get(self, key: str, prompts: Sequence[Sam2Prompt]) -> tuple[Sam2Prediction, ...] | None:
        """The stored predictions for ``prompts``, or None (a miss).

        A missing entry is a miss; so is one that cannot be read or does not
        answer exactly these prompts (logged, counted in ``corrupt``).

        Raises:
            TransientIOError: the store kept failing transiently.
        """
        path = self.path_of(key)

        def read() -> bytes:
            with self._fs.open(path, "rb") as f:
                return f.read()

        try:
            raw = retry_transient(read, what=f"reading SAM2 cache entry {self.root}/{key[:2]}/{key[2:]}{self.SUFFIX}")
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except (OSError, ValueError) as err:
            # Not transient (retry_transient re-raises those as TransientIOError, a
            # RuntimeError): a permission or format problem of this one entry.
            return self._corrupt(path, err)
        try:
            data = json.loads(gzip.decompress(raw).decode("utf-8"))
            if data.get("format") != CACHE_FORMAT or data.get("key") != key:
                raise ValueError("entry does not match its key or format")
            preds = data["predictions"]
            if not isinstance(preds, list) or len(preds) != len(prompts):
                raise ValueError(f"entry holds {len(preds)} predictions for {len(prompts)} prompts")
            out = tuple(_prediction_from_json(d, p) for d, p in zip(preds, prompts))
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            return self._corrupt(path, err)
        self._count(hits=1)
        return out

    def _corrupt(self, path: str, err: BaseException) -> None:  # always a miss
        # A torn or foreign file: a miss; the next put replaces it.
        log.warning("ignoring unreadable SAM2 cache entry %s: %s", path, err)
        self._count(corrupt=1, misses=1)
        return None

    def put(self, key: str, image_sha256: str, predictions: Sequence[Sam2Prediction]) -> None:
        """Stores one image's predictions atomically.

        Args:
            key: ``sam2_cache_key(...)`` of the image and prompts.
            image_sha256: the image's digest (stored for humans).
            predictions: one prediction per prompt, in prompt order.

        Raises:
            TransientIOError: the store kept failing transiently.
            OSError: the cache cannot be written (a clear sentence names the key).
        """
        entry = {
            "format": CACHE_FORMAT,
            "key": key,
            "image_sha256": image_sha256,
            "predictions": [_prediction_to_json(p) for p in predictions],
        }
        # mtime=0: the same predictions give the same bytes.
        data = gzip.compress(_json_bytes(entry), compresslevel=6, mtime=0)
        path = self.path_of(key)
        try:
            retry_transient(lambda: self._write(path, data), what=f"writing SAM2 cache entry {path}")
        except OSError as err:
            raise OSError(
                f"cannot write the SAM2 cache entry {path} ({type(err).__name__}: {err}); make the cache folder "
                "writable, point verify_sam2.cache_dir somewhere writable, or set verify_sam2.cache=false."
            ) from err
        self._count(writes=1)

    def _write(self, path: str, data: bytes) -> None:
        publish_entry(self._fs, path, data, local=self._local)

