"""orsgen publish: Hub layout, dataset card, offline loading, upload call path, token hygiene."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orsgen.pipelines.cli import app
from orsgen.stages.dataset.publish import (
    PublishError,
    card_yaml_configs,
    hub_card_yaml,
    plan_layout,
    prepare_hub_folder,
    size_category,
)

FAKE_TOKEN = "hf_FAKEtokenForOrsgenTests0123456789"


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def staged(demo_output, tmp_path_factory):
    """One dry run through the CLI, with a token in the environment."""
    staging = tmp_path_factory.mktemp("publish") / "hub"
    before = _digests(demo_output)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", FAKE_TOKEN)
    try:
        res = CliRunner().invoke(
            app, ["publish", str(demo_output), "--repo-id", "orsgen/demo-ors", "--dry-run", "--staging", str(staging)]
        )
    finally:
        mp.undo()
    return {"staging": staging, "result": res, "before": before}


def test_dry_run_prepares_without_touching_the_run(staged, demo_output):
    res = staged["result"]
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output
    assert FAKE_TOKEN not in res.output
    assert _digests(demo_output) == staged["before"], "publish modified the run folder"
    st = staged["staging"]
    files = sorted(str(p.relative_to(st)) for p in st.rglob("*") if p.is_file())
    assert "README.md" in files and "manifest.json" in files and "assets/preview.png" in files
    assert (st / "assets/preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = [f for f in files if f.startswith("data/")]
    tars = [f for f in files if f.startswith("webdataset/")]
    assert data and tars and all(f.endswith(".parquet") for f in data) and all(f.endswith(".tar") for f in tars)
    # The Hub's <split>-NNNNN-of-MMMMM pattern, numbered per split.
    for f in data + tars:
        name = f.rsplit("/", 1)[-1]
        split, rest = name.split("-", 1)
        i, of = rest.split(".")[0].split("-of-")
        assert len(i) == len(of) == 5 and int(i) < int(of)
        assert sum(1 for g in data + tars if g.rsplit("/", 1)[-1].startswith(f"{split}-") and g[:4] == f[:4]) == int(of)
    assert not [f for f in files if "/." in f or f.startswith(".tmp")], "temporary files left behind"


def test_folder_loads_offline_with_every_config_and_split(staged, demo_output, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = str(staged["staging"])
    manifest = json.loads((demo_output / "manifest.json").read_text())
    configs = datasets.get_dataset_config_names(st)
    assert configs == ["default", "rejects"]
    ds = datasets.load_dataset(st, cache_dir=str(tmp_path / "cache"))
    assert set(ds) == set(manifest["splits"])  # custom split names (testA, testB) included
    for split, v in manifest["splits"].items():
        assert ds[split].num_rows == v["images"]
        assert sum(len(r) for r in ds[split]["samples"]) == v["samples"]
    row = ds["testA"][0]
    assert row["image"].size == (row["width"], row["height"])  # the Image feature from the card decodes bytes
    assert {"expression", "kind", "union_rle", "targets"} <= set(row["samples"][0])
    rej = datasets.load_dataset(st, "rejects", cache_dir=str(tmp_path / "cache"))
    assert rej["rejects"].num_rows == sum(manifest["rejects_by_reason"].values())
    # The WebDataset variant reads with the snippet the card documents.
    from orsgen.stages.dataset.features import webdataset_features

    wds = datasets.load_dataset(
        "webdataset",
        data_files={"train": f"{st}/webdataset/train-*.tar"},
        features=webdataset_features(),
        cache_dir=str(tmp_path / "cache"),
    )
    assert wds["train"].num_rows == manifest["splits"]["train"]["images"]


def test_card_parses_with_dataset_card_and_reports_the_funnel(staged, demo_output):
    from huggingface_hub import DatasetCard

    st = staged["staging"]
    card = DatasetCard.load(st / "README.md")
    d = card.data.to_dict()
    manifest = json.loads((demo_output / "manifest.json").read_text())
    assert d["license"] == "other" and d["license_link"] == "LICENSE.md" and (st / "LICENSE.md").is_file()
    assert d["task_categories"] == ["image-segmentation", "object-detection"]
    assert d["size_categories"] == [size_category(sum(v["images"] for v in manifest["splits"].values()))]
    assert d["pretty_name"] == manifest["name"]
    cfgs = {c["config_name"]: c for c in d["configs"]}
    assert cfgs["default"]["default"] is True
    assert {f["split"] for f in cfgs["default"]["data_files"]} == set(manifest["splits"])
    infos = {i["config_name"]: i for i in d["dataset_info"]}
    assert {s["name"]: s["num_examples"] for s in infos["default"]["splits"]} == {k: v["images"] for k, v in manifest["splits"].items()}
    body = card.text
    # Funnel, drops by reason, samples by kind and split: the manifest's numbers.
    for level, v in manifest["counts"]["levels"].items():
        assert f"| {level} | {v['inputs']} | {v['written']} | {v['rejected']} | yes |" in body
    for reason, n in manifest["rejects_by_reason"].items():
        assert f"| {reason} | {n} |" in body
    for split, v in manifest["splits"].items():
        assert f"| `{split}` | {v['images']} | {v['samples']} |" in body
        for kind in v["samples_by_kind"]:
            assert f"`{kind}`" in body
    # Provenance and sources.
    assert manifest["config_sha256"] in body
    assert "regions.pred_iou_thresh" in body
    for key in ("kirillov2023segany", "lin2014microsoft", "yu2016modeling", "mao2016generation", "liu2023gres", "kazemzadeh2014referitgame"):
        assert f"@inproceedings{{{key}," in body
    assert "![preview" in body and "assets/preview.png" in body
    assert "crowd_policy: skip" in body  # the demo's choice about crowd regions is stated
    assert 'load_dataset("orsgen/demo-ors")' in body


def test_upload_goes_through_huggingface_hub_without_leaking_the_token(staged, demo_output, monkeypatch, caplog):
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def recorder(name):
        def record(self, *args, **kwargs):
            calls.append((name, kwargs))

        return record

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", recorder("create_repo"))
    monkeypatch.setattr(HfApi, "create_branch", recorder("create_branch"))
    monkeypatch.setattr(HfApi, "upload_folder", recorder("upload_folder"))
    monkeypatch.setattr(HfApi, "upload_large_folder", recorder("upload_large_folder"), raising=False)
    caplog.set_level(logging.DEBUG)
    st = staged["staging"]
    res = CliRunner().invoke(
        app,
        ["publish", str(demo_output), "--repo-id", "orsgen/demo-ors", "--private", "--revision", "v1", "--staging", str(st)],
    )
    assert res.exit_code == 0, res.output
    assert "reused" in res.output  # the staged folder is resumed, not rebuilt
    names = [n for n, _ in calls]
    assert names == ["create_repo", "create_branch", "upload_large_folder"]
    assert calls[0][1] == {"repo_id": "orsgen/demo-ors", "repo_type": "dataset", "private": True, "exist_ok": True}
    assert calls[1][1]["branch"] == "v1"
    up = calls[2][1]
    assert up["folder_path"] == str(st) and up["repo_type"] == "dataset" and up["revision"] == "v1"
    assert ".orsgen-publish.json" in up["ignore_patterns"]
    assert all(FAKE_TOKEN not in json.dumps(kw, default=str) for _, kw in calls)
    assert FAKE_TOKEN not in res.output and FAKE_TOKEN not in caplog.text

    # huggingface_hub >= 1.0 folds upload_large_folder into upload_folder (resumable Xet uploads).
    calls.clear()
    monkeypatch.delattr(HfApi, "upload_large_folder", raising=False)
    res = CliRunner().invoke(app, ["publish", str(demo_output), "--repo-id", "orsgen/demo-ors", "--staging", str(st)])
    assert res.exit_code == 0, res.output
    assert [n for n, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[1][1]["revision"] is None

    # A hub error is reported without the token, even when the message holds it.
    def boom(self, **kwargs):
        raise RuntimeError(f"server said no to Bearer {FAKE_TOKEN}")

    monkeypatch.setattr(HfApi, "upload_folder", boom)
    res = CliRunner().invoke(app, ["publish", str(demo_output), "--repo-id", "orsgen/demo-ors", "--staging", str(st)])
    assert res.exit_code == 2 and "resume" in res.output and FAKE_TOKEN not in res.output


def test_no_token_is_a_clear_error(staged, demo_output, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    res = CliRunner().invoke(app, ["publish", str(demo_output), "--repo-id", "orsgen/demo-ors", "--staging", str(staged["staging"])])
    assert res.exit_code == 2 and "hf auth login" in res.output


def test_nested_layout_past_the_folder_cap_still_loads(demo_output, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    layout = plan_layout(str(demo_output), max_files_per_folder=3)
    dests = [f.dest for f in layout.files]
    folders: dict[str, int] = {}
    for d in dests:
        folders[d.rsplit("/", 1)[0]] = folders.get(d.rsplit("/", 1)[0], 0) + 1
    assert max(folders.values()) <= 3
    assert any(d.count("/") == 3 for d in dests)  # train (6 shards) is chunked
    st = tmp_path / "hub3"
    prepare_hub_folder(str(demo_output), st, repo_id="orsgen/demo-ors", max_files_per_folder=3, preview_n=2)
    ds = datasets.load_dataset(str(st), cache_dir=str(tmp_path / "cache"))
    manifest = json.loads((demo_output / "manifest.json").read_text())
    assert {k: v.num_rows for k, v in ds.items()} == {k: v["images"] for k, v in manifest["splits"].items()}


def test_staging_safety(demo_output, tmp_path):
    # A folder that is not this run's staging folder is never overwritten.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PublishError, match="never overwrites"):
        prepare_hub_folder(str(demo_output), other, repo_id="orsgen/demo-ors")
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(PublishError, match="inside the dataset folder"):
        prepare_hub_folder(str(demo_output), demo_output / "hub", repo_id="orsgen/demo-ors")
    with pytest.raises(PublishError, match="ORG/NAME"):
        prepare_hub_folder(str(demo_output), tmp_path / "x", repo_id="no-slash")
    # A shard changed after the run does not match its manifest sha256.
    copy = tmp_path / "run"
    shutil.copytree(demo_output, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    victim = copy / next(s["path"] for s in manifest["shards"] if s["format"] == "parquet")
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(PublishError, match="sha256"):
        prepare_hub_folder(str(copy), tmp_path / "hub", repo_id="orsgen/demo-ors")
    assert not (tmp_path / "hub").exists() and not list(tmp_path.glob(".hub.tmp-*"))


def test_card_helpers():
    assert size_category(0) == "n<1K" and size_category(1000) == "1K<n<10K" and size_category(5_000_000) == "1M<n<10M"
    cfg = card_yaml_configs({"default": {"ood_rare": ["data/ood_rare-*.parquet"], "testA": ["a/*.parquet", "b/*.parquet"]}})
    assert cfg == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "ood_rare", "path": "data/ood_rare-*.parquet"},
                {"split": "testA", "path": ["a/*.parquet", "b/*.parquet"]},
            ],
            "default": True,
        }
    ]
    assert hub_card_yaml("---\nlicense: mit\n---\n\nbody")["license"] == "mit"


def test_card_provenance_skips_stages_that_did_not_run():
    from orsgen.stages.dataset.publish import provenance_of

    config = {
        "caption": {"enabled": False, "backend": {"model": "Qwen/Qwen2.5-VL-72B-Instruct"}},
        "verify_sam2": {"model": "facebook/sam2.1-hiera-large", "filter": {"enabled": False, "iou_thresh": 0.6},
                        "clean": {"enabled": False}, "report": {"enabled": True}},
        "regions": {"pred_iou_thresh": 0.88},
    }
    prov = provenance_of({"config": config})
    assert not any(k.startswith(("caption", "verify_sam2")) for part in prov.values() for k in part)
    assert prov["thresholds"] == {"regions.pred_iou_thresh": 0.88}
    config["verify_sam2"]["filter"]["enabled"] = True
    prov = provenance_of({"config": config})
    assert prov["models"]["verify_sam2.model"] == "facebook/sam2.1-hiera-large"
    assert "verify_sam2.filter.iou_thresh" in prov["thresholds"]
    assert not any(k.startswith("caption") for part in prov.values() for k in part)


def test_card_says_when_crowd_regions_are_left_unmasked():
    from orsgen.stages.dataset.publish import _crowd_section

    manifest = {
        "config": {"expressions": {"enabled": True, "crowd_policy": "non_crowd"}},
        "counts": {"expressions": {"category/crowd_region_unmasked": 7}},
    }
    text = " ".join(_crowd_section(manifest))
    assert "crowd region is left unmasked" in text and "7 sample(s)" in text and "crowd_ids" in text
    manifest["config"]["expressions"]["crowd_policy"] = "skip"
    assert "unmasked" not in " ".join(_crowd_section(manifest))
    assert _crowd_section({"config": {"expressions": {"enabled": False}}}) == []


def test_non_crowd_samples_record_the_crowd_they_leave_out():
    from orsgen.schemas.config import ExpressionConfig
    from orsgen.stages.expressions.categories import category_candidates
    from orsgen.stages.expressions.context import ImageContext
    from orsgen.stages.expressions.stage import margins_for
    from orsgen.stages.expressions.templates import load_templates

    import numpy as np
    from orsgen.schemas.records import Instance
    from orsgen.stages.common.masks import encode_mask, rle_area, rle_bbox_xywh, xywh_to_xyxy

    def inst(i, crowd, x0):
        m = np.zeros((40, 80), dtype=bool)
        m[5:30, x0 : x0 + 10] = True
        rle = encode_mask(m)
        xywh = rle_bbox_xywh(rle)
        return Instance(f"i/ann:{i}", "i", rle, xywh, xywh_to_xyxy(xywh), rle_area(rle), 1, "person", "person", crowd)

    ctx = ImageContext.build("i", 80, 40, [inst(1, False, 2), inst(2, False, 20), inst(3, True, 50)],
                             margins_for(ExpressionConfig(), 80, 40), seed=0)
    cands, counts = category_candidates(ctx, load_templates(), crowd_policy="non_crowd")
    (c,) = cands
    assert c.target_ids == ("i/ann:1", "i/ann:2")
    assert c.metadata["crowd_excluded"] is True and c.metadata["crowd_policy"] == "non_crowd"
    assert c.metadata["crowd_ids"] == ["i/ann:3"] and counts["crowd_region_unmasked"] == 1
