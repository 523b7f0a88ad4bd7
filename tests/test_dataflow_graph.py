"""The shipped SA-1B configs translate for Dataflow offline, with one shuffle of whole records.

``DataflowRunner --dry_run=True`` applies Dataflow's overrides, stages the
dependencies locally and builds the job proto, then returns without a
client: no project, bucket or credentials are touched (fake ones are given).
The SA-1B shard globs point at an in-memory filesystem so the graph can be
built here. How a shuffle is judged to carry records is documented in
``pipelines/dataflow_graph.py``.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import fsspec
import pytest

from orsgen.pipelines.dataflow_graph import proto_shuffles, shuffle_report
from orsgen.pipelines.transforms import IngestDoFn
from orsgen.schemas.config import load_config

pytest.importorskip("apitools", reason="the dev extra installs apache-beam[gcp]")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHARD = "memory://orsgen-dry-run/sa1b/sa_000000.tar"
DATAFLOW = [
    "--runner=DataflowRunner",
    "--project=fake-project",
    "--region=us-central1",
    "--temp_location=gs://fake-orsgen-bucket/tmp",
    "--staging_location=gs://fake-orsgen-bucket/staging",
    "--dry_run=True",
]


@pytest.fixture(scope="module", autouse=True)
def _memory_shard():
    fs = fsspec.filesystem("memory")
    fs.pipe(SHARD.removeprefix("memory://"), b"never read: the job is not run")
    yield
    fs.rm(SHARD.removeprefix("memory://"))


def _dry_run(config: str, *sets: str) -> tuple[beam.Pipeline, object]:
    from apache_beam.options.pipeline_options import PipelineOptions

    from orsgen.pipelines.build import build_pipeline

    cfg = load_config(CONFIGS / config, [f"inputs.0.shards=[{SHARD}]", *sets])
    p = beam.Pipeline(options=PipelineOptions(DATAFLOW))
    build_pipeline(p, cfg, "gs://fake-orsgen-bucket/out")
    result = p.run()
    return p, result


@pytest.mark.parametrize(
    ("config", "sets"),
    [
        ("sa1b.yaml", ()),
        ("sa1b_ors.yaml", ()),
        # With SAM2 verification and its report as well.
        ("sa1b_ors.yaml", ("verify_sam2.filter.enabled=true",)),
    ],
)
def test_dataflow_dry_run_has_at_most_one_shuffle_of_whole_records(config, sets):
    from apache_beam.runners.runner import PipelineState

    p, result = _dry_run(config, *sets)
    assert result.state == PipelineState.DONE
    assert result.job.proto.steps is not None or result.job.proto  # the job request was built
    report = shuffle_report(p)
    # Nothing is hidden from the count: every leaf GroupByKey of the job proto was visited.
    assert sorted(report.all_shuffles) == proto_shuffles(p.runner.proto_pipeline)
    assert len(report.record_shuffles) <= 1, report
    assert len(report.record_shuffles) == 1, "the write stage should be the one shuffle of records"
    # The hidden ones are there and are not counted: a reshuffle of shard paths, a combine of counts.
    assert any("Spread" in s for s in report.all_shuffles) and any("SumEvents" in s for s in report.all_shuffles)


def test_dataflow_dry_run_with_decontamination_keeps_one_record_shuffle(tmp_path):
    """Decontamination and near-duplicate groups add shuffles of ids and hashes only."""
    from apache_beam.runners.runner import PipelineState

    pytest.importorskip("imagehash", reason="decontamination needs the dedup extra")
    hashes = tmp_path / "bench_hashes.txt"
    hashes.write_text("phash:" + "ab" * 32 + "\nsha256:" + "cd" * 32 + "\n")
    p, result = _dry_run(
        "sa1b.yaml",
        f"decontaminate.sources=[{{name: bench, type: hashes, path: {hashes}}}]",
        "decontaminate.near_duplicates=true",
    )
    assert result.state == PipelineState.DONE
    report = shuffle_report(p)
    assert sorted(report.all_shuffles) == proto_shuffles(p.runner.proto_pipeline)
    # The grouping's shuffles are there (buckets of hashes, groups of ids) and are not records.
    dec = [s for s in report.all_shuffles if s.startswith("Decontaminate/")]
    assert any("GroupBuckets" in s for s in dec) and any("ByGroup" in s for s in dec), report
    assert len(report.record_shuffles) == 1, report
    assert not any(s.startswith(("Decontaminate/", "BenchmarkOverlap/")) for s in report.record_shuffles), report


def test_a_join_of_records_is_counted():
    """Twin: a CoGroupByKey of examples (the old caption stage's joins) counts as a record shuffle."""

    def read(_shard):
        return []

    p = beam.Pipeline(runner="FnApiRunner")
    examples = (
        p
        | "Shards" >> beam.Create(["a", "b"])
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(IngestDoFn("x", read)).with_outputs("rejects", "events", main="examples")
    ).examples
    keyed = examples | "Key" >> beam.Map(lambda ex: (ex.key, ex))
    answers = p | "Answers" >> beam.Create([("k", "answer")])
    _ = {"ex": keyed, "answers": answers} | "Join" >> beam.CoGroupByKey()
    _ = keyed | "Write" >> beam.GroupByKey()
    report = shuffle_report(p)
    assert len(report.record_shuffles) == 2, report
    assert report.record_shuffles[0].startswith("Join/") and report.record_shuffles[1] == "Write"
    assert any("Spread" in s for s in report.all_shuffles)
