"""The pyarrow schema mirrors the record dataclasses, and rows round-trip."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from orsgen.schemas import arrow
from orsgen.schemas.records import (
    ImageExample,
    ImageRecord,
    Instance,
    Ref,
    RefSentence,
    Reject,
    RejectLevel,
    Rle,
    Sample,
    TargetGeometry,
    safe_key,
)


@pytest.mark.parametrize("cls,struct", list(arrow.STRUCT_OF.items()), ids=lambda v: getattr(v, "__name__", ""))
def test_struct_fields_match_dataclass(cls, struct):
    names = [f.name for f in dataclasses.fields(cls)]
    assert [struct.field(i).name for i in range(struct.num_fields)] == names


def test_example_schema_matches_records():
    img_fields = [f.name for f in dataclasses.fields(ImageRecord)]
    ex_fields = {f.name for f in dataclasses.fields(ImageExample)}
    schema_names = arrow.EXAMPLE_SCHEMA.names
    # Image fields are flattened into the row; image_bytes is stored as "image".
    assert list(arrow.IMAGE_COLUMNS) == img_fields
    expected = {"key", "split", "input_name", "instances", "refs", "samples"} | set(img_fields) | {"image"}
    assert set(schema_names) == expected
    # presence: rejected annotations kept as context for the expressions stage, never written.
    assert ex_fields - {"image", "image_bytes", "presence"} <= set(schema_names)


def test_reject_schema_matches_records():
    assert arrow.REJECT_SCHEMA.names == [f.name for f in dataclasses.fields(Reject)]


def _example() -> ImageExample:
    rle = Rle((4, 5), "04N0")
    inst = Instance(
        instance_id="coco:1/ann:2", image_id="coco:1", rle=rle, bbox_xywh=(0, 0, 1, 4), bbox_xyxy=(0, 0, 1, 4),
        area_px=4, category_id=3, category_name="cup", supercategory="kitchen", iscrowd=False,
        predicted_iou=0.9, stability_score=None, point_coords=((1.0, 2.0),), crop_box=None, source_ann_id=2,
        mask_origin="polygon",
    )
    ref = Ref(7, "coco:1", (2,), (3,), "val", (RefSentence(9, "The cup", "the cup"),), "refcoco_unc")
    sample = Sample(
        sample_id="s1", image_id="coco:1", expression="the cup", kind="human", target_ids=("coco:1/ann:2",),
        split="val", generator="refcoco_unc", union_rle=rle, union_svg="M 0 0 L 1 0 L 1 1 Z",
        targets=(TargetGeometry("coco:1/ann:2", (0, 0, 1, 4), (0, 1), (0, 2), (0, 0, 200, 1000)),),
        sam2_ious=(0.8,), reground_box=(0, 0, 1, 4), reground_iou=0.9, metadata={"ref_id": 7},
    )
    return ImageExample(
        key="x-coco_1", image=ImageRecord("coco:1", "coco", "mem://1.jpg", 5, 4, "ab", "1.jpg"),
        image_bytes=b"\xff\xd8", instances=(inst,), refs=(ref,), samples=(sample,), split="val", input_name="x",
    )


def test_row_round_trip_through_arrow():
    ex = _example()
    table = pa.Table.from_pylist([arrow.example_to_row(ex)], schema=arrow.EXAMPLE_SCHEMA)
    back = arrow.example_from_row(table.to_pylist()[0])
    assert back == ex


def test_row_rejects_wrong_types():
    row = arrow.example_to_row(_example())
    row["width"] = "wide"
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        pa.Table.from_pylist([row], schema=arrow.EXAMPLE_SCHEMA)


def test_safe_key_has_no_dots():
    assert safe_key("refcoco.unc-coco:1/2") == "refcoco_unc-coco_1_2"


def test_records_pickle_to_dataclasses_own_state_and_bytes():
    """``pickled_by_slots``: the state ``dataclasses`` would pickle (same bytes), and back."""
    import pickle

    from tests.test_write import _example

    from orsgen.schemas import records

    def own_state(self):  # dataclasses' own __getstate__ for slots classes
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    classes = [
        c for c in vars(records).values()
        if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == records.__name__
    ]
    assert all(c.__getstate__.__qualname__.startswith("pickled_by_slots") for c in classes), classes
    ex = _example(0, n_inst=3)
    odd = dataclasses.replace(ex, presence=(records.Presence(7, "cup", ""),), samples=ex.samples + (
        dataclasses.replace(ex.samples[0], metadata={"é": [float("nan"), None, b"\x00"]}, sam2_ious=()),
    ))
    objs = [ex, odd, _example(1, n_inst=1), Reject("k\x00é", "stage", "reason", "msg", RejectLevel.IMAGE, "img"),
            records.Category(1, "cup", "kitchen"), ex.samples[0].targets[0]]
    seen = set()
    for obj in objs:
        for proto in (2, 4, pickle.HIGHEST_PROTOCOL):
            got = pickle.dumps(obj, proto)
            saved = {c: c.__getstate__ for c in classes}
            try:
                for c in classes:
                    c.__getstate__ = own_state
                want = pickle.dumps(obj, proto)
            finally:
                for c, g in saved.items():
                    c.__getstate__ = g
            assert got == want
            back = pickle.loads(got)
            assert repr(back) == repr(obj) and type(back) is type(obj)
        seen.add(type(obj))
    # Every field is set back by __setstate__, one-field classes included.
    for c in classes:
        names = [f.name for f in dataclasses.fields(c)]
        blank = object.__new__(c)
        blank.__setstate__(list(range(len(names))))
        assert [getattr(blank, n) for n in names] == list(range(len(names)))
        assert blank.__getstate__() == list(range(len(names)))
    assert {ImageExample, Reject} <= seen


def test_replace_record_equals_dataclasses_replace():
    """Copies by the slots where ``__init__`` only sets fields; ``dataclasses.replace`` (and its errors) elsewhere."""
    from tests.test_write import _example

    from orsgen.schemas import records

    ex = _example(0, n_inst=2)
    cases = [
        (ex, {"split": "val", "samples": ex.samples[:1]}),
        (ex, {}),
        (ex.samples[0], {"split": "test"}),
        (ex.samples[1], {"split": "", "metadata": {"é": None}, "union_rle": None}),
        (ex.instances[0], {"category_name": "x\x00é", "area_px": 0}),
        (ex.image, {"width": 1}),
        (ex.samples[0].union_rle, {"counts": "0"}),
        (records.Presence(3, "cup"), {"iscrowd": True}),
    ]
    for obj, changes in cases:
        got, want = records.replace_record(obj, **changes), dataclasses.replace(obj, **changes)
        assert type(got) is type(obj) and got == want and repr(got) == repr(want) and got is not obj
        for f in dataclasses.fields(obj):  # the same values, shared as replace shares them
            assert getattr(got, f.name) is getattr(want, f.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(got, dataclasses.fields(got)[0].name, "x")
    assert ex.replace(split="val") == dataclasses.replace(ex, split="val")
    # Reject's __post_init__ (cuts long text) still runs: it goes through dataclasses.replace.
    r = Reject("k", "stage", "reason", "m", RejectLevel.IMAGE, "img")
    long = "y" * (records.MAX_REJECT_MESSAGE_CHARS + 50)
    assert records.replace_record(r, message=long) == dataclasses.replace(r, message=long)
    assert len(records.replace_record(r, message=long).message) <= records.MAX_REJECT_MESSAGE_CHARS + 50
    assert Reject not in records._FIELD_INDEX and ImageExample in records._FIELD_INDEX
    for bad in ({"nope": 1}, {"split": "val", "nope": 1}):
        with pytest.raises(TypeError) as want_err:
            dataclasses.replace(ex.samples[0], **bad)
        with pytest.raises(TypeError) as got_err:
            records.replace_record(ex.samples[0], **bad)
        assert str(got_err.value) == str(want_err.value)


def test_slots_constructor_equals_the_dataclass_init():
    """``slots_constructor(cls)(*values)`` is ``cls(*values)``; classes whose ``__init__`` does more are refused."""
    from orsgen.schemas import records
    from orsgen.stages.expressions.context import Candidate
    from orsgen.stages.expressions.geometry import Geom

    cases = [
        (Geom, ("i1", None, True, 0.0, -0.0, float("nan"), 1, 2.5, 3e300, -4.0)),
        (Geom, ("", "cup", False, 12.0, 1.5, 2.5, 0.0, 0.0, 3.0, 4.0)),
        (Candidate, ("category_single", "the é cup", ("a", "b"), "category.single", {"k": [1]})),
        (records.Presence, (3, "cup\x00", "kitchen", True, "k")),
    ]
    for cls, values in cases:
        make = records.slots_constructor(cls)
        got, want = make(*values), cls(*values)
        assert type(got) is cls and repr(got) == repr(want)
        for f, v in zip(dataclasses.fields(cls), values):
            assert getattr(got, f.name) is v  # the values themselves, as __init__ stores them
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(got, dataclasses.fields(cls)[0].name, "x")
        with pytest.raises(TypeError):
            make(*values[:-1])  # every field is required, positionally
    # Reject's __post_init__ cuts long text: its constructor must stay its own.
    with pytest.raises(TypeError, match="Reject"):
        records.slots_constructor(Reject)
