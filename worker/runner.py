"""Runs one job inside a worker: claim the row, call the job's plain function, record the outcome, release children.

Outcomes follow the error tree (models/errors.py): `JobCancelled` → cancelled; `JobFailed` or `InputError` (the
job can never succeed: bad data, an unsupported method) → failed at once; `LeaseLost` (the attempt stalled and the
job went to another) → nothing at all is written; anything else is a failed attempt, retried while attempts remain.
Every write goes through the attempt's `Lease` (models/jobs.py). A job's checkpoints are removed once it has ended.
"""

from __future__ import annotations

import logging
import socket
import threading
import traceback

from sqlalchemy.orm import sessionmaker

from models.errors import InputError, JobCancelled, JobFailed, LeaseLost
from models.jobs import (Job, JobKind, JobStatus, Lease, claim, fail_attempt, finish, heartbeat, report_progress,
                         unfinished_outputs)
from models.specs import parse_spec
from worker.jobs.checkpoint import forget_checkpoints
from worker.lifecycle import publish, settle_children
from worker.runtime import WorkerRuntime
from worker.tasks import JOBS, TASK_NAMES

log = logging.getLogger("tunequeue.worker")


class Heartbeat(threading.Thread):
    """Touches the running job's row every few seconds, even while one long step runs, so the reaper can tell a
    slow job from a dead worker."""

    def __init__(self, sessions: sessionmaker, lease: Lease, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{lease.job_id}")
        self.sessions, self.lease, self.interval = sessions, lease, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with self.sessions() as session:
                    if not heartbeat(session, self.lease):
                        return  # the attempt lost the job: the job's next step finds out and stops
            except Exception as exc:
                log.warning("heartbeat of job %s failed: %s", self.lease.job_id, exc)


def register_tasks(app, runtime: WorkerRuntime) -> None:
    """One thin bound task per job kind (worker/tasks.py), registered on `app` and running jobs with `runtime`."""
    for kind, function in JOBS.items():
        app.task(name=TASK_NAMES[kind], bind=True)(_task(kind, function, runtime))


def _task(kind: JobKind, function, runtime: WorkerRuntime):
    def task(self, job_id: int) -> str:
        return run_job(self, runtime, job_id, kind, function)

    task.__name__ = task.__qualname__ = kind.value
    return task


def run_job(task, runtime: WorkerRuntime, job_id: int, kind: JobKind, function) -> str:
    """Run job `job_id` for Celery task `task` (bound) with `function` (the kind's plain function, worker/tasks.py);
    returns the outcome as a word."""
    if not isinstance(job_id, int) or job_id <= 0:
        raise ValueError(f"job id must be a positive integer, got {job_id!r}")
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.kind != kind:
            log.error("job %s is not a %s job in the database; message dropped", job_id, kind.value)
            return "missing"
        # the Celery node name tells apart two workers on one machine (and matches `manage.py workers`)
        lease = claim(session, job_id, task.request.id, task.request.hostname or socket.gethostname())
        if lease is None:
            log.warning("job %s is %s, not queued; this delivery does nothing", job_id, job.status.value)
            return "not-queued"
        log.info("job %s (%s) started, attempt %s", job_id, kind.value, lease.attempt)
        base, uid = job.spec.get("model"), job.uid
        runtime.note_job(job_id, base)
        beat = Heartbeat(runtime.sessions, lease, runtime.settings.heartbeat_seconds)
        beat.start()
        try:
            with runtime.sessions() as progress_session:
                result = _call(function, task, runtime, session, progress_session, job, lease)
        except LeaseLost as exc:
            session.rollback()
            log.warning("job %s: attempt %s stopped, writing nothing: %s", job_id, lease.attempt, exc)
            return "lease-lost"
        except JobCancelled as exc:
            return _end(session, runtime, lease, uid, JobStatus.cancelled, str(exc))
        except (JobFailed, InputError) as exc:  # no retry can help
            log.error("job %s failed: %s", job_id, exc)
            return _end(session, runtime, lease, uid, JobStatus.failed, str(exc))
        except Exception as exc:
            session.rollback()
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            status = fail_attempt(session, job_id, f"{exc.__class__.__name__}: {exc}", attempt=lease.attempt)
            if status == JobStatus.queued:  # attempts remain: run it again (a fine-tune resumes from its checkpoint)
                publish(session, runtime.broker, session.get(Job, job_id))
                return "retrying"
            if status == JobStatus.failed:
                forget_checkpoints(runtime.settings.home, uid)
                settle_children(session, runtime.broker, job_id)
            return "failed"
        finally:
            beat.stopped.set()
            runtime.note_job(None, base)  # loaded bases' queues first from the next message on
        if not finish(session, lease, JobStatus.succeeded, result=result):
            log.warning("job %s: attempt %s lost the job before recording its outcome", job_id, lease.attempt)
            return "lease-lost"
        log.info("job %s (%s) succeeded: %s", job_id, kind.value, result)
        forget_checkpoints(runtime.settings.home, uid)
        settle_children(session, runtime.broker, job_id)
        return "succeeded"


def _call(function, task, runtime: WorkerRuntime, session, progress_session, job: Job, lease: Lease) -> dict:
    """Parse the spec and run the plain function, mirroring its progress into the row and into Celery's state."""
    task_id = task.request.id

    def on_progress(progress: dict) -> bool:
        if task_id:  # mirrored to Celery so Flower and AsyncResult see PROGRESS with the same meta
            task.update_state(state="PROGRESS", meta={"job_id": job.id, **progress})
            task.send_event("task-progress", job_id=job.id, **progress)
        return report_progress(progress_session, lease, progress)

    spec = parse_spec(job.spec)
    left_out = unfinished_outputs(session, job) if job.kind == JobKind.generate and spec.adapters else []
    if left_out:  # a sweep's evaluation goes on with the adapters whose fine-tunes succeeded
        spec = spec.model_copy(update={"adapters": [a for a in spec.adapters if a not in left_out]})
    result = function(spec, session, runtime, lease, on_progress)
    return {**result, "left_out_adapters": left_out} if left_out else result


def _end(session, runtime: WorkerRuntime, lease: Lease, uid: str, status: JobStatus, error: str) -> str:
    session.rollback()
    if not finish(session, lease, status, error=error):
        return "lease-lost"
    forget_checkpoints(runtime.settings.home, uid)
    settle_children(session, runtime.broker, lease.job_id)
    return status.value

