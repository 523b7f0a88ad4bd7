"""The whole pipeline on the demo inputs, through Beam's Python direct runner.

One module-scoped build in-process and one with two worker processes; the
tests check they are byte-identical, load with `datasets` and `webdataset`,
reconcile, survive reruns, and route bad input to rejects.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from orsgen.pipelines.run import run_pipeline
from orsgen.pipelines.demo_data import generate_demo_inputs
from orsgen.schemas.config import load_config
from orsgen.stages.write import OutputConflictError

pytestmark = pytest.mark.slow

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every output file except the hidden temp names (none should exist)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    cfg_path = generate_demo_inputs(base / "inputs", seed=0)
    cfg = load_config(cfg_path)
    out1 = base / "out_inprocess"
    out2 = base / "out_multiproc"
    m1 = run_pipeline(cfg, str(out1), ["--runner=FnApiRunner"], show_progress=False)
    m2 = run_pipeline(cfg, str(out2), ["--runner=FnApiRunner", *MULTI], show_progress=False)
    return {"base": base, "cfg_path": cfg_path, "cfg": cfg, "out1": out1, "out2": out2, "m1": m1, "m2": m2}


def test_in_process_and_multi_process_are_byte_identical(demo):
    d1, d2 = _digests(demo["out1"]), _digests(demo["out2"])
    assert d1 == d2
    assert any(k.startswith("webdataset/") for k in d1) and any(k.startswith("parquet/") for k in d1)
    assert not [k for k in d1 if "/." in k or k.startswith(".")], "temporary files left behind"


def test_manifest_reconciles_every_level(demo):
    m = demo["m1"]
    c = m["counts"]
    assert c["inputs"] == c["written"] + c["rejected"] > 0
    for level, v in c["levels"].items():
        assert v["inputs"] == v["written"] + v["rejected"], level
        assert v["reconciled"], level
    assert c["levels"]["instances"]["rejected"] > 0  # region selection dropped some
    assert m["config_sha256"] == demo["cfg"].sha256()
    # Every shard listed exists with its sha256.
    for s in m["shards"]:
        data = (demo["out1"] / s["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
    # Per-split counts add up to what was written.
    assert sum(v["images"] for v in m["splits"].values()) == c["written"]


def test_loads_with_datasets_parquet_and_webdataset(demo, monkeypatch, tmp_path):
    import datasets

    from orsgen.stages.dataset.features import webdataset_features

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = str(tmp_path / "hf")
    out = demo["out1"]
    m = demo["m1"]
    pq = datasets.load_dataset("parquet", data_dir=str(out / "parquet"), cache_dir=cache)
    n_pq = sum(len(v) for v in pq.values())
    assert n_pq == m["counts"]["written"]
    row = next(iter(next(iter(pq.values()))))
    assert isinstance(row["image"], bytes) and row["image"][:2] == b"\xff\xd8"
    splits = sorted({s["split"] for s in m["shards"] if s["format"] == "webdataset"})
    assert sorted(pq) == splits  # custom split names (testA, testB) included
    wds = datasets.load_dataset(
        "webdataset", data_dir=str(out / "webdataset"), features=webdataset_features(), cache_dir=cache
    )
    assert sorted(wds) == splits
    assert sum(len(v) for v in wds.values()) == m["counts"]["written"]
    # The same tars named explicitly, split by split (the manifest lists them).
    files = {
        split: [str(out / s["path"]) for s in m["shards"] if s["format"] == "webdataset" and s["split"] == split]
        for split in splits
    }
    wds_files = datasets.load_dataset("webdataset", data_files=files, features=webdataset_features(), cache_dir=cache)
    assert {k: len(v) for k, v in wds_files.items()} == {k: len(v) for k, v in wds.items()}


def test_loads_with_webdataset_library(demo):
    import webdataset as wds

    tars = sorted(str(p) for p in (demo["out1"] / "webdataset").rglob("*.tar"))
    n = 0
    for sample in wds.WebDataset(tars, shardshuffle=False):
        assert set(sample) >= {"__key__", "jpg", "json"}
        assert "." not in sample["__key__"]
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"]
        n += 1
    assert n == demo["m1"]["counts"]["written"]


def test_human_samples_have_targets_and_masks(demo):
    import pyarrow.parquet as pq

    from orsgen.stages.common.masks import rle_area, rle_union
    from orsgen.schemas.records import Rle

    kinds = set()
    for p in (demo["out1"] / "parquet").rglob("*.parquet"):
        for row in pq.read_table(p).to_pylist():
            insts = {i["instance_id"]: i for i in row["instances"]}
            for s in row["samples"]:
                kinds.add(s["kind"])
                if s["kind"] == "no_target":
                    assert s["target_ids"] == [] and rle_area(Rle.from_coco(s["union_rle"])) == 0
                    continue
                assert s["target_ids"] and len(s["targets"]) == len(s["target_ids"])
                union = rle_union([Rle.from_coco(insts[t]["rle"]) for t in s["target_ids"]])
                assert Rle.from_coco(s["union_rle"]) == union
                assert s["split"] == row["split"]
    assert {"human", "no_target"} <= kinds


def test_rerun_skips_completed_shards(demo):
    out = demo["out1"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "_meta" not in p.parts}
    digests = _digests(out)
    m = run_pipeline(demo["cfg"], str(out), ["--runner=FnApiRunner"], show_progress=False)
    assert m == demo["m1"]
    assert _digests(out) == digests
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before, "a completed shard was rewritten"


def test_rerun_after_a_crash_with_a_fixed_bucket_count_equals_the_clean_run(demo, tmp_path):
    """With an integer ``num_buckets`` the records are keyed in Encode's own stage and the
    completed groups' records reach their stand-ins as a side input: a rerun after a crash
    still skips the completed groups and writes what the clean run wrote."""
    assert isinstance(demo["cfg"].write.num_buckets, int)
    out = tmp_path / "out"
    shutil.copytree(demo["out1"], out)
    reference = _digests(out)
    groups = sorted((out / "_meta" / "groups").iterdir())
    assert len(groups) >= 3
    # The crash: one group lost its record and its shards' markers; no manifest was written.
    lost = groups[1]
    for marker in (out / "_meta" / "shards").rglob(f"{lost.name[: -len('.json')]}-*.done"):
        marker.unlink()
    lost.unlink()
    (out / "manifest.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in groups if p != lost}
    m = run_pipeline(demo["cfg"], str(out), ["--runner=FnApiRunner"], show_progress=False)
    assert m == demo["m1"] and _digests(out) == reference
    # The completed groups were replayed from their records, not rewritten.
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert lost.exists()


def test_other_config_into_same_output_is_refused(demo):
    cfg = load_config(demo["cfg_path"], ["regions.min_area_px=100"])
    with pytest.raises(OutputConflictError, match="another config"):
        run_pipeline(cfg, str(demo["out1"]), ["--runner=FnApiRunner"], show_progress=False)


def test_bad_inputs_become_rejects_end_to_end(demo, tmp_path):
    """A truncated shard, a corrupt JPEG and an unsafe member flow to rejects; counts reconcile."""
    inputs = tmp_path / "inputs"
    shutil.copytree(demo["base"] / "inputs", inputs)
    sa1b = inputs / "sa1b"
    good = (sa1b / "sa_000000.tar").read_bytes()
    (sa1b / "sa_000009.tar").write_bytes(good[: len(good) // 2])  # truncated
    # A shard with a corrupt image, a path-traversal member and a valid pair.
    with tarfile.open(sa1b / "sa_000000.tar") as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, (m, data) in enumerate(members[:4]):
            name = m.name  # copies of images already in sa_000000.tar
            if i == 0 and name.endswith(".jpg"):
                data = data[:40] + b"\x00" * 64
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        evil = b"{}"
        info = tarfile.TarInfo("../evil.json")
        info.size = len(evil)
        tar.addfile(info, io.BytesIO(evil))
    (sa1b / "sa_000008.tar").write_bytes(buf.getvalue())
    cfg = load_config(inputs / "demo.yaml", ["inputs.0.shards=[sa1b/sa_*.tar]"])
    assert len(cfg.inputs[0].shards) == 1 and cfg.inputs[0].shards[0].endswith("sa_*.tar")
    out = tmp_path / "out"
    m = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    c = m["counts"]
    reasons = c["rejected_by_reason"]
    assert reasons.get("shard/truncated_tar", 0) >= 1
    # The truncated copy repeats images of sa_000000.tar: kept once, the rest rejected.
    assert reasons.get("image/duplicate_image", 0) >= 1
    assert reasons.get("image/corrupt_image", 0) == 1
    assert reasons.get("shard/unsafe_member", 0) == 1
    for level, v in c["levels"].items():
        assert v["inputs"] == v["written"] + v["rejected"], level
    assert not (tmp_path / "evil.json").exists() and not (out.parent / "evil.json").exists()
    # The rejects Parquet holds them with their source keys.
    import pyarrow.parquet as pq

    rows = [r for p in (out / "rejects").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    assert any(r["reason"] == "corrupt_image" and "sa_000008.tar" in r["source_key"] for r in rows)
    assert len(rows) == sum(reasons.values())


def test_cli_demo_runs(tmp_path):
    from typer.testing import CliRunner

    from orsgen.pipelines.cli import app

    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "dataset" / "manifest.json").exists()
    bad = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--set", "regions.min_area_frac=-1"])
    assert bad.exit_code == 2
    assert "regions.min_area_frac = -1" in bad.output
    assert os.path.exists(tmp_path / "d" / "inputs" / "demo.yaml")
    # Inputs of another seed are not silently reused.
    other = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--seed", "1", "--quiet"])
    assert other.exit_code == 2 and "--seed 0" in other.output


def test_cli_run_passes_beam_flags_through_and_reports_missing_inputs(tmp_path, monkeypatch):
    """`orsgen run CONFIG --out DIR --set k=v -- <Beam flags>`: flags reach Beam untouched."""
    from typer.testing import CliRunner

    from orsgen.pipelines import cli, commands_build, run

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("inputs:\n  - {type: coco, name: co, annotations: a.json, images: imgs/}\n")
    (tmp_path / "a.json").write_text("{}")
    seen = {}

    def capture(cfg, out, beam_args, *, show_progress):
        # Only the CLI's parsing is under test here; the real runs are above.
        seen.update(cfg=cfg, out=out, beam_args=beam_args)
        return {"counts": {}}

    monkeypatch.setattr(commands_build, "run_pipeline", capture)
    flags = ["--runner=DataflowRunner", "--project=p", "--direct_num_workers=2"]
    res = CliRunner().invoke(
        cli.app, ["run", str(cfg_path), "--out", str(tmp_path / "o"), "--set", "regions.min_area_px=5", "--quiet", "--", *flags]
    )
    assert res.exit_code == 0, res.output
    assert seen["beam_args"] == flags and seen["out"] == str(tmp_path / "o")
    assert seen["cfg"].regions.min_area_px == 5
    opts = run.pipeline_options(seen["beam_args"]).get_all_options()
    assert (opts["runner"], opts["project"], opts["direct_num_workers"]) == ("DataflowRunner", "p", 2)
    assert run.pipeline_options([]).get_all_options()["runner"] == run.DEFAULT_RUNNER
    monkeypatch.undo()

    # A missing top-level input is one clear sentence naming the key, before any job starts.
    (tmp_path / "a.json").unlink()
    res = CliRunner().invoke(cli.app, ["run", str(cfg_path), "--out", str(tmp_path / "o2"), "--quiet"])
    assert res.exit_code == 2
    assert "inputs.0.annotations" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o2").exists()
    cfg_path.write_text("inputs:\n  - {type: sa1b, name: sa, shards: [nope/sa_*.tar]}\n")
    res = CliRunner().invoke(cli.app, ["run", str(cfg_path), "--out", str(tmp_path / "o3"), "--quiet"])
    assert res.exit_code == 2 and "matches no file" in res.output and "Traceback" not in res.output


def test_splits_stay_image_disjoint_when_inputs_disagree(demo, tmp_path):
    """RefCOCO and gRefCOCO copies of one image with different source splits: one split wins."""
    import pyarrow.parquet as pq

    inputs = tmp_path / "inputs"
    shutil.copytree(demo["base"] / "inputs", inputs)
    grefs_path = inputs / "grefcoco" / "grefs(unc).json"
    grefs = json.loads(grefs_path.read_text())
    for r in grefs:
        r["split"] = "train"  # RefCOCO puts some of these images in val/testA/testB
    grefs_path.write_text(json.dumps(grefs))
    cfg = load_config(inputs / "demo.yaml")
    out = tmp_path / "out"
    m = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    splits_of: dict[str, set[str]] = {}
    for p in (out / "parquet").rglob("*.parquet"):
        for row in pq.read_table(p, columns=["image_id", "split"]).to_pylist():
            splits_of.setdefault(row["image_id"], set()).add(row["split"])
    assert all(len(v) == 1 for v in splits_of.values()), {k: v for k, v in splits_of.items() if len(v) > 1}
    conflicts = m["counts"]["rejected_by_reason"].get("image/split_conflict", 0)
    assert conflicts >= 1
    # The evaluation copies won: no RefCOCO evaluation image is in train.
    assert {"testA", "testB", "val"} & {s for v in splits_of.values() for s in v}
    for level, v in m["counts"]["levels"].items():
        assert v["inputs"] == v["written"] + v["rejected"], level


def _sa1b_only_config(demo, tmp_path: Path, extra: str = "") -> Path:
    """The demo's SA-1B input alone, plus a truncated copy of its first shard."""
    inputs = tmp_path / "inputs"
    shutil.copytree(demo["base"] / "inputs" / "sa1b", inputs / "sa1b")
    good = (inputs / "sa1b" / "sa_000000.tar").read_bytes()
    (inputs / "sa1b" / "sa_000009.tar").write_bytes(good[: len(good) * 2 // 3])  # truncated copy
    cfg_path = inputs / "sa1b.yaml"
    cfg_path.write_text(
        "name: sa1b-only\nseed: 0\ninputs:\n- name: sa1b\n  type: sa1b\n  shards: [sa1b/sa_*.tar]\n"
        f"write: {{num_buckets: 2, shard_max_images: 4}}\n{extra}"
    )
    return cfg_path


def test_sa1b_images_without_regions_are_counted_once_and_duplicates_named(demo, tmp_path):
    """Every region dropped: one no_regions per image, its instances counted once, copies are duplicates."""
    cfg = load_config(_sa1b_only_config(demo, tmp_path, "regions: {min_area_px: 100000000}\n"))
    out = tmp_path / "out"
    m = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)  # raises if it does not reconcile
    c = m["counts"]
    for level, v in c["levels"].items():
        assert v["reconciled"] and v["inputs"] == v["written"] + v["rejected"], (level, v)
    assert c["levels"]["images"]["written"] == 0
    import pyarrow.parquet as pq

    rows = [r for p in (out / "rejects").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    no_regions = [r["image_id"] for r in rows if r["reason"] == "no_regions"]
    dups = [r["image_id"] for r in rows if r["reason"] == "duplicate_image"]
    assert no_regions and len(no_regions) == len(set(no_regions)), "an image got two no_regions rejects"
    assert dups and set(dups) <= set(no_regions), "the truncated tar's copies must be reported as duplicates"
    # Each region of the kept copies has exactly one reject row; the instance level adds up without a
    # second count of the same regions "with their image".
    inst_rows = [r for r in rows if r["level"] == "instance"]
    assert c["levels"]["instances"]["rejected"] == len(inst_rows) == c["levels"]["instances"]["inputs"]


def test_a_manifest_that_does_not_reconcile_fails_the_run(demo, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import orsgen.pipelines.build as build
    from orsgen.pipelines import cli
    from orsgen.pipelines.run import UNRECONCILED_EXIT, reconciliation_problem

    assert reconciliation_problem(demo["m1"]) is None
    real = build.reconcile

    def off_by_seven(events, rejects_by_level):  # a stage that lost 7 instances without a word
        levels = real(events, rejects_by_level)
        levels["instances"]["inputs"] += 7
        levels["instances"]["reconciled"] = False
        return levels

    monkeypatch.setattr(build, "reconcile", off_by_seven)
    cfg_path = _sa1b_only_config(demo, tmp_path)
    res = CliRunner().invoke(cli.app, ["run", str(cfg_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == UNRECONCILED_EXIT != 0, res.output
    text = " ".join(res.output.split())
    assert "does not reconcile" in text and "instances level" in text and "7 fewer than" in text, text
    assert (tmp_path / "o" / "manifest.json").exists()  # kept for inspection


def test_preview_of_an_output_without_samples_draws_its_regions(demo, tmp_path):
    """SA-1B before captioning has regions and no samples: the preview shows mask, box, points and id."""
    import numpy as np
    from PIL import Image

    from orsgen.stages.dataset.preview import REGION_KIND, PreviewError, pick_across_splits, write_preview

    cfg = load_config(_sa1b_only_config(demo, tmp_path))
    out = tmp_path / "out"
    m = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    assert sum(v["samples"] for v in m["splits"].values()) == 0 and m["counts"]["levels"]["instances"]["written"] > 0
    items, drawn, regions = pick_across_splits(str(out), 8)
    assert regions and len(items) == 8 and sum(drawn.values()) == 8
    for it in items:
        (tid,) = it.sample.target_ids
        assert it.sample.kind == REGION_KIND and tid in it.instances and tid in it.sample.expression
        (t,) = it.sample.targets
        inst = it.instances[tid]
        assert tuple(t.bbox_xyxy) == tuple(float(v) for v in inst.bbox_xyxy)
    res = write_preview(str(out), str(tmp_path / "r.png"), n=6)
    assert res["regions"] is True and res["by_kind"] == {REGION_KIND: 6}
    sheet = np.asarray(Image.open(tmp_path / "r.png"))
    assert sheet.std() > 10  # something was drawn
    # Nothing at all (no images): still a clear error, not an empty sheet.
    with pytest.raises(PreviewError):
        write_preview(str(tmp_path / "missing"), str(tmp_path / "e.png"))
