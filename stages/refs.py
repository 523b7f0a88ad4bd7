"""RefCOCO-family refs become ``human`` samples with their target masks.

Every sentence of a ref is one sample (the RefCOCO convention: a ref's
sentences are independent expressions of the same target). A gRefCOCO ref with
no target (``ann_id == [-1]``) becomes a ``no_target`` sample whose union mask
is empty.
"""

from __future__ import annotations

from collections import Counter

from orsgen.schemas.records import ExpressionKind, ImageExample, Reject, RejectLevel, Sample, safe_key
from orsgen.stages.common.targets import TargetCache, TargetError, attach_targets

STAGE = "refs"


def ref_source_split(ex: ImageExample) -> str:
    """The source split of an image with refs: the most common split of its refs.

    RefCOCO (unc) and RefCOCOg (umd) splits are image-disjoint, so all refs of
    an image agree; the majority (ties to the alphabetically first split)
    keeps the result well defined for the splits that are not.
    """
    if not ex.refs:
        return ""
    counts = Counter(r.split for r in ex.refs if r.split)
    if not counts:
        return ""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def add_human_samples(ex: ImageExample) -> tuple[ImageExample, list[Reject]]:
    """Turns every sentence of every ref of ``ex`` into a sample.

    Args:
        ex: an image with refs and instances.

    Returns:
        ``(example with samples appended, rejects)``; a sentence whose target
        annotation is not among the image's instances (e.g. its mask was
        rejected at ingest) is a sample-level reject ``missing_target``.
    """
    if not ex.refs:
        return ex, []
    by_ann = {i.source_ann_id: i for i in ex.instances if i.source_ann_id is not None}
    by_id = {i.instance_id: i for i in ex.instances}
    samples: list[Sample] = []
    # Every sentence of a ref targets the same instances: their targets are computed once.
    target_cache = TargetCache()
    rejects: list[Reject] = []
    w, h = ex.image.width, ex.image.height
    for ref in sorted(ex.refs, key=lambda r: r.ref_id):
        missing = [a for a in ref.ann_ids if a not in by_ann]
        target_ids = tuple(by_ann[a].instance_id for a in ref.ann_ids if a in by_ann)
        kind = ExpressionKind.HUMAN if ref.ann_ids else ExpressionKind.NO_TARGET
        for sent in sorted(ref.sentences, key=lambda s: s.sent_id):
            sample_id = safe_key(f"{ex.key}-{ref.dataset}-r{ref.ref_id}-s{sent.sent_id}")
            if missing:
                rejects.append(
                    Reject(
                        source_key=sample_id,
                        stage=STAGE,
                        reason="missing_target",
                        message=f"ref {ref.ref_id} targets annotations {missing} that are not instances of this image.",
                        level=RejectLevel.SAMPLE,
                        image_id=ex.image.image_id,
                    )
                )
                continue
            text = (sent.sent or sent.raw).strip()
            if not text:
                rejects.append(
                    Reject(sample_id, STAGE, "empty_expression", f"ref {ref.ref_id} sentence {sent.sent_id} is empty.",
                           RejectLevel.SAMPLE, ex.image.image_id)
                )
                continue
            sample = Sample(
                sample_id=sample_id,
                image_id=ex.image.image_id,
                expression=text,
                kind=str(kind),
                target_ids=target_ids,
                generator=ref.dataset,
                metadata={"ref_id": ref.ref_id, "sent_id": sent.sent_id, "raw": sent.raw, "source_split": ref.split},
            )
            try:
                samples.append(attach_targets(sample, by_id, w, h, cache=target_cache))
            except TargetError as err:
                rejects.append(Reject(sample_id, STAGE, err.reason, str(err), RejectLevel.SAMPLE, ex.image.image_id))
    return ex.replace(samples=ex.samples + tuple(samples)), rejects
