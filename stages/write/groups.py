"""Completed write groups: what lets a rerun skip the shuffle and the write of finished work.

When every shard of a ``(split, bucket)`` group is published, the writer
records the group in ``OUT/_meta/groups/<split>-<bucket>-of-<num_buckets>.json``:
the config's sha256, the stats of its shards, its written counts and the
duplicate copies it dropped (with their rejects). A rerun after a crash
reads these records once per job (a side input, ready before any group of
the rerun is written); examples
that belong to a recorded group are dropped right after they are keyed, so
they never cross the shuffle and the group is never opened again, and the
record stands in for the group's stats, counts and rejects, so the manifest
of a resumed run is byte-identical to that of an uninterrupted one.

A record counts only for the config that wrote it (same ``config_sha256``)
and for the same bucket count (it is in the name); anything else is ignored
and the group is written, with the usual conflict checks.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from orsgen.schemas.records import Reject, RejectLevel
from orsgen.stages.write.files import _fs_root, _write_meta
from orsgen.stages.write.plan import ShardStats

GROUPS_DIR = "_meta/groups"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class DroppedCopy:
    """A duplicate copy a group dropped: its reject and what went with it."""

    reject: Reject
    n_instances: int
    n_refs: int
    n_samples: int


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """A completed ``(split, bucket)`` group of a run.

    Attributes:
        split: the group's split.
        bucket: its bucket.
        num_buckets: the split's bucket count.
        config_sha256: ``OrsgenConfig.sha256()`` of the run that wrote it.
        stats: the stats of every shard of the group (format, then part order).
        written: ``{"images", "instances", "refs", "samples"}`` written.
        dropped: the duplicate copies the group dropped, in reject order.
    """

    split: str
    bucket: int
    num_buckets: int
    config_sha256: str
    stats: tuple[ShardStats, ...]
    written: dict[str, int]
    dropped: tuple[DroppedCopy, ...] = ()

    @property
    def key(self) -> tuple[str, int, int]:
        """The group's shuffle key, ``(split, bucket, num_buckets)``."""
        return (self.split, self.bucket, self.num_buckets)

    def to_json(self) -> bytes:
        """Canonical JSON bytes of the record."""
        data = {
            "version": _VERSION,
            "split": self.split,
            "bucket": self.bucket,
            "num_buckets": self.num_buckets,
            "config_sha256": self.config_sha256,
            "stats": [json.loads(s.to_json()) for s in self.stats],
            "written": dict(sorted(self.written.items())),
            "dropped": [
                {
                    "reject": {
                        "source_key": d.reject.source_key,
                        "stage": d.reject.stage,
                        "reason": d.reject.reason,
                        "message": d.reject.message,
                        "level": str(d.reject.level),
                        "image_id": d.reject.image_id,
                    },
                    "n_instances": d.n_instances,
                    "n_refs": d.n_refs,
                    "n_samples": d.n_samples,
                }
                for d in self.dropped
            ],
        }
        return (json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> "GroupRecord":
        """Parses record bytes.

        Raises:
            ValueError: the bytes are not a group record of this version.
        """
        try:
            obj = json.loads(data)
            if obj.get("version") != _VERSION:
                raise ValueError(f"group record version {obj.get('version')!r}, expected {_VERSION}")
            return cls(
                split=str(obj["split"]),
                bucket=int(obj["bucket"]),
                num_buckets=int(obj["num_buckets"]),
                config_sha256=str(obj["config_sha256"]),
                stats=tuple(ShardStats.from_json(json.dumps(s), skipped=True) for s in obj["stats"]),
                written={str(k): int(v) for k, v in obj["written"].items()},
                dropped=tuple(
                    DroppedCopy(
                        reject=Reject(**{**d["reject"], "level": RejectLevel(d["reject"]["level"])}),
                        n_instances=int(d["n_instances"]),
                        n_refs=int(d["n_refs"]),
                        n_samples=int(d["n_samples"]),
                    )
                    for d in obj["dropped"]
                ),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
            raise ValueError(f"not a group record: {err}") from None


def group_record_path(split: str, bucket: int, num_buckets: int) -> str:
    """A group record's path relative to the output root."""
    return f"{GROUPS_DIR}/{split}-{bucket:05d}-of-{num_buckets:05d}.json"


def write_group_record(out: str, record: GroupRecord) -> str:
    """Publishes a group's record (tmp name, then rename); call it after every shard is done.

    Returns:
        The record's path relative to ``out``.
    """
    fs, root = _fs_root(out)
    rel = group_record_path(record.split, record.bucket, record.num_buckets)
    _write_meta(fs, posixpath.join(root, rel), record.to_json())
    return rel


def read_group_records(out: str, config_sha256: str) -> dict[tuple[str, int, int], GroupRecord]:
    """Reads the completed groups of ``out`` written by the config ``config_sha256``.

    A record is trusted only if every shard it lists still has its ``.done``
    marker; a record that does not parse, or that belongs to another config,
    is ignored (its group is simply written again, with the usual checks).

    Args:
        out: the output root, any fsspec URL.
        config_sha256: this run's ``OrsgenConfig.sha256()``.

    Returns:
        ``{(split, bucket, num_buckets): record}``; empty for a new output.
    """
    fs, root = _fs_root(out)
    folder = posixpath.join(root, GROUPS_DIR)
    if not fs.exists(folder):
        return {}
    paths = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    if not paths:
        return {}
    found: dict[tuple[str, int, int], GroupRecord] = {}
    contents: dict[str, Any] = fs.cat(paths, on_error="omit") if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    markers = []
    records = []
    for path in paths:
        data = contents.get(path)
        if data is None:
            continue
        try:
            rec = GroupRecord.from_json(data)
        except ValueError:
            continue
        if rec.config_sha256 != config_sha256:
            continue
        records.append(rec)
        markers.append([posixpath.join(root, "_meta/shards", s.path) + ".done" for s in rec.stats])
    if not records:
        return {}
    # One listing of the markers instead of one existence check per shard:
    # an object store answers a listing of thousands of names in a few calls.
    shards_dir = posixpath.join(root, "_meta/shards")
    done = {posixpath.normpath(p) for p in fs.find(shards_dir) if p.endswith(".done")} if fs.exists(shards_dir) else set()
    for rec, marks in zip(records, markers):
        if all(posixpath.normpath(m) in done for m in marks):
            found[rec.key] = rec
    return found
