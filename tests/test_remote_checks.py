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


# ------------------------------------------------------------------ what a worker gets installed

from pathlib import Path  # noqa: E402

from orsgen.pipelines.worker_env import (  # noqa: E402
    WorkerPackagingError,
    check_worker_packaging,
    render,
    worker_requirements,
)

ROOT = Path(__file__).resolve().parents[1]


def test_worker_requirements_file_is_in_sync_with_pyproject():
    reqs = worker_requirements(ROOT / "pyproject.toml")
    assert any(r.startswith("gcsfs") for r in reqs) and not any(r.startswith("apache-beam") for r in reqs)
    assert (ROOT / "containers" / "requirements-worker.txt").read_text() == render(reqs), (
        "regenerate it: python -m orsgen.pipelines.worker_env > containers/requirements-worker.txt"
    )


@pytest.mark.parametrize("args", [
    ["--sdk_container_image=us-docker.pkg.dev/p/orsgen/orsgen-cpu:0.1.0"],
    ["--extra_package=dist/orsgen-0.1.0-py3-none-any.whl", "--requirements_file=containers/requirements-worker.txt"],
    ["--setup_file=./pyproject.toml"],
])
def test_packaging_flags_that_give_workers_orsgen_and_gcsfs(args):
    check_worker_packaging(["--runner=DataflowRunner", *args])


@pytest.mark.parametrize(("args", "says"), [
    ([], "remote workers would start without orsgen"),
    (["--extra_package=dist/orsgen-0.1.0-py3-none-any.whl"], "would lack gcsfs"),
])
def test_packaging_flags_that_leave_workers_without_orsgen_are_refused(args, says):
    with pytest.raises(WorkerPackagingError, match=says):
        check_worker_packaging(["--runner=DataflowRunner", *args])
