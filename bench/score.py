"""ROUGE throughput: tunequeue's scorer (rouge-score-rs, batched on all cores) vs a `rouge_score` loop, side by side
in one run on the same pairs, taking turns `--pairs` times after a warm-up (tunequeue's scorer scores the pairs
`--fast-repeats` times per run, so that its run is not a few milliseconds long). Checks the numbers agree, then
prints one JSON line per figure (median rate and its min–max over the pairs) and the ratio (median of the per-pair
ratios, min, max).

    python bench/score.py --tiny      # 2,000 pairs
    python bench/score.py             # 20,000 pairs
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench._common import add_bench_args, emit, emit_machine, interleave, paired_ratio, rate, rates  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2,000 ROUGE pairs instead of 20,000")
    parser.add_argument("--rouge-pairs", type=int, default=None, help="prediction/reference pairs scored per run")
    parser.add_argument("--fast-repeats", type=int, default=10,
                        help="times tunequeue's scorer scores the pairs in each of its runs [10]")
    add_bench_args(parser, threads=False)
    args = parser.parse_args()
    n = args.rouge_pairs or (2000 if args.tiny else 20000)
    predictions, references = make_pairs(n)
    reference = rouge_scores(predictions, references, fast=False)
    fast = rouge_scores(predictions, references, fast=True)
    max_diff = max(abs(a[k] - b[k]) for a, b in zip(fast, reference) for k in a)

    def scorer():
        # one call takes tens of ms, a few of a shared machine's scheduler slices: one preemption would be the figure
        for _ in range(args.fast_repeats):
            rouge_scores(predictions, references, fast=True)

    # the two calls above, which checked that the scores agree, were the warm-up
    seconds = interleave({"rouge_score_loop": lambda: rouge_scores(predictions, references, fast=False),
                          "tunequeue_scorer": scorer}, args.pairs, "cpu", warmup=False)
    slow, quick = rates(n, seconds["rouge_score_loop"]), rates(n * args.fast_repeats, seconds["tunequeue_scorer"])
    emit(figure="rouge_score_loop", rouge_pairs=n, **rate("pairs_per_s", slow))
    emit(figure="tunequeue_scorer", rouge_pairs=n, repeats_per_run=args.fast_repeats, cores=os.cpu_count(),
         **rate("pairs_per_s", quick))
    emit(ratio="tunequeue_scorer / rouge_score_loop", **paired_ratio(quick, slow), target=5,
         max_abs_difference=max_diff)
    emit_machine()
    sys.exit(0 if max_diff <= 1e-9 else 1)

if __name__ == "__main__":
    main()
