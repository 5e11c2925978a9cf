"""Fine-tuning: `train_adapter(spec, session, ...)` trains with any method (worker/methods.py) on any model kind
(worker/features.py) and records the result.

Batches are built from length-sorted windows with dynamic padding (labels padded with -100), so the loss is the
target tokens' only and little compute goes to padding. A PEFT adapter is written in PEFT's own format
(`adapter_config.json` + `adapter_model.safetensors`) under `TUNEQUEUE_HOME/adapters/NAME`; full fine-tuning writes
a whole model folder there.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sqlalchemy import delete
from sqlalchemy.orm import Session

from models.results import Adapter, LossPoint
from worker.ml.builtin import DEFAULT_PROMPT_TEMPLATE
from worker.data.examples import examples_for
from worker.faults import parse_faults
from worker.ml.features import cached_encode, collate, label_tokens, pad  # noqa: F401 (pad: re-exported)
from worker.ml.methods import (base_for, check_method_supported, classification_labels, parameter_counts, save_output,
                            trainable_model)
from worker.ml.model_cache import ModelCache
from models.specs import FinetuneSpec

log = logging.getLogger("tunequeue.train")
ProgressFn = Callable[[dict], bool]  # returns True when the job should stop (cancel requested)
LOG_EVERY = 10


class JobCancelled(Exception):
    pass


class JobTimeLimit(Exception):
    pass


@dataclass
class TrainState:
    """Everything a resumed run needs besides model, optimizer and scheduler: where it is in the data."""

    batches: list
    position: int = 0
    step: int = 0
    best_eval: Optional[float] = None
    last_eval: Optional[float] = None
    evals_without_gain: int = 0
    stopped_early: bool = False
    micro_batches: int = 1
    curve: dict = field(default_factory=dict)


def save_checkpoint(directory: Path, model, optimizer, scheduler, rng: random.Random, state: TrainState) -> None:
    """Adapter weights, optimizer, scheduler, RNG states and data position, written atomically."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "adapter": trainable_state(model),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "state": asdict(state),
    }
    staging = directory / "checkpoint.pt.tmp"
    torch.save(payload, staging)
    os.replace(staging, directory / "checkpoint.pt")


def load_checkpoint(directory: Optional[Path], model, optimizer, scheduler, rng: random.Random,
                    state: TrainState) -> int:
    """Restore a checkpoint into the objects given; returns the step it resumes from (0: none)."""
    import torch

    if directory is None or not (directory / "checkpoint.pt").exists():
        return 0
    payload = torch.load(directory / "checkpoint.pt", weights_only=False)
    model.load_state_dict(payload["adapter"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    rng.setstate(payload["python_rng"])
    torch.set_rng_state(payload["torch_rng"])
    for key, value in payload["state"].items():
        setattr(state, key, value)
    state.curve = {int(k): v for k, v in state.curve.items()}
    return state.step


def _train_batch(model, batch, features, pad_id, device, micro_batches: int):
    """Forward and backward over `batch` in `micro_batches` slices, gradients accumulated; returns the loss."""
    import torch

    size = math.ceil(len(batch) / micro_batches)
    total = None
    for start in range(0, len(batch), size):
        part = batch[start:start + size]
        inputs = collate(features, part, pad_id, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):  # fp32 on CPU
            loss = model(**inputs).loss
        (loss * len(part) / len(batch)).backward()
        weighted = loss.detach() * len(part) / len(batch)
        total = weighted if total is None else total + weighted
    return total


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random, window: int = 50,
                            max_tokens: int | None = None) -> list[list[int]]:
    """Indices shuffled, sorted by length inside windows of `window` batches, cut into batches of at most
    `batch_size` examples and (if given) `max_tokens` padded tokens, batches shuffled."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        batch: list[int] = []
        longest = 0
        for index in sorted(order[start:start + span], key=lambda i: lengths[i]):
            grown = max(longest, lengths[index])
            if batch and (len(batch) >= batch_size or (max_tokens and grown * (len(batch) + 1) > max_tokens)):
                batches.append(batch)
                batch, grown = [], lengths[index]
            batch.append(index)
            longest = grown
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def eval_loss(model, features: list[dict], pad_id: int, device: str, batch_size: int) -> float:
    """Mean loss per target token (per example for classification) on held-out examples, without gradients."""
    import torch

    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            inputs = collate(features, order[start:start + batch_size], pad_id, device)
            n = label_tokens(inputs)
            total += float(model(**inputs).loss) * n
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def train_adapter(spec: FinetuneSpec, session: Session, cache: ModelCache, home: Path, *,
                  job_id: Optional[int] = None, on_progress: Optional[ProgressFn] = None) -> dict:
    """Fine-tune `spec.model` with `spec.method` and record the adapter (or full model) row; returns a summary."""
    import torch

    started = time.monotonic()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    check_method_supported(spec, cache.device)
    task = spec.task or cache.task_of(spec.model)
    spec = with_task_defaults(spec, task)
    target_column = spec.label_column if task == "classification" else spec.summary_column
    # a --train-limit takes a random subset chosen by the seed, not the file's first rows
    examples = examples_for(spec, spec.train_split, target_column=target_column, limit=spec.train_limit,
                            shuffle=spec.train_limit is not None)
    labels = classification_labels(cache.resolve(spec.model), [e["target"] for e in examples]) \
        if task == "classification" else None
    loaded = base_for(spec, cache, task, labels)
    tokenizer = loaded.tokenizer
    encoding = {"max_source_length": spec.max_source_length, "max_target_length": spec.max_target_length,
                "label2id": {label: i for i, label in enumerate(labels)} if labels else None}
    features, from_cache = cached_encode(home, task, tokenizer, examples, **encoding)
    evaluation = None
    if spec.eval_split:
        held_out = examples_for(spec, spec.eval_split, target_column=target_column, limit=spec.eval_limit)
        if labels:
            held_out = [e for e in held_out if e["target"] in encoding["label2id"]]
        evaluation = cached_encode(home, task, tokenizer, held_out, **encoding)[0] or None
    if job_id is not None:
        session.execute(delete(LossPoint).where(LossPoint.job_id == job_id))  # a re-run draws its curve anew
        session.commit()
    curve: dict[int, dict] = {}
    recent: list = []
    last_eval = None
    rng = random.Random(spec.seed)
    steps_per_epoch = math.ceil(len(examples) / spec.per_device_train_batch_size)
    total_steps = spec.max_steps or max(1, math.ceil(steps_per_epoch * spec.num_train_epochs))

    checkpoint_dir = home / "checkpoints" / f"job-{job_id}" if job_id is not None else None
    faults = parse_faults(os.environ.get("TUNEQUEUE_FAULTS", ""))
    with trainable_model(spec, cache, loaded, task) as model:
        trainable, total = parameter_counts(model)
        params = [p for p in model.parameters() if p.requires_grad]
        on_cuda = str(loaded.device).startswith("cuda")
        optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, **({"fused": True} if on_cuda else {}))
        warmup = min(spec.warmup_steps, total_steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) * max(0.0, 1 - s / total_steps))
        model.train()
        pad_id = tokenizer.pad_token_id
        lengths = [len(f["input_ids"]) for f in features]
        eval_every = spec.eval_steps or steps_per_epoch
        batching = {"max_tokens": spec.max_tokens_per_batch}
        state = TrainState(batches=length_bucketed_batches(lengths, spec.per_device_train_batch_size, rng,
                                                           **batching))
        resumed_from = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, rng, state)
        initial_eval = None  # the untrained starting point, so "evaluation improved" has a number to beat
        if evaluation and not resumed_from:
            initial_eval = eval_loss(model, evaluation, pad_id, loaded.device, spec.per_device_train_batch_size)
        if resumed_from:
            curve.update(state.curve)
        best_state = None
        micro_batches = state.micro_batches
        last_save = time.monotonic()

        def save(reason: str) -> None:
            state.curve, state.micro_batches = curve, micro_batches
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, rng, state)
            log.info("checkpoint at step %s (%s)", state.step, reason)

        while state.step < total_steps and not state.stopped_early:
            if state.position >= len(state.batches):  # next epoch
                state.batches, state.position = length_bucketed_batches(
                    lengths, spec.per_device_train_batch_size, rng, **batching), 0
            batch = state.batches[state.position]
            while True:
                try:
                    faults.maybe_oom(state.step + 1, micro_batches)
                    loss = _train_batch(model, batch, features, pad_id, loaded.device, micro_batches)
                    break
                except torch.cuda.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    if math.ceil(len(batch) / micro_batches) <= 1:
                        raise
                    micro_batches *= 2  # same effective batch through gradient accumulation
                    log.warning("out of memory at step %s: micro-batch now %s", state.step + 1,
                                math.ceil(len(batch) / micro_batches))
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.position += 1
            state.step += 1
            step = state.step
            recent.append(loss.detach())
            faults.maybe_crash(step)
            if evaluation and (step % eval_every == 0 or step == total_steps):
                last_eval = eval_loss(model, evaluation, pad_id, loaded.device, spec.per_device_train_batch_size)
                curve.setdefault(step, {})["eval_loss"] = last_eval
                if state.best_eval is None or last_eval < state.best_eval:
                    state.best_eval, state.evals_without_gain = last_eval, 0
                    if spec.early_stopping_patience:
                        best_state = trainable_state(model, clone=True)
                else:
                    state.evals_without_gain += 1
                    if spec.early_stopping_patience and state.evals_without_gain >= spec.early_stopping_patience:
                        state.stopped_early = True
                state.last_eval = last_eval
            if step % LOG_EVERY == 0 or step == total_steps or state.stopped_early:
                recent = recent[-LOG_EVERY:]
                mean_loss = float(torch.stack(recent).mean())  # one sync per logging interval
                curve.setdefault(step, {})["train_loss"] = mean_loss
                progress = {"step": step, "total_steps": total_steps, "loss": round(mean_loss, 4)}
                if state.last_eval is not None:
                    progress["eval_loss"] = round(state.last_eval, 4)
                if resumed_from:
                    progress["resumed_from_step"] = resumed_from
                if on_progress and on_progress(progress):
                    if checkpoint_dir:
                        save("cancelled")
                    raise JobCancelled(f"cancelled at step {step}" + (" (checkpoint kept)" if checkpoint_dir else ""))
            due_by_time = (spec.checkpoint_every_minutes is not None
                           and time.monotonic() - last_save > 60 * spec.checkpoint_every_minutes)
            if checkpoint_dir and ((spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0)
                                   or due_by_time):
                save("periodic")
                last_save = time.monotonic()
            if spec.time_limit_s and time.monotonic() - started > spec.time_limit_s and step < total_steps:
                if checkpoint_dir:
                    save("time limit")
                raise JobTimeLimit(f"time limit of {spec.time_limit_s:g}s reached at step {step}"
                                   + (" (checkpoint kept; a re-run resumes there)" if checkpoint_dir else ""))
        step, last_eval, best_eval, stopped_early = state.step, state.last_eval, state.best_eval, state.stopped_early
        if not recent:  # resumed at the very end
            recent = [torch.tensor(curve[max(curve)].get("train_loss", float("nan")))] if curve else [torch.tensor(0.0)]
        final_loss = float(torch.stack(recent[-LOG_EVERY:]).mean())
        if best_state is not None:  # early stopping keeps the best evaluated weights
            model.load_state_dict(best_state, strict=False)
        model.eval()
        out_dir = home / "adapters" / spec.name
        staging = home / "adapters" / f".{spec.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        save_output(spec, model, loaded, staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the adapter is saved; the checkpoint has served

    duration = time.monotonic() - started
    hyperparameters = {**spec.hyperparameters, **({"labels": labels} if labels else {})}
    session.execute(delete(Adapter).where(Adapter.name == spec.name))  # a re-run (or --replace) replaces the row
    adapter = Adapter(name=spec.name, job_id=job_id, base_model=spec.model, method=spec.method, task=task,
                      hyperparameters=hyperparameters, path=str(out_dir.relative_to(home)),
                      size_bytes=dir_size(out_dir), trainable_params=trainable, total_params=total,
                      train_loss=final_loss, eval_loss=last_eval, best_eval_loss=best_eval, duration_s=duration)
    session.add(adapter)
    if job_id is not None:
        session.add_all([LossPoint(job_id=job_id, step=s, train_loss=point.get("train_loss"),
                                   eval_loss=point.get("eval_loss")) for s, point in sorted(curve.items())])
    session.commit()
    return {"adapter_id": adapter.id, "adapter": spec.name, "method": spec.method, "task": task, "steps": step,
            "total_steps": total_steps, "stopped_early": stopped_early, "train_loss": round(final_loss, 4),
            "initial_eval_loss": None if initial_eval is None else round(initial_eval, 4),
            "eval_loss": None if last_eval is None else round(last_eval, 4),
            "best_eval_loss": None if best_eval is None else round(best_eval, 4),
            "first_train_loss": next((p["train_loss"] for _, p in sorted(curve.items()) if "train_loss" in p), None),
            "trainable_params": trainable, "total_params": total,
            "percent_trainable": round(100 * trainable / total, 4) if total else None,
            "size_bytes": adapter.size_bytes, "duration_s": round(duration, 2), "base_loads": cache.loads,
            "tokenized_from_cache": from_cache, "resumed_from_step": resumed_from,
            "micro_batch_size": math.ceil(spec.per_device_train_batch_size / micro_batches)}


def with_task_defaults(spec, task: str):
    """The spec with its task filled in; classification reads the bare text unless a template was chosen."""
    update: dict = {"task": task}
    if task == "classification" and spec.prompt_template == DEFAULT_PROMPT_TEMPLATE:
        update["prompt_template"] = "{text}"
    return spec.model_copy(update=update)


def trainable_state(model, clone: bool = False) -> dict:
    """The weights this run trains (LoRA layers, virtual tokens, heads, or everything for full fine-tuning)."""
    return {name: (p.detach().clone() if clone else p.detach().cpu()) for name, p in model.named_parameters()
            if p.requires_grad}
