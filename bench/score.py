"""ROUGE throughput: tunequeue's scorer (rouge-score-rs, batched on all cores) vs a `rouge_score` loop, side by side
in one run on the same pairs. Prints one JSON line per figure, then the ratio, and checks the numbers agree.

    python bench/score.py --tiny      # 2,000 pairs
    python bench/score.py             # 20,000 pairs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from worker.data import synthetic  # noqa: E402
from worker.jobs.score import rouge_scores  # noqa: E402


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    examples = list(synthetic.generate_split("train", seed=seed, size=max(n, 1)))
    predictions, references = [], []
    for example in examples[:n]:
        words = example["summary"].split() + rng.choice(examples)["summary"].split()
        references.append(example["summary"])
        predictions.append(" ".join(rng.sample(words, k=rng.randint(5, len(words)))))
    return predictions, references


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2,000 pairs instead of 20,000")
    parser.add_argument("--pairs", type=int, default=None)
    args = parser.parse_args()
    n = args.pairs or (2000 if args.tiny else 20000)
    predictions, references = make_pairs(n)
    reference, t_ref = timed(lambda: rouge_scores(predictions, references, fast=False))
    fast, t_fast = timed(lambda: rouge_scores(predictions, references, fast=True))
    max_diff = max(abs(a[k] - b[k]) for a, b in zip(fast, reference) for k in a)
    print(json.dumps({"figure": "rouge_score_loop", "pairs": n, "seconds": round(t_ref, 4),
                      "pairs_per_s": round(n / t_ref, 1)}))
    print(json.dumps({"figure": "tunequeue_scorer", "pairs": n, "seconds": round(t_fast, 4),
                      "pairs_per_s": round(n / t_fast, 1), "cores": os.cpu_count()}))
    print(json.dumps({"ratio": "tunequeue_scorer / rouge_score_loop", "value": round(t_ref / t_fast, 1),
                      "target": 5, "max_abs_difference": max_diff}))
    sys.exit(0 if max_diff <= 1e-9 else 1)


if __name__ == "__main__":
    main()
