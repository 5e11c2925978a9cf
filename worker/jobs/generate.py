"""Generation: `generate_summaries(spec, session, ...)` writes one prediction row per example and variant.

Examples are sorted by length and generated in batches (greedy, stopping at EOS); a causal LM's rows hold only the
new tokens, a classifier's rows the predicted label. A job may name several adapters: LoRA adapters that run on the
same resident copy of the base go together in mixed batches (rows of one example for every adapter side by side; one
gather-matmul per layer for all adapters, worker/ml/multi_lora.py, or PEFT's `adapter_names` for what that does not
cover), instead of one pass per adapter. That copy is the one the adapter was trained on: the full-precision base
for lora adapters (the "base" variant rides along there), the 4-bit base for qlora adapters, the int8 base for lora
adapters trained with --load-in-8bit; the same cache entries their fine-tunes used, so a sweep's fine-tunes and its
evaluation load each once. A job naming adapters of several copies makes one mixed pass per copy. Other
variants (full models, prompt tuning, classifiers) get a pass each. Rows already written by an earlier attempt are
kept and skipped, so a re-run finishes the rest instead of duplicating.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import JobCancelled, NotFound
from models.jobs import Lease
from models.results import Adapter, Generation
from models.specs import GENERATE_BATCH_TOKENS, GenerateSpec
from worker.data.examples import examples_for
from worker.faults import Faults
from worker.jobs import ProgressFn, rounded_timings, timed
from worker.ml import multi_lora
from worker.ml.features import attention_mask, pad
from worker.ml.kinds import resolve_model_kind
from worker.ml.methods import base_quantization, classification_labels
from worker.ml.model_cache import LoadedModel, ModelCache
from worker.store import store_for

log = logging.getLogger("tunequeue.generate")
BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" inside a mixed batch


@dataclass
class Pass:
    """Variants generated together on one model: a single variant, or several LoRA adapters mixed."""

    variants: list[tuple[str, Optional[Adapter]]]
    quantization: Optional[str] = None  # the copy of the base it runs on: None (full precision), "4bit", "8bit"
    applied_by: Optional[str] = None  # how the adapters were applied: merged copy, gather-matmul, peft...

    @property
    def mixed(self) -> bool:
        return len(self.variants) > 1

    @property
    def base(self) -> str:
        return {None: "full precision", "4bit": "4-bit", "8bit": "8-bit"}[self.quantization]

    def peft_name(self, variant: str) -> str:
        """PEFT's name for a variant inside the mixed model (adapter names may hold dots, module names may not)."""
        index = [name for name, _ in self.variants].index(variant)
        return BASE_ADAPTER_NAME if self.variants[index][1] is None else f"adapter_{index}"


def quantization_for(adapter: Optional[Adapter]) -> Optional[str]:
    """The copy of the base an adapter runs on: the cache entry its fine-tune trained on ("4bit" for qlora, "8bit"
    for lora with --load-in-8bit, None for full precision)."""
    return None if adapter is None else base_quantization(adapter.method, adapter.hyperparameters)


def plan_passes(variants: list[tuple[str, Optional[Adapter]]], model_kind: str) -> list[Pass]:
    """One mixed pass per copy of the base holding two or more LoRA adapters (the base variant rides along on the
    full-precision one), then a pass for each variant left."""
    groups: dict[Optional[str], list] = {}
    if model_kind != "classification":
        for variant in variants:
            if variant[1] is not None and variant[1].method in ("lora", "qlora"):
                groups.setdefault(quantization_for(variant[1]), []).append(variant)
    passes = []
    for quantization, group in sorted(groups.items(), key=lambda item: item[0] or ""):  # full precision first
        if len(group) < 2:
            continue
        base = next((v for v in variants if v[1] is None), None)
        if quantization is None and base is not None:  # "base" means the model as given: the full-precision copy
            group.insert(0, base)
        passes.append(Pass(group, quantization=quantization))
    mixed = {id(v) for p in passes for v in p.variants}
    return passes + [Pass([v], quantization=quantization_for(v[1])) for v in variants if id(v) not in mixed]


def _adapters(spec: GenerateSpec, session: Session) -> list[tuple[str, Optional[Adapter]]]:
    names = list(spec.adapters) or ([spec.adapter] if spec.adapter else [])
    if not names:
        return [("base", None)]
    found = {a.name: a for a in session.scalars(select(Adapter).where(Adapter.name.in_(names)))}
    missing = [n for n in names if n not in found and n != "base"]
    if missing:
        raise NotFound(f"adapter {missing[0]!r} does not exist")
    return [(n, found.get(n)) for n in names]  # "base" (no adapter) may ride along in a list


Rows = Callable[[list[str]], ContextManager[dict]]  # a batch's variants → extra generate() arguments, in scope


@contextlib.contextmanager
def _pass_model(p: Pass, cache: ModelCache, spec: GenerateSpec, model_kind: str, home: Path,
                labels: Optional[list[str]]) -> Iterator[tuple[object, LoadedModel, Optional[Rows]]]:
    adapter = p.variants[0][1]
    # the pass's folders from the artifact store: in place, or verified copies in this worker's cache
    folders = iter(store_for(home).fetch_folders([a.path for _, a in p.variants if a is not None]))
    paths = [next(folders) if a is not None else None for _, a in p.variants]
    if adapter is not None and adapter.method == "full":  # a whole fine-tuned model: its own cache entry
        loaded = cache.get(str(paths[0]), model_kind, labels=labels)
        p.applied_by = "full model"
        yield loaded.model, loaded, None
        return
    loaded = cache.get(spec.model, model_kind, labels=labels, quantization=p.quantization)
    names = [name for name, _ in p.variants]
    saved = [path for path in paths if path is not None]
    lora = all(a is None or a.method in ("lora", "qlora") for _, a in p.variants)
    if lora and saved and all(multi_lora.supported(path) for path in saved):
        if not p.mixed and p.quantization is None:
            # merged into copies of its target layers: the base's speed, no LoRA matmuls at every decoding step
            with cache.with_merged_lora(loaded, paths[0]) as model:
                p.applied_by = "merged copy"
                yield model, loaded, None
            return
        # one gather-matmul per layer for all adapters (worker/ml/multi_lora.py), 1.2-1.8x PEFT's adapter_names on a
        # 4-bit base; on a quantized base also for a single adapter, where no merged copy can be made and the hooks
        # run as fast as PEFT's 4-bit LoRA layers (1.0-1.14x, bench/qlora.py)
        with cache.with_lora_mix(loaded, paths) as mix:
            p.applied_by = "gather-matmul"
            yield loaded.model, loaded, lambda batch: _in_scope(mix.batch([names.index(v) for v in batch]))
        return
    if p.mixed:
        with cache.with_adapters(loaded, {p.peft_name(name): path for name, path in zip(names, paths)
                                          if path is not None}) as model:
            p.applied_by = "peft adapter_names"
            yield model, loaded, lambda batch: contextlib.nullcontext({"adapter_names": [p.peft_name(v)
                                                                                         for v in batch]})
        return
    with cache.with_adapter(loaded, paths[0]) as model:
        p.applied_by = "peft" if adapter is not None else None
        yield model, loaded, None


@contextlib.contextmanager
def _in_scope(scope: ContextManager) -> Iterator[dict]:
    with scope:
        yield {}


def batch_at(order: list[int], start: int, lengths: list[int], batch_size: Optional[int], new_tokens: int,
             token_budget: int = GENERATE_BATCH_TOKENS) -> list[int]:
    """The batch of `order` (indices sorted by length, shortest first) that starts at `start`: `batch_size`
    examples when one is given, else as many as fit `token_budget` padded tokens, each row counted as the batch's
    longest input plus `new_tokens`; at least one."""
    if batch_size:
        return order[start:start + batch_size]
    end = start + 1
    while end < len(order) and (lengths[order[end]] + new_tokens) * (end + 1 - start) <= token_budget:
        end += 1
    return order[start:end]


def _run_batch(model, loaded: LoadedModel, model_kind: str, spec: GenerateSpec, ids: list[list[int]],
               extra: dict, labels: Optional[list[str]]) -> list[str]:
    tokenizer, device = loaded.tokenizer, loaded.device
    left = model_kind == "causal"
    input_ids = pad(ids, tokenizer.pad_token_id, left=left).to(device)
    mask = attention_mask(ids, left=left).to(device)
    if model_kind == "classification":
        logits = model(input_ids=input_ids, attention_mask=mask, **extra).logits
        return [labels[i] for i in logits.argmax(-1).tolist()]
    output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=spec.max_new_tokens,
                            do_sample=False, num_beams=1, no_repeat_ngram_size=spec.no_repeat_ngram_size or None,
                            pad_token_id=tokenizer.pad_token_id, **extra)
    if left:  # a causal LM returns prompt + continuation: keep the new tokens only
        output = output[:, input_ids.shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


def generate_summaries(spec: GenerateSpec, session: Session, cache: ModelCache, home: Path, *,
                       job_id: int, on_progress: Optional[ProgressFn] = None, faults: Optional[Faults] = None,
                       lease: Optional[Lease] = None) -> dict:
    """Generate (or classify) every example of the split for every variant; rows are committed batch by batch,
    each batch fenced by `lease` when a worker runs the job."""
    import torch

    started = time.monotonic()
    spec = resolve_model_kind(spec)
    model_kind = spec.model_kind
    faults = faults or Faults()
    timings: dict[str, float] = {}
    variants = _adapters(spec, session)
    with timed(timings, "read_data_s"):
        examples = examples_for(spec, spec.split, target_column=spec.target_column, limit=spec.limit)
    done = set(session.execute(select(Generation.variant, Generation.example_id).where(
        Generation.job_id == job_id)).tuples())
    was_loaded = cache.is_loaded(spec.model)
    total, finished, batch_size, batch_number = len(examples) * len(variants), len(done), spec.batch_size, 0
    token_budget = GENERATE_BATCH_TOKENS
    new_tokens = 0 if model_kind == "classification" else spec.max_new_tokens
    passes = plan_passes(variants, model_kind)
    for p in passes:
        items = [(name, adapter, e) for e in examples for name, adapter in p.variants if (name, e["id"]) not in done]
        if not items:
            continue
        labels = None
        if model_kind == "classification":
            adapter = p.variants[0][1]
            labels = (adapter.hyperparameters.get("labels") if adapter is not None else None) or \
                classification_labels(cache.resolve(spec.model), [e["target"] for e in examples])
        load_started = time.monotonic()  # the base (~0 when resident) and its adapters: merged, hooked or PEFT's
        with _pass_model(p, cache, spec, model_kind, home, labels) as (model, loaded, rows), torch.inference_mode():
            timings["model_load_s"] = timings.get("model_load_s", 0.0) + time.monotonic() - load_started
            with timed(timings, "tokenize_s"):
                encoded = loaded.tokenizer([e["source"] for _, _, e in items], truncation=True,
                                           max_length=spec.max_source_length)["input_ids"]
            lengths = [len(ids) for ids in encoded]
            order = sorted(range(len(items)), key=lambda i: (lengths[i], items[i][0]))
            start = 0
            while start < len(order):
                batch = batch_at(order, start, lengths, batch_size, new_tokens, token_budget)
                batch_number += 1
                scope = rows([items[i][0] for i in batch]) if rows else contextlib.nullcontext({})
                try:
                    faults.maybe_oom_batch(batch_number)
                    with scope as extra, timed(timings, "generate_s"):
                        predictions = _run_batch(model, loaded, model_kind, spec, [encoded[i] for i in batch], extra,
                                                 labels)
                except torch.cuda.OutOfMemoryError:
                    if len(batch) == 1:
                        raise
                    if batch_size:
                        batch_size = max(1, batch_size // 2)  # the same batch again, smaller
                    else:
                        token_budget //= 2
                    log.warning("out of memory generating: batch size now %s", batch_size or f"{token_budget} tokens")
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                write_started = time.monotonic()
                if lease is not None:
                    lease.hold(session)
                session.add_all([
                    Generation(job_id=job_id, variant=items[i][0], adapter_id=items[i][1].id if items[i][1] else None,
                               split=spec.split, example_id=items[i][2]["id"], source=items[i][2]["text"],
                               prediction=prediction, reference=items[i][2]["target"])
                    for i, prediction in zip(batch, predictions)
                ])
                session.commit()
                timings["write_s"] = timings.get("write_s", 0.0) + time.monotonic() - write_started
                start += len(batch)
                finished += len(batch)
                if on_progress and on_progress({"step": finished, "total_steps": total}):
                    raise JobCancelled(f"cancelled after {finished} of {total} rows")
    duration = time.monotonic() - started
    generated = finished - len(done)
    return {"variant": spec.variant if len(variants) == 1 else None, "variants": [v for v, _ in variants],
            "model_kind": model_kind, "examples": len(examples), "rows": total, "resumed_from": len(done),
            "passes": len(passes), "applied_by": [p.applied_by for p in passes], "bases": [p.base for p in passes],
            "model_was_loaded": was_loaded, "base_loads": cache.loads,
            "duration_s": round(duration, 2), "rows_per_s": round(generated / duration, 2) if duration else None,
            "examples_per_s": round(generated / duration, 2) if duration else None, "batch_size": batch_size,
            "batch_tokens": None if batch_size else token_budget, "timings": rounded_timings(timings)}
