"""How a job's outcome becomes its Celery task's state, so that Flower and `AsyncResult` tell the truth.

The job's row in the SQL database is the record; the task's state mirrors it:

    job succeeded                     → SUCCESS, result: one line naming the job and what it produced
    job failed for good               → FAILURE, exception `JobFailure` carrying the job's error
    attempt failed, job re-queued     → RETRY (the next attempt is a new task, "attempt N" in its name)
    attempt superseded (lease lost)   → RETRY, or the job's final state when the job has ended meanwhile
    job cancelled / row gone          → REVOKED, with the reason
    sweep point pruned (ASHA)         → PRUNED (an event and state of tunequeue's own), result: the reason
    sweep point promoted at a rung    → PROMOTED; the job goes on as a new task from its checkpoint
    sweep point waiting at its rung   → HELD (lazy ASHA); a new task once its rung promotes or prunes it
    duplicate delivery of the task    → nothing: the delivery that runs the job reports for it

Progress while a job runs is sent as repeated `task-started` events carrying the original start time and a
`result` field ("step 40/100 · loss 1.234 · eval loss 1.310"): Flower 2.2 shows a task's `result` on its task page
and in the tasks table, and returns it from `/api/task/info/ID`. A custom event type would not do: Celery's event
state gives every unknown state a precedence above REVOKED, so a task that had reported progress could never be
shown as revoked afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass


class JobFailure(Exception):
    """Raised out of a task whose job failed for good, so that Celery records FAILURE with the job's error."""


@dataclass(frozen=True)
class Outcome:
    """What a delivery of a job's task did: `word` is succeeded | failed | retrying | superseded | cancelled |
    missing | duplicate | not-queued; `message` is what the task's state says about it."""

    word: str
    job_id: int
    message: str = ""
    error: BaseException | None = None


# Errors that say the job's input can never work, whichever worker tries and however often: raised by parsers and
# file access (a file that is not JSON, a missing column, a missing or unreadable path). Matched by class name for
# the libraries the worker imports lazily.
_NEVER_SUCCEEDS = (LookupError, UnicodeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                   PermissionError)
_NEVER_SUCCEEDS_NAMES = {"JSONDecodeError", "ArrowInvalid", "DatasetGenerationError", "DatasetNotFoundError",
                         "EmptyDatasetError", "SafetensorError", "HeaderTooLarge", "ParserError"}


def retry_can_help(exc: BaseException) -> bool:
    """False for user-input and data errors (retrying would fail the same way: the job fails at once, with the
    reason); True for everything else: crashes, out-of-memory, lost connections to the database or the broker."""
    from models.errors import InputError, JobFailed, Unavailable

    if isinstance(exc, Unavailable):
        return True
    if isinstance(exc, (InputError, JobFailed, *_NEVER_SUCCEEDS)):
        return False
    return not any(cls.__name__ in _NEVER_SUCCEEDS_NAMES for cls in type(exc).__mro__)


def progress_text(progress: dict) -> str:
    """One line for Flower: step / total, loss, eval loss (only the parts the job reported)."""
    parts = []
    if progress.get("step") is not None:
        total = progress.get("total_steps")
        parts.append(f"step {progress['step']}/{total}" if total else f"step {progress['step']}")
    for key, label in (("loss", "loss"), ("eval_loss", "eval loss")):
        value = progress.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.4f}")
    for key in ("done", "examples", "batch"):
        if key in progress and not parts:
            parts.append(f"{key} {progress[key]}")
    return " · ".join(parts) or "running"


def send_progress(task, job_id: int, progress: dict, started: float | None) -> None:
    """Mirror `progress` to Celery: the result backend (`AsyncResult.info`) and the event stream (Flower)."""
    if not task.request.id:
        return
    task.update_state(state="PROGRESS", meta={"job_id": job_id, **progress})
    fields = {"result": progress_text(progress), "job_id": job_id, **_plain(progress)}
    if started is not None:
        fields["timestamp"] = started  # keeps Flower's "started" time where it was
    task.send_event("task-started", **fields)


def end_task(task, outcome: Outcome):
    """End the Celery task as the job's outcome says: return a result, or raise what makes Celery record the state
    (see the module docstring)."""
    from celery.exceptions import Ignore, Retry

    if outcome.word == "succeeded":
        return outcome.message
    if outcome.word == "failed":  # chained to the job's own exception, so Flower's traceback shows where it was raised
        raise JobFailure(outcome.message) from outcome.error
    if outcome.word in ("retrying", "superseded"):
        raise Retry(outcome.message, exc=JobFailure(outcome.message))
    if outcome.word == "duplicate":
        raise Ignore()
    if outcome.word in ("pruned", "promoted", "held"):
        end_as(task, outcome.word.upper(), outcome.message)
    revoke(task, outcome.message)  # cancelled, missing, not-queued


def end_as(task, state: str, message: str) -> None:
    """End the task in a state of tunequeue's own (PRUNED: successive halving stopped the point; PROMOTED: it passed
    its rung and is queued again as a new task; HELD: it waits at its rung): the `task-pruned` / `task-promoted` /
    `task-held` event gives Flower that state (Celery's event state takes an unknown event's name as the state), and
    the result backend records it."""
    from celery.exceptions import Ignore

    request = task.request
    if request.id:
        task.send_event(f"task-{state.lower()}", result=message)
        task.backend.store_result(request.id, message, state, request=request)
    raise Ignore()


def revoke(task, reason: str) -> None:
    """Record the running task as REVOKED (the event Flower reads and the result backend) and stop it quietly."""
    from celery.exceptions import Ignore

    request = task.request
    if request.id:
        task.send_event("task-revoked", terminated=False, signum=None, expired=False, reason=reason)
        task.backend.mark_as_revoked(request.id, reason, request=request)
    raise Ignore()


# the fields of Celery's event and task records, which a progress key must never overwrite
_RESERVED = {"uuid", "name", "state", "received", "sent", "started", "rejected", "succeeded", "failed", "retried",
             "revoked", "args", "kwargs", "eta", "expires", "retries", "worker", "result", "exception", "timestamp",
             "runtime", "traceback", "exchange", "routing_key", "clock", "client", "root", "root_id", "parent",
             "parent_id", "children", "type", "hostname", "pid", "utcoffset", "local_received"}


def _plain(progress: dict) -> dict:
    """The progress fields that travel as they are (numbers and short strings); Flower keeps them on the task."""
    return {k: v for k, v in progress.items()
            if k not in _RESERVED and isinstance(v, (int, float, str)) and not (isinstance(v, str) and len(v) > 200)}
