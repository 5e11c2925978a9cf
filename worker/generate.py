"""Generation: `generate_summaries(spec, session, ...)` writes one prediction row per example of a split.

Examples are sorted by length and generated in batches (greedy, stopping at EOS). Rows already written by an earlier
attempt of the same job are kept and skipped, so a re-run finishes the rest instead of duplicating.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.results import Adapter, Generation
from worker.data import load_examples
from worker.faults import parse_faults
from worker.model_cache import ModelCache
from worker.specs import GenerateSpec
from worker.train import JobCancelled, ProgressFn, pad

log = logging.getLogger("tunequeue.generate")


def generate_summaries(spec: GenerateSpec, session: Session, cache: ModelCache, home: Path, *,
                       job_id: int, on_progress: Optional[ProgressFn] = None) -> dict:
    import torch

    started = time.monotonic()
    adapter = None
    if spec.adapter:
        adapter = session.scalar(select(Adapter).where(Adapter.name == spec.adapter))
        if adapter is None:
            raise LookupError(f"adapter {spec.adapter!r} does not exist")
    examples = load_examples(spec.dataset, spec.split, spec.text_column, spec.summary_column,
                             template=spec.prompt_template, seed=spec.seed, limit=spec.limit)
    done = set(session.scalars(select(Generation.example_id).where(
        Generation.job_id == job_id, Generation.variant == spec.variant)))
    todo = [e for e in examples if e["id"] not in done]
    was_loaded = cache.is_loaded(spec.model)
    loaded = cache.get(spec.model)
    tokenizer = loaded.tokenizer
    encoded = tokenizer([e["source"] for e in todo], truncation=True,
                        max_length=spec.max_source_length)["input_ids"] if todo else []
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))
    adapter_path = home / adapter.path if adapter else None
    faults = parse_faults(os.environ.get("TUNEQUEUE_FAULTS", ""))
    batch_size, start, batch_number = spec.batch_size, 0, 0
    with cache.with_adapter(spec.model, adapter_path) as model, torch.inference_mode():
        while start < len(order):
            batch = order[start:start + batch_size]
            batch_number += 1
            try:
                faults.maybe_oom_batch(batch_number)
                input_ids = pad([encoded[i] for i in batch], tokenizer.pad_token_id).to(loaded.device)
                output = model.generate(input_ids=input_ids,
                                        attention_mask=(input_ids != tokenizer.pad_token_id).long(),
                                        max_new_tokens=spec.max_new_tokens, do_sample=False, num_beams=1,
                                        no_repeat_ngram_size=spec.no_repeat_ngram_size or None)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)  # the same batch again, smaller
                log.warning("out of memory generating: batch size now %s", batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            predictions = tokenizer.batch_decode(output, skip_special_tokens=True)
            session.add_all([
                Generation(job_id=job_id, variant=spec.variant, adapter_id=adapter.id if adapter else None,
                           split=spec.split, example_id=todo[i]["id"], source=todo[i]["text"],
                           prediction=prediction.strip(), reference=todo[i]["target"])
                for i, prediction in zip(batch, predictions)
            ])
            session.commit()
            start += len(batch)
            finished = start
            if on_progress and on_progress({"step": finished + len(done), "total_steps": len(examples)}):
                raise JobCancelled(f"cancelled after {finished + len(done)} examples")
    duration = time.monotonic() - started
    return {"variant": spec.variant, "examples": len(examples), "resumed_from": len(done),
            "model_was_loaded": was_loaded, "base_loads": cache.loads, "duration_s": round(duration, 2),
            "examples_per_s": round(len(todo) / duration, 2) if duration else None, "batch_size": batch_size}
