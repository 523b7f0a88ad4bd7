"""What the Beam wrappers save per element gives exactly what the per-element way gave.

Counting events are summed per bundle (``BundleCounts``) instead of sent one
by one; the run's summed events must be the same, zero-valued keys included,
and a wrapper driven outside a bundle still yields each event.
"""

from __future__ import annotations

from collections import Counter

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from orsgen.pipelines.transforms import EVENTS, REJECTS, IngestDoFn, StageDoFn
from orsgen.schemas.records import ImageExample, ImageRecord, Reject, RejectLevel


def _example(i: int) -> ImageExample:
    return ImageExample(key=f"k{i}", image=ImageRecord(f"img:{i}", "coco", "u", 4, 4, "0" * 64), image_bytes=b"x")


def _stage(ex: ImageExample) -> tuple[ImageExample | None, list[Reject], list[tuple[str, int]]]:
    i = int(ex.key[1:])
    if i % 5 == 0:
        # Dropped with an image reject: the dropped_with_image events are zero here.
        return None, [Reject(ex.image.image_id, "t", "bad", "bad image", RejectLevel.IMAGE, ex.image.image_id)], []
    # A zero event is not sent (StageDoFn's rule); the others are.
    return ex, [], [("t/odd", i % 2), ("t/zero", 0), ("t/n", i)]


def _read(n: int):
    for i in range(n):
        if i == 3:
            yield Reject(f"src:{i}", "ingest", "corrupt", "unreadable", RejectLevel.IMAGE)
        else:
            yield _example(i)


def _expected(n: int) -> dict[str, int]:
    """The per-element events of _read and _stage, summed by hand."""
    ev: Counter[str] = Counter()
    keys: set[str] = set()
    for item in _read(n):
        if isinstance(item, Reject):
            ev["ingest_rejects/image"] += 1
            continue
        for k in ("images", "instances", "refs", "samples"):
            keys.add(f"read/{k}")
            ev[f"read/{k}"] += 1 if k == "images" else 0
        out, _, events = _stage(item)
        if out is None:
            for k in ("instances", "refs", "samples"):
                keys.add(f"dropped_with_image/{k}")
            continue
        for k, v in events:
            if v:
                keys.add(k)
                ev[k] += v
    return {k: ev[k] for k in keys | set(ev)}


def test_events_summed_per_bundle_equal_the_per_element_events():
    n = 40
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        read = (
            p
            | beam.Create([n])
            | "Read" >> beam.ParDo(IngestDoFn("in", _read)).with_outputs(REJECTS, EVENTS, main="examples")
        )
        # Spread over several bundles: each bundle sends its own sums.
        stage = (
            read.examples
            | beam.Reshuffle()
            | "Stage" >> beam.ParDo(StageDoFn("T", _stage)).with_outputs(REJECTS, EVENTS, main="examples")
        )
        events = (read[EVENTS], stage[EVENTS]) | beam.Flatten() | beam.CombinePerKey(sum)
        expected = _expected(n)
        # Zero-valued keys (read/refs, dropped_with_image/*) are still there.
        assert expected["read/refs"] == 0 and "dropped_with_image/samples" in expected and "t/zero" not in expected
        assert_that(events, equal_to(sorted(expected.items())), label="events")
        assert_that(stage[REJECTS] | beam.Map(lambda r: r.reason), equal_to(["bad"] * 8), label="rejects")


def test_outside_a_bundle_each_event_is_yielded():
    # A DoFn that drives StageDoFn.process by hand (verify_sam2's _ApplyDoFn)
    # never calls start_bundle: the events must come out with the example.
    fn = StageDoFn("T", _stage)
    out = list(fn.process(_example(7)))
    events = [o.value for o in out if isinstance(o, beam.pvalue.TaggedOutput) and o.tag == EVENTS]
    assert events == [("t/odd", 1), ("t/n", 7)]
    assert [o for o in out if isinstance(o, ImageExample)] == [_example(7)]
    # Inside a bundle they wait for finish_bundle instead.
    fn.start_bundle()
    out = list(fn.process(_example(7)))
    assert not [o for o in out if isinstance(o, beam.pvalue.TaggedOutput) and o.tag == EVENTS]
    done = [o.value.value for o in fn.finish_bundle()]
    assert done == [("t/odd", 1), ("t/n", 7)]
    assert list(fn.finish_bundle()) == []


def test_options_with_cached_views_read_and_write_what_plain_options_do():
    import pickle

    from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, PipelineOptions, StandardOptions, TypeOptions

    from orsgen.pipelines.run import pipeline_options

    flags = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing",
             "--experiments=a", "--experiments=b", "--no_pipeline_type_check", "--unknown_flag=3"]
    cached, plain = pipeline_options(flags), PipelineOptions(flags)
    assert cached.view_as(TypeOptions) is cached.view_as(TypeOptions)
    for cls in (StandardOptions, DirectOptions, DebugOptions, TypeOptions):
        assert vars(cached.view_as(cls)._visible_options) == vars(plain.view_as(cls)._visible_options)
    assert cached.get_all_options() == plain.get_all_options()
    assert cached.get_all_options(retain_unknown_options=True)["unknown_flag"] == "3"
    # A value set through one view is seen through every view and by the options.
    cached.view_as(DirectOptions).direct_num_workers = 5
    plain.view_as(DirectOptions).direct_num_workers = 5
    assert cached.view_as(DirectOptions).direct_num_workers == 5
    assert cached.get_all_options() == plain.get_all_options()
    # Pickled (as a runner may), without the cache, and still the same options.
    back = pickle.loads(pickle.dumps(cached))
    assert "_views" not in back.__dict__
    assert back.get_all_options() == plain.get_all_options()
    assert back.view_as(DirectOptions).direct_num_workers == 5
    # Without --runner, orsgen's default runner is named.
    assert pipeline_options([]).view_as(StandardOptions).runner == "FnApiRunner"


def test_a_run_where_every_image_is_rejected_and_one_without_rejects(tmp_path):
    # The bucket counts come from combines without defaults (the side inputs'
    # defaults stand in): the two empty situations, no reject at all and no
    # encoded example at all, still run, write what they should and reconcile.
    import json

    from orsgen.pipelines.demo_data import write_coco
    from orsgen.pipelines.run import run_pipeline
    from orsgen.schemas.config import load_config

    ann = write_coco(tmp_path / "coco", 0, 2)
    cfg_text = (
        "name: t\nseed: 0\ninputs:\n- name: coco\n  type: coco\n"
        f"  annotations: {ann}\n  images: {tmp_path / 'coco' / 'images'}\n"
        "expressions: {enabled: false}\nregions: {apply_to: []}\n"
    )
    (tmp_path / "ok.yaml").write_text(cfg_text)
    m = run_pipeline(load_config(tmp_path / "ok.yaml"), str(tmp_path / "ok"), ["--runner=FnApiRunner"], show_progress=False)
    assert m["counts"]["written"] == 2 and m["counts"]["rejected"] == 0
    assert not (tmp_path / "ok" / "rejects").exists()
    for p in (tmp_path / "coco" / "images").iterdir():
        p.write_bytes(b"not a jpeg")
    (tmp_path / "bad.yaml").write_text(cfg_text.replace("name: t\n", "name: t-bad\n"))
    m = run_pipeline(load_config(tmp_path / "bad.yaml"), str(tmp_path / "bad"), ["--runner=FnApiRunner"], show_progress=False)
    assert m["counts"]["written"] == 0 and m["counts"]["rejected"] == 2
    assert not list((tmp_path / "bad").glob("webdataset/data/*.tar"))
    assert json.loads((tmp_path / "bad" / "manifest.json").read_text())["counts"]["levels"]["images"]["reconciled"]


def _side_inputs_by_step(cfg, out) -> dict[str, int]:
    from orsgen.pipelines.build import build_pipeline

    p = beam.Pipeline(runner="FnApiRunner")
    build_pipeline(p, cfg, str(out))
    found: dict[str, int] = {}

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):  # noqa: ANN001
            found[node.full_label.split("/", 1)[0]] = found.get(node.full_label.split("/", 1)[0], 0) + len(node.side_inputs)

    p.visit(Visitor())
    return found


def test_a_fixed_bucket_count_keys_records_without_waiting_for_split_sizes(tmp_path):
    """An integer ``num_buckets`` needs no side input to key records and rejects (so the encoded
    records are not materialised before the shuffle); ``auto`` waits for the sizes and counts."""
    from orsgen.pipelines.demo_data import generate_demo_inputs
    from orsgen.schemas.config import load_config

    cfg_path = generate_demo_inputs(tmp_path / "inputs", seed=0)
    fixed = _side_inputs_by_step(load_config(cfg_path, ["write.num_buckets=3"]), tmp_path / "o1")
    auto = _side_inputs_by_step(load_config(cfg_path, ["write.num_buckets=auto"]), tmp_path / "o2")
    assert fixed["KeyByBucket"] == fixed["KeyRejects"] == 0 and "CountRejects" not in fixed
    assert auto["KeyByBucket"] == auto["KeyRejects"] == 1 and "CountRejects" in auto
    # The completed groups' records still gate the shuffle in both.
    assert fixed["SkipCompletedGroups"] == auto["SkipCompletedGroups"] == 1
    assert fixed["CompletedGroups"] == 1 and auto["CompletedGroups"] == 0


# ------------------------------------------------------------------ stage chains


def _chain_stages():
    """Three stages: a drop with events, a side input, a sample-level reject, a second drop."""

    def first(ex: ImageExample, offset: int):
        i = int(ex.key[1:])
        if i % 5 == 0:
            return None, [Reject(ex.image.image_id, "first", "bad", "bad image", RejectLevel.IMAGE, ex.image.image_id)], []
        return ex.replace(key=f"k{i}", split=f"s{i + offset}"), [], [("first/n", i)]

    def second(ex: ImageExample):
        i = int(ex.key[1:])
        rejects = [Reject(f"{ex.key}/x", "second", "odd", "odd one", RejectLevel.REF, ex.image.image_id)] if i % 2 else []
        return ex, rejects

    def third(ex: ImageExample, bad: int):
        # Never sees an image that ``first`` dropped (it would fail on i % 5 == 0).
        i = int(ex.key[1:])
        assert i % 5, "a dropped image reached the next stage"
        if i % bad == 0:
            return None, [Reject(ex.image.image_id, "third", "worse", "worse", RejectLevel.IMAGE, ex.image.image_id)]
        return ex.replace(split=ex.split + "!"), [], [("third/n", 1)]

    return [("First", first), ("Second", second), ("Third", third)]


_SINK: dict[str, list] = {}


def _keep(xs, label):  # noqa: ANN001, ANN202
    # The FnApiRunner runs in this process: the collected lists land here.
    _SINK[label] = sorted(xs)


def _run_stages(chain: bool, n: int) -> tuple[dict[str, list], dict[str, int]]:
    """The three stages as one ParDo each, or as one StageChainDoFn: (collected outputs, counters)."""
    from apache_beam.metrics.metric import MetricsFilter

    from orsgen.pipelines.transforms import StageChainDoFn

    _SINK.clear()
    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    examples = p | beam.Create(list(range(n))) | beam.Reshuffle() | beam.Map(_example)
    offset = beam.pvalue.AsSingleton(p | "Offset" >> beam.Create([100]))
    sides = {"First": (offset,), "Second": (), "Third": (7,)}
    outs = []
    if chain:
        fn = StageChainDoFn([(StageDoFn(name, f), len(sides[name])) for name, f in _chain_stages()])
        outs.append(examples | "Chain" >> beam.ParDo(fn, offset, 7).with_outputs(REJECTS, EVENTS, main="examples"))
    else:
        for name, f in _chain_stages():
            res = examples | name >> beam.ParDo(StageDoFn(name, f), *sides[name]).with_outputs(
                REJECTS, EVENTS, main="examples"
            )
            examples = res.examples
            outs.append(res)
    written = outs[-1].examples | beam.Map(lambda ex: (ex.key, ex.split))
    rejects = [o[REJECTS] for o in outs] | "R" >> beam.Flatten() | beam.Map(lambda r: (r.source_key, r.stage, r.reason))
    events = [o[EVENTS] for o in outs] | "E" >> beam.Flatten() | beam.CombinePerKey(sum)
    for label, pc in (("written", written), ("rejects", rejects), ("events", events)):
        _ = pc | f"Collect{label}" >> beam.combiners.ToList() | f"Keep{label}" >> beam.Map(_keep, label)
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("orsgen"))["counters"]
    }
    return dict(_SINK), counters


def test_a_stage_chain_gives_what_the_separate_stages_give():
    """Outputs, rejects, summed events and each stage's counters are those of one ParDo per stage."""
    n = 40
    separate, chained = _run_stages(False, n), _run_stages(True, n)
    assert chained == separate
    written = dict(separate[0]["written"])
    # The side inputs reached their stages: First's offset and Third's divisor.
    assert written["k1"] == "s101!" and "k7" not in written and "k14" not in written and "k5" not in written
    assert len(separate[0]["rejects"]) == 8 + 4 + sum(1 for i in range(n) if i % 5 and i % 2)
    counters = separate[1]
    assert counters["First_in"] == n and counters["Second_in"] == counters["Third_in"] == n - n // 5
    assert counters["dropped_bad"] == n // 5 and counters["dropped_worse"] == 4
    events = dict(separate[0]["events"])
    assert events["first/n"] == sum(i for i in range(n) if i % 5) and events["third/n"] == len(written)


def test_a_stage_chain_stops_at_a_drop_and_names_the_stage_that_broke_the_rules():
    from orsgen.pipelines.transforms import StageChainDoFn

    stages = dict(_chain_stages())
    fn = StageChainDoFn([(StageDoFn("First", stages["First"]), 1), (StageDoFn("Third", stages["Third"]), 1)])
    # Outside a bundle: every event comes out with the example, as StageDoFn's do.
    out = list(fn.process(_example(3), 100, 7))
    assert [o for o in out if isinstance(o, ImageExample)] == [_example(3).replace(split="s103!")]
    assert [o.value for o in out if isinstance(o, beam.pvalue.TaggedOutput) and o.tag == EVENTS] == [
        ("first/n", 3), ("third/n", 1)]
    # Dropped by First: Third never runs (it asserts so), one image reject comes out.
    out = list(fn.process(_example(10), 100, 7))
    assert [o.value.reason for o in out if isinstance(o, beam.pvalue.TaggedOutput) and o.tag == REJECTS] == ["bad"]
    assert not [o for o in out if isinstance(o, ImageExample)]
    # Inside a bundle the events wait for finish_bundle, summed over the stages.
    fn.start_bundle()
    list(fn.process(_example(3), 100, 7))
    list(fn.process(_example(4), 100, 7))
    assert sorted(o.value.value for o in fn.finish_bundle()) == [("first/n", 7), ("third/n", 2)]
    # A stage that drops an image without an image reject is named in the error.
    silent = StageChainDoFn([(StageDoFn("First", stages["First"]), 1), (StageDoFn("Quiet", lambda ex: (None, [])), 0)])
    try:
        list(silent.process(_example(3), 100))
    except RuntimeError as e:
        assert "stage Quiet dropped image img:3" in str(e)
    else:
        raise AssertionError("a silent drop went through")
    # A stage that raises is named too (Beam names only the chained step).
    def broken(ex):  # noqa: ANN001, ANN202
        raise ValueError("boom")

    raising = StageChainDoFn([(StageDoFn("First", stages["First"]), 1), (StageDoFn("Broken", broken), 0)])
    try:
        list(raising.process(_example(3), 100))
    except ValueError as e:
        assert "raised in stage Broken of the chained step, on image img:3" in " ".join(e.__notes__)
    else:
        raise AssertionError("the stage's error was lost")
