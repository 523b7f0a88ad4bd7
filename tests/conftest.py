"""Shared fixtures: tiny images and masks built in memory."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

# CI replays the same hypothesis examples on every run (a red CI must mean a
# change broke something, not that a new random draw was made); local runs keep
# exploring new examples. CI sets CI=true.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev dependency
    pass

# Tests never touch the network: the hub stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A small deterministic JPEG."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def random_mask(rng: np.random.Generator, h: int, w: int, n_blobs: int = 3) -> np.ndarray:
    """A random union of rectangles and discs, possibly with speckle."""
    m = np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n_blobs):
        if rng.random() < 0.5:
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            m[y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] = True
        else:
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(1, max(2, min(h, w) // 2))
            m |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    return m


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------ tiny VLMs (tests/vlm_fixtures.py)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """Tiny Qwen2.5-VL models built offline: ``.random`` (noise) and ``.scripted``.

    ``.scripted`` answers ``vlm_fixtures.SCRIPTED_ANSWER`` (greedy) to every prompt.
    ``.hub_cache`` is an empty HF_HUB_CACHE folder for servers.
    """
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    import types

    from vlm_fixtures import build_tiny_qwen25vl

    root = tmp_path_factory.mktemp("tiny_vlm")
    return types.SimpleNamespace(
        random=str(build_tiny_qwen25vl(root / "random")),
        scripted=str(build_tiny_qwen25vl(root / "scripted", scripted=True)),
        hub_cache=str(root / "hub"),
        root=root,
    )


@pytest.fixture(scope="session")
def tiny_vlm_managed(tiny_vlm):
    """One ``transformers serve`` for the session, run by ``ManagedServerCaptioner``.

    It is not pinned to a model: requests name ``tiny_vlm.random`` or
    ``tiny_vlm.scripted`` (the captioner's own model is the scripted one).
    Requests run one at a time; ``response_format`` and ``n`` are ignored;
    never send ``stop`` (HTTP 500 for VLMs). A test may kill the server: the
    captioner restarts it on the same port (``max_restarts=2``).
    """
    pytest.importorskip("fastapi")
    from orsgen.stages.caption.backends import ManagedServerCaptioner
    from vlm_fixtures import serve_command, serve_env

    cap = ManagedServerCaptioner(
        serve_command(None),
        tiny_vlm.scripted,
        env=serve_env(tiny_vlm.hub_cache),
        startup_timeout_s=180,
        max_restarts=2,
        max_image_side_px=64,
        timeout_s=120,
        max_retries=2,
        backoff_initial_s=0.05,
        log_path=str(tiny_vlm.root / "serve.log"),
    )
    yield cap
    pid = cap.pid
    cap.close()
    # Stopped cleanly: the process (group) is gone.
    assert not cap.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


@pytest.fixture(scope="session")
def tiny_vlm_server(tiny_vlm_managed):
    """Base URL (``http://127.0.0.1:P/v1``) of the session's ``transformers serve``."""
    return tiny_vlm_managed.client.base_url


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory):
    """The output folder of one demo build, shared by the publish/export/loader/eval tests.

    Read-only for the tests: they copy it before changing anything.
    """
    from orsgen.pipelines.run import run_pipeline
    from orsgen.pipelines.demo_data import generate_demo_inputs
    from orsgen.schemas.config import load_config

    base = tmp_path_factory.mktemp("demo_output")
    cfg = load_config(generate_demo_inputs(base / "inputs", seed=0))
    out = base / "dataset"
    run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    return out


def json_member_reference(row: dict) -> bytes:
    """The WebDataset JSON member of an example row (without ``image``), by ``json.dumps``.

    ``example_to_row`` yields plain JSON values, so this is
    ``canonical_json(example_to_json(ex))``: the reference of
    ``schemas.arrow.example_json_bytes`` and of the Parquet rows' readers.
    """
    import json

    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def interior_points_reference(rle):
    """The interior-points rule written out the direct way (the oracle of the fast paths).

    ``np.nonzero`` pixels, OpenCV's precise distance transform squared and
    rounded, ``np.hypot`` over every pixel and ``np.median``.
    """
    import cv2
    import numpy as np

    from orsgen.stages.common import masks as M

    crop, (ox, oy) = M.decode_crop(rle, pad_px=1)
    ys, xs = np.nonzero(crop)
    dist = cv2.distanceTransform(crop.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    dist = np.rint(dist.astype(np.float64) ** 2)
    y1, x1 = divmod(int(np.argmax(dist)), dist.shape[1])
    d1 = np.hypot(xs - x1, ys - y1)
    far = d1 > np.median(d1)
    if not far.any():
        p2 = (x1, y1)
    else:
        j = int(np.argmax(dist[ys[far], xs[far]]))
        p2 = (int(xs[far][j]), int(ys[far][j]))
    return (x1 + ox, y1 + oy), (p2[0] + ox, p2[1] + oy)


def coco_counts(runs: list[int]) -> bytes:
    """COCO's compressed-counts writer (rleToString) written out: deltas after the third run, 5-bit groups.

    Takes any ints (negative deltas and runs included), so tests can build
    the strings the decoders must refuse as well as the ones they accept.
    """
    out = bytearray()
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(c + 48)
    return bytes(out)
