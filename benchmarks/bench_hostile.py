"""Benchmark: what the hostile-input bounds of issue 11 cost on ordinary inputs.

Two ratios, each against a baseline measured in the same run:

(a) ``stages.ingest.validate.value_problem`` over N COCO-shaped annotations
    (40 polygon coordinates each) against ``json.loads`` of the same
    annotations, which every COCO ingest already pays;
(b) ``safe_pickle.restricted_loads`` (restricted unpickler + opcode pre-scan
    + expansion and depth measure) against plain ``pickle.loads`` of the same
    RefCOCO-shaped refs pickle (protocol 2, 3 sentences per ref).

CPU time (``time.process_time``), best of ``--reps``. Bombs are not timed
here: tests/test_bombs.py shows each is refused under a 1.5 GiB cap.

    python benchmarks/bench_hostile.py --anns 100000 --refs 50000
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import time
from collections.abc import Callable
from typing import Any

from orsgen.stages.ingest import safe_pickle
from orsgen.stages.ingest.validate import value_problem


def _best(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anns", type=int, default=100_000)
    ap.add_argument("--refs", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(0)
    anns = [
        {
            "id": i,
            "image_id": i // 7,
            "category_id": rng.randint(1, 90),
            "segmentation": [[rng.uniform(0, 640) for _ in range(40)]],
            "area": 1.0,
            "bbox": [1.0, 2.0, 3.0, 4.0],
            "iscrowd": 0,
        }
        for i in range(args.anns)
    ]
    text = json.dumps(anns)
    parsed = json.loads(text)
    t_json = _best(lambda: json.loads(text), args.reps)
    t_check = _best(lambda: [value_problem(a, "a") for a in parsed], args.reps)
    print(f"(a) {args.anns} annotations: json.loads {t_json:.2f} s, value_problem {t_check:.2f} s "
          f"-> checks cost {t_check / t_json:.2f}x of parsing")

    refs = [
        {
            "ref_id": i, "ann_id": i, "category_id": 1, "image_id": i, "split": "train",
            "sentences": [
                {"raw": f"the cat {k}", "sent": f"the cat {k}", "sent_id": 3 * i + k, "tokens": ["the", "cat", str(k)]}
                for k in range(3)
            ],
            "sent_ids": [3 * i, 3 * i + 1, 3 * i + 2], "file_name": "x.jpg",
        }
        for i in range(args.refs)
    ]  # fmt: skip
    data = pickle.dumps(refs, protocol=2)
    t_plain = _best(lambda: pickle.loads(data), args.reps)
    t_safe = _best(lambda: safe_pickle.restricted_loads(data), args.reps)
    print(f"(b) refs pickle of {len(data) / 1e6:.1f} MB ({args.refs} refs): pickle.loads {t_plain:.2f} s, "
          f"restricted_loads {t_safe:.2f} s -> {t_safe / t_plain:.2f}x")


if __name__ == "__main__":
    main()
