"""Fine-tuning checkpoints: everything a run needs to resume where it stopped.

One file per job, `checkpoints/UID/checkpoint.pt` in the artifact store (worker/store.py; the job's random uid, so
two databases that share a store never resume each other's runs): with the default store the file
`TUNEQUEUE_HOME/checkpoints/UID/checkpoint.pt` itself; with a remote one a file under TUNEQUEUE_HOME/cache/files,
put to the store after each save (then removed) and fetched from it on resume, so a run resumes on any machine. It
holds the weights the run trains, the optimizer, the scheduler, both RNG states, a `TrainState` (position in the
data, step, evaluation history, curve) and a hash of the spec, which must match on resume. It is written atomically
(`.tmp` + os.replace; one object replacing the last in a remote store), so a crash mid-write keeps the previous one;
a full disk removes the `.tmp` and says so. A retry (a crash, a lost worker, a time limit) resumes from it; the
runner removes it once the job has ended.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from models.errors import DiskFull
from worker.store import ArtifactStore, store_for

log = logging.getLogger("tunequeue.train")

CHECKPOINT_FILE = "checkpoint.pt"


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
    curve: dict = field(default_factory=dict)  # step -> {"train_loss": ..., "eval_loss": ...}
    pruned: Optional[dict] = None  # {"step", "reason"}: successive halving stopped this sweep point there
    recent: list = field(default_factory=list)  # the step losses since the last log line, so a resumed run logs alike


@dataclass(frozen=True)
class CheckpointPlace:
    """Where one job's checkpoint lives: its key in the store, and the local file it is written to and read from."""

    store: ArtifactStore
    uid: str

    @property
    def key(self) -> str:
        return f"checkpoints/{self.uid}/{CHECKPOINT_FILE}"

    @property
    def file(self) -> Path:
        return self.store.local_path(self.key)


def checkpoint_place(home: Path, job_uid: Optional[str]) -> Optional[CheckpointPlace]:
    """Where the job with uid `job_uid` keeps its checkpoint; None for a run outside a job, which never checkpoints."""
    return CheckpointPlace(store_for(home), job_uid) if job_uid else None


def forget_checkpoints(home: Path, job_uid: str) -> None:
    """A job that has ended never resumes: its checkpoint goes (from the store and any local copy)."""
    store = store_for(home)
    store.delete(f"checkpoints/{job_uid}")
    if not store.is_local:
        shutil.rmtree(store.local_path(f"checkpoints/{job_uid}"), ignore_errors=True)


def spec_hash(spec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def checkpoint_due(spec, step: int, last_save: float) -> bool:
    """A periodic checkpoint is due at `step`: every `checkpoint_every_steps` steps, and every
    `checkpoint_every_minutes` since the last one (`last_save`, a `time.monotonic()` value)."""
    due_by_time = (spec.checkpoint_every_minutes is not None
                   and time.monotonic() - last_save > 60 * spec.checkpoint_every_minutes)
    return due_by_time or bool(spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0)


def save_checkpoint(place: CheckpointPlace, model, optimizer, scheduler, rng: random.Random, state: TrainState,
                    spec_digest: str) -> None:
    """Adapter weights, optimizer, scheduler, RNG states and data position, written atomically (and put to a remote
    store, where one object replaces the last)."""
    write_checkpoint_file(place, checkpoint_payload(trainable_state(model), optimizer.state_dict(),
                                                    scheduler.state_dict(), rng, state, spec_digest))


def checkpoint_payload(adapter: dict, optimizer_state: dict, scheduler_state: dict, rng: random.Random,
                       state: TrainState, spec_digest: str) -> dict:
    """What a checkpoint file holds (what `load_checkpoint` reads back); the torch RNG state is taken now."""
    import torch

    return {"adapter": adapter, "optimizer": optimizer_state, "scheduler": scheduler_state,
            "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "state": asdict(state),
            "spec_hash": spec_digest}


def write_checkpoint_file(place: CheckpointPlace, payload: dict) -> None:
    """`payload` (`checkpoint_payload`) written atomically to the job's checkpoint, and put to a remote store."""
    import torch

    staging = place.file.with_name(f"{CHECKPOINT_FILE}.tmp")
    with writing(staging):
        staging.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, staging)
        os.replace(staging, place.file)
    place.store.put_file(place.file, place.key)
    if not place.store.is_local:  # the store's object is the checkpoint; no copy lingers on a machine that dies
        place.file.unlink(missing_ok=True)


class writing:
    """Context for writing `path` (a file or a folder): on any failure the half-written path is removed, and a full
    disk becomes DiskFull naming where. torch and safetensors report a full disk without an errno, so the free space
    left tells."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, kind, exc, _traceback) -> bool:
        if exc is None:
            return False
        full = getattr(exc, "errno", None) == errno.ENOSPC or _nearly_full(self.path)
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)
        if full and isinstance(exc, Exception):  # torch, safetensors and the OS each word it their own way
            raise DiskFull(f"disk full at {self.path.parent}: could not write {self.path.name}") from None
        return False


def _nearly_full(path: Path, margin: int = 1 << 20) -> bool:
    folder = next((p for p in [path, *path.parents] if p.exists()), None)
    return folder is not None and shutil.disk_usage(folder).free < margin


def load_checkpoint(place: Optional[CheckpointPlace], model, optimizer, scheduler, rng: random.Random,
                    state: TrainState, spec_digest: str) -> int:
    """Restore a checkpoint (fetched from the store: it may have been written on another machine) into the objects
    given; returns the step it resumes from (0: none). A checkpoint of another spec is not used."""
    import torch

    path = place.store.fetch_file(place.key) if place is not None else None
    if path is None:
        return 0
    payload = torch.load(path, weights_only=False)
    if not place.store.is_local:
        path.unlink(missing_ok=True)
    if payload.get("spec_hash") != spec_digest:
        log.warning("checkpoint %s belongs to another spec; starting over", place.store.describe(place.key))
        return 0
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(payload["adapter"]) != trained:  # never half-load weights under names this model does not train
        log.warning("checkpoint %s holds other weights than this run trains; starting over",
                    place.store.describe(place.key))
        return 0
    model.load_state_dict(payload["adapter"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    rng.setstate(payload["python_rng"])
    torch.set_rng_state(payload["torch_rng"])
    for key, value in payload["state"].items():
        setattr(state, key, value)
    state.curve = {int(k): v for k, v in state.curve.items()}
    return state.step


def trainable_state(model, clone: bool = False) -> dict:
    """The weights this run trains (LoRA layers, virtual tokens, heads, or everything for full fine-tuning)."""
    return {name: (p.detach().clone() if clone else p.detach().cpu()) for name, p in model.named_parameters()
            if p.requires_grad}
