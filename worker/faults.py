"""Fault injection for tests and chaos runs: `Settings.faults` (TUNEQUEUE_FAULTS), parsed by the worker runtime for
each job and passed to the job functions; empty in normal operation."""

from __future__ import annotations


class Faults:
    """Fault injection for tests, from a comma-separated list:
    `oom_at_step:N` raises torch.cuda.OutOfMemoryError once at training step N (CPUs never raise it);
    `crash_at_step:N` raises RuntimeError after training step N, on every attempt;
    `oom_at_batch:N` raises it once at generation batch N; `score_delay_s:N` sleeps N seconds before scores are
    written (so a test can kill a worker mid-scoring); `nan_at_step:N` sets a trained weight to NaN after step N,
    so the loss really becomes NaN from then on; `rung_metric_is_lr:1` makes the metric a sweep point reports at
    its rungs its own learning rate (so a test knows exactly which points successive halving must prune);
    `rung_pause_s:N` sleeps N seconds once a rung's decision is recorded (or read back), before the point stops or
    is re-queued (so a test can kill a worker, its broker or the sweep there); not at the rung an attempt resumes
    from."""

    def __init__(self, oom_at_step: int | None = None, crash_at_step: int | None = None,
                 oom_at_batch: int | None = None, score_delay_s: int | None = None, nan_at_step: int | None = None,
                 rung_metric_is_lr: int | None = None, rung_pause_s: int | None = None):
        self.oom_at_step, self.crash_at_step, self.oom_fired = oom_at_step, crash_at_step, False
        self.oom_at_batch, self.score_delay_s, self.nan_at_step = oom_at_batch, score_delay_s, nan_at_step
        self.rung_metric_is_lr, self.rung_pause_s = bool(rung_metric_is_lr), rung_pause_s

    def maybe_poison(self, step: int, params: list) -> None:
        if self.nan_at_step == step and params:
            import torch

            with torch.no_grad():
                params[0].view(-1)[0] = float("nan")

    def maybe_oom(self, step: int, micro_batches: int) -> None:
        if self.oom_at_step == step and not self.oom_fired:
            import torch

            self.oom_fired = True
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by TUNEQUEUE_FAULTS at step {step})")

    def maybe_oom_batch(self, batch_number: int) -> None:
        if self.oom_at_batch == batch_number and not self.oom_fired:
            import torch

            self.oom_fired = True
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by TUNEQUEUE_FAULTS at batch {batch_number})")

    def maybe_delay_scoring(self) -> None:
        if self.score_delay_s:
            import time

            time.sleep(self.score_delay_s)

    def maybe_pause_after_rung(self) -> None:
        if self.rung_pause_s:
            import time

            time.sleep(self.rung_pause_s)

    def maybe_crash(self, step: int) -> None:
        if self.crash_at_step == step:
            raise RuntimeError(f"crash injected by TUNEQUEUE_FAULTS at step {step}")


def parse_faults(text: str) -> Faults:
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, number = item.partition(":")
        if name not in ("oom_at_step", "crash_at_step", "oom_at_batch", "score_delay_s", "nan_at_step",
                        "rung_metric_is_lr", "rung_pause_s") \
                or not number.isdigit():
            raise ValueError(f"unknown fault {item!r} in TUNEQUEUE_FAULTS")
        values[name] = int(number)
    return Faults(**values)
