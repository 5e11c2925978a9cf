"""Fine-tuning checkpoints: everything a run needs to resume where it stopped.

One file per job, `TUNEQUEUE_HOME/checkpoints/job-ID/checkpoint.pt`, holding the weights the run trains, the
optimizer, the scheduler, both RNG states and a `TrainState` (position in the data, step, evaluation history, curve).
It is written atomically (`.tmp` + os.replace), so a crash mid-write keeps the previous one; fine-tuning removes it
once the adapter is saved, and keeps it on a cancel or a time limit so a re-run resumes there.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

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


def checkpoint_dir(home: Path, job_id: Optional[int]) -> Optional[Path]:
    """Where job `job_id` keeps its checkpoint; None for a run outside a job, which never checkpoints."""
    return home / "checkpoints" / f"job-{job_id}" if job_id is not None else None


def save_checkpoint(directory: Path, model, optimizer, scheduler, rng: random.Random, state: TrainState) -> None:
    """Adapter weights, optimizer, scheduler, RNG states and data position, written atomically."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "adapter": trainable_state(model),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "state": asdict(state),
    }
    staging = directory / f"{CHECKPOINT_FILE}.tmp"
    torch.save(payload, staging)
    os.replace(staging, directory / CHECKPOINT_FILE)


def load_checkpoint(directory: Optional[Path], model, optimizer, scheduler, rng: random.Random,
                    state: TrainState) -> int:
    """Restore a checkpoint into the objects given; returns the step it resumes from (0: none)."""
    import torch

    if directory is None or not (directory / CHECKPOINT_FILE).exists():
        return 0
    payload = torch.load(directory / CHECKPOINT_FILE, weights_only=False)
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
