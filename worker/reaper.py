"""Putting lost work back: jobs whose worker died (heartbeat stopped) and queued jobs whose message vanished.

`reconcile()` is run by every worker periodically and by `manage.py jobs reconcile`. Both repairs are safe to repeat
and to race: a job is claimed with a guarded update, so an extra message for it does nothing. A job the reaper
fails for good or skips is announced like one the runner ends (worker/notify.py: the webhook, the sweep's end).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.jobs import Job, JobStatus, fail_attempt, readiness, stale_running
from worker import notify
from worker.broker import Broker
from worker.jobs.checkpoint import forget_checkpoints
from worker.lifecycle import publish, release, settle_children, skip

log = logging.getLogger("tunequeue.reaper")


def reap_lost_workers(session: Session, broker: Broker, stale_seconds: float) -> list[tuple[int, str]]:
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    outcomes = []
    for job in stale_running(session, cutoff):
        error = (f"worker lost: no heartbeat for over {stale_seconds:g}s "
                 f"(host {job.worker_host}, attempt {job.attempts})")
        status = fail_attempt(session, job.id, error, only_if_stale_before=cutoff)
        if status == JobStatus.queued:
            publish(session, broker, session.get(Job, job.id))
        elif status == JobStatus.failed:
            forget_checkpoints(broker.settings.home, job.uid)
            settle_children(session, broker, job.id)
        if status is not None:
            log.warning("job %s: %s -> %s", job.id, error, status.value)
            outcomes.append((job.id, status.value))
        if status == JobStatus.failed:
            notify.job_ended(broker.settings, session, job.id)
    return outcomes


def republish_lost_messages(session: Session, broker: Broker) -> list[int]:
    """Queued jobs that should be in the broker (their parents have finished, one succeeded) but are not: publish
    them again. A job whose parents all finished without success (its settling was lost) is skipped."""
    queued = list(session.scalars(select(Job).where(Job.status == JobStatus.queued)))
    queues = set(broker.known_queues()) | {job.queue for job in queued if job.queue}
    waiting = broker.waiting_job_ids(sorted(queues))
    lost = []
    for job in queued:
        if job.id in waiting:
            continue
        state, reason = readiness(session, job)
        if state == "skip":
            skipped = skip(session, job.id, reason)
            settle_children(session, broker, job.id)
            if skipped:
                notify.job_ended(broker.settings, session, job.id)
        if state != "ready":
            continue
        publish(session, broker, job)
        lost.append(job.id)
    if lost:
        log.warning("re-published %d queued jobs whose messages were missing: %s", len(lost), lost)
    return lost


def settle_waiting_points(session: Session, broker: Broker) -> list[int]:
    """Sweeps with points waiting at a rung (lazy ASHA) are settled again: a point cancelled or failed outside a
    worker's run (or a worker that died between ending a point and settling) may have closed a rung."""
    from models.search import Rung
    from worker.search import settle_sweep

    sweeps = set(session.scalars(select(Job.sweep_id).join(Rung, Rung.job_id == Job.id)
                                 .where(Rung.decision == "wait", Job.status == JobStatus.queued).distinct()))
    session.commit()
    released = []
    for sweep_id in sorted(s for s in sweeps if s is not None):
        decided = settle_sweep(session, sweep_id)
        release(session, broker, decided)
        released += decided
    if released:
        log.warning("settled %d sweep points waiting at their rungs: %s", len(released), released)
    return released


def reconcile(session: Session, broker: Broker, stale_seconds: float) -> dict:
    return {"requeued_or_failed": reap_lost_workers(session, broker, stale_seconds),
            "settled": settle_waiting_points(session, broker),
            "republished": republish_lost_messages(session, broker)}


class ReaperThread(threading.Thread):
    """Runs `reconcile()` every `interval` seconds inside a worker process."""

    def __init__(self, broker: Broker, sessions, interval: float, stale_seconds: float):
        super().__init__(daemon=True, name="tunequeue-reaper")
        self.broker, self.sessions, self.interval, self.stale_seconds = broker, sessions, interval, stale_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with self.sessions() as session:
                    reconcile(session, self.broker, self.stale_seconds)
            except Exception as exc:  # the broker or database may be briefly away; try again next round
                log.warning("reaper round failed: %s", exc)
