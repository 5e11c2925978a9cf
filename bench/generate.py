"""Generation throughput, side by side in one run: one summary at a time (the seed recipe) vs tunequeue's
length-sorted batches, and N adapters swapped between passes (PEFT `set_adapter`, all adapters already loaded) vs
one mixed pass (tunequeue's gather-matmul hooks, worker/multi_lora.py; PEFT's own `adapter_names` mixing is printed
too, for reference); and one adapter as PEFT layers vs merged into copies of the layers it targets.

    python bench/generate.py --tiny          # tiny-t5 on CPU, seconds
    python bench/generate.py                 # FLAN-T5-base architecture (random weights), for a GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import contextlib  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import emit, examples, load_model, median_seconds  # noqa: E402


def generate(model, tokenizer, sources: list[str], batch_size: int, new_tokens: int, device: str, **extra) -> int:
    """Greedy generation of exactly `new_tokens` tokens per example (so both sides do the same work)."""
    import torch

    from worker.ml.features import pad

    encoded = tokenizer(sources, truncation=True, max_length=512)["input_ids"]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    names = extra.pop("adapter_names", None)
    mixer, slots = extra.pop("mixer", None), extra.pop("slots", None)
    done = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids = pad([encoded[i] for i in batch], tokenizer.pad_token_id).to(device)
            kwargs = {"adapter_names": [names[i] for i in batch]} if names else {}
            scope = mixer.batch([slots[i] for i in batch]) if mixer else contextlib.nullcontext()
            with scope:
                model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                               do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            done += len(batch)
    return done


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch of the adapter figures and the first batched figure [64 tiny, 128 full]")
    parser.add_argument("--large-batch-size", type=int, default=None,
                        help="a second batched figure [256 tiny; none in full mode]")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the median of this many runs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = args.batch_size or (64 if args.tiny else 128)
    sizes = [batch_size] + [b for b in [args.large_batch_size or (256 if args.tiny else None)] if b]
    n = args.examples or 2 * max(sizes + [256])  # two batches of the largest size: lengths sort into tight batches
    new_tokens = 24 if args.tiny else 64
    model, tokenizer = load_model(args.tiny, device)
    if device == "cuda" and not args.tiny:
        model = model.to(torch.bfloat16)
    sources = [e["source"] for e in examples("test", n)]
    one_at_a_time = sources[:32]  # the slow side runs on fewer examples; rates are per summary
    repeats = args.repeats
    for size in (1, 4):  # warm-up: first calls allocate and pick kernels, on neither side's clock
        generate(model, tokenizer, sources[:4], size, new_tokens, device)

    slow = median_seconds(lambda: generate(model, tokenizer, one_at_a_time, 1, new_tokens, device), device, repeats)
    slow_rate = len(one_at_a_time) / slow
    emit(figure="one_at_a_time", device=device, summaries=len(one_at_a_time), summaries_per_s=round(slow_rate, 2))
    for size in sizes:
        fast_rate = n / median_seconds(lambda: generate(model, tokenizer, sources, size, new_tokens, device), device,
                                       repeats)
        emit(figure="batched", device=device, summaries=n, batch_size=size, summaries_per_s=round(fast_rate, 2))
        emit(ratio=f"batched ({size}) / one_at_a_time", value=round(fast_rate / slow_rate, 1),
             target=30 if args.tiny else 150)

    from worker.ml.multi_lora import MixedLora

    names = [f"a{i}" for i in range(args.adapters)]
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"], init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    peft_model.eval()
    folder = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    peft_model.save_pretrained(folder)  # one subfolder per adapter name
    folders = [folder / name for name in names]
    per_adapter = max(batch_size // args.adapters, 1) * 2
    mixed_sources = (sources * (args.adapters * per_adapter // len(sources) + 1))[: args.adapters * per_adapter]
    def swap():
        for i, name in enumerate(names):
            peft_model.set_adapter(name)
            generate(peft_model, tokenizer, mixed_sources[i * per_adapter:(i + 1) * per_adapter], batch_size,
                     new_tokens, device)

    rows = [i // per_adapter for i in range(len(mixed_sources))]
    swapped = median_seconds(swap, device, repeats)
    peft_mixed = median_seconds(lambda: generate(peft_model, tokenizer, mixed_sources, batch_size, new_tokens, device,
                                                 adapter_names=[names[r] for r in rows]), device, repeats)
    base = peft_model.unload()
    mixer = MixedLora(base, folders)
    mixed = median_seconds(lambda: generate(base, tokenizer, mixed_sources, batch_size, new_tokens, device,
                                            mixer=mixer, slots=rows), device, repeats)
    dense = bool(mixer.dense)
    mixer.remove()
    total = len(mixed_sources)
    emit(figure="adapters_swapped", adapters=args.adapters, summaries=total, summaries_per_s=round(total / swapped, 2))
    emit(figure="adapters_mixed_peft_adapter_names", adapters=args.adapters, summaries=total,
         summaries_per_s=round(total / peft_mixed, 2))
    emit(figure="adapters_mixed_batch", adapters=args.adapters, summaries=total, path="worker/multi_lora.py hooks",
         dense=dense, summaries_per_s=round(total / mixed, 2))
    emit(ratio="mixed / swapped", value=round(swapped / mixed, 2), target=2)

    # one adapter: PEFT's LoRA layers (two extra matmuls per layer and step) vs merged into copies of its layers
    from peft import PeftModel

    from worker.ml.multi_lora import merged_copy

    single = PeftModel.from_pretrained(base, str(folders[0])).eval()
    with_layers = median_seconds(lambda: generate(single, tokenizer, sources, batch_size, new_tokens, device), device,
                                 repeats)
    base = single.unload()
    with merged_copy(base, folders[0]):
        merged = median_seconds(lambda: generate(base, tokenizer, sources, batch_size, new_tokens, device), device,
                                repeats)
    emit(figure="one_adapter_peft_layers", summaries=n, summaries_per_s=round(n / with_layers, 2))
    emit(figure="one_adapter_merged_copy", summaries=n, summaries_per_s=round(n / merged, 2))
    emit(ratio="merged copy / peft layers", value=round(with_layers / merged, 2))


if __name__ == "__main__":
    main()
