"""Runs one job inside a worker: claim the row, call the job's plain function, record the outcome, release children.

Outcomes follow the error tree (models/errors.py): `JobCancelled` → cancelled; an error no retry can help (bad
input or data, an unsupported method: `worker.outcomes.retry_can_help`) → failed at once; `LeaseLost` (the attempt
stalled and the job went to another) → nothing at all is written; anything else (a crash, a database or broker
hiccup) is a failed attempt, retried while attempts remain. Every write goes through the attempt's `Lease`
(models/jobs.py). A job's checkpoints are removed once it has ended; its log lines go to its own file
(worker/joblog.py) and a failed attempt's traceback tail to its row. The task's Celery state then mirrors the
outcome (worker/outcomes.py), so Flower shows what the database holds.
"""

from __future__ import annotations

import logging
import socket
import time
import traceback
from dataclasses import replace

from sqlalchemy import select

from models.errors import InputError, JobCancelled, JobFailed, LeaseLost, TrialHeld, TrialPromoted
from models.jobs import (Job, JobKind, JobStatus, Lease, claim, fail_attempt, finish, report_progress,
                         requeue_promoted, unfinished_outputs)
from models.specs import parse_spec
from worker import notify
from worker.heartbeat import Heartbeat
from worker.jobs.checkpoint import forget_checkpoints
from worker.joblog import job_logging
from worker.lifecycle import publish, release, settle_children
from worker.outcomes import Outcome, end_task, retry_can_help, send_progress
from worker.runtime import WorkerRuntime
from worker.task_names import TASK_NAMES
from worker.tasks import JOBS

log = logging.getLogger("tunequeue.worker")


def register_tasks(app, runtime: WorkerRuntime) -> None:
    """One thin bound task per job kind (worker/tasks.py), registered on `app` and running jobs with `runtime`."""
    for kind, function in JOBS.items():
        app.task(name=TASK_NAMES[kind], bind=True)(_task(kind, function, runtime))


def _task(kind: JobKind, function, runtime: WorkerRuntime):
    def task(self, job_id: int) -> str:
        return end_task(self, run_job(self, runtime, job_id, kind, function))

    task.__name__ = task.__qualname__ = kind.value
    return task


def run_job(task, runtime: WorkerRuntime, job_id: int, kind: JobKind, function) -> Outcome:
    """Run job `job_id` for Celery task `task` (bound) with `function` (the kind's plain function, worker/tasks.py);
    returns what happened, which `end_task` turns into the task's state (worker/outcomes.py)."""
    if not isinstance(job_id, int) or job_id <= 0:
        raise ValueError(f"job id must be a positive integer, got {job_id!r}")
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.kind != kind:
            log.error("job %s is not a %s job in the database; message dropped", job_id, kind.value)
            return Outcome("missing", job_id, f"job {job_id} is not a {kind.value} job in the database (deleted?)")
        # the Celery node name tells apart two workers on one machine (and matches `manage.py workers`)
        lease = claim(session, job_id, task.request.id, task.request.hostname or socket.gethostname())
        if lease is None:
            return _not_claimed(task, job)
        with job_logging(runtime.settings, job_id, lease.attempt):
            outcome = _attempt(task, runtime, session, job, lease, function)
        if outcome.word in ("succeeded", "failed", "cancelled", "pruned"):
            notify.job_ended(runtime.settings, session, job_id)  # never raises
        return outcome


def _not_claimed(task, job: Job) -> Outcome:
    """A delivery that found its job not queued: cancelled or skipped before it started, or a duplicate message."""
    log.warning("job %s is %s, not queued; this delivery does nothing", job.id, job.status.value)
    if job.status == JobStatus.cancelled:
        return Outcome("cancelled", job.id, f"job {job.id} was cancelled before it started")
    if job.status == JobStatus.skipped:
        return Outcome("not-queued", job.id, f"job {job.id} was skipped: {job.error or ''}".strip())
    lead = (job.result or {}).get("co_trained_in_job") or (job.progress or {}).get("co_trained_in_job")
    if lead and job.celery_task_id == task.request.id:  # its own message, after another task trained it
        if job.status == JobStatus.succeeded:
            return Outcome("succeeded", job.id, f"job {job.id} succeeded: co-trained in job {lead}'s pass")
        if job.status == JobStatus.failed:
            return Outcome("failed", job.id, f"job {job.id} failed in job {lead}'s co-trained pass: {job.error}")
        return Outcome("not-queued", job.id, f"job {job.id} is {job.status.value}: co-trained in job {lead}'s pass")
    if job.celery_task_id == task.request.id:  # a redelivery of the task that runs (or ran) the job
        return Outcome("duplicate", job.id)
    return Outcome("not-queued", job.id, f"job {job.id} is {job.status.value} under task {job.celery_task_id}; "
                                         "this older message was dropped")


def _attempt(task, runtime: WorkerRuntime, session, job: Job, lease: Lease, function) -> Outcome:
    job_id, kind, uid, base = job.id, job.kind, job.uid, job.spec.get("model")
    log.info("job %s (%s) started, attempt %s", job_id, kind.value, lease.attempt)
    runtime.note_job(job_id, base)
    beat = Heartbeat(runtime.sessions, lease, runtime.settings.heartbeat_seconds)
    beat.start()
    try:
        with runtime.sessions() as progress_session:
            result = _call(function, task, runtime, session, progress_session, job, lease)
    except LeaseLost as exc:
        session.rollback()
        log.warning("job %s: attempt %s stopped, writing nothing: %s", job_id, lease.attempt, exc)
        return _superseded(session, job_id, lease)
    except JobCancelled as exc:
        return _end(session, runtime, lease, uid, JobStatus.cancelled, str(exc))
    except TrialPromoted as exc:
        return _promoted(session, runtime, job, lease, exc)
    except TrialHeld as exc:
        return _held(session, runtime, job, lease, exc)
    except Exception as exc:
        session.rollback()
        trace = traceback.format_exc()
        log.error("job %s failed:\n%s", job_id, trace)
        error = str(exc) if isinstance(exc, (JobFailed, InputError)) else f"{exc.__class__.__name__}: {exc}"
        if not retry_can_help(exc):  # bad input or data: no retry can help
            return replace(_end(session, runtime, lease, uid, JobStatus.failed, error, trace), error=exc)
        status = fail_attempt(session, job_id, error, attempt=lease.attempt, traceback=tail(trace))
        if status == JobStatus.queued:  # attempts remain: run it again (a fine-tune resumes from its checkpoint)
            publish(session, runtime.broker, session.get(Job, job_id))
            return Outcome("retrying", job_id, f"job {job_id}: attempt {lease.attempt} failed, queued again as "
                                               f"attempt {lease.attempt + 1}: {error}")
        if status == JobStatus.failed:
            forget_checkpoints(runtime.settings.home, uid)
            _search_step(runtime, session, job_id)
            settle_children(session, runtime.broker, job_id)
            return Outcome("failed", job_id, f"job {job_id} failed after {lease.attempt} attempts: {error}", exc)
        return _superseded(session, job_id, lease)
    finally:
        beat.stopped.set()
        runtime.note_job(None, base)  # loaded bases' queues first from the next message on
    status = JobStatus.pruned if result.get("pruned") else JobStatus.succeeded
    if not finish(session, lease, status, result=result):
        log.warning("job %s: attempt %s lost the job before recording its outcome", job_id, lease.attempt)
        return _superseded(session, job_id, lease)
    log.info("job %s (%s) %s: %s", job_id, kind.value, status.value, result)
    forget_checkpoints(runtime.settings.home, uid)
    _search_step(runtime, session, job_id)
    settle_children(session, runtime.broker, job_id)
    if status == JobStatus.pruned:
        return Outcome("pruned", job_id, f"job {job_id} {result['pruned']['reason']}")
    return Outcome("succeeded", job_id, success_text(job_id, kind, result))


def _promoted(session, runtime: WorkerRuntime, job: Job, lease: Lease, promoted: TrialPromoted) -> Outcome:
    """The point passed its rung: back to the queue (its checkpoint stays) to train on wherever a worker is free."""
    job_id = lease.job_id
    session.rollback()
    if session.scalar(select(Job.cancel_requested).where(Job.id == job_id)):  # asked to stop: it does not go on
        return _end(session, runtime, lease, job.uid, JobStatus.cancelled, f"cancelled at step {promoted.step}")
    progress = {**(job.progress or {}), "step": promoted.step, "promoted_at_step": promoted.step}
    if not requeue_promoted(session, lease, progress):
        return _superseded(session, job_id, lease)
    publish(session, runtime.broker, session.get(Job, job_id))
    log.info("job %s: %s; queued again", job_id, promoted.reason)
    return Outcome("promoted", job_id, f"job {job_id} {promoted.reason}; it trains on from its checkpoint")


def _held(session, runtime: WorkerRuntime, job: Job, lease: Lease, held: TrialHeld) -> Outcome:
    """The point waits at its rung (lazy ASHA): back to queued without a message, its checkpoint kept. Under the
    sweep's lock, so that a settling that decided it meanwhile is seen here (and it is published at once) or sees
    it queued (and publishes it)."""
    from models.search import Rung
    from worker.search import WAIT, lock_sweep, settle_rungs

    job_id = lease.job_id
    session.rollback()
    if session.scalar(select(Job.cancel_requested).where(Job.id == job_id)):
        return _end(session, runtime, lease, job.uid, JobStatus.cancelled, f"cancelled at step {held.step}")
    progress = {**(job.progress or {}), "step": held.step, "held_at_step": held.step}
    progress.pop("promoted_at_step", None)
    lock_sweep(session, job.sweep_id)
    if not requeue_promoted(session, lease, progress, publish_later=True):
        return _superseded(session, job_id, lease)
    # settled again: a re-run that found its wait recorded (a retry of a cancelled point) may meet a closed rung
    released = [other for other in settle_rungs(session, job.sweep_id) if other != job_id]
    decided = session.scalar(select(Rung.decision).where(Rung.job_id == job_id, Rung.step == held.step))
    session.commit()
    release(session, runtime.broker, released)
    if decided != WAIT:
        publish(session, runtime.broker, session.get(Job, job_id))
    log.info("job %s: %s", job_id, held.reason)
    return Outcome("held", job_id, f"job {job_id} {held.reason}")


def _search_step(runtime: WorkerRuntime, session, job_id: int) -> None:
    """A sweep point of an ASHA or TPE search ended: Optuna is told, and a TPE sweep gets its next trials (before
    its evaluation's join is settled, so the evaluation waits for them too)."""
    session.expire_all()
    job = session.get(Job, job_id)
    if job is None or job.kind != JobKind.finetune or not (job.spec or {}).get("search"):
        return
    from worker import search

    try:
        search.trial_ended(runtime.settings, session, job)
        if job.sweep_id is not None:
            # a point that ended may close a rung others wait at (lazy ASHA)
            release(session, runtime.broker, search.settle_sweep(session, job.sweep_id))
            for trial in search.next_trials(runtime.settings, session, job.sweep_id):
                publish(session, runtime.broker, trial)
    except Exception as exc:  # the job's own outcome stands; a TPE sweep goes on with the trials it has
        session.rollback()
        log.exception("job %s: search bookkeeping failed: %s", job_id, exc)


def _superseded(session, job_id: int, lease: Lease) -> Outcome:
    """This attempt lost the job (the reaper took it as lost): the task says what became of the job."""
    session.expire_all()
    job = session.get(Job, job_id)
    status = job.status if job is not None else None
    if status == JobStatus.failed:
        return Outcome("failed", job_id, f"job {job_id} failed: {job.error}")
    if status == JobStatus.cancelled:
        return Outcome("cancelled", job_id, f"job {job_id} was cancelled")
    return Outcome("superseded", job_id, f"job {job_id}: attempt {lease.attempt} was taken as lost; "
                                         f"the job went on as attempt {job.attempts if job else '?'}")


def _call(function, task, runtime: WorkerRuntime, session, progress_session, job: Job, lease: Lease) -> dict:
    """Parse the spec and run the plain function, mirroring its progress into the row and into Celery's state."""
    task_id = task.request.id

    started = time.time()

    def on_progress(progress: dict) -> bool:
        if task_id:  # mirrored to Celery: AsyncResult.info has the dict, Flower the task's result line
            send_progress(task, job.id, progress, started)
        return report_progress(progress_session, lease, progress)

    spec = parse_spec(job.spec)
    if job.kind == JobKind.generate and spec.adapters and job.sweep_id is not None:
        from worker.search import waited_adapters  # a TPE sweep's evaluation also covers the trials added later

        spec = spec.model_copy(update={"adapters": waited_adapters(session, job, spec.adapters)})
    left_out = unfinished_outputs(session, job) if job.kind == JobKind.generate and spec.adapters else []
    if left_out and job.sweep_id is not None:  # an ASHA sweep may evaluate its best pruned points too
        from worker.search import evaluated_pruned

        left_out = evaluated_pruned(session, job, left_out)
    if left_out:  # a sweep's evaluation goes on with the adapters whose fine-tunes succeeded
        spec = spec.model_copy(update={"adapters": [a for a in spec.adapters if a not in left_out]})
    result = function(spec, session, runtime, lease, on_progress)
    return {**result, "left_out_adapters": left_out} if left_out else result


def _end(session, runtime: WorkerRuntime, lease: Lease, uid: str, status: JobStatus, error: str,
         trace: str | None = None) -> Outcome:
    session.rollback()
    if not finish(session, lease, status, error=error, traceback=tail(trace) if trace else None):
        return _superseded(session, lease.job_id, lease)
    forget_checkpoints(runtime.settings.home, uid)
    if status == JobStatus.failed:
        _search_step(runtime, session, lease.job_id)
    settle_children(session, runtime.broker, lease.job_id)
    word = "failed" if status == JobStatus.failed else "cancelled"
    return Outcome(word, lease.job_id, f"job {lease.job_id} {status.value}: {error}")


def tail(trace: str, lines: int = 40) -> str:
    """The last `lines` lines of a traceback: where it was raised and what, which is what `jobs show` needs."""
    return "\n".join(trace.rstrip().splitlines()[-lines:])


def success_text(job_id: int, kind: JobKind, result: dict) -> str:
    """One line for the task's result in Flower: the job and what it produced."""
    if kind == JobKind.finetune:
        losses = ", ".join(f"{k.replace('_', ' ')} {result[k]}" for k in ("train_loss", "eval_loss")
                           if result.get(k) is not None)
        return f"job {job_id} succeeded: adapter {result.get('adapter')} ({losses})" if losses else \
            f"job {job_id} succeeded: adapter {result.get('adapter')}"
    if kind == JobKind.generate:
        return f"job {job_id} succeeded: {result.get('rows')} rows for {len(result.get('variants') or [])} variants"
    means = ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, float))[:200]
    return f"job {job_id} succeeded: {result.get('examples')} examples scored ({means})"

