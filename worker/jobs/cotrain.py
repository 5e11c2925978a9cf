"""Co-training: K compatible LoRA sweep points trained together in one pass over the resident base.

`train_adapters_together(specs, ...)` trains K LoRA fine-tunes that differ only in their own hyperparameters
(learning rate, rank, alpha, dropout, warm-up, clipping norm) on the same data, with the same batches (one seed):
every batch holds the examples once per adapter, side by side, each copy through its own adapter
(worker/ml/co_lora.py), one forward and backward for all. The optimizer is one AdamW with a parameter group per
adapter (its learning rate and weight decay) and one warm-up/decay lambda per group, as `make_optimizer` makes for a
run alone; gradients are clipped per adapter; the loss is the sum of each adapter's mean token loss, so each
adapter gets exactly the gradient it would get alone. With the same seed and no LoRA dropout, each adapter follows
its solo run (`train_adapter`) to float rounding.

Each adapter is recorded as its own run would be (`finetune.record`: Adapter row, LossPoint rows per job, the same
summary), plus `co_trained_with`. One adapter whose loss stops being a number, or whose job asks to cancel, leaves
the pass; the others train on. Each point of a pass run for a job checkpoints on its own schedule into its job's
checkpoint file, in the format of a run alone (its weights under PEFT's names, its own optimizer group and state, its
schedule, the shared data position and random states): a retry after a crash resumes that point alone from there.

`compatible(specs)` says why specs cannot be trained together (None when they can).
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from sqlalchemy import delete
from sqlalchemy.orm import Session

from models.jobs import Job, Lease
from models.results import LossPoint
from models.specs import FinetuneSpec
from worker.faults import Faults
from worker.jobs import ProgressFn, rounded_timings, timed
from worker.jobs.checkpoint import (CheckpointPlace, TrainState, checkpoint_due, checkpoint_payload, checkpoint_place,
                                    spec_hash, write_checkpoint_file, writing)
from worker.jobs.finetune import (LOG_EVERY, Prepared, Run, epoch_batches, prepare, publish_and_record,
                                  untrained_eval_loss)
from worker.ml.features import collate
from worker.ml.kinds import resolve_model_kind
from worker.ml.methods import check_method_supported, check_target_modules, checkpointing, peft_config
from worker.ml.model_cache import ModelCache
from worker.store import ArtifactStore, store_for

log = logging.getLogger("tunequeue.train")

# what may differ between co-trained points: each adapter's own parameters, optimizer group and schedule
MAY_DIFFER = {"name", "replace", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "warmup_steps",
              "max_grad_norm", "weight_decay", "checkpoint_every_steps", "checkpoint_every_minutes"}
DEFAULT_WEIGHT_DECAY = 0.01  # torch AdamW's, what make_optimizer uses


def compatible(specs: Sequence[FinetuneSpec]) -> Optional[str]:
    """None when `specs` can be trained together; else the one-line reason they cannot."""
    if not specs:
        return "no specs"
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        return f"two points share an adapter name ({', '.join(sorted({n for n in names if names.count(n) > 1}))})"
    for spec in specs:
        unsupported = [why for why, bad in [
            (f"method {spec.method} (co-training is LoRA only)", spec.method != "lora"),
            ("an 8-bit base", spec.load_in_8bit),
            ("a classification model (its head is trained whole, one per adapter)",
             spec.model_kind == "classification"),
            (f"optim {spec.optim} (torch AdamW only)", spec.optim != "adamw"),
            ("a search (ASHA/TPE rungs)", spec.search is not None),
            ("early stopping", spec.early_stopping_patience is not None),
            ("a time limit", spec.time_limit_s is not None)] if bad]
        if unsupported:
            return f"{spec.name} cannot be co-trained: {unsupported[0]}"
    first = specs[0].model_dump(exclude=MAY_DIFFER)
    for spec in specs[1:]:
        other = spec.model_dump(exclude=MAY_DIFFER)
        differ = [key for key in first if first[key] != other.get(key)]
        if differ:
            key = differ[0]
            return (f"{specs[0].name} and {spec.name} differ in {key} ({first[key]!r} vs {other[key]!r}); co-trained "
                    f"points share everything but {', '.join(sorted(MAY_DIFFER - {'name', 'replace'}))}")
    return None


@dataclass
class Member:
    """One adapter of the pass: its spec, where it is, what it measured, and why it left the pass (if it did)."""

    spec: FinetuneSpec
    state: TrainState
    recent: list = field(default_factory=list)  # per-step loss tensors since the last log
    left: Optional[dict] = None  # {"failed": reason} or {"cancelled": reason}
    checkpoints: Optional[CheckpointPlace] = None  # its job's checkpoint (None outside a job)
    guard: Callable = contextlib.nullcontext  # fences its job's writes
    last_save: float = field(default_factory=time.monotonic)


def train_adapters_together(specs: Sequence[FinetuneSpec], session: Session, cache: ModelCache, home: Path, *,
                            job_ids: Optional[Sequence[Optional[int]]] = None,
                            on_progress: Optional[Sequence[Optional[ProgressFn]]] = None,
                            leases: Optional[Sequence[Optional[Lease]]] = None, mode: str = "bmm") -> list[dict]:
    """Train `specs` (compatible ones) together and record each as `train_adapter` would; returns one summary per
    spec, in order: train_adapter's keys plus `co_trained_with` (the other adapters' names), or for a point that
    left the pass `{"adapter": NAME, "failed": reason}` / `{"adapter": NAME, "cancelled": reason}` (nothing saved
    or recorded for it). `job_ids`, `on_progress` (each job's ProgressFn; True asks that point to cancel) and
    `leases` (fencing each job's writes) are per spec."""
    import torch

    reason = compatible(specs)
    if reason:
        raise ValueError(reason)
    k = len(specs)
    job_ids, on_progress, leases = (list(x) if x is not None else [None] * k for x in (job_ids, on_progress, leases))
    started = time.monotonic()
    specs = [resolve_model_kind(s) for s in specs]
    reason = compatible(specs)  # the model kind is known now
    if reason:
        raise ValueError(reason)
    lead = specs[0]
    random.seed(lead.seed)
    torch.manual_seed(lead.seed)
    check_method_supported(lead, cache.device)
    prepared = prepare(lead, cache, home)
    timings = prepared.timings
    guards = [(lambda lease=lease: lease.held(session)) if lease else contextlib.nullcontext for lease in leases]
    for job_id, guard in zip(job_ids, guards):
        if job_id is not None:
            with guard():
                session.execute(delete(LossPoint).where(LossPoint.job_id == job_id))  # a re-run draws its curve anew
    session.commit()

    from worker.ml.co_lora import CoLora

    loaded = prepared.loaded
    check_target_modules(lead, loaded.model, lead.model_kind)
    configs = [peft_config(spec, lead.model_kind, loaded) for spec in specs]
    staging: dict[int, Path] = {}
    store = store_for(home)
    with cache_lock(cache), checkpointing(loaded.model, lead.gradient_checkpointing):
        co = CoLora(loaded.model, configs, seed=lead.seed, mode=mode)
        try:
            with timed(timings, "initial_eval_s"):
                optimizer, scheduler = make_optimizer(specs, co, loaded.device, prepared.total_steps)
                rng = random.Random(lead.seed)
                batches = epoch_batches(lead, prepared, rng)  # the same batches each point would draw alone
                members = [Member(spec=spec, state=TrainState(batches=batches), guard=guard,
                                  checkpoints=checkpoint_place(home, session.get(Job, job_id).uid) if job_id else None)
                           for spec, job_id, guard in zip(specs, job_ids, guards)]
                initial_eval = untrained_eval_loss(lead, prepared, loaded.model) if prepared.evaluation else None
            loaded.model.train()
            with timed(timings, "train_s"):
                train_together(co, members, prepared, optimizer, scheduler, rng, on_progress)
            loaded.model.eval()
            with timed(timings, "save_s"):
                for i, member in enumerate(members):
                    if not member.left:
                        staging[i] = save_one(co, i, member.spec, store)
        finally:
            co.remove()
            loaded.model.eval()
    base_total = sum(p.numel() for p in loaded.model.parameters())
    results: list[dict] = []
    try:
        with timed(timings, "record_s"):
            for i, member in enumerate(members):
                if member.left:
                    results.append({"adapter": member.spec.name, **member.left})
                    continue
                trainable = co.trainable_count(i)
                run = Run(spec=member.spec, prepared=prepared, model=None, params=co.parameters(i), optimizer=None,
                          scheduler=None, rng=rng, state=member.state, counts=(trainable, base_total + trainable),
                          checkpoints=None, guard=guards[i], faults=Faults(), on_progress=None, started=started,
                          initial_eval=initial_eval, recent=member.recent)
                results.append(publish_and_record(run, session, store, staging[i], guards[i], job_id=job_ids[i],
                                                  base_loads=cache.loads))
        others = [m.spec.name for m in members]
        for result in results:
            if "failed" not in result and "cancelled" not in result:
                result["co_trained_with"] = [n for n in others if n != result["adapter"]]
                result["timings"] = rounded_timings(timings)  # the pass's, shared by its adapters
        return results
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(cache: ModelCache):
    """The model cache's one-job-at-a-time lock on the resident base (what `training_adapter` holds)."""
    with cache._lock:
        yield


def make_optimizer(specs: Sequence[FinetuneSpec], co, device: str, total_steps: int):
    """One AdamW, a parameter group per adapter (its learning rate and weight decay), and a LambdaLR with each
    group's warm-up/decay schedule: what `finetune.make_optimizer` gives each run alone."""
    import torch

    groups = [{"params": co.parameters(i), "lr": spec.learning_rate,
               "weight_decay": getattr(spec, "weight_decay", DEFAULT_WEIGHT_DECAY)} for i, spec in enumerate(specs)]
    # fused on CUDA as make_optimizer; on the CPU one foreach update for the K·2·layers tensors instead of a Python
    # loop over them (the same arithmetic)
    optimizer = torch.optim.AdamW(groups, **({"fused": True} if str(device).startswith("cuda") else {"foreach": True}))

    def schedule(spec):
        warmup = min(spec.warmup_steps, total_steps // 10)
        return lambda s: min(1.0, (s + 1) / (warmup + 1)) * max(0.0, 1 - s / total_steps)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(spec) for spec in specs])


def train_together(co, members: list[Member], prepared: Prepared, optimizer, scheduler, rng: random.Random,
                   on_progress: list) -> None:
    """All the steps: every batch once per adapter still in the pass; evaluation, logging and the finite-loss check
    at the same steps as a run alone."""
    import torch

    lead, device = members[0].spec, prepared.loaded.device
    total, step, position, batches = prepared.total_steps, 0, 0, members[0].state.batches
    while step < total:
        active = [i for i, m in enumerate(members) if not m.left]
        if not active:
            return
        if position >= len(batches):  # next epoch: the same draw a run alone makes
            batches, position = epoch_batches(lead, prepared, rng), 0
            for member in members:
                member.state.batches = batches
        inputs = collate(prepared.features, batches[position], prepared.pad_id, device)
        with co.rows(active):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                losses = block_losses(co.model, inputs, len(active), lead.model_kind)
            losses.sum().backward()
        for i in active:
            torch.nn.utils.clip_grad_norm_(co.parameters(i), members[i].spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, position = step + 1, position + 1
        detached = losses.detach()
        for j, i in enumerate(active):
            members[i].recent.append(detached[j])
            members[i].state.step, members[i].state.position = step, position
        evaluating = prepared.evaluation and (step % prepared.eval_every == 0 or step == total)
        if evaluating:
            evaluate_together(co, members, active, prepared, lead.per_device_train_batch_size)
        if step % LOG_EVERY == 0 or step == total:
            for i in active:
                log_point(members[i], step, total, on_progress[i])
        due = [i for i in active if not members[i].left and step < total and members[i].checkpoints is not None
               and checkpoint_due(members[i].spec, step, members[i].last_save)]
        if due:
            checkpoint_members(co, members, due, optimizer, scheduler, rng)


def log_point(member: Member, step: int, total: int, on_progress: Optional[ProgressFn]) -> None:
    """A run alone's `check_finite` and `report` for one adapter: a loss that is not a number, or a cancel asked by
    its job, takes it out of the pass."""
    import torch

    member.recent = member.recent[-LOG_EVERY:]
    recent = torch.stack(member.recent)
    if not bool(torch.isfinite(recent).all()):
        member.left = {"failed": f"the training loss became {float(recent[~torch.isfinite(recent)][0])} at or before "
                                 f"step {step}: lower the learning rate (or lora_alpha), or check the data"}
        log.info("%s leaves the co-trained pass at step %s: %s", member.spec.name, step, member.left)
        return
    mean_loss = float(recent.mean())
    state = member.state
    state.curve.setdefault(step, {})["train_loss"] = mean_loss
    progress = {"step": step, "total_steps": total, "loss": round(mean_loss, 4)}
    if state.last_eval is not None:
        progress["eval_loss"] = round(state.last_eval, 4)
    if on_progress and on_progress(progress):
        member.left = {"cancelled": f"cancelled at step {step}"}
    if member.left:
        log.info("%s leaves the co-trained pass at step %s: %s", member.spec.name, step, member.left)


def checkpoint_members(co, members: list[Member], due: list[int], optimizer, scheduler, rng: random.Random) -> None:
    """Points `due` each write their job's checkpoint as its run alone would (worker/jobs/checkpoint.py), so that a
    retry resumes it alone with `train_adapter`: its weights under the PEFT model's parameter names, its optimizer
    group with its state renumbered from 0, its learning-rate lambda's state, the shared data position and RNGs."""
    optimizer_state, scheduler_state = optimizer.state_dict(), scheduler.state_dict()
    for i in due:
        member = members[i]
        group = optimizer_state["param_groups"][i]
        member.state.recent = [float(loss) for loss in member.recent[-LOG_EVERY:]]
        payload = checkpoint_payload(
            {peft_parameter_name(key): tensor for key, tensor in co.state_dict(i).items()},
            {"state": {new: optimizer_state["state"][old] for new, old in enumerate(group["params"])
                       if old in optimizer_state["state"]},
             "param_groups": [{**group, "params": list(range(len(group["params"])))}]},
            {key: [value[i]] if isinstance(value, list) and len(value) == len(members) else value
             for key, value in scheduler_state.items()},  # base_lrs, _last_lr, lr_lambdas: one per group
            rng, member.state, spec_hash(member.spec))
        with member.guard():
            write_checkpoint_file(member.checkpoints, payload)
        member.last_save = time.monotonic()
        log.info("%s: checkpoint at step %s (co-trained pass)", member.spec.name, member.state.step)


def peft_parameter_name(saved_key: str) -> str:
    """A saved adapter key (`...q.lora_A.weight`) as the parameter is named in a PEFT model training it alone (the
    adapter is "default": `...q.lora_A.default.weight`)."""
    return saved_key.removesuffix(".weight") + ".default.weight"


def block_losses(model, inputs: dict, blocks: int, model_kind: str):
    """Each block's mean loss per target token, from one forward pass over `inputs` repeated `blocks` times: (blocks,).
    The loss is computed as the model computes it (seq2seq: on the labels; causal: shifted by one)."""
    import torch.nn.functional as F

    batch = {key: value.repeat(blocks, *[1] * (value.dim() - 1)) for key, value in inputs.items()}
    labels = batch.pop("labels")
    if model_kind == "seq2seq":
        logits = model(**batch, decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels)).logits
    else:
        logits, labels = model(**batch).logits[:, :-1], labels[:, 1:]
    token_losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="none").view(blocks, -1)
    tokens = (labels != -100).view(blocks, -1).sum(1).clamp(min=1)
    return token_losses.sum(1) / tokens


def eval_losses(co, adapters: list[int], features: list[dict], pad_id: int, device: str, batch_size: int,
                model_kind: str) -> list[float]:
    """Each adapter's mean loss per target token on held-out features (what `finetune.eval_loss` gives one adapter
    alone), one pass over the features for all of them."""
    import torch

    from worker.ml.features import label_tokens

    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    totals, tokens = torch.zeros(len(adapters), dtype=torch.float64), 0
    model = co.model
    was_training = model.training
    model.eval()
    with torch.no_grad(), co.rows(adapters):
        for start in range(0, len(order), batch_size):
            inputs = collate(features, order[start:start + batch_size], pad_id, device)
            n = label_tokens(inputs)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                totals += block_losses(model, inputs, len(adapters), model_kind).double().cpu() * n
            tokens += n
    model.train(was_training)
    return (totals / max(tokens, 1)).tolist()


def evaluate_together(co, members: list[Member], active: list[int], prepared: Prepared, batch_size: int) -> None:
    losses = eval_losses(co, active, prepared.evaluation, prepared.pad_id, prepared.loaded.device, batch_size,
                         members[0].spec.model_kind)
    for i, loss in zip(active, losses):
        state = members[i].state
        state.curve.setdefault(state.step, {})["eval_loss"] = loss
        if state.best_eval is None or loss < state.best_eval:
            state.best_eval, state.evals_without_gain = loss, 0
        else:
            state.evals_without_gain += 1
        state.last_eval = loss


def save_one(co, i: int, spec: FinetuneSpec, store: ArtifactStore) -> Path:
    """Adapter i written into a staging folder (as `finetune.save` does); returns it."""
    staging = store.staging_folder("adapters", spec.name)
    with writing(staging):
        staging.parent.mkdir(parents=True, exist_ok=True)
        co.save(i, staging)
    return staging


__all__ = ["compatible", "train_adapters_together", "math"]
