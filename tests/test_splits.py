"""Split assignment is deterministic, proportional and honours source splits."""

from __future__ import annotations

from collections import Counter

from orsgen.schemas.config import SplitConfig
from orsgen.stages.splits import assign_split


def test_deterministic_and_proportional():
    cfg = SplitConfig(ratios={"train": 0.8, "val": 0.1, "test": 0.1}, salt="s")
    ids = [f"coco:{i}" for i in range(20000)]
    a = [assign_split(i, cfg) for i in ids]
    assert a == [assign_split(i, cfg) for i in ids]
    c = Counter(a)
    assert abs(c["train"] / len(ids) - 0.8) < 0.02 and abs(c["val"] / len(ids) - 0.1) < 0.02


def test_salt_changes_partition_and_source_split_wins():
    a = SplitConfig(salt="a")
    b = SplitConfig(salt="b")
    ids = [f"sa1b:{i}" for i in range(200)]
    assert [assign_split(i, a) for i in ids] != [assign_split(i, b) for i in ids]
    assert assign_split("coco:1", a, "testA") == "testA"
    assert assign_split("coco:1", SplitConfig(keep_source_splits=False, ratios={"train": 1.0}), "testA") == "train"
