"""Human screening: the verdicts of ``orsgen review`` applied to a build.

A person judges samples of a finished dataset in the browser (``orsgen
review``, ``stages/dataset/review/``); every verdict lands in
``DIR/_review/decisions.parquet``, a folder of Parquet part files (one per
review session, so two reviewers never write the same file). A later build
names that folder in ``review.decisions`` and this stage applies it, after
the splits are known:

* a rejected sample becomes a sample-level reject ``human_rejected`` whose
  message carries the reviewer's reason;
* an accepted sample is written with ``screened: true``;
* in a split of ``review.require_screened_for``, every other sample (never
  judged, or skipped) is held out as a sample-level reject ``unscreened``.

Sample ids are stable across builds of the same config and inputs, which is
what lets a verdict given on one build apply to the next. Everything here but
``read_decisions`` is pure.
"""

from __future__ import annotations

import datetime as _dt
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import pyarrow.parquet as pq

from orsgen.schemas.arrow import DECISION_SCHEMA, decision_from_row
from orsgen.schemas.records import ImageExample, Reject, RejectLevel, ReviewDecision, Verdict

STAGE = "screening"
HUMAN_REJECTED = "human_rejected"
UNSCREENED = "unscreened"
REVIEW_DIR = "_review"
DECISIONS_NAME = "decisions.parquet"
#: Event prefix of the per-split screening figures (``screening/<split>/<what>``).
EVENT_PREFIX = "screening"
#: Event of the number of distinct samples the decisions judge (emitted once per build).
DECISIONS_EVENT = "screening_decisions/samples"

#: Reject reasons offered by the review page (keys 1..n); free text is allowed
#: too and counts as ``other`` in the manifest (free text must not become keys).
REASON_CODES: dict[str, str] = {
    "wrong_target": "the mask or box is not what the expression refers to",
    "ambiguous": "the expression fits more than one object, or none",
    "bad_mask": "mask quality: leaks, holes, or misses part of the object",
    "bad_expression": "the expression is wrong, unreadable or ungrammatical",
    "unsafe": "offensive or unsafe content",
}


class DecisionsError(ValueError):
    """A decisions file cannot be read or holds an invalid row."""


def decisions_path(root: str) -> str:
    """``DIR/_review/decisions.parquet`` of an output folder."""
    return posixpath.join(str(root).rstrip("/"), REVIEW_DIR, DECISIONS_NAME)


def _part_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    if fs.isdir(path):
        # Temp files of a part being written start with "."; they never count.
        return sorted(
            p for p in fs.ls(path, detail=False)
            if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
        )
    return [path]


def read_decisions(path: str) -> list[ReviewDecision]:
    """Every verdict under ``path``, in part-file then row order.

    Args:
        path: a decisions folder (``DIR/_review/decisions.parquet``) or one
            Parquet file of ``DECISION_SCHEMA``; any fsspec URL.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DecisionsError: a part is not a decisions file, or a row is invalid.
    """
    fs, p = fsspec.core.url_to_fs(str(path))
    if not fs.exists(p):
        raise FileNotFoundError(
            f"the decisions {path!r} (review.decisions) do not exist; run `orsgen review DIR` first, "
            "and point review.decisions at DIR/_review/decisions.parquet."
        )
    out: list[ReviewDecision] = []
    for part in _part_files(fs, p):
        try:
            with fs.open(part, "rb") as f:
                table = pq.read_table(f)
        except Exception as err:  # noqa: BLE001 - any Arrow error means the same thing here
            raise DecisionsError(f"{part} is not a readable Parquet file ({err}); move it out of {path} and rebuild.") from None
        missing = [n for n in ("sample_id", "verdict", "time_ms") if n not in table.column_names]
        if missing:
            raise DecisionsError(f"{part} lacks column(s) {missing}; it is not an orsgen decisions file.")
        for i, row in enumerate(table.to_pylist()):
            d = decision_from_row({n: row.get(n) for n in DECISION_SCHEMA.names})
            if not d.sample_id or d.verdict not in tuple(Verdict):
                raise DecisionsError(
                    f"{part} row {i}: sample_id {d.sample_id!r} with verdict {d.verdict!r} is invalid "
                    f"(verdicts: {[str(v) for v in Verdict]})."
                )
            out.append(d)
    return out


def latest_decisions(decisions: Iterable[ReviewDecision]) -> dict[str, ReviewDecision]:
    """One verdict per sample: the latest; ties broken by reviewer, verdict and reason.

    The tie-break makes the result the same whatever order the part files
    are read in.
    """
    best: dict[str, ReviewDecision] = {}
    for d in decisions:
        cur = best.get(d.sample_id)
        if cur is None or (d.time_ms, d.reviewer, d.verdict, d.reason) > (cur.time_ms, cur.reviewer, cur.verdict, cur.reason):
            best[d.sample_id] = d
    return best


def reason_bucket(reason: str) -> str:
    """A reason code as is; free text as ``other``."""
    return reason if reason in REASON_CODES else "other"


def _iso(ms: int) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def screening_stage(
    ex: ImageExample,
    decisions: Mapping[str, ReviewDecision],
    require_screened_for: frozenset[str] | set[str],
) -> tuple[ImageExample, list[Reject], list[tuple[str, int]]]:
    """Applies the verdicts to one example whose split is set.

    Args:
        ex: the example, after the splits stage.
        decisions: the latest verdict per sample id.
        require_screened_for: splits that keep only accepted samples.

    Returns:
        ``(example, rejects, events)``. The image is always kept (its
        instances stay useful); the events are the per-split figures of the
        manifest (``screening/<split>/<what>``).
    """
    split = ex.split
    required = split in require_screened_for
    kept, rejects = [], []
    ev: Counter[str] = Counter()
    pre = f"{EVENT_PREFIX}/{split}"
    for s in ex.samples:
        ev[f"{pre}/samples"] += 1
        d = decisions.get(s.sample_id)
        if d is not None:
            ev["screening_decisions/matched"] += 1
        if d is not None and d.verdict == Verdict.REJECT:
            reason = d.reason or "no reason given"
            rejects.append(
                Reject(
                    s.sample_id, STAGE, HUMAN_REJECTED,
                    f"rejected by reviewer {d.reviewer or '?'} at {_iso(d.time_ms)}: {reason}",
                    RejectLevel.SAMPLE, ex.image.image_id,
                )
            )
            ev[f"{pre}/human_rejected"] += 1
            ev[f"{pre}/reason/{reason_bucket(d.reason)}"] += 1
            continue
        if d is not None and d.verdict == Verdict.ACCEPT:
            ev[f"{pre}/accepted"] += 1
            ev[f"{pre}/written"] += 1
            kept.append(s if s.screened else _screened(s))
            continue
        if d is not None:
            ev[f"{pre}/skipped"] += 1
        if required:
            why = "was skipped by its reviewer" if d is not None else "was never reviewed"
            rejects.append(
                Reject(
                    s.sample_id, STAGE, UNSCREENED,
                    f"split {split!r} requires screened samples (review.require_screened_for) and this sample {why}; "
                    "review it with `orsgen review` and rebuild.",
                    RejectLevel.SAMPLE, ex.image.image_id,
                )
            )
            ev[f"{pre}/unscreened"] += 1
            continue
        ev[f"{pre}/written"] += 1
        kept.append(s)
    out = ex if len(kept) == len(ex.samples) and all(a is b for a, b in zip(kept, ex.samples)) else ex.replace(samples=tuple(kept))
    return out, rejects, sorted(ev.items())


def _screened(sample: Any) -> Any:
    import dataclasses

    return dataclasses.replace(sample, screened=True)


def screening_figures(events: Mapping[str, int], require_screened_for: Iterable[str] = ()) -> dict[str, Any]:
    """The manifest's ``counts.screening``: per split, and how many verdicts matched.

    Args:
        events: the run's summed events.
        require_screened_for: the splits that required screening.

    Returns:
        ``{"splits": {split: {samples, accepted, human_rejected, skipped,
        unscreened, written, screened_frac, acceptance_rate, required,
        rejected_by_reason}}, "decisions": {samples, matched, unmatched}}``;
        empty when the stage did not run.
    """
    required = set(require_screened_for)
    splits: dict[str, dict[str, Any]] = {}
    for key, n in events.items():
        if not key.startswith(EVENT_PREFIX + "/"):
            continue
        _, split, what = key.split("/", 2)
        v = splits.setdefault(split, {"rejected_by_reason": {}})
        if what.startswith("reason/"):
            v["rejected_by_reason"][what.split("/", 1)[1]] = n
        else:
            v[what] = n
    if not splits and DECISIONS_EVENT not in events:
        return {}
    for split, v in splits.items():
        for k in ("samples", "accepted", "human_rejected", "skipped", "unscreened", "written"):
            v.setdefault(k, 0)
        judged = v["accepted"] + v["human_rejected"]
        v["acceptance_rate"] = round(v["accepted"] / judged, 6) if judged else None
        v["screened_frac"] = round(v["accepted"] / v["written"], 6) if v["written"] else None
        v["required"] = split in required
        v["rejected_by_reason"] = dict(sorted(v["rejected_by_reason"].items()))
    total = int(events.get(DECISIONS_EVENT, 0))
    matched = int(events.get("screening_decisions/matched", 0))
    return {
        "splits": dict(sorted(splits.items())),
        "decisions": {"samples": total, "matched": matched, "unmatched": max(0, total - matched)},
    }


def summarize(decisions: Iterable[ReviewDecision]) -> dict[str, Any]:
    """Acceptance rates of a review, by kind, template, split, reviewer and reason.

    Args:
        decisions: every verdict (only the latest per sample counts).

    Returns:
        ``{"total": {...}, "by_kind": {k: {...}}, "by_template": ..., "by_split": ...,
        "by_reviewer": ..., "by_reason": {reason: n}}``; each ``{...}`` holds
        ``decided, accepted, rejected, skipped, acceptance_rate`` where the rate
        is accepted / (accepted + rejected), or None before any verdict.
    """
    latest = latest_decisions(decisions)

    def empty() -> dict[str, Any]:
        return {"decided": 0, "accepted": 0, "rejected": 0, "skipped": 0}

    groups: dict[str, dict[str, dict[str, Any]]] = {"by_kind": {}, "by_template": {}, "by_split": {}, "by_reviewer": {}}
    total = empty()
    by_reason: Counter[str] = Counter()
    for d in latest.values():
        slot = {Verdict.ACCEPT: "accepted", Verdict.REJECT: "rejected", Verdict.SKIP: "skipped"}[Verdict(d.verdict)]
        keys = {"by_kind": d.kind or "?", "by_template": d.template or "-", "by_split": d.split or "?", "by_reviewer": d.reviewer or "?"}
        for g, k in keys.items():
            row = groups[g].setdefault(k, empty())
            row["decided"] += 1
            row[slot] += 1
        total["decided"] += 1
        total[slot] += 1
        if d.verdict == Verdict.REJECT:
            by_reason[d.reason or "(none)"] += 1

    def rate(row: dict[str, Any]) -> dict[str, Any]:
        judged = row["accepted"] + row["rejected"]
        return {**row, "acceptance_rate": row["accepted"] / judged if judged else None}

    out: dict[str, Any] = {"total": rate(total)}
    for g, rows in groups.items():
        out[g] = {k: rate(v) for k, v in sorted(rows.items())}
    out["by_reason"] = dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def decisions_digest(decisions: Mapping[str, ReviewDecision]) -> str:
    """Hex sha256 of the applied verdicts (sorted, canonical JSON), for the manifest."""
    import hashlib

    from orsgen.schemas.records import canonical_json

    rows = [decisions[k] for k in sorted(decisions)]
    return hashlib.sha256(canonical_json(rows)).hexdigest()
