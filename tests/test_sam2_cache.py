"""SAM2 result cache: a rerun sends no cached image through SAM2 and writes the same bytes.

A counting fake backend stands in for SAM2 (no torch needed): its masks are
the prompt boxes, its scores awkward floats, and every ``predict_images``
call appends a line to a log file, so the tests count SAM2 calls exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orsgen.schemas.config import VerifySam2Config, config_from_dict
from orsgen.schemas.records import ExpressionKind, ImageExample, ImageRecord, Instance, Sample
from orsgen.stages.common import transient
from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, xywh_to_xyxy
from orsgen.stages.common.targets import attach_targets
from orsgen.stages.common.transient import TransientIOError
from orsgen.stages.verify.backend import Sam2Prediction, Sam2Prompt
from orsgen.stages.verify.cache import Sam2ResultCache, fingerprint_of, model_fingerprint, sam2_cache_key

# ------------------------------------------------------------------ the counting fake SAM2


class CountingSam2:
    """Boxes as masks; one log line per ``predict_images`` call (one per batch)."""

    def __init__(self, log: str) -> None:
        self._log = log

    def predict_images(self, items):
        with open(self._log, "a") as f:  # one line per call: the digests of its images
            f.write(" ".join(hashlib.sha256(data).hexdigest() for data, _ in items) + "\n")
        out = []
        for data, prompts in items:
            w, h = Image.open(io.BytesIO(data)).size
            preds = []
            for p in prompts:
                x0, y0, x1, y1 = (int(v) for v in p.box_xyxy)
                masks, ious = [], []
                for shrink in range(3 if p.multimask_output else 1):
                    m = np.zeros((h, w), dtype=bool)
                    m[y0 + shrink : max(y0 + shrink, y1 - shrink), x0 + shrink : max(x0 + shrink, x1 - shrink)] = True
                    masks.append(encode_mask(m))
                    # Floats that only an exact round trip reproduces.
                    ious.append((x0 * 0.1 + y1 * 0.2) % 1.0 / 3.0 + shrink * 1e-17)
                preds.append(Sam2Prediction(p.instance_id, p.multimask_output, tuple(masks), tuple(ious)))
            out.append(preds)
        return out

    def describe(self):
        return {"backend": "counting", "model": "fake", "device": "cpu", "dtype": "float32"}


def _calls(log: Path) -> int:
    return len(_images_sent(log))


def _images_sent(log: Path) -> list[str]:
    """The image digests of every call, in order."""
    return log.read_text().splitlines() if log.exists() else []


# ------------------------------------------------------------------ cache unit tests


def _prompts(mm: bool = False) -> tuple[Sam2Prompt, ...]:
    return (
        Sam2Prompt("coco:1/ann:0", (1.0, 2.0, 30.0, 40.0), ((5.5, 6.5), (7.5, 8.5)), mm),
        Sam2Prompt("coco:1/ann:1", (0.0, 0.0, 10.0, 10.0), ((1.5, 1.5),), mm),
    )


def _preds(prompts) -> tuple[Sam2Prediction, ...]:
    m = np.zeros((40, 50), dtype=bool)
    m[3:9, 4:20] = True
    k = 3 if prompts[0].multimask_output else 1
    return tuple(
        Sam2Prediction(p.instance_id, p.multimask_output, (encode_mask(m),) * k, tuple([0.1 + 0.2, 1e-300, -0.0][:k]))
        for p in prompts
    )


FP = model_fingerprint("facebook/sam2.1-hiera-large", backend="transformers", meta_model_cfg=None, device="auto",
                       dtype="auto", mask_threshold=0.0)


def test_round_trip_is_bit_exact_and_entries_are_deterministic(tmp_path):
    cache = Sam2ResultCache(str(tmp_path / "c"))
    prompts = _prompts(mm=True)
    key = sam2_cache_key(b"image", prompts, FP)
    assert cache.get(key, prompts) is None and cache.misses == 1 and cache.corrupt == 0
    preds = _preds(prompts)
    cache.put(key, "ab" * 32, preds)
    path = tmp_path / "c" / key[:2] / f"{key[2:]}.json.gz"
    first = path.read_bytes()
    got = cache.get(key, prompts)
    assert got == preds and cache.hits == 1
    assert [[v.hex() for v in p.pred_ious] for p in got] == [[v.hex() for v in p.pred_ious] for p in preds]
    cache.put(key, "ab" * 32, preds)  # a concurrent writer of the same key writes the same bytes
    assert path.read_bytes() == first and len(cache) == 1
    assert not [p for p in (tmp_path / "c").rglob(".tmp-*")]


def test_corrupt_torn_or_foreign_entries_are_misses_not_errors(tmp_path):
    cache = Sam2ResultCache(str(tmp_path))
    prompts = _prompts()
    key = sam2_cache_key(b"image", prompts, FP)
    cache.put(key, "0" * 64, _preds(prompts))
    path = Path(cache.path_of(key))
    good = path.read_bytes()
    entry = json.loads(gzip.decompress(good))
    bad_entries = [
        b"",  # empty
        good[: len(good) // 2],  # torn gzip
        b"<html>503</html>",  # not gzip
        gzip.compress(b"{not json"),
        gzip.compress(json.dumps({**entry, "key": "f" * 64}).encode()),  # another key's entry
        gzip.compress(json.dumps({**entry, "format": 999}).encode()),
        gzip.compress(json.dumps({**entry, "predictions": entry["predictions"][:1]}).encode()),
        gzip.compress(json.dumps({**entry, "predictions": entry["predictions"][::-1]}).encode()),  # other prompts
        gzip.compress(json.dumps({**entry, "predictions": [{**p, "pred_ious": []} for p in entry["predictions"]]}).encode()),
        gzip.compress(json.dumps({**entry, "predictions": [{**p, "masks": [{"size": "x"}]} for p in entry["predictions"]]}).encode()),
        gzip.compress(json.dumps({**entry, "predictions": [{**p, "pred_ious": ["0.5"]} for p in entry["predictions"]]}).encode()),
    ]
    for i, data in enumerate(bad_entries, 1):
        path.write_bytes(data)
        assert cache.get(key, prompts) is None, i
        assert cache.corrupt == i
    # The entry answers its own prompts only.
    path.write_bytes(good)
    assert cache.get(key, _prompts(mm=True)) is None
    assert cache.get(key, prompts) == _preds(prompts)
    with pytest.raises(ValueError, match="not a sha256"):
        cache.path_of("../../etc/passwd")


def test_key_changes_with_image_prompts_and_model_but_not_batch_sizes(tmp_path):
    prompts = _prompts()
    base = sam2_cache_key(b"image", prompts, FP)
    moved = (Sam2Prompt("coco:1/ann:0", (1.0, 2.0, 30.0, 41.0), prompts[0].points_xy, False), prompts[1])
    other_point = (Sam2Prompt("coco:1/ann:0", prompts[0].box_xyxy, ((5.5, 6.5),), False), prompts[1])
    variants = [
        sam2_cache_key(b"image2", prompts, FP),
        sam2_cache_key(b"image", _prompts(mm=True), FP),
        sam2_cache_key(b"image", moved, FP),
        sam2_cache_key(b"image", other_point, FP),
        sam2_cache_key(b"image", prompts[:1], FP),
    ]
    for change in ({"model": "facebook/sam2.1-hiera-tiny"}, {"backend": "meta"}, {"dtype": "bfloat16"},
                   {"device": "cpu"}, {"mask_threshold": 0.5}, {"meta_model_cfg": "configs/x.yaml"}):
        cfg = VerifySam2Config.model_validate(change)
        variants.append(sam2_cache_key(b"image", prompts, fingerprint_of(cfg)))
    assert base not in variants and len(set(variants)) == len(variants)
    # Throughput settings and the cache settings themselves do not change the answer.
    same = VerifySam2Config.model_validate({"images_per_batch": 16, "prompts_per_batch": 8, "model_copies": 2,
                                            "share_model_across_processes": False, "cache_dir": "/x"})
    assert sam2_cache_key(b"image", prompts, fingerprint_of(same)) == base
    # A local checkpoint replaced in place misses: its files are part of the key.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"hidden_size": 8}')
    (ckpt / "model.safetensors").write_bytes(b"\0" * 10)
    fp1 = fingerprint_of(VerifySam2Config.model_validate({"model": str(ckpt)}))
    (ckpt / "config.json").write_text('{"hidden_size": 16}')
    fp2 = fingerprint_of(VerifySam2Config.model_validate({"model": str(ckpt)}))
    assert sam2_cache_key(b"i", prompts, fp1) != sam2_cache_key(b"i", prompts, fp2)


def test_transient_read_errors_retry_then_fail_the_bundle_and_unwritable_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(transient, "_sleep", lambda s: None)
    cache = Sam2ResultCache(str(tmp_path / "c"))
    prompts = _prompts()
    key = sam2_cache_key(b"image", prompts, FP)
    cache.put(key, "0" * 64, _preds(prompts))
    real_open = cache._fs.open
    failures = {"n": 2}

    def flaky(path, mode="rb", **kw):
        if failures["n"] > 0:
            failures["n"] -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(cache._fs, "open", flaky)
    assert cache.get(key, prompts) == _preds(prompts)  # retried, then a hit
    failures["n"] = 100
    with pytest.raises(TransientIOError):  # never a silent miss: the runner retries the bundle
        cache.get(key, prompts)
    assert cache.corrupt == 0
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="verify_sam2.cache_dir"):
        Sam2ResultCache(str(blocker / "cache")).put(key, "0" * 64, _preds(prompts))


def test_config_keys_are_validated_and_left_out_of_the_config_identity():
    from orsgen.schemas.config import ConfigError

    inputs = [{"type": "coco", "name": "coco", "annotations": "a", "images": "i"}]
    on = config_from_dict({"inputs": inputs})
    off = config_from_dict({"inputs": inputs, "verify_sam2": {"cache": False, "cache_dir": "/elsewhere"}})
    assert on.verify_sam2.cache and on.verify_sam2.cache_dir is None
    assert not off.verify_sam2.cache and off.verify_sam2.cache_dir == "/elsewhere"
    # Turning the cache off or moving it never stops a rerun from resuming.
    assert on.sha256() == off.sha256()
    with pytest.raises(ConfigError, match="verify_sam2.cache"):
        config_from_dict({"inputs": inputs, "verify_sam2": {"cache": "sometimes"}})
    with pytest.raises(ConfigError, match="verify_sam2.cache_dir"):
        config_from_dict({"inputs": inputs, "verify_sam2": {"cache_dir": ""}})


def test_remote_runs_refuse_a_local_sam2_cache_dir():
    from orsgen.pipelines.remote import RemotePathError, check_remote_paths

    inputs = [{"type": "coco", "name": "coco", "annotations": "gs://b/a.json", "images": "gs://b/i"}]
    sam2 = {"filter": {"enabled": True}, "cache_dir": "/local/cache"}
    cfg = config_from_dict({"inputs": inputs, "verify_sam2": sam2})
    flags = ["--runner=DataflowRunner"]
    with pytest.raises(RemotePathError, match="verify_sam2.cache_dir"):
        check_remote_paths(cfg, "gs://b/out", flags)
    check_remote_paths(config_from_dict({"inputs": inputs, "verify_sam2": {**sam2, "cache_dir": "gs://b/c"}}),
                       "gs://b/out", flags)
    check_remote_paths(config_from_dict({"inputs": inputs, "verify_sam2": {**sam2, "cache": False}}),
                       "gs://b/out", flags)


# ------------------------------------------------------------------ the Beam stage


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _scene(image_id: int) -> ImageExample:
    from orsgen.pipelines.demo_data import demo_scene

    image, objects = demo_scene(0, "coco", image_id)
    h, w = image.shape[:2]
    iid = f"coco:{image_id}"
    insts = []
    for i, o in enumerate(objects):
        rle = encode_mask(o.mask)
        box = rle_bbox_xywh(rle)
        insts.append(Instance(f"{iid}/ann:{i}", iid, rle, box, xywh_to_xyxy(box), rle_area(rle), category_id=1,
                              source_ann_id=i, mask_origin="polygon"))
    by_id = {i.instance_id: i for i in insts}
    key = f"coco-coco_{image_id}"
    samples = tuple(
        attach_targets(Sample(f"{key}-s{i}", iid, f"object {i}", str(ExpressionKind.HUMAN), (inst.instance_id,)), by_id, w, h)
        for i, inst in enumerate(insts)
    )
    data = _jpeg(image)
    rec = ImageRecord(iid, "coco", "mem://x.jpg", w, h, hashlib.sha256(data).hexdigest(), "x.jpg")
    return ImageExample(key, rec, data, tuple(insts), (), samples, input_name="coco")


def _stage_cfg(**sam2):
    base = {"device": "cpu", "images_per_batch": 1, "share_model_across_processes": False,
            "filter": {"enabled": True, "iou_thresh": 0.8},
            "clean": {"enabled": True, "iou_band": [0.5, 1.0], "pred_iou_thresh": 0.1, "on_reject": "drop"}}
    for k, v in sam2.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict({"inputs": [{"type": "coco", "name": "coco", "annotations": "a", "images": "i"}],
                             "verify_sam2": base})


class _Handler:
    """Builds the real Sam2ModelHandler around the counting backend."""

    @staticmethod
    def make(cfg, log: Path):
        from orsgen.pipelines.verify_sam2 import Sam2ModelHandler

        class CountingHandler(Sam2ModelHandler):
            def load_model(self):
                return CountingSam2(str(log))

        return CountingHandler(cfg.verify_sam2)


def _run_stage(cfg, out: Path, log: Path, examples) -> dict:
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    from orsgen.pipelines.verify_sam2 import VerifySam2
    import dataclasses

    def as_json(item):
        def plain(v):  # bytes (images, reject payloads) by their digest
            return hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else str(v)

        data = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item
        return json.dumps(data, sort_keys=True, default=plain).encode()

    got = out / "got"
    got.mkdir(parents=True, exist_ok=True)

    def dump(name):
        def write(items):
            (got / name).write_bytes(b"\n".join(sorted(items)))
        return write

    with TestPipeline(runner="FnApiRunner") as p:
        ex, rej, ev = p | beam.Create(examples) | VerifySam2(cfg, str(out), handler=_Handler.make(cfg, log))
        for name, pc in (("examples", ex), ("rejects", rej), ("events", ev)):
            _ = (pc | f"J{name}" >> beam.Map(as_json) | f"L{name}" >> beam.combiners.ToList()
                 | f"W{name}" >> beam.Map(dump(name)))
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    shutil.rmtree(got)
    return files


@pytest.fixture(scope="module")
def scenes():
    return [_scene(100_001 + i) for i in range(2)]


def test_failed_inference_is_a_dead_letter_and_never_cached(scenes, tmp_path):
    import dataclasses

    cfg = _stage_cfg(report={"enabled": False})
    out, log = tmp_path / "out", tmp_path / "calls.log"
    # An image SAM2 cannot read (the fake raises, as decode_rgb would).
    broken = dataclasses.replace(scenes[0], key="coco-coco_199999", image_bytes=b"\xff\xd8 truncated")
    files = _run_stage(cfg, out, log, [scenes[1], broken])
    assert _calls(log) == 2
    entries = [k for k in files if k.startswith("_cache/sam2/")]
    rejects = files["got/rejects"]
    assert len(entries) == 1 and b"sam2_inference_failed" in rejects and b"coco-coco_199999" in rejects
    # The stored entry is the good image's, so a rerun asks SAM2 about the failed one again.
    assert json.loads(gzip.decompress(files[entries[0]]))["image_sha256"] == scenes[1].image.sha256
    assert b" at 0x" not in rejects  # the message is the same on every run


def test_cache_root_follows_the_config():
    from orsgen.pipelines.verify_sam2 import sam2_cache_root

    assert sam2_cache_root(VerifySam2Config(), "gs://b/out/") == "gs://b/out/_cache/sam2"
    assert sam2_cache_root(VerifySam2Config(cache_dir="s3://c/sam2"), "gs://b/out") == "s3://c/sam2"
    assert sam2_cache_root(VerifySam2Config(cache=False, cache_dir="s3://c/sam2"), "gs://b/out") == ""


# ------------------------------------------------------------------ the whole pipeline


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_rerun_after_a_crash_sends_no_image_through_sam2_on_one_or_two_workers(tmp_path, monkeypatch):
    from orsgen.pipelines import verify_sam2
    from orsgen.pipelines.demo_data import generate_demo_inputs
    from orsgen.pipelines.run import run_pipeline
    from orsgen.schemas.config import load_config

    log = tmp_path / "calls.log"
    # share_model_across_processes=false keeps the fake in this process (the
    # direct runner in-process or multi-threaded).
    monkeypatch.setattr(verify_sam2, "load_backend", lambda *a, **kw: CountingSam2(str(log)))
    cfg_path = generate_demo_inputs(tmp_path / "in", seed=0, n_sa1b_shards=1, sa1b_images_per_shard=2,
                                    n_coco_images=3, n_ref_images=2)
    cfg = load_config(cfg_path, [
        "verify_sam2.model=counting-fake", "verify_sam2.device=cpu", "verify_sam2.share_model_across_processes=false",
        "verify_sam2.filter.enabled=true", "verify_sam2.filter.iou_thresh=0.8",
        "verify_sam2.clean.enabled=true", "verify_sam2.clean.iou_band=[0.5, 1.0]", "verify_sam2.clean.on_reject=drop",
    ])
    out = tmp_path / "out"
    m1 = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    assert all(lv["reconciled"] for lv in m1["counts"]["levels"].values())
    calls = _calls(log)
    entries = list((out / "_cache" / "sam2").rglob("*.json.gz"))
    assert calls > 0 and entries
    reference = _tree(out)
    assert "reports/verify_sam2/report.json" in reference

    # The crash: no manifest, no group record, the report and one data shard never written.
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "_meta" / "groups")
    shutil.rmtree(out / "reports" / "verify_sam2")
    shard = sorted((out / "webdataset").rglob("*.tar"))[0]
    shard.unlink()
    for marker in (out / "_meta" / "shards").rglob(shard.name + ".done"):
        marker.unlink()
    # ... and one cache entry was torn: a miss, recomputed and stored again (no crash, no reject).
    torn = sorted(entries)[0]
    torn.write_bytes(torn.read_bytes()[:7])
    flags = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    m2 = run_pipeline(cfg, str(out), flags, show_progress=False)
    # Only the torn entry's image went to SAM2 again (once per record that holds
    # it: RefCOCO and gRefCOCO share images); every other came from the cache.
    torn_sha = json.loads(gzip.decompress(torn.read_bytes()))["image_sha256"]
    again = {sha for line in _images_sent(log)[calls:] for sha in line.split()}
    assert again == {torn_sha}
    assert m2 == m1 and _tree(out) == reference
