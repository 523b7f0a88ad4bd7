"""Config loading: YAML + pydantic, errors name key and value."""

from __future__ import annotations

import pytest

from orsgen.schemas.config import ConfigError, load_config

GOOD = """
name: t
inputs:
  - {type: sa1b, name: sa, shards: ["sa1b/*.tar"]}
  - {type: coco, name: co, annotations: a.json, images: imgs/}
"""


def test_loads_and_resolves_relative_paths(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    cfg = load_config(p)
    assert cfg.inputs[0].shards == [str(tmp_path / "sa1b/*.tar")]
    assert cfg.inputs[1].annotations == str(tmp_path / "a.json")
    assert len(cfg.sha256()) == 64


def test_overrides_apply(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    cfg = load_config(p, ["regions.min_area_frac=0.01", "inputs.0.max_images=3", "write.formats=[parquet]"])
    assert cfg.regions.min_area_frac == 0.01
    assert cfg.inputs[0].max_images == 3
    assert cfg.write.formats == ["parquet"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("regions.min_area_frac=-1", "regions.min_area_frac = -1"),
        ("regions.typo_key=1", "regions.typo_key = 1"),
        ("inputs.0.name=has space", "inputs.0.name"),
        ("write.formats=[tfrecord]", "write.formats.0 = \"tfrecord\""),
        ("splits.ratios={train: 0.5}", "sum to 1"),
    ],
)
def test_errors_name_key_and_value(tmp_path, override, needle):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    with pytest.raises(ConfigError) as err:
        load_config(p, [override])
    assert needle in str(err.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["regions.min_area_frac"])


def test_duplicate_input_names(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD.replace("name: co", "name: sa"))
    with pytest.raises(ConfigError, match="unique"):
        load_config(p)


def test_redacted_config_masks_secret_values(tmp_path):
    import json

    from orsgen.schemas.config import redact_argv, redacted_config

    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    cfg = load_config(
        p,
        [
            "caption.backend.backend=managed",
            "caption.backend.model=Qwen/Qwen2.5-VL-7B-Instruct",
            "caption.backend.server_command=[vllm, serve, '{model}', --port, '{port}', --api-key, sk-SECRET1]",
            "caption.backend.server_env={HF_TOKEN: hf_SECRET2}",
        ],
    )
    dumped = json.dumps(redacted_config(cfg))
    assert "SECRET" not in dumped
    assert '"HF_TOKEN": "***"' in dumped and "--api-key" in dumped
    # The full config (and so its sha256) still holds the values; only what is written is masked.
    assert "SECRET1" in json.dumps(cfg.model_dump(mode="json"))
    assert redact_argv(["serve", "--token=abc", "--api-key", "k", "--port", "1"]) == [
        "serve", "--token=***", "--api-key", "***", "--port", "1"]
