"""Launcher-local paths are refused before a job goes to a remote runner."""

from __future__ import annotations

import pytest

from orsgen.pipelines.remote import RemotePathError, check_remote_paths, is_local_url, is_remote_runner
from orsgen.pipelines.run import run_pipeline
from orsgen.schemas.config import OrsgenConfig

DATAFLOW = ["--runner=DataflowRunner", "--project=p", "--region=us-central1"]


def _cfg(shards: list[str], **extra) -> OrsgenConfig:
    return OrsgenConfig.model_validate({"name": "t", "inputs": [{"type": "sa1b", "name": "sa1b", "shards": shards}], **extra})


@pytest.mark.parametrize(("args", "remote"), [
    ([], False),
    (["--runner=FnApiRunner"], False),
    (["--runner", "DirectRunner"], False),
    (["--runner=PrismRunner"], False),
    (["--runner=DataflowRunner"], True),
    (["--runner=apache_beam.runners.dataflow.dataflow_runner.DataflowRunner"], True),
    (["--runner=FlinkRunner"], True),
    (["--runner=PortableRunner", "--environment_type=LOOPBACK"], False),
])
def test_which_runners_are_remote(args, remote):
    assert is_remote_runner(args) is remote


def test_local_urls():
    assert is_local_url("/data/sa1b/sa_000000.tar") and is_local_url("rel/x.tar") and is_local_url("file:///x")
    assert is_local_url("memory://x")
    assert not is_local_url("gs://b/sa_000000.tar") and not is_local_url("s3://b/x") and not is_local_url("hf://datasets/a/b")


def test_local_shards_with_dataflow_are_refused_naming_the_key():
    cfg = _cfg(["gs://b/sa_0000*.tar", "/data/sa1b/sa_000001.tar"])
    with pytest.raises(RemotePathError, match=r"inputs\.0\.shards\.1 '/data/sa1b/sa_000001.tar' is a local path"):
        check_remote_paths(cfg, "gs://b/out", DATAFLOW)
    with pytest.raises(RemotePathError, match=r"--out '/tmp/out' is a local path"):
        check_remote_paths(_cfg(["gs://b/x.tar"]), "/tmp/out", DATAFLOW)


def test_remote_paths_with_dataflow_and_local_paths_with_a_local_runner_pass():
    # Twin: nothing to refuse.
    check_remote_paths(_cfg(["gs://b/sa_0000*.tar"]), "gs://b/out", DATAFLOW)
    check_remote_paths(_cfg(["/data/sa1b/sa_000001.tar"]), "/tmp/out", ["--runner=FnApiRunner"])


def test_run_pipeline_refuses_before_reading_anything(tmp_path):
    # The shard does not exist: the remote check comes first and names the key.
    cfg = _cfg([str(tmp_path / "missing.tar")])
    with pytest.raises(RemotePathError, match=r"inputs\.0\.shards\.0"):
        run_pipeline(cfg, "gs://b/out", DATAFLOW, show_progress=False)
