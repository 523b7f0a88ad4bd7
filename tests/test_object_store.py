"""An end-to-end build that reads from and writes to an S3-compatible server on 127.0.0.1.

moto's server stands in for an object store (GCS and S3 go through fsspec
the same way); it binds 127.0.0.1 on a free port and stops with the module.
The rerun must skip the completed shards: no data shard is uploaded again.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from orsgen.pipelines.demo_data import write_sa1b
from orsgen.pipelines.run import run_pipeline
from orsgen.schemas.config import load_config

pytestmark = pytest.mark.slow

BUCKET = "orsgen-e2e"
RUNNER = ["--runner=FnApiRunner"]


class _Recorder:
    """WSGI middleware: remembers (method, path) of every request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self.lock:
            self.calls.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    recorder = _Recorder(server._server.app)
    server._server.app = recorder
    mp = pytest.MonkeyPatch()
    endpoint = f"http://{host}:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
    }.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    yield fs, recorder
    mp.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _config(tmp: Path, shards: list[str]) -> Any:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s3-e2e",
        "inputs": [{"type": "sa1b", "name": "sa1b", "shards": shards}],
        "splits": {"ratios": {"train": 0.5, "val": 0.5}},
        "write": {"num_buckets": 2, "shard_max_images": 2},
    }))
    return load_config(path)


def _tree(fs: Any, root: str) -> dict[str, str]:
    return {p.removeprefix(root): hashlib.sha256(fs.cat_file(p)).hexdigest() for p in sorted(fs.find(root))}


def test_build_reads_and_writes_s3_and_a_rerun_skips_completed_shards(s3, tmp_path):
    fs, recorder = s3
    for path in write_sa1b(tmp_path / "in", seed=5, n_shards=2, images_per_shard=3):
        fs.put_file(str(path), f"{BUCKET}/in/{Path(path).name}")
    cfg = _config(tmp_path, [f"s3://{BUCKET}/in/sa_*.tar"])
    out = f"s3://{BUCKET}/out"

    m = run_pipeline(cfg, out, RUNNER, show_progress=False)
    for level, c in m["counts"]["levels"].items():
        assert c["reconciled"], (level, c)
    assert m["counts"]["levels"]["images"]["inputs"] == 6
    first = _tree(fs, f"{BUCKET}/out/")
    data = [p for p in first if p.endswith((".tar", ".parquet")) and not p.startswith(("_meta", "rejects"))]
    assert data, first
    # Everything went through the server: the shards were read from it and written to it.
    puts = [p for meth, p in recorder.calls if meth in ("PUT", "POST") and "/out/" in p]
    assert any(p.endswith(".done") for p in puts)
    assert any(meth == "GET" and "/in/sa_" in p for meth, p in recorder.calls)

    recorder.calls.clear()
    m2 = run_pipeline(cfg, out, RUNNER, show_progress=False)
    assert m2["counts"] == m["counts"]
    assert _tree(fs, f"{BUCKET}/out/") == first
    rewritten = {p for meth, p in recorder.calls if meth in ("PUT", "POST")}
    assert not [d for d in data if any(r.endswith(d) for r in rewritten)], "completed shards were uploaded again"


def test_a_missing_object_is_named_before_the_run(s3, tmp_path):
    """Twin: a shard glob that matches nothing in the bucket fails with the pattern, not an empty dataset."""
    fs, _ = s3
    cfg = _config(tmp_path, [f"s3://{BUCKET}/nowhere/sa_*.tar"])
    with pytest.raises(FileNotFoundError, match=r"s3://orsgen-e2e/nowhere/sa_\*\.tar"):
        run_pipeline(cfg, f"s3://{BUCKET}/out-missing", RUNNER, show_progress=False)
    assert not fs.exists(f"{BUCKET}/out-missing/manifest.json")
