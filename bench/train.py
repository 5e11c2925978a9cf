"""Training throughput, side by side in one run on the same model, data and number of steps: the seed recipe
(every sequence padded to 512 tokens, batch 8, plain loop) vs tunequeue's path (length-bucketed batches with dynamic
padding, labels padded with -100, one loss sync per logging interval).

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

from bench._common import Timer, emit, examples, load_model  # noqa: E402


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


def run(model, tokenizer, batches, device: str, lr: float, pad_to: int | None) -> dict:
    """Train a fresh LoRA adapter over `batches` (lists of (source ids, target ids)); returns the figures. An untimed
    first pass over the same batches counts the FLOPs (torch's FlopCounterMode) and warms the kernels up."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _train(model, tokenizer, batches, device, lr, pad_to)
    figures = _train(model, tokenizer, batches, device, lr, pad_to)
    flops = counter.get_total_flops()
    return {**figures, "seconds": round(figures["seconds"], 2), "gflop_per_sample": round(flops / figures["samples"] / 1e9, 3),
            "achieved_gflop_per_s": round(flops / figures["seconds"] / 1e9, 1)}


def _train(model, tokenizer, batches, device: str, lr: float, pad_to: int | None) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from worker.ml.features import pad

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=32, lora_alpha=64,
                                                  target_modules=["q", "v"]))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    fused = {"fused": True} if device == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=lr, **fused)
    peft_model.train()
    pad_id = tokenizer.pad_token_id
    real = computed = samples = 0
    losses = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                   enabled=False)
    with Timer(device) as timer:
        for step, batch in enumerate(batches, start=1):
            sources = [s if pad_to is None else s + [pad_id] * (pad_to - len(s)) for s, _ in batch]
            targets = [t if pad_to is None else t + [-100] * (pad_to // 4 - len(t)) for _, t in batch]
            input_ids = pad(sources, pad_id).to(device, non_blocking=True)
            labels = pad(targets, -100).to(device, non_blocking=True)
            with autocast:
                loss = peft_model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long(),
                                  labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            real += sum(len(s) for s, _ in batch) + sum(len(t) for _, t in batch)
            computed += input_ids.numel() + labels.numel()
            samples += len(batch)
            if step % 10 == 0 or step == len(batches):
                losses.append(float(loss.detach()))  # one host sync per logging interval
    peft_model.unload()
    return {"samples_per_s": round(samples / timer.seconds, 1), "tokens_per_s": round(real / timer.seconds, 1),
            "real_token_fraction": round(real / computed, 3), "peak_memory_mb": round(peak_memory_mb(device), 1),
            "final_loss": round(losses[-1], 4), "samples": samples, "seconds": timer.seconds}


def main() -> None:
    import torch

    from worker.jobs.finetune import length_bucketed_batches

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--samples", type=int, default=None, help="training examples each side sees")
    parser.add_argument("--batch-size", type=int, default=None, help="tunequeue's batch size")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.samples or (512 if args.tiny else 8192)
    batch_size = args.batch_size or (64 if args.tiny else 128)
    model, tokenizer = load_model(args.tiny, device)
    data = examples("train", n)
    sources = tokenizer([e["source"] for e in data], truncation=True, max_length=512)["input_ids"]
    targets = tokenizer([e["target"] for e in data], truncation=True, max_length=128)["input_ids"]
    pairs = list(zip(sources, targets))
    seed_batches = [pairs[i:i + 8] for i in range(0, n, 8)]
    seed_steps = seed_batches[: max(4, len(seed_batches) // 8)]  # the slow side sees fewer samples; rates compare
    tq_batches = [[pairs[i] for i in b] for b in length_bucketed_batches([len(s) for s in sources], batch_size,
                                                                       random.Random(0))]
    seed = run(model, tokenizer, seed_steps, device, 3e-3, pad_to=512)
    emit(figure="seed_recipe", device=device, batch_size=8, padded_to=512, **seed)
    fast = run(model, tokenizer, tq_batches, device, 3e-3, pad_to=None)
    emit(figure="tunequeue", device=device, batch_size=batch_size, padded_to="longest in bucket", **fast)
    emit(figure="matmul_peak", device=device, gflop_per_s=round(matmul_peak(device), 1),
         note="one large fp32 (CPU) / bf16 (CUDA) matmul: the most a training step can reach")
    emit(ratio="tunequeue / seed_recipe samples_per_s", value=round(fast["samples_per_s"] / seed["samples_per_s"], 1),
         target=30 if args.tiny else 10,
         # the ratio splits into FLOPs saved (padding never computed) times how much faster the FLOPs that remain run
         flops_saved=round(seed["gflop_per_sample"] / fast["gflop_per_sample"], 1),
         flop_rate_gain=round(fast["achieved_gflop_per_s"] / seed["achieved_gflop_per_s"], 2))


if __name__ == "__main__":
    main()
