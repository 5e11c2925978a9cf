"""Which compute dtype a 4-bit (QLoRA) base should use on this machine: the same LoRA training steps on the same NF4
weights with `bnb_4bit_compute_dtype` fp32 and bf16, side by side. Each side is its own 4-bit load of the model
(tunequeue's `quantization_config`, only the compute dtype changed), prepared as the worker prepares it, with a LoRA
adapter on every linear layer and AdamW; calling a side runs `--steps` training steps on fixed batches of the
built-in dataset. The sides take turns (`bench/_common.py`), and the ratio line is bf16's step rate over fp32's.
The final losses of both sides are printed too, so a dtype that is fast because it computes wrong shows.

    python bench/qlora_dtype.py                    # tiny-t5 and tiny-llama on this machine's device
    python bench/qlora_dtype.py --models tiny-t5 --steps 3
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import (add_bench_args, emit, emit_machine, examples, interleave, paired_ratio, rate,  # noqa: E402
                           rates, setup)


class Side:
    """One compute dtype: a 4-bit base with a LoRA adapter and its optimizer, and the batches it trains on."""

    def __init__(self, name: str, model_kind: str, compute_dtype, device: str, batches: list[dict]):
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        from worker.ml.builtin import ensure_builtin
        from worker.ml.kinds import PEFT_TASK_TYPES, model_class, quantization_config

        home = Path(os.environ.get("TUNEQUEUE_HOME", Path(tempfile.gettempdir()) / "tunequeue-bench"))
        config = quantization_config("4bit", model_kind)
        config.bnb_4bit_compute_dtype = compute_dtype
        base = model_class(model_kind).from_pretrained(str(ensure_builtin(name, home)), quantization_config=config,
                                                       device_map={"": 0} if device == "cuda" else "cpu")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        self.model = get_peft_model(base, LoraConfig(task_type=PEFT_TASK_TYPES[model_kind], r=16, lora_alpha=32,
                                                     target_modules="all-linear"))
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=3e-3)
        self.batches, self.device, self.loss = batches, device, float("nan")

    def __call__(self) -> None:
        import torch

        self.model.train()
        for batch in self.batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                loss = self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss)


def batches_for(name: str, model_kind: str, steps: int, batch_size: int) -> list[dict]:
    """`steps` batches of the built-in dataset's training split, tokenized as the worker does (worker/ml/features)."""
    from transformers import AutoTokenizer

    from worker.ml.builtin import ensure_builtin
    from worker.ml.features import collate, encode

    home = Path(os.environ.get("TUNEQUEUE_HOME", Path(tempfile.gettempdir()) / "tunequeue-bench"))
    tokenizer = AutoTokenizer.from_pretrained(ensure_builtin(name, home))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = examples("train", steps * batch_size)
    features = encode(model_kind, tokenizer, [{"id": str(i), "source": r["source"], "target": r["target"]}
                                              for i, r in enumerate(rows)], max_source_length=256,
                      max_target_length=64)
    return [collate(features, list(range(i, i + batch_size)), tokenizer.pad_token_id, "cpu")
            for i in range(0, len(features), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-t5,tiny-llama", help="built-in models [tiny-t5,tiny-llama]")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed run [5]")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step [16]")
    add_bench_args(parser)
    args = parser.parse_args()
    device = setup(args)

    import torch

    from models.builtins import BUILTIN_MODELS

    for name in args.models.split(","):
        model_kind = BUILTIN_MODELS[name].model_kind
        batches = batches_for(name, model_kind, args.steps, args.batch_size)
        sides = {"fp32": Side(name, model_kind, torch.float32, device, batches),
                 "bf16": Side(name, model_kind, torch.bfloat16, device, batches)}
        seconds = interleave(sides, args.pairs, device)
        for dtype, side in sides.items():
            emit(figure="qlora_train_steps", model=name, compute_dtype=dtype, device=device,
                 **rate("steps_per_s", rates(args.steps, seconds[dtype])), final_loss=round(side.loss, 4))
        emit(ratio="bf16_over_fp32_steps_per_s", model=name, device=device,
             **paired_ratio(rates(args.steps, seconds["bf16"]), rates(args.steps, seconds["fp32"])))
    emit_machine()


if __name__ == "__main__":
    main()
