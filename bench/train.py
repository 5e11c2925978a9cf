"""Training throughput, side by side in one run on the same model and data: the seed recipe (every sequence padded
to 512 tokens, batch 8, plain loop) vs tunequeue's path (length-bucketed batches with dynamic padding, labels padded
with -100, one loss sync per logging interval). Each side trains its own LoRA adapter on the shared base; after a
first pass of each that counts the FLOPs (and warms up), the sides take turns `--pairs` times and every figure is
the median over the pairs, with its min–max. The seed recipe is too slow to run all samples in every pair: it runs
a fixed subset (the first eighth of the batches) each time; rates are per sample.

    python bench/train.py --tiny          # tiny-t5 on CPU
    python bench/train.py                 # FLAN-T5-base architecture (random weights), for a GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402

from bench._common import (Timer, add_bench_args, emit, emit_machine, examples, interleave, load_model,  # noqa: E402
                           paired_ratio, rate, rates, setup, sig)


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (Linux: KiB)


def matmul_peak(device: str) -> float:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    a @ a
    with Timer(device) as timer:
        for _ in range(10):
            a @ a
    return 10 * 2 * 2048**3 / timer.seconds / 1e9


class Side:
    """One way of training: its own LoRA adapter (r=32 on q, v) and optimizer, its batches (lists of (source ids,
    target ids)) and padding. Calling it makes one pass over the batches; the token counts are kept."""

    def __init__(self, peft_model, name: str, tokenizer, batches, device: str, lr: float, pad_to: int | None):
        import torch

        self.model, self.name, self.batches, self.device, self.pad_to = peft_model, name, batches, device, pad_to
        self.pad_id = tokenizer.pad_token_id
        params = [p for n, p in peft_model.named_parameters() if f".{name}." in n]
        self.optimizer = torch.optim.AdamW(params, lr=lr, **({"fused": True} if device == "cuda" else {}))
        self.samples = sum(len(b) for b in batches)
        self.real = self.computed = 0
        self.loss = float("nan")

    def __call__(self) -> None:
        import torch

        from worker.ml.features import pad

        self.model.set_adapter(self.name)
        self.model.train()
        pad_id, pad_to = self.pad_id, self.pad_to
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda"
                    else torch.autocast("cpu", enabled=False))
        real = computed = 0
        for step, batch in enumerate(self.batches, start=1):
            sources = [s if pad_to is None else s + [pad_id] * (pad_to - len(s)) for s, _ in batch]
            targets = [t if pad_to is None else t + [-100] * (pad_to // 4 - len(t)) for _, t in batch]
            input_ids = pad(sources, pad_id).to(self.device, non_blocking=True)
            labels = pad(targets, -100).to(self.device, non_blocking=True)
            with autocast:
                loss = self.model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long(), labels=labels).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            real += sum(len(s) for s, _ in batch) + sum(len(t) for _, t in batch)
            computed += input_ids.numel() + labels.numel()
            if step % 10 == 0 or step == len(self.batches):
                self.loss = float(loss.detach())  # one host sync per logging interval
        self.real, self.computed = real, computed


def main() -> None:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from worker.jobs.finetune import length_bucketed_batches

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--samples", type=int, default=None, help="training examples tunequeue's side sees per pair")
    parser.add_argument("--batch-size", type=int, default=None, help="tunequeue's batch size")
    add_bench_args(parser)
    args = parser.parse_args()
    device = setup(args)
    n = args.samples or (512 if args.tiny else 8192)
    batch_size = args.batch_size or (64 if args.tiny else 128)
    model, tokenizer = load_model(args.tiny, device)
    data = examples("train", n)
    sources = tokenizer([e["source"] for e in data], truncation=True, max_length=512)["input_ids"]
    targets = tokenizer([e["target"] for e in data], truncation=True, max_length=128)["input_ids"]
    pairs = list(zip(sources, targets))
    seed_batches = [pairs[i:i + 8] for i in range(0, n, 8)]
    seed_steps = seed_batches[: max(4, len(seed_batches) // 8)]
    tq_batches = [[pairs[i] for i in b] for b in length_bucketed_batches([len(s) for s in sources], batch_size,
                                                                       random.Random(0))]
    torch.manual_seed(0)
    config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=32, lora_alpha=64, target_modules=["q", "v"])
    peft_model = get_peft_model(model, config, adapter_name="seed_recipe")
    peft_model.add_adapter("tunequeue", config)
    sides = {"seed_recipe": Side(peft_model, "seed_recipe", tokenizer, seed_steps, device, 3e-3, pad_to=512),
             "tunequeue": Side(peft_model, "tunequeue", tokenizer, tq_batches, device, 3e-3, pad_to=None)}
    flops = {}
    for name, side in sides.items():  # the warm-up pass counts the FLOPs (torch's FlopCounterMode)
        counter = FlopCounterMode(display=False)
        with counter:
            side()
        flops[name] = counter.get_total_flops()
    seconds = interleave(sides, args.pairs, device, warmup=False)
    peak = [matmul_peak(device) for _ in range(args.pairs)]

    figures = {}
    for name, side in sides.items():
        samples_per_s = rates(side.samples, seconds[name])
        gflop_per_s = rates(flops[name] / 1e9, seconds[name])
        figures[name] = (samples_per_s, gflop_per_s)
        emit(figure=name, device=device, batch_size=8 if name == "seed_recipe" else batch_size,
             padded_to=512 if name == "seed_recipe" else "longest in bucket", samples=side.samples,
             **({"subset": f"the first {side.samples} of the {n} samples, in every pair"} if name == "seed_recipe"
                else {}),
             **rate("samples_per_s", samples_per_s), **rate("tokens_per_s", rates(side.real, seconds[name])),
             real_token_fraction=round(side.real / side.computed, 3),
             gflop_per_sample=sig(flops[name] / side.samples / 1e9),
             **rate("achieved_gflop_per_s", gflop_per_s), final_loss=round(side.loss, 4),
             peak_memory_mb=round(peak_memory_mb(device), 1))
    emit(figure="matmul_peak", device=device, **rate("gflop_per_s", peak),
         note="one large fp32 (CPU) / bf16 (CUDA) matmul: the most a training step can reach")
    (seed_rate, seed_gflops), (tq_rate, tq_gflops) = figures["seed_recipe"], figures["tunequeue"]
    emit(ratio="tunequeue / seed_recipe samples_per_s", **paired_ratio(tq_rate, seed_rate),
         target=30 if args.tiny else 10,
         # the ratio splits into FLOPs saved (padding never computed) times how much faster the FLOPs that remain run
         flops_saved=sig(flops["seed_recipe"] / sides["seed_recipe"].samples
                         / (flops["tunequeue"] / sides["tunequeue"].samples), 2),
         flop_rate_gain=paired_ratio(tq_gflops, seed_gflops)["value"])
    emit_machine()


if __name__ == "__main__":
    main()
