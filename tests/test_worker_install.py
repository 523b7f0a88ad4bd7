"""The built wheel installs into a clean venv the way a Dataflow worker installs it, and the DoFns load there.

What the worker does (Beam 2.77 ``boot.go`` / ``piputil.go``), reproduced:

1. the SDK image provides apache-beam and its dependencies: here the dev
   venv's site-packages without orsgen, seen through a ``.pth`` file of a
   fresh ``venv`` (no pip, no orsgen, nothing of this checkout on its path);
2. ``pip install --no-deps --force-reinstall WHEEL`` (``--extra_package``);
3. ``pip install -r requirements-worker.txt`` and ``pip install WHEEL``,
   offline (``--no-index``): every dependency must already be satisfied;
4. the pipeline's pickled DoFns (from the runner API proto, as Dataflow
   ships them) are unpickled there and their ``setup()`` is run.

A worker would fail the same way if the wheel lacked a module, a data file
(prompts, configs) or a dependency, or if a DoFn pickled a reference to a
launcher-only object.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

WORKER_SCRIPT = r'''
import pathlib, sys
import orsgen
assert "site-packages" in orsgen.__file__ and pathlib.Path(orsgen.__file__).is_relative_to(sys.prefix), orsgen.__file__
import gcsfs  # the gcp extra reached the worker
from apache_beam.internal import pickler
import apache_beam as beam
n = 0
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.pkl")):
    fn = pickler.loads(path.read_bytes())[0]
    if isinstance(fn, beam.DoFn) and type(fn).__module__.startswith("orsgen."):
        fn.setup()
        fn.teardown()
        n += 1
print("SETUP_OK", n, orsgen.__file__)
'''


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd[:4]}... failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _pickled_dofns(config: Path, sets: list[str], out: Path, dest: Path) -> int:
    """Writes every pickled DoFn of the pipeline's runner API proto to ``dest``."""
    import apache_beam as beam
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    from orsgen.pipelines.build import build_pipeline
    from orsgen.schemas.config import load_config

    cfg = load_config(config, sets)
    p = beam.Pipeline(runner="FnApiRunner")
    build_pipeline(p, cfg, str(out))
    proto = p.to_runner_api()
    n = 0
    for tid, t in sorted(proto.components.transforms.items()):
        if t.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
        if payload.do_fn.urn == "beam:dofn:pickled_python_info:v1":
            (dest / f"{n:04d}.pkl").write_bytes(payload.do_fn.payload)
            n += 1
    return n


def _can_build_here() -> bool:
    try:
        import setuptools
        import wheel as _wheel  # noqa: F401
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, as `pip wheel` makes it from a clone."""
    dist = tmp_path_factory.mktemp("dist")
    # Without build isolation when this venv can build it (fast, offline); otherwise pip
    # fetches the build backend pyproject.toml names (setuptools>=68, wheel) from the registry.
    isolation: list[str] = []
    if _can_build_here():
        isolation = ["--no-build-isolation"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(ROOT)])
    (whl,) = dist.glob("orsgen-*.whl")
    return whl


def test_wheel_installs_like_a_dataflow_worker_and_dofns_set_up(tmp_path, wheel):
    import site

    py = sys.executable

    # The "SDK image": this venv's packages without orsgen (no editable hook, no dist-info).
    image = tmp_path / "image-site-packages"
    image.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            if "orsgen" in entry.name.lower() or entry.suffix == ".pth" or (image / entry.name).exists():
                continue
            (image / entry.name).symlink_to(entry)
    venv = tmp_path / "worker-venv"
    _run([py, "-m", "venv", "--without-pip", str(venv)])
    vpy = venv / "bin" / "python"
    (next((venv / "lib").glob("python3.*")) / "site-packages" / "sdk_image.pth").write_text(f"{image}\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [py, "-m", "pip", "--python", str(vpy), "install", "--no-index", "--disable-pip-version-check", "-q"]
    _run([*pip, "--no-deps", "--force-reinstall", str(wheel)], env=env, cwd=tmp_path)
    _run([*pip, "-r", str(ROOT / "containers" / "requirements-worker.txt"), str(wheel)], env=env, cwd=tmp_path)

    dofns = tmp_path / "dofns"
    dofns.mkdir()
    shard = tmp_path / "sa_000000.tar"
    shard.write_bytes(b"")  # only globbed while the graph is built
    n = _pickled_dofns(ROOT / "configs" / "sa1b_ors.yaml", [f"inputs.0.shards=[{shard}]"], tmp_path / "out", dofns)
    assert n >= 8

    res = _run([str(vpy), "-c", WORKER_SCRIPT, str(dofns)], env=env, cwd=tmp_path)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("SETUP_OK")][0]
    _, count, where = line.split(" ", 2)
    assert int(count) >= 5 and where.startswith(str(venv))


def test_a_wheel_without_its_dependencies_fails_to_install_offline(tmp_path, wheel):
    """Twin: an offline worker without orsgen's dependencies cannot install the wheel (the check can fail)."""
    py = sys.executable
    venv = tmp_path / "bare-venv"
    _run([py, "-m", "venv", "--without-pip", str(venv)])
    res = subprocess.run(
        [py, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert res.returncode != 0 and "apache-beam" in (res.stdout + res.stderr).lower().replace("_", "-")


def test_worker_images_use_the_launchers_beam_and_the_boot_entrypoint():
    """The Dockerfiles stay on the Beam SDK image of the installed apache-beam (boot refuses a mismatch)."""
    import apache_beam

    for name, extras in (("cpu", "[gcp]"), ("gpu", "[sam2,vlm,gcp]")):
        text = (ROOT / "containers" / f"{name}.Dockerfile").read_text()
        assert f"ARG BEAM_VERSION={apache_beam.__version__}" in text
        assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION}" in text
        assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
        assert f'"${{whl}}{extras}"' in text
    gpu = (ROOT / "containers" / "gpu.Dockerfile").read_text()
    assert "python -m venv /opt/vllm-venv" in gpu and "torch==2.14.1" in gpu
