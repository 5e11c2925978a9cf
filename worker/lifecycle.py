"""Enqueueing: insert the job row (the source of truth), then publish only its id to Redis.

A job with an unfinished parent (or join, `JobWait`) is stored but not published; when a job finishes, the worker
publishes each child whose parents have all finished with one success, and marks skipped those whose parents all
failed or were cancelled (`settle_children`).
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.jobs import Job, JobKind, JobStatus, JobWait, children, readiness

TASK_NAMES = {kind: f"worker.tasks.{kind.value}" for kind in JobKind}


class BrokerUnavailable(RuntimeError):
    pass


def check_broker(app) -> None:
    """Fail fast, before any row is written, when Redis cannot be reached."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        raise BrokerUnavailable(f"cannot reach the broker at {mask(app.conf.broker_url)}: {exc}") from None


def mask(url: str) -> str:
    from models.settings import mask_url

    return mask_url(url or "")


MAX_PRIORITY = 9


def publish(session: Session, app, job: Job) -> None:
    """Send the job's id to the queue of its base model (worker/affinity.py); every (re)publish goes through here."""
    from celery.utils import uuid

    from worker.routing import register_queue, route

    job.queue, job.queued_at, job.celery_task_id = route(app, job.spec), utcnow(), uuid()
    session.commit()  # the row is complete before a worker can see the message
    register_queue(app, job.queue)
    # tunequeue's priority grows with urgency; the Redis transport serves 0 first, so the scale is turned over
    app.send_task(TASK_NAMES[job.kind], args=[job.id], queue=job.queue, priority=MAX_PRIORITY - job.priority,
                  task_id=job.celery_task_id)


def enqueue(session: Session, app, spec, parent: Job | None = None, *, waits_for: list[Job] = (),
            priority: int = 0, sweep_id: int | None = None, max_attempts: int = 3) -> Job:
    """Store the job (after `parent`, or after every job of `waits_for`) and publish it if it can run now."""
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between 0 and {MAX_PRIORITY}")
    if parent is not None and waits_for:
        raise ValueError("a job has one parent or a join of jobs it waits for, not both")
    job = Job(kind=JobKind(spec.kind), status=JobStatus.queued, spec=spec.model_dump(mode="json"),
              parent_id=parent.id if parent else None, attempts=0, cancel_requested=False, priority=priority,
              sweep_id=sweep_id, max_attempts=max_attempts)
    session.add(job)
    session.flush()
    session.add_all([JobWait(job_id=job.id, waits_for_id=other.id) for other in waits_for])
    session.commit()
    state, reason = readiness(session, job)
    if state == "ready":
        publish(session, app, job)
    elif state == "skip":
        skip(session, job.id, reason)
    return job


def skip(session: Session, job_id: int, reason: str) -> bool:
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
                           .values(status=JobStatus.skipped, error=reason, finished_at=utcnow()))
    session.commit()
    return bool(done.rowcount)


def settle_children(session: Session, app, job_id: int) -> None:
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
                    publish(session, app, session.get(Job, child.id))
            elif state == "skip" and skip(session, child.id, reason):
                pending.append(child.id)


def cancel(session: Session, app, job: Job) -> str:
    """Cancel a queued job at once; ask a running one to stop at its next step. Returns what happened."""
    if job.status == JobStatus.queued:
        done = session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.queued)
                               .values(status=JobStatus.cancelled, finished_at=utcnow(), error="cancelled by user"))
        session.commit()
        if done.rowcount:
            settle_children(session, app, job.id)  # a join may run without this job
            return "cancelled"
    if job.status in (JobStatus.queued, JobStatus.running):
        session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
        session.commit()
        return "cancel requested"
    return f"already {job.status.value}"


def latest_jobs(session: Session, limit: int = 50, status: JobStatus | None = None) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    return list(session.scalars(query))
