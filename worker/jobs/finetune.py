"""Fine-tuning: `train_adapter(spec, session, ...)` trains with any method (worker/ml/methods.py) on any model kind
(worker/ml/kinds.py) and records the result.

`train_adapter` reads as its steps: `prepare` (examples, labels, base model, features), `start_run` (optimizer,
scheduler, resume from a checkpoint), `train_loop`, `save` (the adapter folder) and `record` (database rows and the
summary). Checkpoint files are worker/jobs/checkpoint.py's.

Batches are built from length-sorted windows with dynamic padding (labels padded with -100), so the loss is the
target tokens' only and little compute goes to padding. A PEFT adapter is written in PEFT's own format
(`adapter_config.json` + `adapter_model.safetensors`) into the artifact store (worker/store.py) as `adapters/NAME`
(the folder `TUNEQUEUE_HOME/adapters/NAME` by default); full fine-tuning writes a whole model folder there. The
adapter row, which holds the folder's key, is written only once the folder is in the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from models.errors import JobCancelled, JobFailed, JobTimeLimit, TrialHeld, TrialPromoted
from models.jobs import Job, Lease
from models.results import Adapter, LossPoint
from models.specs import FinetuneSpec
from worker.data.examples import examples_for
from worker.faults import Faults
from worker.jobs import ProgressFn, rounded_timings, timed
from worker.jobs.checkpoint import (CheckpointPlace, TrainState, checkpoint_due, checkpoint_place, load_checkpoint,
                                    save_checkpoint, spec_hash, trainable_state, writing)
from worker.ml.features import cached_encode, collate, label_tokens
from worker.ml.kinds import resolve_model_kind
from worker.ml.methods import (base_for, check_method_supported, classification_labels, parameter_counts, save_output,
                               trainable_model)
from worker.ml.model_cache import LoadedModel, ModelCache
from worker.store import ArtifactStore, folder_size, store_for

log = logging.getLogger("tunequeue.train")
LOG_EVERY = 10


@dataclass
class Prepared:
    """What training needs before the model is made trainable: the base, the features and how many steps."""

    loaded: LoadedModel
    model_was_loaded: bool  # this job loaded the base (a miss in the model cache), rather than finding it resident
    labels: Optional[list[str]]  # classification labels in head order; None for other kinds
    features: list[dict]
    from_cache: bool  # the training features came from the tokenization cache
    evaluation: Optional[list[dict]]  # held-out features; None without an eval split
    total_steps: int
    eval_every: int
    timings: dict = field(default_factory=dict)  # seconds of each part of the job, for its result

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    @property
    def pad_id(self) -> int:
        return self.loaded.tokenizer.pad_token_id


@dataclass
class Run:
    """One training run in progress: the model and its optimizer, where it is, and what it has measured so far."""

    spec: FinetuneSpec
    prepared: Prepared
    model: Any
    params: list
    optimizer: Any
    scheduler: Any
    rng: random.Random
    state: TrainState
    counts: tuple[int, int]  # trainable and total parameters
    checkpoints: Optional[CheckpointPlace]
    guard: Callable[[], ContextManager]  # fences a write: it happens only while this attempt holds the job
    faults: Faults
    on_progress: Optional[ProgressFn]
    started: float
    resumed_from: int = 0
    initial_eval: Optional[float] = None
    search_value: Optional[float] = None  # a search point's metric at its last step, told to Optuna
    recent: list = field(default_factory=list)  # loss tensors since the last log, read once per interval
    best_weights: Optional[dict] = None  # kept for early stopping
    last_save: float = 0.0
    # an ASHA point's rung decision: (step, value_of) -> worker.search.Decision, recorded once in the database
    on_rung: Optional[Callable] = None


def train_adapter(spec: FinetuneSpec, session: Session, cache: ModelCache, home: Path, *,
                  job_id: Optional[int] = None, on_progress: Optional[ProgressFn] = None,
                  faults: Optional[Faults] = None, lease: Optional[Lease] = None,
                  on_rung: Optional[Callable] = None) -> dict:
    """Fine-tune `spec.model` with `spec.method` and record the adapter (or full model) row; returns a summary.
    With a `lease` (a worker's attempt), every write (checkpoints, the adapter folder, the rows) is fenced by it.

    A sweep point with a search (`spec.search`, ASHA) stops at each of its rungs: it checkpoints, and `on_rung`
    decides. Promoted, it raises TrialPromoted (the runner re-queues it; the next attempt resumes from that
    checkpoint and trains on); held (lazy promotion: its rung has not decided yet), it raises TrialHeld (the runner
    puts it back to queued unpublished; its rung publishes it once decided); pruned, it saves its adapter as it is
    at that step and returns, the summary saying `pruned`."""
    import torch

    started = time.monotonic()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    check_method_supported(spec, cache.device)
    spec = resolve_model_kind(spec)
    prepared = prepare(spec, cache, home)
    timings = prepared.timings
    guard = (lambda: lease.held(session)) if lease else contextlib.nullcontext
    if job_id is not None:
        with guard():
            session.execute(delete(LossPoint).where(LossPoint.job_id == job_id))  # a re-run draws its curve anew
        session.commit()
    checkpoints = checkpoint_place(home, session.get(Job, job_id).uid if job_id is not None else None)
    with trainable_model(spec, cache, prepared.loaded, spec.model_kind) as model:
        with timed(timings, "initial_eval_s"):  # optimizer, resume, and (mostly) the eval loss before training
            run = start_run(spec, prepared, model, checkpoints, guard, faults or Faults(), on_progress, started)
            run.on_rung = on_rung
        with timed(timings, "train_s"):  # the steps, with their periodic evaluations and checkpoints
            train_loop(run)
        if spec.search is not None and not run.state.pruned:
            with timed(timings, "search_metric_s"):
                run.search_value = rung_value_of(run)
        store = store_for(home)
        with timed(timings, "save_s"):
            staging = save(run, store)
    try:
        with timed(timings, "record_s"):
            result = publish_and_record(run, session, store, staging, guard, job_id=job_id, base_loads=cache.loads)
        return {**result, "timings": rounded_timings(timings)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare(spec: FinetuneSpec, cache: ModelCache, home: Path) -> Prepared:
    """Examples read and tokenized (through the cache), labels found, the base model loaded, step counts set."""
    # a --train-limit takes a random subset chosen by the seed, not the file's first rows
    timings: dict[str, float] = {}
    with timed(timings, "read_data_s"):
        examples = examples_for(spec, spec.train_split, target_column=spec.target_column, limit=spec.train_limit,
                                shuffle=spec.train_limit is not None)
    labels = classification_labels(cache.resolve(spec.model), [e["target"] for e in examples]) \
        if spec.model_kind == "classification" else None
    loads_before = cache.loads
    with timed(timings, "model_load_s"):  # ~0 when the base is resident
        loaded = base_for(spec, cache, spec.model_kind, labels)
    encoding = {"max_source_length": spec.max_source_length, "max_target_length": spec.max_target_length,
                "label2id": {label: i for i, label in enumerate(labels)} if labels else None}
    with timed(timings, "tokenize_s"):  # train and eval splits, through the tokenization cache
        features, from_cache = cached_encode(home, spec.model_kind, loaded.tokenizer, examples, **encoding)
        evaluation = held_out_features(spec, home, loaded.tokenizer, encoding) if spec.eval_split else None
    steps_per_epoch = math.ceil(len(examples) / spec.per_device_train_batch_size)
    return Prepared(loaded=loaded, model_was_loaded=cache.loads > loads_before, labels=labels, features=features,
                    from_cache=from_cache, evaluation=evaluation,
                    total_steps=spec.max_steps or max(1, math.ceil(steps_per_epoch * spec.num_train_epochs)),
                    eval_every=spec.eval_steps or steps_per_epoch, timings=timings)



def held_out_features(spec: FinetuneSpec, home: Path, tokenizer, encoding: dict) -> Optional[list[dict]]:
    """Features of the eval split (only examples with a known label, for classification); None when empty."""
    held_out = examples_for(spec, spec.eval_split, target_column=spec.target_column, limit=spec.eval_limit)
    if encoding["label2id"]:
        held_out = [e for e in held_out if e["target"] in encoding["label2id"]]
    return cached_encode(home, spec.model_kind, tokenizer, held_out, **encoding)[0] or None


def start_run(spec: FinetuneSpec, prepared: Prepared, model, checkpoints: Optional[Path], guard, faults: Faults,
              on_progress: Optional[ProgressFn], started: float) -> Run:
    """Optimizer, scheduler and the first epoch's batches, restored from a checkpoint when there is one; a fresh
    run measures the untrained eval loss, so "evaluation improved" has a number to beat."""
    counts = parameter_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(spec, params, prepared.loaded.device, prepared.total_steps)
    model.train()
    rng = random.Random(spec.seed)
    state = TrainState(batches=epoch_batches(spec, prepared, rng))
    run = Run(spec=spec, prepared=prepared, model=model, params=params, optimizer=optimizer, scheduler=scheduler,
              rng=rng, state=state, counts=counts, checkpoints=checkpoints, guard=guard, faults=faults,
              on_progress=on_progress, started=started)
    run.resumed_from = load_checkpoint(checkpoints, model, optimizer, scheduler, rng, state, spec_hash(spec))
    if run.resumed_from and state.recent:
        import torch

        run.recent = [torch.tensor(loss) for loss in state.recent]
    if prepared.evaluation and not run.resumed_from:
        run.initial_eval = untrained_eval_loss(spec, prepared, model)
    run.last_save = time.monotonic()
    return run


def untrained_eval_loss(spec: FinetuneSpec, prepared: Prepared, model) -> float:
    """The eval loss before training. A new LoRA adapter leaves its base's output as it is (B starts at zero), so
    every LoRA fine-tune of one resident base on one eval set starts from the same loss, whatever its rank, alpha or
    learning rate: it is computed once per model-cache entry and eval set, and a sweep's other points reuse it."""
    def compute() -> float:
        return eval_loss(model, prepared.evaluation, prepared.pad_id, prepared.loaded.device,
                         spec.per_device_train_batch_size)

    if spec.method not in ("lora", "qlora") or spec.model_kind == "classification":
        return compute()
    key = hashlib.sha256(repr((spec.per_device_train_batch_size, prepared.evaluation)).encode()).hexdigest()
    known = prepared.loaded.extra.setdefault("untrained_eval_losses", {})
    if key not in known:
        known[key] = compute()
    return known[key]


def make_optimizer(spec: FinetuneSpec, params: list, device: str, total_steps: int):
    """AdamW (`spec.optim`: torch's, or bitsandbytes' with 8-bit states, paged or not; the same defaults, weight
    decay 0.01) with linear warmup (at most a tenth of the steps) then linear decay to zero."""
    import torch

    if spec.optim == "adamw":
        fused = {"fused": True} if str(device).startswith("cuda") else {}
        optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, **fused)
    else:
        import bitsandbytes as bnb

        optimizer_class = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[spec.optim]
        optimizer = optimizer_class(params, lr=spec.learning_rate, weight_decay=0.01)
    warmup = min(spec.warmup_steps, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) * max(0.0, 1 - s / total_steps))
    return optimizer, scheduler


def epoch_batches(spec: FinetuneSpec, prepared: Prepared, rng: random.Random) -> list[list[int]]:
    return length_bucketed_batches(prepared.lengths, spec.per_device_train_batch_size, rng,
                                   max_tokens=spec.max_tokens_per_batch)


def train_loop(run: Run) -> None:
    """Train to `total_steps` or until early stopping; raises JobCancelled, JobTimeLimit (checkpoint kept) or
    JobFailed when the loss stops being a number."""
    state = run.state
    if run.resumed_from:  # a point resumed at a rung: promoted there, or stopped before the decision was recorded
        rung_check(run)
    while state.step < run.prepared.total_steps and not state.stopped_early and not state.pruned:
        if state.position >= len(state.batches):  # next epoch
            state.batches, state.position = epoch_batches(run.spec, run.prepared, run.rng), 0
        loss = train_step(run, state.batches[state.position])
        run.recent.append(loss.detach())
        check_finite(run)
        run.faults.maybe_crash(state.step)
        run.faults.maybe_poison(state.step, run.params)
        evaluate(run)
        report(run)
        rung_check(run)
        checkpoint_if_due(run)
        stop_at_time_limit(run)


def rung_check(run: Run) -> None:
    """At an ASHA rung: checkpoint (so that whatever follows resumes here), then the decision: pruned, the loop
    ends and the adapter is saved as it is; promoted, TrialPromoted re-queues the point, unless this attempt
    resumed at this very rung (the promotion it resumes from)."""
    search, step = run.spec.search, run.state.step
    if search is None or run.on_rung is None or step not in search.decision_steps:
        return
    if run.checkpoints and step != run.resumed_from:
        write_checkpoint(run, "rung")
    decision = run.on_rung(step, lambda: rung_value_of(run))
    if step != run.resumed_from:
        run.faults.maybe_pause_after_rung()
    if decision.action == "prune":
        run.state.pruned = {"step": step, "reason": decision.reason, "value": decision.value}
    elif decision.action == "wait":  # on a re-run too: it waits until its rung decides
        raise TrialHeld(step, decision.reason)
    elif step != run.resumed_from:
        raise TrialPromoted(step, decision.reason)


def rung_value_of(run: Run) -> float:
    """The search metric of the model as it is now, on the eval split (the loss already measured at this step is
    reused)."""
    from worker.jobs.rung_metric import rung_value

    spec, state, prepared = run.spec, run.state, run.prepared
    if run.faults.rung_metric_is_lr:
        return spec.learning_rate
    if not prepared.evaluation:
        raise JobFailed(f"strategy.metric {spec.search.metric}: the eval split {spec.eval_split!r} has no examples")

    def loss() -> float:
        measured = state.curve.get(state.step, {}).get("eval_loss")
        return measured if measured is not None else eval_loss(
            run.model, prepared.evaluation, prepared.pad_id, prepared.loaded.device, spec.per_device_train_batch_size)

    return rung_value(run.model, spec.search.metric, prepared.evaluation, prepared.loaded.tokenizer,
                      prepared.loaded.device, spec.model_kind, batch_size=spec.per_device_train_batch_size,
                      max_new_tokens=spec.max_target_length, eval_loss=loss)


def train_step(run: Run, batch: list[int]):
    """One optimizer step on `batch`; returns its loss. Out of memory halves the micro-batch and tries again, with
    gradient accumulation keeping the effective batch the same."""
    import torch

    state = run.state
    while True:
        try:
            run.faults.maybe_oom(state.step + 1, state.micro_batches)
            loss = _train_batch(run.model, batch, run.prepared.features, run.prepared.pad_id,
                                run.prepared.loaded.device, state.micro_batches)
            break
        except torch.cuda.OutOfMemoryError:
            run.optimizer.zero_grad(set_to_none=True)
            if math.ceil(len(batch) / state.micro_batches) <= 1:
                raise
            state.micro_batches *= 2
            log.warning("out of memory at step %s: micro-batch now %s", state.step + 1,
                        math.ceil(len(batch) / state.micro_batches))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    torch.nn.utils.clip_grad_norm_(run.params, run.spec.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.position += 1
    state.step += 1
    return loss


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


def evaluate(run: Run) -> None:
    """Every `eval_every` steps and at the last: the held-out loss; early stopping keeps the best weights seen and
    stops after `early_stopping_patience` evaluations without a gain."""
    spec, state, prepared = run.spec, run.state, run.prepared
    if not prepared.evaluation or (state.step % prepared.eval_every and state.step != prepared.total_steps):
        return
    loss = eval_loss(run.model, prepared.evaluation, prepared.pad_id, prepared.loaded.device,
                     spec.per_device_train_batch_size)
    state.curve.setdefault(state.step, {})["eval_loss"] = loss
    if state.best_eval is None or loss < state.best_eval:
        state.best_eval, state.evals_without_gain = loss, 0
        if spec.early_stopping_patience:
            run.best_weights = trainable_state(run.model, clone=True)
    else:
        state.evals_without_gain += 1
        if spec.early_stopping_patience and state.evals_without_gain >= spec.early_stopping_patience:
            state.stopped_early = True
    state.last_eval = loss


def report(run: Run) -> None:
    """Every LOG_EVERY steps, at the last and on early stopping: the mean recent loss into the curve and to
    `on_progress`; when that asks for a cancel, raise JobCancelled (the runner removes the job's checkpoint)."""
    import torch

    state, step = run.state, run.state.step
    if step % LOG_EVERY and step != run.prepared.total_steps and not state.stopped_early:
        return
    run.recent = run.recent[-LOG_EVERY:]
    mean_loss = float(torch.stack(run.recent).mean())  # one sync per logging interval
    state.curve.setdefault(step, {})["train_loss"] = mean_loss
    progress = {"step": step, "total_steps": run.prepared.total_steps, "loss": round(mean_loss, 4)}
    if state.last_eval is not None:
        progress["eval_loss"] = round(state.last_eval, 4)
    if run.resumed_from:
        progress["resumed_from_step"] = run.resumed_from
    if run.on_progress and run.on_progress(progress):
        raise JobCancelled(f"cancelled at step {step}")


def checkpoint_if_due(run: Run) -> None:
    """A checkpoint every `checkpoint_every_steps` steps, and every `checkpoint_every_minutes` since the last one."""
    if run.checkpoints and checkpoint_due(run.spec, run.state.step, run.last_save):
        write_checkpoint(run, "periodic")
        run.last_save = time.monotonic()


def stop_at_time_limit(run: Run) -> None:
    """Past `time_limit_s` with steps left: checkpoint and raise JobTimeLimit, so a re-run resumes here."""
    spec, step = run.spec, run.state.step
    if spec.time_limit_s and time.monotonic() - run.started > spec.time_limit_s and step < run.prepared.total_steps:
        if run.checkpoints:
            write_checkpoint(run, "time limit")
        raise JobTimeLimit(f"time limit of {spec.time_limit_s:g}s reached at step {step}"
                           + (" (checkpoint kept; a re-run resumes there)" if run.checkpoints else ""))


def write_checkpoint(run: Run, reason: str) -> None:
    run.state.recent = [float(loss) for loss in run.recent[-LOG_EVERY:]]
    with run.guard():
        save_checkpoint(run.checkpoints, run.model, run.optimizer, run.scheduler, run.rng, run.state,
                        spec_hash(run.spec))
    log.info("checkpoint at step %s (%s)", run.state.step, reason)


def check_finite(run: Run) -> None:
    """Every LOG_EVERY steps (when the losses are read anyway): a loss that is NaN or infinite fails the run for
    good; no retry trains it back, and no adapter is saved."""
    import torch

    if run.state.step % LOG_EVERY and run.state.step != run.prepared.total_steps:
        return
    recent = torch.stack(run.recent[-LOG_EVERY:])
    if not bool(torch.isfinite(recent).all()):
        raise JobFailed(f"the training loss became {float(recent[~torch.isfinite(recent)][0])} at or before step "
                        f"{run.state.step}: lower the learning rate (or lora_alpha), or check the data")


def save(run: Run, store: ArtifactStore) -> Path:
    """Write the adapter (or full model) into a staging folder of its own (beside `adapters/NAME` in a local store),
    so that a crash (or a full disk) never leaves a half-written folder under that name; returns the staging
    folder."""
    if run.best_weights is not None:  # early stopping keeps the best evaluated weights
        run.model.load_state_dict(run.best_weights, strict=False)
    run.model.eval()
    staging = store.staging_folder("adapters", run.spec.name)
    with writing(staging):
        staging.parent.mkdir(parents=True, exist_ok=True)
        save_output(run.spec, run.model, run.prepared.loaded, staging)
    return staging


def publish_and_record(run: Run, session: Session, store: ArtifactStore, staging: Path, guard, *,
                       job_id: Optional[int], base_loads: int) -> dict:
    """Put the staged folder into the store, then write its row (committed): only the attempt holding the job
    publishes. A local store renames the folder under its name inside the fence; a remote one uploads it first,
    under a content-hashed key nothing points to yet, so an upload by an attempt that then loses the job is
    harmless (and removed). Older versions of the name go once the new row is committed."""
    size = folder_size(staging)
    uploaded = None if store.is_local else store.put_folder(staging, "adapters", run.spec.name)
    try:
        with guard():
            key = uploaded or store.put_folder(staging, "adapters", run.spec.name)
            result = record(run, session, key, size, job_id=job_id, base_loads=base_loads)
        session.commit()
    except BaseException:
        session.rollback()
        if uploaded and session.scalar(select(Adapter.id).where(Adapter.path == uploaded)) is None:
            store.delete(uploaded)
        raise
    store.delete_other_versions("adapters", run.spec.name, keep=key)
    return result


def record(run: Run, session: Session, key: str, size_bytes: int, *, job_id: Optional[int], base_loads: int) -> dict:
    """The Adapter row for the folder at store key `key` (replacing any of the same name: a re-run or --replace) and
    the loss curve's rows; returns the job's summary."""
    spec, state, labels = run.spec, run.state, run.prepared.labels
    duration = time.monotonic() - run.started
    final_loss = final_train_loss(run)
    trainable, total = run.counts
    hyperparameters = {**spec.hyperparameters, **({"labels": labels} if labels else {})}
    session.execute(delete(Adapter).where(Adapter.name == spec.name))
    adapter = Adapter(name=spec.name, job_id=job_id, base_model=spec.model, method=spec.method,
                      model_kind=spec.model_kind, hyperparameters=hyperparameters, path=key,
                      size_bytes=size_bytes, trainable_params=trainable, total_params=total,
                      train_loss=final_loss, eval_loss=state.last_eval, best_eval_loss=state.best_eval,
                      duration_s=duration)
    session.add(adapter)
    if job_id is not None:
        session.add_all([LossPoint(job_id=job_id, step=s, train_loss=point.get("train_loss"),
                                   eval_loss=point.get("eval_loss")) for s, point in sorted(state.curve.items())])
    session.flush()  # the caller's guard commits
    return summary(run, adapter, final_loss, duration, base_loads)


def summary(run: Run, adapter: Adapter, final_loss: float, duration: float, base_loads: int) -> dict:
    spec, state, prepared = run.spec, run.state, run.prepared
    trainable, total = run.counts
    return {"adapter_id": adapter.id, "adapter": spec.name, "method": spec.method, "model_kind": spec.model_kind,
            "steps": state.step, "total_steps": prepared.total_steps, "stopped_early": state.stopped_early,
            "train_loss": round(final_loss, 4), "initial_eval_loss": rounded(run.initial_eval),
            "eval_loss": rounded(state.last_eval), "best_eval_loss": rounded(state.best_eval),
            "first_train_loss": next((p["train_loss"] for _, p in sorted(state.curve.items()) if "train_loss" in p),
                                     None),
            "trainable_params": trainable, "total_params": total,
            "percent_trainable": round(100 * trainable / total, 4) if total else None,
            "size_bytes": adapter.size_bytes, "duration_s": round(duration, 2), "base_loads": base_loads,
            "model_was_loaded": prepared.model_was_loaded, "quantization": prepared.loaded.quantization,
            "base_bytes": prepared.loaded.size_bytes, "optim": spec.optim,
            "tokenized_from_cache": prepared.from_cache, "resumed_from_step": run.resumed_from,
            "micro_batch_size": math.ceil(spec.per_device_train_batch_size / state.micro_batches),
            **({"pruned": state.pruned} if state.pruned else {}),
            **({"search_value": rounded(run.search_value, 6)} if run.search_value is not None else {})}


def final_train_loss(run: Run) -> float:
    """Mean of the last LOG_EVERY step losses; a run resumed at its very end takes the curve's last one."""
    import torch

    recent, curve = run.recent, run.state.curve
    if not recent:  # resumed at the very end
        recent = [torch.tensor(curve[max(curve)].get("train_loss", float("nan")))] if curve else [torch.tensor(0.0)]
    return float(torch.stack(recent[-LOG_EVERY:]).mean())


def rounded(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(value, digits)


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
