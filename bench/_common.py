"""Shared helpers of the benchmark scripts: a base model (built-in tiny-t5 or FLAN-T5-base built from its config,
random weights), examples from the built-in dataset, JSON output, and the one way every bench measures:
`interleave` runs the sides of a comparison in turns (A B A B …) after a warm-up, `paired_ratio` takes each pair's
ratio from its two adjacent runs and reports their median, min, max and count (`spread`), and `rate` gives a
figure's median rate with its min–max."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

# Before torch loads OpenMP: its threads otherwise spin while waiting for each other, and when a neighbour holds one of
# the two cores, a two-thread op waits for a descheduled thread. On this 2-core machine under load, batch-64
# generation ran at 24-412 summaries/s from run to run (ratio medians 2.5× to 29×); with passive waiting, at 183-258
# summaries/s and 10.5-16× (bench/RESULTS.md, "Noise"). OMP_WAIT_POLICY=ACTIVE in the environment measures the other
# way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# FLAN-T5-base's architecture (google/flan-t5-base config.json), built locally with random weights: throughput only.
FLAN_T5_BASE = dict(d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def add_bench_args(parser, threads: bool = True) -> None:
    parser.add_argument("--pairs", type=_at_least_5, default=5, help="timed rounds after the warm-up [5, at least 5]")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads [torch's default]")


def _at_least_5(text: str) -> int:
    if int(text) < 5:
        raise argparse.ArgumentTypeError("at least 5 pairs")
    return int(text)


def setup(args) -> str:
    """The device; sets torch's thread count when asked."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return "cuda" if torch.cuda.is_available() else "cpu"


def leave(root: Path, keep: bool) -> None:
    """A run's scratch folder at its end: kept with its path printed (`--keep`), else removed."""
    if keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)


def emit_machine() -> None:
    """What the machine was doing: the load average over the run tells a quiet run from a shared one."""
    torch = sys.modules.get("torch")
    emit(figure="machine", cpus=os.cpu_count(), torch_threads=torch.get_num_threads() if torch else None,
         omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), load_avg_1_5_15=[round(x, 2) for x in os.getloadavg()])


def load_model(tiny: bool, device: str):
    """(model, tokenizer) on `device`: tiny-t5, or the FLAN-T5-base architecture with the tiny tokenizer's ids
    mapped into its vocabulary (so the same text gives the same sequence lengths)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

    from worker.ml.builtin import ensure_builtin

    home = Path(os.environ.get("TUNEQUEUE_HOME", Path(tempfile.gettempdir()) / "tunequeue-bench"))
    path = ensure_builtin("tiny-t5", home)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tiny:
        model = AutoModelForSeq2SeqLM.from_pretrained(path)
    else:
        model = T5ForConditionalGeneration(T5Config(**FLAN_T5_BASE))
    return model.to(device).eval(), tokenizer


def examples(split: str, n: int, template: str | None = None) -> list[dict]:
    from worker.data import synthetic
    from worker.ml.builtin import DEFAULT_PROMPT_TEMPLATE

    template = template or DEFAULT_PROMPT_TEMPLATE
    out = []
    for ex in synthetic.generate_split(split, size=n):
        out.append({"source": template.replace("{dialogue}", ex["dialogue"]), "target": ex["summary"]})
    return out


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def interleave(sides: dict[str, Callable[[], object]], pairs: int, device: str, warmup: bool = True
               ) -> dict[str, list[float]]:
    """Wall seconds of each side's timed calls. Every side is called once untimed (warm-up), then the sides take
    turns, A B A B …, `pairs` times: a neighbour's burst lands on one pair, not on one side's whole figure. With more
    than two sides, put the side the others are divided by in the middle, so that it runs next to each of them."""
    if warmup:
        for run in sides.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(pairs):
        for name, run in sides.items():
            with Timer(device) as timer:
                run()
            seconds[name].append(timer.seconds)
    return seconds


def rates(items: float, seconds: list[float]) -> list[float]:
    return [items / s for s in seconds]


def spread(values: list[float]) -> dict:
    """Median of per-pair figures with their min, max and count: the keys of a ratio line."""
    return {"value": sig(statistics.median(values)), "min": sig(min(values)), "max": sig(max(values)),
            "pairs": len(values)}


def paired_ratio(fast: list[float], slow: list[float]) -> dict:
    """`spread` of fast/slow taken pair by pair (the two runs of a pair are adjacent in time)."""
    return spread([f / s for f, s in zip(fast, slow)])


def rate(key: str, values: list[float]) -> dict:
    """A figure's median rate under `key`, and its min–max over the pairs under `key`_range."""
    return {key: sig(statistics.median(values)), f"{key}_range": [sig(min(values)), sig(max(values))]}


def sig(x: float, digits: int = 3) -> float:
    """`x` rounded to `digits` significant digits (1,234.5 → 1230; 2.2149 → 2.21)."""
    return float(f"{x:.{digits}g}") if x else 0.0
