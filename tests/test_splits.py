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


# ----------------------------------------------------------------- conflicts across inputs


def _copy(input_name: str, image_id: str = "coco:1"):
    from orsgen.schemas.records import ImageExample, ImageRecord

    return ImageExample(
        key=f"{input_name}-{image_id.replace(':', '_')}",
        image=ImageRecord(image_id, "coco", f"{input_name}.jpg", 4, 4, "x"),
        image_bytes=b"",
        input_name=input_name,
    )


def test_conflicting_copies_go_to_the_most_protected_split():
    from orsgen.stages.splits import SPLIT_CONFLICT, resolve_split_conflicts

    copies = [(_copy("refcocog"), "train"), (_copy("refcoco"), "testA"), (_copy("refcoco_plus"), "testA")]
    kept, dropped = resolve_split_conflicts(copies, ["train"])
    assert sorted((ex.input_name, s) for ex, s in kept) == [("refcoco", "testA"), ("refcoco_plus", "testA")]
    assert [(ex.input_name, r.reason, r.level) for ex, r in dropped] == [("refcocog", SPLIT_CONFLICT, "image")]
    assert "testA" in dropped[0][1].message and "refcoco" in dropped[0][1].message
    # ood beats evaluation beats training; ties are alphabetical, whatever the order of arrival.
    for order in ([("a", "val"), ("b", "ood_area"), ("c", "train")], [("c", "train"), ("a", "val"), ("b", "ood_area")]):
        kept, dropped = resolve_split_conflicts([(_copy(n), s) for n, s in order], ["train"])
        assert [s for _, s in kept] == ["ood_area"] and len(dropped) == 2
    kept, _ = resolve_split_conflicts([(_copy("a"), "val"), (_copy("b"), "test")], ["train"])
    assert [s for _, s in kept] == ["test"]


def test_agreeing_copies_are_all_kept():
    from orsgen.stages.splits import resolve_split_conflicts

    kept, dropped = resolve_split_conflicts([(_copy("a"), "val"), (_copy("b"), "val")], ["train"])
    assert len(kept) == 2 and not dropped
