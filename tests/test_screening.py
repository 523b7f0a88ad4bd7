"""The screening stage, the decisions store and the review summary (pure parts, no browser)."""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from orsgen.pipelines.cli import app
from orsgen.schemas.arrow import DECISION_SCHEMA, decision_to_row
from orsgen.schemas.config import ConfigError, config_from_dict, load_config
from orsgen.schemas.records import ImageExample, ImageRecord, ReviewDecision, Sample
from orsgen.stages.dataset.publish import screening_section
from orsgen.stages.dataset.review import DecisionLog
from orsgen.stages.screening import (
    DECISIONS_EVENT,
    DecisionsError,
    decisions_path,
    latest_decisions,
    read_decisions,
    screening_figures,
    screening_stage,
    summarize,
)


def _example(split: str, n: int) -> ImageExample:
    img = ImageRecord("coco:1", "coco", "x.jpg", 10, 10, "0" * 64)
    samples = tuple(Sample(f"s{i}", "coco:1", f"expr {i}", "human", (), split=split, template=f"t{i % 2}") for i in range(n))
    return ImageExample("k1", img, b"", samples=samples, split=split)


def _d(sid: str, verdict: str, reason: str = "", t: int = 1000, reviewer: str = "alice", kind: str = "human", template: str = "") -> ReviewDecision:
    return ReviewDecision(sid, verdict, reason, reviewer, t, "val", kind, template)


def test_decision_schema_mirrors_the_record():
    assert DECISION_SCHEMA.names == [f.name for f in dataclasses.fields(ReviewDecision)]


def test_stage_applies_verdicts():
    ex = _example("val", 4)
    decisions = latest_decisions([_d("s0", "accept"), _d("s1", "reject", "bad_mask"), _d("s2", "skip")])
    out, rejects, events = screening_stage(ex, decisions, frozenset())
    assert [s.sample_id for s in out.samples] == ["s0", "s2", "s3"]
    assert [s.screened for s in out.samples] == [True, False, False]
    [r] = rejects
    assert (r.source_key, r.reason, r.level, r.stage) == ("s1", "human_rejected", "sample", "screening")
    assert "bad_mask" in r.message and "alice" in r.message
    ev = dict(events)
    assert ev["screening/val/accepted"] == 1 and ev["screening/val/human_rejected"] == 1 and ev["screening/val/skipped"] == 1
    assert ev["screening/val/written"] == 3 and ev["screening/val/reason/bad_mask"] == 1 and ev["screening_decisions/matched"] == 3


def test_required_split_holds_out_unscreened():
    ex = _example("val", 3)
    decisions = latest_decisions([_d("s0", "accept"), _d("s1", "skip")])
    out, rejects, events = screening_stage(ex, decisions, frozenset({"val"}))
    assert [s.sample_id for s in out.samples] == ["s0"]
    assert {r.source_key: r.reason for r in rejects} == {"s1": "unscreened", "s2": "unscreened"}
    assert "skipped" in rejects[0].message and "never reviewed" in rejects[1].message
    # Another split is not held out.
    out2, rejects2, _ = screening_stage(_example("train", 3), decisions, frozenset({"val"}))
    assert len(out2.samples) == 3 and not rejects2
    fig = screening_figures({**dict(events), DECISIONS_EVENT: 2}, ["val"])
    v = fig["splits"]["val"]
    assert (v["samples"], v["accepted"], v["unscreened"], v["written"], v["required"], v["screened_frac"]) == (3, 1, 2, 1, True, 1.0)
    assert fig["decisions"] == {"samples": 2, "matched": 2, "unmatched": 0}


def test_latest_verdict_wins_in_any_order():
    ds = [_d("s0", "reject", "ambiguous", t=1), _d("s0", "accept", t=5), _d("s1", "skip", t=3, reviewer="bob"), _d("s1", "accept", t=3, reviewer="alice")]
    a, b = latest_decisions(ds), latest_decisions(list(reversed(ds)))
    assert a == b and a["s0"].verdict == "accept" and a["s1"].reviewer == "bob"


def test_log_parts_are_atomic_and_read_as_one(tmp_path):
    clock = iter(range(1000, 2000, 10))
    a = DecisionLog(str(tmp_path), "alice", clock_ms=lambda: next(clock))
    b = DecisionLog(str(tmp_path), "bob", clock_ms=lambda: next(clock))
    a.add("s0", "accept", "")
    b.add("s1", "reject", "wrong_target", kind="phrase", template="t1")
    a.add("s2", "skip", "")
    folder = tmp_path / "_review" / "decisions.parquet"
    (folder / ".part-junk.parquet.tmp").write_bytes(b"half a file")  # a crash mid-write leaves only this
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("part-")) == sorted([os.path.basename(a.path), os.path.basename(b.path)])
    got = read_decisions(decisions_path(str(tmp_path)))
    assert sorted((d.sample_id, d.verdict, d.reviewer) for d in got) == [("s0", "accept", "alice"), ("s1", "reject", "bob"), ("s2", "skip", "alice")]
    assert pq.read_table(folder).num_rows == 3
    # One Parquet file works as review.decisions too.
    single = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist([decision_to_row(_d("s9", "accept"))], schema=DECISION_SCHEMA), single)
    assert [d.sample_id for d in read_decisions(str(single))] == ["s9"]


def test_bad_decisions_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="review.decisions"):
        read_decisions(str(tmp_path / "nope"))
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "part-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(DecisionsError, match="not a readable Parquet"):
        read_decisions(str(folder))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([decision_to_row(_d("s0", "maybe"))], schema=DECISION_SCHEMA), bad)
    with pytest.raises(DecisionsError, match="verdict 'maybe' is invalid"):
        read_decisions(str(bad))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    with pytest.raises(DecisionsError, match="lacks column"):
        read_decisions(str(other))


def test_summary_rates_by_kind_template_reason():
    s = summarize([
        _d("a", "accept", kind="human"), _d("b", "reject", "bad_mask", kind="human"), _d("c", "accept", kind="phrase", template="p1"),
        _d("d", "skip", kind="phrase", template="p1"), _d("e", "reject", "bad_mask", kind="phrase", template="p1"),
        _d("b", "reject", "ambiguous", t=2000, kind="human"),  # changed mind: only the latest counts
    ])
    assert s["total"] == {"decided": 5, "accepted": 2, "rejected": 2, "skipped": 1, "acceptance_rate": 0.5}
    assert s["by_kind"]["human"]["acceptance_rate"] == 0.5 and s["by_kind"]["phrase"]["acceptance_rate"] == 0.5
    assert s["by_template"]["p1"]["decided"] == 3 and s["by_template"]["-"]["decided"] == 2
    assert s["by_reason"] == {"ambiguous": 1, "bad_mask": 1}
    assert summarize([])["total"]["acceptance_rate"] is None


def test_review_config(tmp_path):
    base = {"inputs": [{"type": "coco", "name": "c", "annotations": "a.json", "images": "img"}]}
    cfg = config_from_dict({**base, "review": {"decisions": "x", "require_screened_for": ["val", "test", "val"]}})
    assert cfg.review.require_screened_for == ["test", "val"] and cfg.review.active
    assert not config_from_dict(base).review.active
    with pytest.raises(ConfigError, match="review.require_screened_for"):
        config_from_dict({**base, "review": {"require_screened_for": ["../x"]}})
    with pytest.raises(ConfigError, match="review"):
        config_from_dict({**base, "review": {"decisons": "typo"}})
    (tmp_path / "c.yaml").write_text(
        "inputs: [{type: coco, name: c, annotations: a.json, images: img}]\nreview: {decisions: rev/_review/decisions.parquet}\n"
    )
    assert load_config(tmp_path / "c.yaml").review.decisions == str(tmp_path / "rev" / "_review" / "decisions.parquet")


def test_card_section():
    assert screening_section({}) == []
    lines = "\n".join(screening_section({
        "splits": {"val": {"samples": 4, "accepted": 2, "human_rejected": 1, "skipped": 0, "unscreened": 1, "written": 2,
                           "acceptance_rate": 2 / 3, "screened_frac": 1.0, "required": True, "rejected_by_reason": {"bad_mask": 1}}},
        "decisions": {"samples": 3, "matched": 3, "unmatched": 0}, "decisions_sha256": "ab",
    }))
    assert "## Human screening" in lines and "| `val` | yes | 4 | 2 | 1 | 0 | 1 | 2 | 66.7% | 100.0% |" in lines and "bad_mask" in lines


def test_cli_summary(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["review", str(tmp_path), "--summary"])
    assert res.exit_code == 2 and "no review decisions yet" in " ".join(res.output.split())
    log = DecisionLog(str(tmp_path), "alice")
    log.add("s0", "accept", "", kind="human", template="")
    log.add("s1", "reject", "bad_mask", kind="phrase", template="p1")
    res = runner.invoke(app, ["review", str(tmp_path), "--summary"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "2 sample(s) decided: 1 accepted, 1 rejected" in text and "50.0%" in text
    assert "bad_mask" in text and "phrase" in text and "p1" in text


def test_rebuild_refuses_changed_verdicts_in_same_out(tmp_path):
    """Verdicts added since a build are new input: the same --out would mix old and new shards."""
    import json

    from orsgen.pipelines.run import check_output_compatible
    from orsgen.stages.screening import decisions_digest
    from orsgen.stages.write import OutputConflictError

    DecisionLog(str(tmp_path / "ds"), "alice").add("s0", "accept", "")
    path = decisions_path(str(tmp_path / "ds"))
    cfg = config_from_dict({"inputs": [{"type": "coco", "name": "c", "annotations": "a.json", "images": "img"}], "review": {"decisions": path}})
    out = tmp_path / "out"
    out.mkdir()
    digest = decisions_digest(latest_decisions(read_decisions(path)))
    manifest = {"config_sha256": cfg.sha256(), "counts": {"screening": {"decisions_sha256": digest}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    check_output_compatible(cfg, str(out))  # same verdicts: a rerun resumes
    DecisionLog(str(tmp_path / "ds"), "bob").add("s1", "reject", "bad_mask")
    with pytest.raises(OutputConflictError, match="other review verdicts"):
        check_output_compatible(cfg, str(out))
    # run_pipeline applies the check before it claims the output (the config's
    # sha256 is unchanged: it names the decisions by path).
    from orsgen.pipelines.run import run_pipeline

    (tmp_path / "a.json").write_text("{}")
    cfg_run = config_from_dict(
        {"inputs": [{"type": "coco", "name": "c", "annotations": str(tmp_path / "a.json"), "images": str(tmp_path / "img")}],
         "review": {"decisions": path}}
    )
    manifest["config_sha256"] = cfg_run.sha256()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OutputConflictError, match="other review verdicts"):
        run_pipeline(cfg_run, str(out), show_progress=False)


def test_log_rolls_over_to_bounded_parts(tmp_path, monkeypatch):
    from orsgen.stages.dataset.review import store

    monkeypatch.setattr(store, "ROWS_PER_PART", 2)
    log = DecisionLog(str(tmp_path), "alice")
    for i in range(5):
        log.add(f"s{i}", "accept", "")
    parts = sorted(p.name for p in (tmp_path / "_review" / "decisions.parquet").iterdir())
    assert len(parts) == 3 and [pq.read_metadata(tmp_path / "_review" / "decisions.parquet" / p).num_rows for p in parts] == [2, 2, 1]
    assert len(log) == 5 and sorted(d.sample_id for d in read_decisions(decisions_path(str(tmp_path)))) == [f"s{i}" for i in range(5)]
