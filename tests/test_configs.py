"""Every bundled config validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from orsgen.schemas.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bundled_config_validates(path):
    cfg = load_config(path)
    assert cfg.inputs
