"""Job state changes shared by every door and the worker: publish a stored job, skip one that can never run, and
settle the children of a finished job.

A job with an unfinished parent (or join, `JobWait`) is stored but not published; when a job finishes, the worker
publishes each child whose parents have all finished with one success, and marks skipped those whose parents all
failed or were cancelled (`settle_children`).
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.jobs import Job, JobStatus, children, readiness
from models.sweeps import Sweep
from worker.broker import Broker
from worker.routing import route
from worker.task_names import task_title


def publish(session: Session, broker: Broker, job: Job) -> None:
    """Send the job's id to the queue of its base model (worker/routing.py); every (re)publish goes through here.
    The message carries a readable task name for Flower (`worker.task_names.task_title`) and, for a retry, the number of
    attempts made so far."""
    from celery.utils import uuid

    job.queue, job.queued_at, job.celery_task_id = route(broker.queue, job.spec), utcnow(), uuid()
    session.commit()  # the row is complete before a worker can see the message
    sweep = session.get(Sweep, job.sweep_id).name if job.sweep_id else None
    title = task_title(job.kind, job.id, job.spec, sweep=sweep, attempt=job.attempts + 1)
    broker.register_queue(job.queue)
    broker.send(job.kind, job.id, queue=job.queue, priority=job.priority, task_id=job.celery_task_id,
                title=title, retries=job.attempts)


def release(session: Session, broker: Broker, job_ids) -> None:
    """Publish the sweep points their rung has just promoted or pruned (lazy ASHA) that wait in the queue; a point
    still running when it was decided publishes itself (worker/runner.py `_held`)."""
    for job_id in job_ids:
        job = session.get(Job, job_id, populate_existing=True)
        if job is not None and job.status == JobStatus.queued:
            publish(session, broker, job)


def skip(session: Session, job_id: int, reason: str) -> bool:
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
                           .values(status=JobStatus.skipped, error=reason, finished_at=utcnow()))
    session.commit()
    return bool(done.rowcount)


def settle_children(session: Session, broker: Broker, job_id: int) -> None:
    """After job `job_id` finished (any outcome): publish the children that can run now, skip those that never can
    (and, in turn, theirs). Safe to race: only the caller that sets a child's first `queued_at` publishes it."""
    pending = [job_id]
    while pending:
        for child in children(session, pending.pop()):
            if child.status != JobStatus.queued:
                continue
            state, reason = readiness(session, child)
            if state == "ready" and child.queued_at is None:
                first = session.execute(update(Job).where(Job.id == child.id, Job.status == JobStatus.queued,
                                                          Job.queued_at.is_(None)).values(queued_at=utcnow()))
                session.commit()
                if first.rowcount:
                    publish(session, broker, session.get(Job, child.id))
            elif state == "skip" and skip(session, child.id, reason):
                pending.append(child.id)
