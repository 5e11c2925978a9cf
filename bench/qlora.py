"""QLoRA on CPU, side by side: what a 4-bit base saves in memory and what it costs in speed.

For each model (tiny-t5 and tiny-llama; without --tiny also the FLAN-T5-base architecture, built from its config
with random weights and saved once so that the model cache can load it):

- resident: the base loaded through tunequeue's model cache in fp32, 8-bit (LLM.int8) and 4-bit (NF4 with double
  quantization), each in a fresh process: the cache's own count of the entry's bytes, and how much the process's
  RSS grew (and peaked) loading it and reading every weight once, split into anonymous memory and mapped file pages
  (a safetensors checkpoint is mapped: its pages count in RSS once touched).
- train: LoRA on the fp32 base vs QLoRA vs QLoRA + gradient checkpointing + 8-bit AdamW, through tunequeue's own
  training code (worker/jobs/finetune.py `prepare`/`start_run`/`train_step`, the spec fields `method`,
  `gradient_checkpointing` and `optim`). Each configuration lives in a process of its own, so that its peak RSS is
  its own; after a warm-up round in each, the processes take turns, one round of the same batches each, `--pairs`
  times. Figures: samples/s, and the peak RSS of each round (VmHWM, reset before the round).
- generate: summaries/s of the fp32 base + a LoRA adapter (merged copy: what a generate job does) vs the 4-bit
  base + a QLoRA adapter (gather-matmul hooks, worker/ml/multi_lora.py), with PEFT's Linear4bit LoRA layers beside
  them; and 4 adapters in one mixed batch on the 4-bit base, the hooks vs PEFT's `adapter_names`. The adapters are
  random (LoRA B drawn, not zero), every summary is exactly `new_tokens` long, so every side does the same work;
  `same_predictions` counts the rows where the hooks and PEFT produced the same tokens.

    python bench/qlora.py --tiny         # tiny-t5 and tiny-llama, about two minutes on 2 cores
    python bench/qlora.py                # + the FLAN-T5-base architecture (random weights), ~20 minutes
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import (FLAN_T5_BASE, add_bench_args, emit, emit_machine, examples, interleave,  # noqa: E402
                           paired_ratio, rate, rates, sig)

REPLY = "@@"  # a child's replies start with this (libraries may print to stdout too)
QUANTIZATIONS = {"fp32": None, "8bit": "8bit", "4bit": "4bit"}
TRAIN_CONFIGS = {  # name: FinetuneSpec fields
    "lora": {"method": "lora"},
    "qlora": {"method": "qlora"},
    "qlora_gc_adamw8bit": {"method": "qlora", "gradient_checkpointing": True, "optim": "adamw_8bit"},
}
FLAN = "flan-t5-base-random"
MIB = 1 << 20


def bench_home() -> Path:
    return Path(os.environ.get("TUNEQUEUE_HOME", Path(tempfile.gettempdir()) / "tunequeue-bench"))


def model_ref(name: str) -> str:
    """The reference the model cache loads: a built-in name, or the folder of the FLAN-T5-base architecture."""
    if name != FLAN:
        return name
    folder = bench_home() / FLAN
    if not (folder / "tunequeue-bench.txt").exists():  # built once: ~1 GB of fp32 weights
        import torch
        from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

        from worker.ml.builtin import ensure_builtin

        torch.manual_seed(0)
        config = T5Config(**FLAN_T5_BASE, architectures=["T5ForConditionalGeneration"])
        T5ForConditionalGeneration(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(ensure_builtin("tiny-t5", bench_home())).save_pretrained(folder)
        (folder / "tunequeue-bench.txt").write_text("random weights, FLAN-T5-base architecture\n")
    return str(folder)


# ------------------------------------------------------------------------------------------------ in a child
def proc_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak() -> None:
    """VmHWM (and getrusage's maxrss) start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def reply(**fields) -> None:
    print(REPLY + json.dumps(fields), flush=True)


def child_resident(cfg: dict) -> None:
    """RSS before and after loading the base through the cache and reading every weight once (safetensors maps the
    file: its pages count once touched), split into anonymous memory and mapped file pages, and the peak during the
    load; then the cache is dropped, and what freeing it gives back is the weights' share (the rest of the growth is
    code and library state loaded on first use, which stays)."""
    import ctypes
    import gc
    import itertools

    import torch
    import transformers  # noqa: F401  (imported before the baseline, as the cache's load imports it)

    from worker.ml.model_cache import ModelCache

    cache = ModelCache(bench_home(), device="cpu", budget_bytes=1 << 40)
    ref = cache.resolve(model_ref(cfg["model"]))
    before = {field: proc_kib(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    reset_peak()
    loaded = cache.get(ref, quantization=QUANTIZATIONS[cfg["quantization"]])
    with torch.no_grad():
        for tensor in itertools.chain(loaded.model.parameters(), loaded.model.buffers()):
            tensor.sum()  # read every page once
    after = {field: proc_kib(field) for field in before}
    peak = proc_kib("VmHWM")
    figures = {"cache_bytes": cache.stats()["entries"][0]["bytes"],
               "parameters": sum(p.numel() for p in loaded.model.parameters())}
    del loaded, cache, tensor
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what the weights held
    reply(**figures, **{f"{field}_growth_kib": after[field] - before[field] for field in before},
          load_peak_growth_kib=peak - before["VmRSS"], freed_kib=after["VmRSS"] - proc_kib("VmRSS"))


def child_train(cfg: dict) -> None:
    """One training configuration; each "round" line on stdin trains the same `steps` batches and replies with the
    seconds, samples and the round's peak RSS."""
    from models.specs import FinetuneSpec
    from worker.faults import Faults
    from worker.jobs.finetune import prepare, start_run, train_step
    from worker.ml.kinds import resolve_model_kind
    from worker.ml.methods import trainable_model
    from worker.ml.model_cache import ModelCache

    home = bench_home()
    cache = ModelCache(home, device="cpu", budget_bytes=1 << 40)
    steps, batch_size = cfg["steps"], cfg["batch_size"]
    spec = resolve_model_kind(FinetuneSpec(
        name=f"bench-{cfg['config']}", model=model_ref(cfg["model"]), train_limit=steps * batch_size,
        per_device_train_batch_size=batch_size, max_steps=steps * (cfg["rounds"] + 1), eval_split=None,
        warmup_steps=0, learning_rate=1e-3, max_source_length=cfg["max_source_length"],
        **TRAIN_CONFIGS[cfg["config"]]))
    prepared = prepare(spec, cache, home)
    with trainable_model(spec, cache, prepared.loaded, spec.model_kind) as model:
        run = start_run(spec, prepared, model, None, contextlib.nullcontext, Faults(), None, time.monotonic())
        batches = run.state.batches[:steps]
        reply(ready=True, rss_after_load_kib=proc_kib("VmRSS"), optimizer=type(run.optimizer).__name__,
              checkpointing=bool(getattr(model.get_base_model(), "is_activation_checkpointing", False)))
        for line in sys.stdin:
            if line.strip() != "round":
                break
            before = proc_kib("VmRSS")
            reset_peak()
            started = time.perf_counter()
            loss = None
            for batch in batches:
                loss = train_step(run, batch)
            seconds = time.perf_counter() - started
            reply(seconds=seconds, samples=sum(len(b) for b in batches), rss_before_kib=before,
                  peak_kib=proc_kib("VmHWM"), file_kib=proc_kib("RssFile"), loss=float(loss))


def generate(model, tokenizer, sources: list[str], batch_size: int, new_tokens: int, causal: bool,
             scope=None, **extra) -> list[list[int]]:
    """Greedy generation of exactly `new_tokens` tokens per example in length-sorted batches, padded as a generate
    job pads; `scope(rows)` is the context a batch of rows runs in (the hooks' row choice). Returns the new tokens."""
    import torch

    from worker.ml.features import attention_mask, pad

    encoded = tokenizer(sources, truncation=True, max_length=512)["input_ids"]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    names = extra.pop("adapter_names", None)
    out: list[list[int]] = [[] for _ in sources]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids = [encoded[i] for i in batch]
            kwargs = {"adapter_names": [names[i] for i in batch]} if names else {}
            with scope(batch) if scope else contextlib.nullcontext():
                tokens = model.generate(input_ids=pad(ids, tokenizer.pad_token_id, left=causal),
                                        attention_mask=attention_mask(ids, left=causal), do_sample=False,
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        pad_token_id=tokenizer.pad_token_id, **kwargs)
            if causal:
                tokens = tokens[:, max(len(s) for s in ids):]
            for row, index in enumerate(batch):
                out[index] = tokens[row].tolist()
    return out


def random_adapters(model_name: str, model_kind: str, path: str, count: int, folder: Path) -> list[Path]:
    """`count` LoRA adapters (r=16 on every linear layer, tunequeue's default) with drawn, non-zero B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model

    from worker.ml.kinds import PEFT_TASK_TYPES, load_model

    folders = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(load_model(path, model_kind), LoraConfig(
            task_type=PEFT_TASK_TYPES[model_kind], r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        model.save_pretrained(folder / f"{model_name}-{i}")
        folders.append(folder / f"{model_name}-{i}")
    return folders


def child_generate(cfg: dict) -> None:
    from peft import PeftModel

    from worker.ml.kinds import load_model
    from worker.ml.model_cache import ModelCache
    from worker.ml.multi_lora import MixedLora, merged_copy

    cache = ModelCache(bench_home(), device="cpu", budget_bytes=1 << 40)
    ref = model_ref(cfg["model"])
    full, quantized = cache.get(ref), cache.get(ref, quantization="4bit")
    kind, causal, tokenizer = full.model_kind, full.model_kind == "causal", full.tokenizer
    folders = random_adapters(cfg["model"], kind, full.path, cfg["adapters"], Path(tempfile.mkdtemp(prefix="bq-")))
    # PEFT's sides get a 4-bit copy of their own, so that the hooks can sit on the cached one at the same time
    peft_model = PeftModel.from_pretrained(load_model(full.path, kind, quantization="4bit"), str(folders[0]),
                                           adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        peft_model.load_adapter(str(folder), adapter_name=f"a{i}")
    peft_model.eval()
    sources = [e["source"] for e in examples("test", cfg["examples"])]
    n, size, new = len(sources), cfg["batch_size"], cfg["new_tokens"]
    outputs: dict[str, list] = {}

    def side(name: str, model, scope=None, **extra):
        def run():
            outputs[name] = generate(model, tokenizer, sources, size, new, causal, scope, **dict(extra))
        return run

    # what a generate job applies (worker/jobs/generate.py), without the cache's one-job-at-a-time lock
    one = MixedLora(quantized.model, [folders[0]])
    with merged_copy(full.model, folders[0]):
        peft_model.set_adapter("a0")
        seconds = interleave({  # the 4-bit hooks in the middle: both ratios divide adjacent runs
            "fp32_lora_merged": side("fp32_lora_merged", full.model),
            "4bit_qlora_hooks": side("4bit_qlora_hooks", quantized.model, lambda rows: one.batch([0] * len(rows))),
            "4bit_qlora_peft": side("4bit_qlora_peft", peft_model),
        }, cfg["pairs"], "cpu")
    one.remove()
    same_single = sum(a == b for a, b in zip(outputs["4bit_qlora_hooks"], outputs["4bit_qlora_peft"]))
    slots = [i % len(folders) for i in range(n)]
    mix = MixedLora(quantized.model, folders)
    mixed_seconds = interleave({
        "4bit_mixed_hooks": side("4bit_mixed_hooks", quantized.model, lambda rows: mix.batch([slots[i] for i in rows])),
        "4bit_mixed_peft_adapter_names": side("4bit_mixed_peft_adapter_names", peft_model,
                                              adapter_names=[f"a{s}" for s in slots]),
    }, cfg["pairs"], "cpu")
    mix.remove()
    same_mixed = sum(a == b for a, b in zip(outputs["4bit_mixed_hooks"], outputs["4bit_mixed_peft_adapter_names"]))
    reply(summaries=n, seconds={**seconds, **mixed_seconds}, same_single=same_single, same_mixed=same_mixed)


CHILDREN = {"resident": child_resident, "train": child_train, "generate": child_generate}


# ------------------------------------------------------------------------------------------------ the parent
class Child:
    """A bench process: started with its role and settings, answering lines on stdin with `REPLY` lines."""

    def __init__(self, role: str, cfg: dict):
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-qlora-{role}-", suffix=".log", delete=False)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", role, json.dumps(cfg)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.log.seek(0)
        raise RuntimeError(f"bench child exited ({self.process.wait()}): {self.log.read()[-3000:]}")

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        self.process.wait(timeout=60)
        os.unlink(self.log.name)


def resident(model: str) -> None:
    children = {q: Child("resident", {"model": model, "quantization": q}) for q in QUANTIZATIONS}  # in parallel
    found = {q: child.read() for q, child in children.items()}
    for child in children.values():
        child.close()
    for q, figures in found.items():
        emit(figure="resident", model=model, quantization=q, cache_bytes=figures["cache_bytes"],
             cache_mib=sig(figures["cache_bytes"] / MIB), bytes_vs_fp32=sig(figures["cache_bytes"]
                                                                            / found["fp32"]["cache_bytes"]),
             rss_growth_mib=sig(figures["VmRSS_growth_kib"] / 1024),
             anonymous_growth_mib=sig(figures["RssAnon_growth_kib"] / 1024),
             mapped_file_growth_mib=sig(figures["RssFile_growth_kib"] / 1024),
             rss_freed_with_the_model_mib=sig(figures["freed_kib"] / 1024),
             load_peak_growth_mib=sig(figures["load_peak_growth_kib"] / 1024), parameters=figures["parameters"])


def train(model: str, args) -> None:
    tiny = model != FLAN
    cfg = {"model": model, "steps": args.train_steps, "batch_size": args.train_batch or (16 if tiny else 8),
           "rounds": args.pairs + 1, "max_source_length": 512}
    children = {name: Child("train", {**cfg, "config": name}) for name in TRAIN_CONFIGS}
    ready = {name: child.read() for name, child in children.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in children}

    def round_of(name: str):
        return lambda: rounds[name].append(children[name].ask("round"))

    # LoRA in the middle: each QLoRA side's ratio divides two adjacent runs
    order = ["qlora", "lora", "qlora_gc_adamw8bit"]
    for name in order:  # warm-up round in every process, untimed
        children[name].ask("round")
    interleave({name: round_of(name) for name in order}, args.pairs, "cpu", warmup=False)
    for child in children.values():
        child.close()
    speed = {name: [r["samples"] / r["seconds"] for r in rs] for name, rs in rounds.items()}
    peak = {name: [r["peak_kib"] / 1024 for r in rs] for name, rs in rounds.items()}
    for name, rs in rounds.items():
        emit(figure="train", model=model, config=name, **TRAIN_CONFIGS[name], optimizer=ready[name]["optimizer"],
             checkpointing=ready[name]["checkpointing"], samples=rs[0]["samples"], batch_size=cfg["batch_size"],
             **rate("samples_per_s", speed[name]), **rate("peak_rss_mib", peak[name]),
             rss_after_load_mib=sig(ready[name]["rss_after_load_kib"] / 1024),
             mapped_file_mib=sig(rs[-1]["file_kib"] / 1024), final_loss=round(rs[-1]["loss"], 4),
             via="worker/jobs/finetune.py train_step, spec fields method/gradient_checkpointing/optim")
    for name in ("qlora", "qlora_gc_adamw8bit"):
        emit(ratio=f"{model} {name} / lora samples_per_s", **paired_ratio(speed[name], speed["lora"]))
        emit(ratio=f"{model} {name} / lora peak_rss", **paired_ratio(peak[name], peak["lora"]))


def generate_figures(model: str, args) -> None:
    tiny = model != FLAN
    child = Child("generate", {"model": model, "examples": args.examples or (64 if tiny else 16),
                               "batch_size": args.examples or (64 if tiny else 16), "adapters": 4,
                               "new_tokens": args.new_tokens or (24 if tiny else 16), "pairs": args.pairs})
    found = child.read()
    child.close()
    n, seconds = found["summaries"], found["seconds"]
    speed = {name: rates(n, s) for name, s in seconds.items()}
    for name in speed:
        emit(figure="generate", model=model, side=name, summaries=n, **rate("summaries_per_s", speed[name]))
    emit(ratio=f"{model} 4bit+qlora (hooks) / fp32+lora (merged) summaries_per_s",
         **paired_ratio(speed["4bit_qlora_hooks"], speed["fp32_lora_merged"]))
    emit(ratio=f"{model} one adapter on 4bit: hooks / peft layers summaries_per_s",
         **paired_ratio(speed["4bit_qlora_hooks"], speed["4bit_qlora_peft"]), same_predictions=found["same_single"],
         of=n)
    emit(ratio=f"{model} 4 adapters mixed on 4bit: hooks / peft adapter_names summaries_per_s",
         **paired_ratio(speed["4bit_mixed_hooks"], speed["4bit_mixed_peft_adapter_names"]),
         same_predictions=found["same_mixed"], of=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny-t5 and tiny-llama only")
    parser.add_argument("--models", default=None, help=f"comma-separated, of tiny-t5, tiny-llama, {FLAN}")
    parser.add_argument("--parts", default="resident,train,generate")
    parser.add_argument("--train-steps", type=int, default=4, help="optimizer steps per training round [4]")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch [16 tiny, 8 FLAN-T5-base]")
    parser.add_argument("--examples", type=int, default=None, help="summaries per generation round (one batch)")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    add_bench_args(parser, threads=False)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child[0]](json.loads(args.child[1]))
        return
    models = args.models.split(",") if args.models else ["tiny-t5", "tiny-llama"] + ([] if args.tiny else [FLAN])
    parts = args.parts.split(",")
    if FLAN in models:
        model_ref(FLAN)  # build it once, before the children race to
    for model in models:
        if "resident" in parts:
            resident(model)
        if "train" in parts:
            train(model, args)
        if "generate" in parts:
            generate_figures(model, args)
    import torch  # noqa: F401  (for the machine line's thread count)

    emit_machine()


if __name__ == "__main__":
    main()
