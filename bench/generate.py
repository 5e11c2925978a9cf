"""Generation throughput, side by side in one run: one summary at a time (the seed recipe) vs tunequeue's
length-sorted batches, and N adapters swapped between passes (PEFT `set_adapter`, all adapters already loaded) vs
one mixed pass (tunequeue's gather-matmul hooks, worker/ml/multi_lora.py; PEFT's own `adapter_names` mixing is printed
too, for reference); and one adapter as PEFT layers vs merged into copies of the layers it targets. In each of the
three comparisons the sides take turns `--pairs` times after a warm-up; figures are medians over the pairs with
their min–max, ratios the median of the per-pair ratios. One-at-a-time generation is too slow to run every example
in every pair: it runs a fixed subset (`--slow-examples`, the first 32) each time; rates are per summary.

The first batched figure is what a `generate` job does by default: length-sorted batches filled up to a budget of
padded tokens (models/specs.py GENERATE_BATCH_TOKENS), cut by the worker's own `batch_at`; `--batch-size` replaces
it with a fixed count. `--budgets 4096,16384,...` adds a figure per token budget (the sweep the default was chosen
from).

    python bench/generate.py --tiny          # tiny-t5 on CPU, seconds
    python bench/generate.py --tiny --budgets 2048,4096,8192,16384,32768,65536
    python bench/generate.py                 # FLAN-T5-base architecture (random weights), for a GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import (add_bench_args, emit, emit_machine, examples, interleave, load_model,  # noqa: E402
                           paired_ratio, rate, rates, setup)
from models.specs import GENERATE_BATCH_TOKENS  # noqa: E402


def generate(model, tokenizer, sources: list[str], batch_size: int | None, new_tokens: int, device: str,
             token_budget: int = GENERATE_BATCH_TOKENS, **extra) -> int:
    """Greedy generation of exactly `new_tokens` tokens per example (so both sides do the same work), in batches of
    `batch_size`, or (None) of `token_budget` padded tokens as a generate job cuts them."""
    import torch

    from worker.jobs.generate import batch_at
    from worker.ml.features import pad

    encoded = tokenizer(sources, truncation=True, max_length=512)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    order = sorted(range(len(sources)), key=lambda i: lengths[i])
    names = extra.pop("adapter_names", None)
    mixer, slots = extra.pop("mixer", None), extra.pop("slots", None)
    done = 0
    with torch.inference_mode():
        while done < len(order):
            batch = batch_at(order, done, lengths, batch_size, new_tokens, token_budget)
            ids = pad([encoded[i] for i in batch], tokenizer.pad_token_id).to(device)
            kwargs = {"adapter_names": [names[i] for i in batch]} if names else {}
            scope = mixer.batch([slots[i] for i in batch]) if mixer else contextlib.nullcontext()
            with scope:
                model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                               do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            done += len(batch)
    return done


def batch_rows(lengths: list[int], budget: int, new_tokens: int) -> list[int]:
    """Rows of each batch a generate job cuts from examples of these (sorted) lengths under `budget`."""
    from worker.jobs.generate import batch_at

    order, rows = list(range(len(lengths))), []
    while sum(rows) < len(order):
        rows.append(len(batch_at(order, sum(rows), lengths, None, new_tokens, budget)))
    return rows


def main() -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from worker.ml.multi_lora import MixedLora, merged_copy

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--slow-examples", type=int, default=32,
                        help="the fixed subset that one-at-a-time generation runs in each pair")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch of the adapter figures and the first batched figure [generate's default: a "
                             f"budget of {GENERATE_BATCH_TOKENS} padded tokens]")
    parser.add_argument("--large-batch-size", type=int, default=None,
                        help="a second batched figure [256 tiny; none in full mode]")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--budgets", default=None, help="comma-separated token budgets, each a figure of its own")
    add_bench_args(parser)
    args = parser.parse_args()
    device = setup(args)
    batch_size = args.batch_size  # None: generate's default, a token budget
    sizes = [batch_size] + [b for b in [args.large_batch_size or (256 if args.tiny else None)] if b]
    n = args.examples or 2 * max([s for s in sizes if s] + [256])  # two batches of the largest size
    new_tokens = 24 if args.tiny else 64
    model, tokenizer = load_model(args.tiny, device)
    if device == "cuda" and not args.tiny:
        model = model.to(torch.bfloat16)
    sources = [e["source"] for e in examples("test", n)]
    one_at_a_time = sources[: args.slow_examples]  # too slow to run all n five times; rates are per summary

    def batched(size: int | None, budget: int = GENERATE_BATCH_TOKENS):
        return lambda: generate(model, tokenizer, sources, size, new_tokens, device, token_budget=budget)

    if args.budgets:
        budgets = [int(b) for b in args.budgets.split(",")]
        seconds = interleave({b: batched(None, b) for b in budgets}, args.pairs, device)
        lengths = sorted(len(ids) for ids in tokenizer(sources, truncation=True, max_length=512)["input_ids"])
        for budget in budgets:
            rows = batch_rows(lengths, budget, new_tokens)
            emit(figure="budget", device=device, batch_tokens=budget, summaries=n, new_tokens=new_tokens,
                 batches=len(rows), rows_per_batch=[min(rows), max(rows)],
                 **rate("summaries_per_s", rates(n, seconds[budget])))

    def label(size: int | None) -> str:
        return str(size) if size else f"default: {GENERATE_BATCH_TOKENS}-token budget"

    # one_at_a_time sits between the batched sides, so that each ratio divides two adjacent runs
    sides = {f"batched {label(sizes[0])}": batched(sizes[0]),
             "one_at_a_time": lambda: generate(model, tokenizer, one_at_a_time, 1, new_tokens, device),
             **{f"batched {label(size)}": batched(size) for size in sizes[1:]}}
    seconds = interleave(sides, args.pairs, device)
    slow = rates(len(one_at_a_time), seconds["one_at_a_time"])
    emit(figure="one_at_a_time", device=device, summaries=len(one_at_a_time),
         subset=f"the first {len(one_at_a_time)} of the {n} examples, in every pair", **rate("summaries_per_s", slow))
    for size in sizes:
        fast = rates(n, seconds[f"batched {label(size)}"])
        emit(figure="batched", device=device, summaries=n, batch_size=size,
             batch_tokens=None if size else GENERATE_BATCH_TOKENS, **rate("summaries_per_s", fast))
        emit(ratio=f"batched ({label(size)}) / one_at_a_time", **paired_ratio(fast, slow),
             target=30 if args.tiny else 150)

    names = [f"a{i}" for i in range(args.adapters)]
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"], init_lora_weights=False)
    # PEFT's sides get their own copy of the base, so that tunequeue's hooks can sit on `model` at the same time
    peft_model = get_peft_model(copy.deepcopy(model), config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    peft_model.eval()
    folder = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    peft_model.save_pretrained(folder)  # one subfolder per adapter name
    folders = [folder / name for name in names]
    per_adapter = max((batch_size or 64) // args.adapters, 1) * 2
    mixed_sources = (sources * (args.adapters * per_adapter // len(sources) + 1))[: args.adapters * per_adapter]
    rows = [i // per_adapter for i in range(len(mixed_sources))]
    mixer = MixedLora(model, folders)

    def swap():
        for i, name in enumerate(names):
            peft_model.set_adapter(name)
            generate(peft_model, tokenizer, mixed_sources[i * per_adapter:(i + 1) * per_adapter], batch_size,
                     new_tokens, device)

    row_names = [names[r] for r in rows]
    seconds = interleave({
        "adapters_mixed_peft_adapter_names": lambda: generate(peft_model, tokenizer, mixed_sources, batch_size,
                                                              new_tokens, device, adapter_names=row_names),
        "adapters_swapped": swap,
        "adapters_mixed_batch": lambda: generate(model, tokenizer, mixed_sources, batch_size, new_tokens, device,
                                                 mixer=mixer, slots=rows),
    }, args.pairs, device)
    dense = bool(mixer.dense)
    mixer.remove()
    total = len(mixed_sources)
    swapped, peft_mixed, mixed = (rates(total, seconds[k]) for k in
                                  ("adapters_swapped", "adapters_mixed_peft_adapter_names", "adapters_mixed_batch"))
    emit(figure="adapters_swapped", adapters=args.adapters, summaries=total, **rate("summaries_per_s", swapped))
    emit(figure="adapters_mixed_peft_adapter_names", adapters=args.adapters, summaries=total,
         **rate("summaries_per_s", peft_mixed))
    emit(figure="adapters_mixed_batch", adapters=args.adapters, summaries=total, path="worker/ml/multi_lora.py hooks",
         dense=dense, **rate("summaries_per_s", mixed))
    emit(ratio="mixed / swapped", **paired_ratio(mixed, swapped), target=2)
    emit(ratio="peft adapter_names / swapped", **paired_ratio(peft_mixed, swapped))

    # one adapter: PEFT's LoRA layers (two extra matmuls per layer and step) vs merged into copies of its layers
    single = PeftModel.from_pretrained(copy.deepcopy(model), str(folders[0])).eval()
    with merged_copy(model, folders[0]):
        seconds = interleave({"peft": lambda: generate(single, tokenizer, sources, batch_size, new_tokens, device),
                              "merged": lambda: generate(model, tokenizer, sources, batch_size, new_tokens, device)},
                             args.pairs, device)
    with_layers, merged = rates(n, seconds["peft"]), rates(n, seconds["merged"])
    emit(figure="one_adapter_peft_layers", summaries=n, **rate("summaries_per_s", with_layers))
    emit(figure="one_adapter_merged_copy", summaries=n, **rate("summaries_per_s", merged))
    emit(ratio="merged copy / peft layers", **paired_ratio(merged, with_layers))
    emit_machine()


if __name__ == "__main__":
    main()
