"""Fine-tuning checkpoints: everything a run needs to resume where it stopped.

One file per job, `TUNEQUEUE_HOME/checkpoints/UID/checkpoint.pt` (the job's random uid, so two databases that
share a home never resume each other's runs), holding the weights the run trains, the optimizer, the scheduler,
both RNG states, a `TrainState` (position in the data, step, evaluation history, curve) and a hash of the spec, which
must match on resume. It is written atomically (`.tmp` + os.replace), so a crash mid-write keeps the previous one;
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from models.errors import DiskFull

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


def checkpoint_dir(home: Path, job_uid: Optional[str]) -> Optional[Path]:
    """Where the job with uid `job_uid` keeps its checkpoint; None for a run outside a job, which never checkpoints."""
    return home / "checkpoints" / job_uid if job_uid else None


def forget_checkpoints(home: Path, job_uid: str) -> None:
    """A job that has ended never resumes: its checkpoint goes."""
    shutil.rmtree(checkpoint_dir(home, job_uid), ignore_errors=True)


def spec_hash(spec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def save_checkpoint(directory: Path, model, optimizer, scheduler, rng: random.Random, state: TrainState,
                    spec_digest: str) -> None:
    """Adapter weights, optimizer, scheduler, RNG states and data position, written atomically."""
    import torch

    payload = {
        "adapter": trainable_state(model),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "state": asdict(state),
        "spec_hash": spec_digest,
    }
    staging = directory / f"{CHECKPOINT_FILE}.tmp"
    with writing(staging):
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(payload, staging)
        os.replace(staging, directory / CHECKPOINT_FILE)


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


def load_checkpoint(directory: Optional[Path], model, optimizer, scheduler, rng: random.Random,
                    state: TrainState, spec_digest: str) -> int:
    """Restore a checkpoint into the objects given; returns the step it resumes from (0: none). A checkpoint of
    another spec is not used."""
    import torch

    if directory is None or not (directory / CHECKPOINT_FILE).exists():
        return 0
    payload = torch.load(directory / CHECKPOINT_FILE, weights_only=False)
    if payload.get("spec_hash") != spec_digest:
        log.warning("checkpoint in %s belongs to another spec; starting over", directory)
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
