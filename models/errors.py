"""The one error tree of tunequeue. Every door catches it once: the CLI (manage.py), the runner (worker/runner.py)
and, later, the HTTP API.

- `InputError`: the user's input is wrong (a bad flag, an unknown model, a missing column, an unknown job id).
  The message is one line meant for the user; the CLI prints it and exits 2, and nothing has been written.
  `NotFound` is the kind that names something that does not exist.
- `Unavailable`: a service the command needs (the broker, the database) cannot be reached; exit 1, one line.
- `JobFailed`: this job can never succeed, so it fails at once without a retry (QLoRA on a worker without CUDA,
  data the worker cannot read). An `InputError` raised inside a job counts as one too.
- `JobTimeLimit`: the soft time limit was reached after a checkpoint; a failed attempt like a crash.
- `LeaseLost`: the attempt lost its claim on the job to a newer attempt; it stops and writes nothing.
- `DiskFull`: a checkpoint or an adapter could not be written for lack of space (the message names where).
- `JobCancelled`: a cancel was asked for and the running job stopped at its next step.
- `TrialPromoted`: a sweep point passed a successive-halving rung; it checkpointed and goes back to the queue to
  train on from there (not an error: the runner re-queues it without counting an attempt against it).

Any other exception inside a job is taken as passing (a crash, an out-of-memory): the job is retried until its
attempts run out.
"""

from __future__ import annotations


class TunequeueError(Exception):
    """Base of every error tunequeue raises on purpose; the message is one line."""


class InputError(TunequeueError, ValueError):
    """The user's input is wrong: one line, exit 2, nothing enqueued or written."""

    exit_code = 2


class NotFound(InputError, LookupError):
    """The input names a job, adapter, sweep or metric that does not exist."""


class Unavailable(TunequeueError):
    """A service the command needs (broker, database) cannot be reached."""

    exit_code = 1


class JobFailed(TunequeueError):
    """The job can never succeed: failed at once, no retry."""


class JobTimeLimit(TunequeueError):
    """The job's soft time limit was reached; it checkpointed first, so a retry resumes where it stopped."""


class LeaseLost(TunequeueError):
    """This attempt no longer holds the job (the reaper gave it to another worker while this one stalled): stop and
    write nothing."""


class DiskFull(TunequeueError):
    """A write ran out of disk space; what was half written is removed. A failed attempt like a crash."""


class JobCancelled(TunequeueError):
    """The running job stopped at its next step because a cancel was requested."""


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message` (or just the type), for errors that come from libraries."""
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__


class TrialHeld(TunequeueError):
    """A sweep point waits at its rung (lazy ASHA) for the results that decide it: checkpointed, it goes back to
    queued without a message, and is published once its rung promotes or prunes it."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class TrialPromoted(TunequeueError):
    """A sweep point passed its rung: checkpointed, it is queued again to resume from that step on any worker."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason
