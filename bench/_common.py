"""Shared helpers of the benchmark scripts: a base model (built-in tiny-t5 or FLAN-T5-base built from its config,
random weights), examples from the built-in dataset, timing and JSON output."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# FLAN-T5-base's architecture (google/flan-t5-base config.json), built locally with random weights: throughput only.
FLAN_T5_BASE = dict(d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


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


def median_seconds(run, device: str, repeats: int = 3) -> float:
    """Median wall time of `repeats` calls of `run()` (the machine's noise hits both sides of a ratio alike)."""
    import statistics

    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            run()
        times.append(timer.seconds)
    return statistics.median(times)
