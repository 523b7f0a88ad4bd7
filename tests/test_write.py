"""Tests of stages/write/: shard layout, formats, determinism and safety."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from orsgen.schemas.arrow import EXAMPLE_SCHEMA, REJECT_SCHEMA, example_from_row, example_to_json, example_to_row
from orsgen.schemas.config import WriteConfig
from orsgen.schemas.records import (
    ImageExample,
    ImageRecord,
    Instance,
    Ref,
    RefSentence,
    Reject,
    Rle,
    Sample,
    TargetGeometry,
    canonical_json,
)
from orsgen.stages import write as W
from orsgen.stages.dataset.features import webdataset_features
from orsgen.stages.write import plan as WP
from orsgen.stages.write import shards as WS
from tests.conftest import json_member_reference


# ------------------------------------------------------------------ fixtures


def _jpeg(seed: int, w: int = 48, h: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rle(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> Rle:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return Rle.from_coco(mask_utils.encode(np.asfortranarray(m)))


def _example(i: int, split: str = "train", n_inst: int = 2) -> ImageExample:
    h, w = 32, 48
    image_bytes = _jpeg(i, w, h)
    image_id = f"coco:{1000 + i}"
    coco = i % 2 == 0  # alternate COCO-like (categories) and SA-1B-like (scores) fields
    instances = tuple(
        Instance(
            instance_id=f"{image_id}/ann:{j}",
            image_id=image_id,
            rle=_rle(h, w, 2 + j, 3, 10 + j, 12),
            bbox_xywh=(2.0 + j, 3.0, 8.0, 9.0),
            bbox_xyxy=(2.0 + j, 3.0, 10.0 + j, 12.0),
            area_px=72,
            category_id=1 if coco else None,
            category_name="person" if coco else None,
            supercategory="person" if coco else None,
            predicted_iou=None if coco else 0.9,
            stability_score=None if coco else 0.95,
            point_coords=() if coco else ((5.0, 6.0),),
            crop_box=None if coco else (0.0, 0.0, float(w), float(h)),
            source_ann_id=j,
        )
        for j in range(n_inst)
    )
    refs = (
        (
            Ref(
                ref_id=i,
                image_id=image_id,
                ann_ids=(0,),
                category_ids=(1,),
                split=split,
                sentences=(RefSentence(sent_id=i, raw="The Man.", sent="the man"),),
                dataset="refcoco_unc",
            ),
        )
        if coco
        else ()
    )
    samples = (
        Sample(
            sample_id=f"s{i}-0",
            image_id=image_id,
            expression="the man on the left",
            kind="phrase",
            target_ids=(instances[0].instance_id,),
            split=split,
            generator="template",
            union_rle=instances[0].rle,
            targets=(TargetGeometry(instances[0].instance_id, (2.0, 3.0, 10.0, 12.0), (5, 6), (7, 8), (42, 94, 208, 375)),),
            sam2_ious=(0.91,),
            metadata={"template": "t1", "n": i},
        ),
        Sample(
            sample_id=f"s{i}-1",
            image_id=image_id,
            expression="a giraffe",
            kind="no_target",
            target_ids=(),
            split=split,
            union_rle=Rle(size=(h, w), counts=mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))["counts"].decode()),
        ),
    )
    return ImageExample(
        key=f"coco-{1000 + i}",
        image=ImageRecord(image_id, "coco", f"/data/{i}.jpg", w, h, f"{i:064x}", f"{i}.jpg"),
        image_bytes=image_bytes,
        instances=instances,
        refs=refs,
        samples=samples,
        split=split,
        input_name="coco",
    )


@pytest.fixture
def examples() -> list[ImageExample]:
    # Deliberately unsorted: the writer must sort by key.
    return [_example(i) for i in (3, 0, 5, 1, 4, 2)]


def _cfg(**kw) -> WriteConfig:
    return WriteConfig(**{"formats": ["webdataset", "parquet"], "num_buckets": 1, **kw})


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tmp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------ planning


def test_bucket_of_is_stable_and_in_range():
    assert [W.bucket_of(f"k{i}", 7) for i in range(50)] == [W.bucket_of(f"k{i}", 7) for i in range(50)]
    buckets = {W.bucket_of(f"k{i}", 7) for i in range(200)}
    assert buckets == set(range(7))
    assert W.bucket_of("anything", 1) == 0
    # Fixed value: the hash must not change between releases, or reruns move keys.
    assert W.bucket_of("coco-1000", 1000) == int.from_bytes(__import__("hashlib").sha256(b"coco-1000").digest()[:8], "big") % 1000


def test_bucket_of_rejects_zero_buckets():
    with pytest.raises(ValueError, match="num_buckets"):
        W.bucket_of("k", 0)


def test_plan_parts_rolls_over_by_count(examples):
    parts = W.plan_parts(examples, max_images=4, max_bytes=10**9)
    assert [len(p) for p in parts] == [4, 2]
    keys = [ex.key for p in parts for ex in p]
    assert keys == sorted(ex.key for ex in examples)


def test_plan_parts_rolls_over_by_bytes(examples):
    one = W.plan_parts(examples[:1], 1, 10**9)  # any single example
    sizes = [W.encode_example(ex, ["webdataset"]).size for ex in sorted(examples, key=lambda e: e.key)]
    # Room for two examples plus the tar trailer, not three.
    cap = sizes[0] + sizes[1] + WP._TAR_RECORD + 10
    parts = W.plan_parts(examples, max_images=100, max_bytes=cap)
    assert len(one) == 1
    assert all(1 <= len(p) <= 2 for p in parts) and len(parts) >= 3
    assert sum(len(p) for p in parts) == len(examples)


def test_plan_parts_gives_an_oversized_example_its_own_part(examples):
    parts = W.plan_parts(examples, max_images=100, max_bytes=1)
    assert [len(p) for p in parts] == [1] * len(examples)
    assert W.plan_parts([], 10, 10) == []


def test_plan_parts_rejects_unsafe_and_duplicate_keys(examples):
    with pytest.raises(ValueError, match="not WebDataset-safe"):
        W.plan_parts([examples[0].replace(key="coco.1000")], 10, 10**9)
    with pytest.raises(ValueError, match="more than once"):
        W.plan_parts([examples[0], examples[0]], 10, 10**9)


def test_json_member_is_canonical_json_of_example_to_json(examples):
    for ex in examples:
        assert W.encode_example(ex, ["webdataset"]).json == canonical_json(example_to_json(ex))


def _member_or_error(fn, ex):
    try:
        return fn(ex)
    except Exception as err:  # the same error type is expected from both
        return type(err)


def test_json_member_written_directly_equals_json_dumps_of_the_row(examples):
    """``example_json_bytes`` == json.dumps of ``example_to_row``'s row, on odd values of every field."""
    import dataclasses
    import enum

    from orsgen.schemas.arrow import example_json_bytes

    def reference(ex):
        row = example_to_row(ex)
        del row["image"]
        return json_member_reference(row)

    class Kind(str, enum.Enum):
        PHRASE = "phrase"

    class Text(str):
        pass

    nan, inf = float("nan"), float("inf")
    # Converted by float()/int() in the row; the JSON-ready subset is passed through as is.
    odd = [nan, inf, -inf, -0.0, 1e308, 5e-324, 0.1, np.float64(0.3), np.float32(1.1), True, 7, np.int64(3), 2**70]
    plain = [v for v in odd if not isinstance(v, (np.float32, np.int64))] + [None]
    texts = ["", "é ü \u00e9", 'q"uote\\back', "nl\n\t\x00\x1f\x7f", "\u2028\U0001f600", Text("sub"), None]
    variants = []
    for ex in examples:
        variants.append(ex)
        inst, sample = ex.instances[0], ex.samples[0]
        target = sample.targets[0] if sample.targets else None
        for k in range(len(odd)):
            f4 = tuple(odd[(k + j) % len(odd)] for j in range(4))
            t = texts[k % len(texts)]
            inst2 = dataclasses.replace(
                inst, bbox_xywh=f4, bbox_xyxy=f4[::-1], crop_box=f4 if k % 2 else None, area_px=odd[k] if k > 9 else k,
                point_coords=((f4[0], f4[1]), (f4[2], f4[3])) if k % 3 else (), predicted_iou=plain[k % len(plain)],
                stability_score=None if k % 2 else -0.0, category_id=[k, None, True, 2**63][k % 4], category_name=t,
                supercategory=texts[(k + 1) % len(texts)], mask_origin=t, iscrowd=[0, 1, "", "x"][k % 4],
                source_ann_id=[k, 10**20, None][k % 3],
            )
            t2 = None if target is None else dataclasses.replace(target, bbox_xyxy=f4, point_1=(True, np.int64(k)), qwen_box=(1.9, 2, 3, 4))
            sample2 = dataclasses.replace(
                sample, kind=[Kind.PHRASE, "phrase", Text("x")][k % 3], expression=t, model=texts[(k + 2) % len(texts)],
                target_ids=(Text("a"), "b\u00e9") if k % 2 else (), targets=(t2, t2, *sample.targets) if t2 else (),
                sam2_ious=f4[:k % 4], reground_box=f4 if k % 2 else None, reground_iou=plain[(k + 5) % len(plain)],
                screened=[0, 1, "", "y", None][k % 5], union_rle=None if k % 4 == 0 else sample.union_rle, union_svg=t,
                metadata={"k": k, "é": [plain[k % len(plain)], t], "nested": {"b": 1, "a": None}},
            )
            refs = tuple(
                dataclasses.replace(r, ref_id=np.int64(k), ann_ids=(True, np.int64(2), 3.7), sentences=tuple(
                    dataclasses.replace(s, raw=t, sent=texts[(k + 3) % len(texts)], sent_id=[k, 2**70, None][k % 3])
                    for s in r.sentences
                ), dataset=t)
                for r in ex.refs
            )
            image = dataclasses.replace(ex.image, width=np.int64(ex.image.width), height=True, file_name=t, sha256=Text("h"))
            variants.append(ex.replace(instances=(inst2, *ex.instances), samples=(sample2, *ex.samples), refs=refs, image=image, key=Text(ex.key)))
    # Values json.dumps refuses (the same error type) or writes but UTF-8 cannot hold.
    ex = examples[0]
    variants += [
        ex.replace(samples=(dataclasses.replace(ex.samples[0], expression="lone \ud800"),)),
        ex.replace(instances=(dataclasses.replace(ex.instances[0], category_id=np.int64(3)),)),
        ex.replace(samples=(dataclasses.replace(ex.samples[0], metadata={"x": object()}),)),
        ex.replace(instances=(dataclasses.replace(ex.instances[0], bbox_xywh=("x", 1, 2, 3)),)),
    ]
    for v in variants:
        assert _member_or_error(example_json_bytes, v) == _member_or_error(reference, v)
    assert isinstance(_member_or_error(example_json_bytes, variants[-1]), type)


def test_json_member_shortcuts_equal_json_dumps_of_the_row(examples):
    """The per-example memo (Rle and target JSON by identity, the image id written
    once), the box format and the kept metadata encoder write what json.dumps writes."""
    from orsgen.schemas import arrow as A
    from orsgen.schemas.records import Rle

    def reference(ex):
        row = example_to_row(ex)
        del row["image"]
        return json_member_reference(row)

    ex = next(e for e in examples if e.instances and e.samples)
    inst, sample = ex.instances[0], ex.samples[0]
    other = ex.instances[-1].rle if ex.instances[-1].rle != inst.rle else Rle(inst.rle.size, "0" + inst.rle.counts)
    cases = []
    for union in (inst.rle, Rle(inst.rle.size, str(inst.rle.counts)), other, None):
        for image_id in (ex.image.image_id, "".join(ex.image.image_id), "coco:other"):
            s2 = dataclasses.replace(sample, union_rle=union, image_id=image_id, reground_box=(1.5, -0.0, float("nan"), 4.0))
            # The same union object on two samples and on the instance, an equal one elsewhere.
            cases.append(ex.replace(samples=(s2, sample, s2)))
    boxes = [(0.5, 1.0, 2.0, 3.0), (1, 2.0, 3.0, 4.0), (np.float64(1.0), 2.0, 3.0, 4.0), (True, 2.0, 3.0, 4.0),
             (float("inf"), -float("inf"), 5e-324, 1e308), [0.5, 1.0, 2.0, 3.0], (), (1.0, 2.0, 3.0)]
    for box in boxes:
        i2 = dataclasses.replace(inst, bbox_xywh=box, bbox_xyxy=box, crop_box=box)
        cases.append(ex.replace(instances=(i2, *ex.instances[1:]), samples=(dataclasses.replace(sample, sam2_ious=box),)))
    for ex2 in cases:
        assert A.example_json_bytes(ex2) == reference(ex2)
    # Metadata: an error is json.dumps's own, and the encoder is still right afterwards.
    loop: dict = {"a": 1}
    loop["self"] = loop
    for bad, err in (({"x": object()}, TypeError), (loop, ValueError), ({1: {2: [set()]}}, TypeError)):
        with pytest.raises(err) as raised:
            A.example_json_bytes(ex.replace(samples=(dataclasses.replace(sample, metadata=bad),)))
        with pytest.raises(err) as expected:
            json.dumps(bad, sort_keys=True, separators=(",", ":"))
        assert str(raised.value) == str(expected.value)
        good = ex.replace(samples=(dataclasses.replace(sample, metadata={"b": [1, {"c": 2.5}], "a": "é"}),))
        assert A.example_json_bytes(good) == reference(good)
        assert not A._METADATA_MARKERS


def test_plan_parts_of_encoded_examples_matches_and_returns_them(examples):
    encoded = [W.encode_example(ex, ["webdataset"]) for ex in examples]
    parts = W.plan_parts(encoded, max_images=100, max_bytes=2 * encoded[0].size + WP._TAR_RECORD + 10)
    assert all(isinstance(e, W.EncodedExample) for p in parts for e in p)
    plain = W.plan_parts(examples, max_images=100, max_bytes=2 * encoded[0].size + WP._TAR_RECORD + 10)
    assert [[e.key for e in p] for p in parts] == [[ex.key for ex in p] for p in plain]


# ------------------------------------------------------------------ encoding


def test_encode_example_fields(examples):
    import pickle

    ex = examples[1]  # coco-1000: has refs
    enc = W.encode_example(ex, ["webdataset", "parquet"])
    assert (enc.key, enc.split, enc.image) == (ex.key, ex.split, ex.image_bytes)
    assert enc.json == canonical_json(example_to_json(ex))
    assert (enc.n_instances, enc.n_refs, enc.n_samples) == (2, 1, 2)
    assert enc.samples_by_kind == (("no_target", 1), ("phrase", 1))
    assert enc.size == sum(512 + -(-n // 512) * 512 for n in (len(ex.image_bytes), len(enc.json)))
    # The image rides in ``image`` only; record_batch() builds the full
    # Parquet row from the JSON member and the image.
    full = enc.record_batch()
    assert full.equals(pa.RecordBatch.from_pylist([example_to_row(ex)], schema=EXAMPLE_SCHEMA))
    assert example_from_row(full.to_pylist()[0]) == ex
    # Beam moves it between workers by pickling; it is immutable.
    assert pickle.loads(pickle.dumps(enc)) == enc
    with pytest.raises(AttributeError):
        enc.key = "other"  # type: ignore[misc]


def test_encoding_does_not_depend_on_formats(examples, tmp_path):
    # The Parquet row is built by the writer from the JSON member, so an
    # example encoded for WebDataset alone writes the same Parquet shard.
    wds_only = [W.encode_example(ex, ["webdataset"]) for ex in examples]
    assert wds_only == [W.encode_example(ex, ["webdataset", "parquet"]) for ex in examples]
    W.write_bucket(str(tmp_path / "a"), "train", 0, wds_only, _cfg())
    W.write_bucket(str(tmp_path / "b"), "train", 0, examples, _cfg())
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert files_a and files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.parquet"))
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def _reference_files(out: Path, examples: list[ImageExample], cfg: WriteConfig) -> dict[str, bytes]:
    """The shard bytes the writer made before encoding moved out of it.

    ``tarfile.addfile`` per member and ``Table.from_pylist`` of
    ``example_to_row`` rows per row group: an independent path to the same
    files, so the fast writer is checked against plain library calls.
    """
    items = sorted(examples, key=lambda e: e.key)
    files: dict[str, bytes] = {}
    parts = W.plan_parts(items, cfg.shard_max_images, cfg.shard_max_bytes)
    for part_no, part in enumerate(parts):
        tar_path = out / "tar" / f"{part_no}.tar"
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for ex in part:
                for ext, data in (("jpg", ex.image_bytes), ("json", canonical_json(example_to_json(ex)))):
                    info = tarfile.TarInfo(f"{ex.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        files[W.shard_path('train', 0, part_no, 'webdataset', cfg.num_buckets)] = tar_path.read_bytes()
        pq_path = out / "pq" / f"{part_no}.parquet"
        pq_path.parent.mkdir(parents=True, exist_ok=True)
        rows = [example_to_row(ex) for ex in part]
        sizes = [len(ex.image_bytes) + len(canonical_json(example_to_json(ex))) + WP._PARQUET_ROW_OVERHEAD for ex in part]
        cap = max(1, cfg.parquet_row_group_max_bytes - WP._PARQUET_GROUP_OVERHEAD)
        with pq.ParquetWriter(
            pq_path, EXAMPLE_SCHEMA, compression=cfg.parquet_compression, use_dictionary=WS._DICTIONARY_COLUMNS
        ) as writer:
            for a, b in WP._split_by_size(sizes, len(part), cap):
                writer.write_table(pa.Table.from_pylist(rows[a:b], schema=EXAMPLE_SCHEMA), row_group_size=b - a)
        files[W.shard_path('train', 0, part_no, 'parquet', cfg.num_buckets)] = pq_path.read_bytes()
    return files


@pytest.mark.parametrize(
    "cfg_kw",
    [
        {"shard_max_images": 4},
        {"parquet_row_group_max_bytes": 40 * 1024, "parquet_compression": "snappy"},
        {"shard_max_bytes": 60_000},
    ],
)
def test_encoded_and_image_examples_give_identical_files(tmp_path, cfg_kw):
    # Varied rows (nulls, empty lists, refs or not, long keys that need PAX
    # headers, empty JSON-sized images) and more than one part and row group.
    exs = [_example(i, n_inst=1 + i % 3) for i in range(9)]
    exs.append(_example(20).replace(key="k" * 120))  # PAX path header
    exs.append(_example(21).replace(key="k" * 96, image_bytes=b""))  # 100-char .json name, empty jpg
    exs.append(_example(22).replace(image_bytes=_jpeg(22, 97, 61)[:1024]))  # exactly two blocks
    cfg = _cfg(**cfg_kw)
    W.write_bucket(str(tmp_path / "plain"), "train", 0, exs, cfg)
    encoded = [W.encode_example(ex, cfg.formats) for ex in reversed(exs)]
    W.write_bucket(str(tmp_path / "encoded"), "train", 0, encoded, cfg)
    mixed = encoded[::2] + exs[-2::-2]  # both kinds in one bucket
    assert sorted(e.key for e in mixed) == sorted(ex.key for ex in exs)
    W.write_bucket(str(tmp_path / "mixed"), "train", 0, mixed, cfg)
    plain = _tree(tmp_path / "plain")
    assert plain == _tree(tmp_path / "encoded") == _tree(tmp_path / "mixed")
    data = {k: v for k, v in plain.items() if not k.startswith("_meta/")}
    ref = _reference_files(tmp_path / "ref", exs, cfg)
    assert set(data) == set(ref)
    # Each case spans more than one part or more than one row group.
    groups = [pq.ParquetFile(io.BytesIO(v)).metadata.num_row_groups for k, v in ref.items() if k.endswith(".parquet")]
    assert len(groups) > 1 or groups[0] > 1
    for path, want in ref.items():
        assert data[path] == want, path


# ------------------------------------------------------------------- formats


def test_parquet_round_trip(tmp_path, examples):
    stats = W.write_bucket(str(tmp_path), "train", 0, examples, _cfg(formats=["parquet"]))
    assert [s.path for s in stats] == ["parquet/data/train-00000-of-00001-0000.parquet"]
    table = pq.read_table(tmp_path / stats[0].path)
    # Types match exactly; list children come back named "element" (the
    # Parquet spec's compliant nested naming) where Arrow says "item".
    assert table.schema.equals(EXAMPLE_SCHEMA)
    assert table.schema.metadata[b"orsgen.schema"] == b"example/1"
    got = [example_from_row(r) for r in table.to_pylist()]
    assert got == sorted(examples, key=lambda e: e.key)
    s = stats[0]
    assert (s.n_images, s.n_samples, s.n_instances) == (6, 12, 12)
    assert s.samples_by_kind == {"no_target": 6, "phrase": 6}
    assert s.n_bytes == (tmp_path / s.path).stat().st_size
    assert not s.skipped
    assert not (tmp_path / "webdataset").exists()


@pytest.mark.parametrize("row_group_cap", [40 * 1024, 64 * 1024 * 1024])
def test_parquet_through_the_write_buffer_is_the_same_file(tmp_path, examples, monkeypatch, row_group_cap):
    """Arrow's write buffer hands the sink the same byte stream in fewer pieces (one and several row groups)."""
    big = [ex.replace(image_bytes=_jpeg(i, 96, 64)) for i, ex in enumerate(examples)]
    cfg = _cfg(formats=["parquet"], parquet_row_group_max_bytes=row_group_cap)
    real_write = WS._HashingWriter.write
    files, writes = {}, {}
    for buffer_bytes in (1, WS._PARQUET_WRITE_BUFFER_BYTES, 10**9):  # 1: each piece goes straight through
        calls = []

        def counting_write(self, data, calls=calls):
            calls.append(len(data))
            return real_write(self, data)

        monkeypatch.setattr(WS, "_PARQUET_WRITE_BUFFER_BYTES", buffer_bytes)
        monkeypatch.setattr(WS._HashingWriter, "write", counting_write)
        out = tmp_path / str(buffer_bytes)
        (stats,) = W.write_bucket(str(out), "train", 0, big, cfg)
        files[buffer_bytes], writes[buffer_bytes] = _tree(out), len(calls)
        assert stats.sha256 == hashlib.sha256((out / stats.path).read_bytes()).hexdigest()
    assert files[1] == files[WS._PARQUET_WRITE_BUFFER_BYTES] == files[10**9]
    # One write for the whole file (the rest: its sidecar and marker) instead of one per page.
    assert writes[10**9] <= 3 and writes[1] > 200
    (path,) = [p for p in files[1] if p.endswith(".parquet")]
    n_groups = pq.ParquetFile(io.BytesIO(files[1][path])).metadata.num_row_groups
    assert n_groups == 1 if row_group_cap > 10**6 else n_groups > 1


@pytest.mark.parametrize("fail_at", [1, 2])
def test_parquet_sink_failure_propagates_and_nothing_follows_it(examples, fail_at):
    """A store error in the buffered Parquet write is raised as is; Arrow's later flushes never reach the sink."""
    import gc

    from orsgen.stages.write.files import _HashingWriter
    from orsgen.stages.write.spill import SpilledGroup

    class Failing(io.BytesIO):
        calls = 0

        def write(self, data):
            self.calls += 1
            if self.calls >= fail_at:
                raise ConnectionError("store went away")
            return super().write(data)

    big = [W.encode_example(ex.replace(image_bytes=_jpeg(i, 512, 512)), ["parquet"]) for i, ex in enumerate(examples * 3)]
    group = SpilledGroup(10**9, None)
    for i, enc in enumerate(big):
        group.add(dataclasses.replace(enc, key=f"{enc.key}_{i}"))
    group.seal()
    entries = sorted(group.entries, key=lambda e: e.key)
    assert sum(e.n_image for e in entries) > 2 * WS._PARQUET_WRITE_BUFFER_BYTES  # the buffer fills twice
    f = Failing()
    with pytest.raises(ConnectionError, match="store went away"):
        WS._parquet_writer(entries, group, _cfg(formats=["parquet"]))(_HashingWriter(f))
    gc.collect()
    assert f.calls == fail_at


def test_webdataset_reads_every_key(tmp_path, examples):
    import webdataset as wds

    stats = W.write_bucket(str(tmp_path), "train", 0, examples, _cfg(formats=["webdataset"], shard_max_images=4))
    urls = [str(tmp_path / s.path) for s in stats]
    assert [Path(u).name for u in urls] == ["train-00000-of-00001-0000.tar", "train-00000-of-00001-0001.tar"]
    by_key = {ex.key: ex for ex in examples}
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        ex = by_key[sample["__key__"]]
        assert set(sample) >= {"jpg", "json"}
        assert sample["jpg"] == ex.image_bytes
        assert sample["json"] == canonical_json(example_to_json(ex))
        seen.append(sample["__key__"])
    assert seen == sorted(by_key)


def test_tar_headers_are_deterministic(tmp_path, examples):
    stats = W.write_bucket(str(tmp_path), "train", 0, examples, _cfg(formats=["webdataset"]))
    with tarfile.open(tmp_path / stats[0].path) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [f"{k}.{e}" for k in sorted(ex.key for ex in examples) for e in ("jpg", "json")]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)


def test_mismatched_split_is_refused(tmp_path, examples):
    with pytest.raises(ValueError, match="split 'train' but is written to split 'val'"):
        W.write_bucket(str(tmp_path), "val", 0, examples, _cfg())
    assert not any(tmp_path.iterdir())


def test_empty_bucket_writes_nothing(tmp_path):
    assert W.write_bucket(str(tmp_path), "train", 0, [], _cfg()) == []
    assert W.write_rejects_bucket(str(tmp_path), 0, []) == []
    assert not any(tmp_path.iterdir())


def test_row_groups_stay_under_the_cap(tmp_path, examples):
    # A group costs ~10 KB of page headers before any row (58 leaf columns),
    # so the smallest useful cap is a few tens of KB; rows here are ~8 KB.
    cap = 40 * 1024
    big = [ex.replace(image_bytes=_jpeg(i, 96, 64)) for i, ex in enumerate(examples)]
    stats = W.write_bucket(str(tmp_path), "train", 0, big, _cfg(formats=["parquet"], parquet_row_group_max_bytes=cap))
    md = pq.ParquetFile(tmp_path / stats[0].path).metadata
    assert md.num_row_groups > 1
    assert md.num_rows == len(big)
    for i in range(md.num_row_groups):
        assert md.row_group(i).total_byte_size <= cap


def test_load_dataset_parquet_and_webdataset(tmp_path, examples, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    out = tmp_path / "out"
    val = [_example(i, split="val") for i in (10, 11)]
    stats = W.write_bucket(str(out), "train", 0, examples, _cfg(shard_max_images=4))
    stats += W.write_bucket(str(out), "val", 0, val, _cfg())
    cache = str(tmp_path / "cache")

    ds = datasets.load_dataset("parquet", data_dir=str(out / "parquet"), cache_dir=cache)
    assert sorted(ds) == ["train", "val"]  # split names kept verbatim
    assert ds["train"].num_rows == len(examples) and ds["val"].num_rows == len(val)
    assert sorted(ds["train"]["key"]) == sorted(ex.key for ex in examples)

    tars = {
        "train": [str(out / s.path) for s in stats if s.format == "webdataset" and s.split == "train"],
        "validation": [str(out / s.path) for s in stats if s.format == "webdataset" and s.split == "val"],
    }
    wd = datasets.load_dataset("webdataset", data_files=tars, cache_dir=cache)
    assert wd["train"].num_rows == len(examples)
    # The same split inference works for the tars through data_dir.
    wd2 = datasets.load_dataset("webdataset", data_dir=str(out / "webdataset"), cache_dir=cache,
                                features=webdataset_features())
    assert sorted(wd2) == ["train", "val"] and wd2["val"].num_rows == len(val)
    row = wd["train"][0]
    assert set(row) >= {"__key__", "jpg", "json"}
    assert row["json"]["key"] == row["__key__"]


def test_load_dataset_webdataset_with_nulls_first_needs_features(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    # Six SA-1B-like samples (null category_id, no refs) sort before a COCO-like one.
    exs = [_example(i) for i in (1, 3, 5, 7, 9, 11, 20)]
    stats = W.write_bucket(str(tmp_path / "out"), "train", 0, exs, _cfg(formats=["webdataset"]))
    files = {"train": [str(tmp_path / "out" / s.path) for s in stats]}
    # Without features, datasets 5.2 infers category_id as null from the first
    # five samples and fails on the sixth ("Couldn't cast int64 to null").
    ds = datasets.load_dataset(
        "webdataset", data_files=files, cache_dir=str(tmp_path / "c"), features=webdataset_features()
    )
    last = ds["train"][len(exs) - 1]
    assert last["__key__"] == "coco-1020"
    assert last["json"]["instances"][0]["category_id"] == 1
    assert last["json"]["refs"][0]["sentences"][0]["sent"] == "the man"


# --------------------------------------------------------- rerun and safety


def test_rerun_into_a_fresh_dir_is_byte_identical(tmp_path, examples):
    rejects = [Reject("s/1", "ingest", "corrupt_image", "bad"), Reject("s/0", "regions", "dropped_small", "tiny", "instance")]
    trees = []
    for name, order in (("a", examples), ("b", list(reversed(examples)))):
        out = tmp_path / name
        W.write_bucket(str(out), "train", 0, order, _cfg(shard_max_images=4, parquet_row_group_max_bytes=4096))
        W.write_rejects_bucket(str(out), 0, rejects if name == "a" else rejects[::-1])
        trees.append(_tree(out))
    assert trees[0] == trees[1]
    assert "_meta/shards/webdataset/data/train-00000-of-00001-0001.tar.done" in trees[0]
    assert "_meta/shards/parquet/data/train-00000-of-00001-0000.parquet.stats.json" in trees[0]
    assert "_meta/shards/rejects/rejects-00000-of-00001-0000.parquet.done" in trees[0]


def test_rerun_into_the_same_dir_skips(tmp_path, examples):
    first = W.write_bucket(str(tmp_path), "train", 0, examples, _cfg(shard_max_images=4))
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = W.write_bucket(str(tmp_path), "train", 0, examples, _cfg(shard_max_images=4))
    assert all(s.skipped for s in again)
    assert [W.ShardStats(**{**{f: getattr(s, f) for f in s.__slots__}, "skipped": False}) for s in again] == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes


def test_completed_shard_of_other_inputs_is_a_conflict(tmp_path, examples):
    W.write_bucket(str(tmp_path), "train", 0, examples, _cfg())
    with pytest.raises(W.OutputConflictError, match="completed shard of another run"):
        W.write_bucket(str(tmp_path), "train", 0, examples[:3], _cfg())


def test_existing_different_file_is_a_conflict_and_kept(tmp_path, examples):
    shard = tmp_path / "webdataset/data/train-00000-of-00001-0000.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"a user's own file")
    with pytest.raises(W.OutputConflictError, match=r"train-00000-of-00001-0000\.tar already exists.*new --out"):
        W.write_bucket(str(tmp_path), "train", 0, examples, _cfg(formats=["webdataset"]))
    assert shard.read_bytes() == b"a user's own file"
    assert _tmp_files(tmp_path) == []
    assert not (tmp_path / "_meta").exists()


def test_existing_identical_file_without_marker_is_adopted(tmp_path, examples):
    ref = tmp_path / "ref"
    (stats,) = W.write_bucket(str(ref), "train", 0, examples, _cfg(formats=["parquet"]))
    out = tmp_path / "out"
    shard = out / stats.path
    shard.parent.mkdir(parents=True)
    shard.write_bytes((ref / stats.path).read_bytes())
    before = shard.stat().st_mtime_ns
    (got,) = W.write_bucket(str(out), "train", 0, examples, _cfg(formats=["parquet"]))
    assert got == stats and not got.skipped
    assert shard.stat().st_mtime_ns == before
    assert _tree(out) == _tree(ref)


def test_crash_before_rename_leaves_no_partial_or_tmp_file(tmp_path, examples, monkeypatch):
    def boom(src, dst):
        raise OSError("injected crash between tmp write and rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="injected crash"):
        W.write_bucket(str(tmp_path), "train", 0, examples, _cfg())
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("*.parquet"))
    assert _tmp_files(tmp_path) == []
    monkeypatch.undo()
    # The next run completes normally.
    assert len(W.write_bucket(str(tmp_path), "train", 0, examples, _cfg())) == 2


def test_crash_before_the_marker_is_recovered_by_a_rerun(tmp_path, examples, monkeypatch):
    real_replace = os.replace

    def replace_but_markers(src, dst):
        if str(dst).endswith(".done"):
            raise OSError("injected crash before the marker")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_but_markers)
    with pytest.raises(OSError, match="before the marker"):
        W.write_bucket(str(tmp_path / "out"), "train", 0, examples, _cfg(formats=["parquet"]))
    monkeypatch.undo()
    shard = tmp_path / "out/parquet/data/train-00000-of-00001-0000.parquet"
    assert shard.exists() and not list(tmp_path.rglob("*.done")) and _tmp_files(tmp_path) == []
    # The rerun finds the shard without its marker, verifies its bytes and completes it.
    (stats,) = W.write_bucket(str(tmp_path / "out"), "train", 0, examples, _cfg(formats=["parquet"]))
    assert not stats.skipped
    W.write_bucket(str(tmp_path / "ref"), "train", 0, examples, _cfg(formats=["parquet"]))
    assert _tree(tmp_path / "out") == _tree(tmp_path / "ref")


def test_non_local_filesystem_uses_the_same_rules(examples):
    import hashlib
    import uuid

    import fsspec

    out = f"memory://orsgen-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        stats = W.write_bucket(out, "train", 0, examples, _cfg(shard_max_images=4))
        assert len(stats) == 4
        for s in stats:
            data = fs.cat_file(f"{out}/{s.path}")
            assert hashlib.sha256(data).hexdigest() == s.sha256 and len(data) == s.n_bytes
            assert fs.exists(f"{out}/_meta/shards/{s.path}.done")
        assert not [p for p in fs.find(out) if ".tmp-" in p]
        assert all(s.skipped for s in W.write_bucket(out, "train", 0, examples, _cfg(shard_max_images=4)))
        path = W.write_manifest(out, {"name": "x"})
        assert path == f"{out}/manifest.json" and json.loads(fs.cat_file(path)) == {"name": "x"}
    finally:
        fs.rm(out, recursive=True)


# ------------------------------------------------------------------- rejects


def test_rejects_are_sorted_and_counted(tmp_path):
    rejects = [
        Reject("b", "regions", "dropped_small", "m2", "instance", "coco:1"),
        Reject("a", "ingest", "corrupt_image", "m1", "image", "coco:2"),
        Reject("a", "regions", "dropped_small", "m1", "instance", "coco:1"),
    ]
    [stats] = W.write_rejects_bucket(str(tmp_path), 3, rejects, num_buckets=4)
    assert stats.path == "rejects/rejects-00003-of-00004-0000.parquet"
    assert stats.rejects_by_reason == {"image/corrupt_image": 1, "instance/dropped_small": 2}
    table = pq.read_table(tmp_path / stats.path)
    assert table.schema.equals(REJECT_SCHEMA, check_metadata=True)  # flat: no list names to differ
    assert table.column("source_key").to_pylist() == ["a", "a", "b"]
    assert table.column("level").to_pylist() == ["image", "instance", "instance"]
    [again] = W.write_rejects_bucket(str(tmp_path), 3, rejects, num_buckets=4)
    assert again.skipped


# ------------------------------------------------------------------ manifest


def _manifest(tmp_path, examples, counts=None) -> tuple[dict, list[W.ShardStats]]:
    stats = W.write_bucket(str(tmp_path), "train", 0, examples, _cfg(shard_max_images=4))
    rej = W.write_rejects_bucket(str(tmp_path), 0, [Reject("x", "ingest", "corrupt_image", "bad")])
    assert len(rej) == 1
    stats += rej
    m = W.build_manifest(
        name="demo",
        config={"write": {"num_buckets": 1}},
        config_sha256="ab" * 32,
        version="0.1.0",
        shard_stats=list(reversed(stats)),
        counts=counts or {"image": {"inputs": 7, "written": 6, "rejected": 1}},
    )
    return m, stats


def test_manifest_content(tmp_path, examples):
    m, stats = _manifest(tmp_path, examples)
    assert m["splits"] == {"train": {"images": 6, "samples": 12, "samples_by_kind": {"no_target": 6, "phrase": 6}}}
    assert m["rejects_by_reason"] == {"image/corrupt_image": 1}
    assert [s["path"] for s in m["shards"]] == sorted(s.path for s in stats)
    assert set(m) == {"name", "orsgen_version", "config_sha256", "config", "counts", "splits", "rejects_by_reason", "shards"}
    assert m["counts"]["image"]["written"] == 6


def test_manifest_refuses_formats_that_disagree(tmp_path, examples):
    _, stats = _manifest(tmp_path, examples)
    with pytest.raises(ValueError, match="disagree"):
        W.build_manifest(name="d", config={}, config_sha256="", version="", shard_stats=stats[:1] + stats[3:], counts={})


def test_write_manifest_identical_rerun_and_conflict(tmp_path, examples):
    m, _ = _manifest(tmp_path, examples)
    path = W.write_manifest(str(tmp_path), m)
    target = tmp_path / "manifest.json"
    assert path == str(target)
    assert json.loads(target.read_bytes()) == m
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    assert W.write_manifest(str(tmp_path), m) == path
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    with pytest.raises(W.OutputConflictError, match="manifest.json already exists"):
        W.write_manifest(str(tmp_path), {**m, "name": "other"})
    assert target.read_bytes() == before[0]
    assert _tmp_files(tmp_path) == []
