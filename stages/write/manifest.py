"""The manifest: every input accounted for, per level, from the shards' stats."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any


from orsgen.stages.write.plan import MANIFEST_NAME, REJECTS_FORMAT, ShardStats
from orsgen.stages.write.files import _HashingWriter, _fs_root, _write_new

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------ manifest


def build_manifest(
    *,
    name: str,
    config: dict[str, Any],
    config_sha256: str,
    version: str,
    shard_stats: Sequence[ShardStats],
    counts: dict[str, Any],
) -> dict[str, Any]:
    """Builds the run manifest from the shard stats.

    Split totals are counted once per split: both formats hold the same
    examples, so one format's shards are summed (they must agree).

    Args:
        name: the dataset name.
        config: the resolved config (``model_dump(mode="json")``).
        config_sha256: ``OrsgenConfig.sha256()``.
        version: the orsgen version that wrote the output.
        shard_stats: stats of every data and rejects shard of the run.
        counts: the pipeline's reconciliation counters, embedded as is.

    Returns:
        The manifest, with sorted keys and no timestamps, so that the same
        run gives the same manifest.

    Raises:
        ValueError: two formats of one split disagree on their totals.
    """
    per_format: dict[str, dict[str, dict[str, Any]]] = {}
    rejects: Counter[str] = Counter()
    for s in shard_stats:
        if s.format == REJECTS_FORMAT:
            rejects.update(s.rejects_by_reason)
            continue
        tot = per_format.setdefault(s.split, {}).setdefault(
            s.format, {"images": 0, "samples": 0, "samples_by_kind": Counter()}
        )
        tot["images"] += s.n_images
        tot["samples"] += s.n_samples
        tot["samples_by_kind"].update(s.samples_by_kind)

    splits: dict[str, Any] = {}
    for split, by_format in sorted(per_format.items()):
        views = [
            {"images": t["images"], "samples": t["samples"], "samples_by_kind": dict(sorted(t["samples_by_kind"].items()))}
            for _, t in sorted(by_format.items())
        ]
        if any(v != views[0] for v in views[1:]):
            raise ValueError(
                f"split {split!r}: formats {sorted(by_format)} disagree on their totals ({views}); "
                "pass the stats of every shard of the run, from the same run."
            )
        splits[split] = views[0]

    shards = [
        {
            "path": s.path,
            "format": s.format,
            "split": s.split,
            "sha256": s.sha256,
            "n_bytes": s.n_bytes,
            "n_images": s.n_images,
            "n_samples": s.n_samples,
        }
        for s in sorted(shard_stats, key=lambda s: s.path)
    ]
    manifest = {
        "name": name,
        "orsgen_version": version,
        "config_sha256": config_sha256,
        "config": config,
        "counts": counts,
        "splits": splits,
        "rejects_by_reason": dict(sorted(rejects.items())),
        "shards": shards,
    }
    # A round trip through canonical JSON sorts every nested key and turns
    # tuples into lists, so the dict equals what write_manifest stores.
    return json.loads(_manifest_bytes(manifest))


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(out: str, manifest: dict[str, Any]) -> str:
    """Writes ``out/manifest.json`` (sorted keys, indented, UTF-8).

    An existing manifest with the same bytes is left as is; one with other
    bytes is never overwritten.

    Args:
        out: the output root, any fsspec URL.
        manifest: from ``build_manifest``.

    Returns:
        The manifest's location, ``out`` joined with ``manifest.json``.

    Raises:
        OutputConflictError: a different manifest is already there.
    """
    fs, root = _fs_root(out)
    data = _manifest_bytes(manifest)

    def produce(sink: _HashingWriter) -> None:
        sink.write(data)

    _write_new(fs, posixpath.join(root, MANIFEST_NAME), produce)
    return out.rstrip("/") + "/" + MANIFEST_NAME
