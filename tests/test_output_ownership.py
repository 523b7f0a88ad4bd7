"""An output belongs to one config and one run; orsgen replaces nothing it did not write (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from orsgen.stages.write import OutputConflictError
from orsgen.stages.write import files as F
from orsgen.stages.write import ownership as O

SHA_A, SHA_B = "a" * 64, "b" * 64


# ---------------------------------------------------------------- config identity


def test_config_identity_is_recorded_before_any_shard_and_other_configs_are_refused(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with O.claim_output(out, SHA_A) as claim:
        assert not claim.complete
    assert json.loads((tmp_path / "out" / "_meta" / "run.json").read_text()) == {"config_sha256": SHA_A}
    assert not (tmp_path / "out" / "_meta" / "lock.json").exists()  # released
    with pytest.raises(OutputConflictError, match="another config"):
        with O.claim_output(out, SHA_B):
            pass
    with O.claim_output(out, SHA_A):  # the same config resumes
        pass


def test_complete_output_is_reported_and_other_manifest_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"config_sha256": SHA_A}))
    with O.claim_output(str(out), SHA_A) as claim:
        assert claim.complete and claim.manifest == {"config_sha256": SHA_A}
    with pytest.raises(OutputConflictError, match="another config"):
        with O.claim_output(str(out), SHA_B):
            pass


def test_rerun_of_a_complete_output_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orsgen.pipelines import build, run
    from orsgen.schemas.config import config_from_dict

    shard = tmp_path / "sa_000000.tar"
    with tarfile.open(shard, "w"):
        pass
    cfg = config_from_dict({"inputs": [{"name": "s", "type": "sa1b", "shards": [str(shard)]}]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"config_sha256": cfg.sha256(), "name": "done"}))

    def boom(*_a, **_k):
        raise AssertionError("the pipeline must not be built for a complete output")

    monkeypatch.setattr(build, "build_pipeline", boom)
    assert run.run_pipeline(cfg, str(out), show_progress=False)["name"] == "done"


# ---------------------------------------------------------------- lease


def test_concurrent_run_is_refused_locally(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with O.claim_output(out, SHA_A):
        with pytest.raises(OutputConflictError, match="another orsgen run"):
            with O.claim_output(out, SHA_A):
                pass
    with O.claim_output(out, SHA_A):  # free again once released
        pass


def test_lease_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from orsgen.stages.write.ownership import claim_output
                with claim_output({out!r}, {SHA_A!r}):
                    print("held", flush=True)
                    time.sleep(120)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(OutputConflictError, match=f"pid {child.pid}"):
            with O.claim_output(out, SHA_A):
                pass
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / "out" / "_meta" / "lock.json").exists()  # left by the killed run
    with O.claim_output(out, SHA_A):  # the kernel released its lock: taken over at once
        pass


def test_object_store_lease_refuses_live_and_takes_over_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setattr(O, "SETTLE_S", 0.0)
    out = f"memory://orsgen-lease-{os.getpid()}-{time.time_ns()}/out"
    fs, root = fsspec.core.url_to_fs(out)
    with O.claim_output(out, SHA_A, ttl_s=30):
        assert fs.exists(f"{root}/_meta/lock.json")
        with pytest.raises(OutputConflictError, match="another orsgen run"):
            with O.claim_output(out, SHA_A, ttl_s=30):
                pass
    assert not fs.exists(f"{root}/_meta/lock.json")
    # A crashed run's lease (expired, never renewed) is taken over.
    fs.pipe_file(f"{root}/_meta/lock.json", json.dumps({"token": "dead", "expires_unix_s": time.time() - 1}).encode())
    with O.claim_output(out, SHA_A, ttl_s=30):
        pass
    # A live one is not.
    fs.pipe_file(f"{root}/_meta/lock.json", json.dumps({"token": "live", "expires_unix_s": time.time() + 60}).encode())
    with pytest.raises(OutputConflictError, match="another orsgen run"):
        with O.claim_output(out, SHA_A, ttl_s=30):
            pass


# ---------------------------------------------------------------- nothing replaced


def _publish(fs_root: Path, rel: str, data: bytes) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    F._write_new(fs, str(fs_root / rel), lambda sink: sink.write(data))


def test_user_files_at_sidecar_marker_and_data_paths_are_never_replaced(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    sidecar = tmp_path / "_meta" / "shards" / "x.tar.stats.json"
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text("mine")
    with pytest.raises(OutputConflictError, match="already exists"):
        F._write_meta(fs, str(sidecar), b"orsgen's")
    assert sidecar.read_text() == "mine"
    F._write_meta(fs, str(sidecar), b"mine")  # identical bytes are adopted, not rewritten


def test_links_and_folders_in_the_way_are_refused(tmp_path: Path) -> None:
    dangling = tmp_path / "a.tar"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputConflictError, match="symbolic link"):
        _publish(tmp_path, "a.tar", b"data")
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    (tmp_path / "b.tar").mkdir()
    with pytest.raises(OutputConflictError, match="is a folder"):
        _publish(tmp_path, "b.tar", b"data")
    _publish(tmp_path, "c.tar", b"data")  # the twin: a free path is written
    assert (tmp_path / "c.tar").read_bytes() == b"data"


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputConflictError, match="is a file"):
        with O.claim_output(str(tmp_path / "out"), SHA_A):
            pass


# ---------------------------------------------------------------- temp files


def test_rerun_sweeps_only_orsgen_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = out / "webdataset" / "data"
    data.mkdir(parents=True)
    ours = [
        data / ".train-00000-of-00002-0000.tar.tmp-0123456789abcdef",
        out / "_cache" / "vlm" / "ab" / (".tmp-" + "0" * 32),
    ]
    ours[1].parent.mkdir(parents=True)
    theirs = [data / ".notes.tmp", data / "train.tmp-0123456789abcdef", out / ".tmp-123", data / "keep.txt"]
    for p in ours + theirs:
        p.write_text("x")
    with O.claim_output(str(out), SHA_A) as claim:
        assert sorted(claim.swept) == sorted(str(p) for p in ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


# ---------------------------------------------------------------- a worker that dies at start-up


def test_worker_failing_at_startup_ends_the_run_with_a_sentence(tmp_path: Path) -> None:
    """Beam's multi-processing runner would wait for a dead worker forever."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('CONTROL_API_SERVICE_DESCRIPTOR'):\n"
        "    sys.stderr.write('worker refuses to start (test)\\n'); sys.exit(3)\n"
    )
    shard = tmp_path / "sa_000000.tar"
    with tarfile.open(shard, "w"):
        pass
    (tmp_path / "c.yaml").write_text(f"inputs: [{{name: s, type: sa1b, shards: [{shard}]}}]\n")
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable, "-c", "from orsgen.pipelines.cli import main; main()", "run", str(tmp_path / "c.yaml"),
            "--out", str(tmp_path / "out"), "--quiet", "--",
            "--direct_running_mode=multi_processing", "--direct_num_workers=1",
        ],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode not in (0, 2), proc.stderr[-2000:]
    assert "worker process exited" in proc.stderr
    assert time.monotonic() - started < 200
    assert not (tmp_path / "out" / "_meta" / "lock.json").exists()  # the lease was released
