"""Co-training in the worker: a sweep's LoRA point takes its compatible queued siblings into one training pass.

With `TUNEQUEUE_COTRAIN=K` (K > 1; 8 by default), a worker starting the first attempt of a sweep's fine-tune claims
up to K − 1 other points of the same sweep that are queued, have never run and that `compatible()` accepts (the same
base, data and schedule; their own learning rate, rank, alpha, warm-up, clipping), and trains them all at once with
`train_adapters_together` (worker/jobs/cotrain.py) on its resident base: each adapter ends as it would alone, to
float rounding. Other workers idle on the same queue get an even share: a pass takes ⌈points / (1 + idle workers)⌉.
Each claimed point is an attempt of its own job: its heartbeat, its progress and cancel flag, its outcome recorded
as a run alone records it (succeeded; failed when its loss stops being a number; cancelled), its children settled.
Each point checkpoints into its own job's checkpoint file as a run alone does: the points of a pass that fails, or
whose worker dies, are retried one by one, each resuming alone from its last checkpoint. Each point's own Celery
message, delivered later, finds it taken and ends its task with the job's outcome (worker/runner.py `_not_claimed`).
"""

from __future__ import annotations

import logging
import math
import socket
from typing import Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import JobCancelled, JobFailed
from models.jobs import Job, JobKind, JobStatus, Lease, claim_sibling, fail_attempt, finish, report_progress
from models.specs import FinetuneSpec
from worker.jobs.checkpoint import forget_checkpoints

log = logging.getLogger("tunequeue.cotrain")


def pick_siblings(session: Session, limit: int, job: Job, spec: FinetuneSpec, resolve) -> list[Job]:
    """Up to `limit` queued, published, never-run fine-tunes of `job`'s sweep that can be trained together with
    it (`resolve` gives a spec its model kind), in the order a worker would take them."""
    from worker.jobs.cotrain import compatible

    if limit < 1 or job.sweep_id is None or compatible([spec]):
        return []
    candidates = session.scalars(select(Job).where(
        Job.sweep_id == job.sweep_id, Job.kind == JobKind.finetune, Job.status == JobStatus.queued,
        Job.attempts == 0, Job.queued_at.is_not(None), Job.cancel_requested.is_(False), Job.id != job.id)
        .order_by(Job.priority.desc(), Job.id))
    chosen: list[tuple[Job, FinetuneSpec]] = []
    for candidate in candidates:
        if len(chosen) >= limit:
            break
        try:
            other = resolve(FinetuneSpec.model_validate(candidate.spec))
        except Exception:  # a spec this worker cannot read: it runs alone and says why
            continue
        if compatible([spec, *(s for _, s in chosen), other]) is None:
            chosen.append((candidate, other))
    session.commit()
    return [candidate for candidate, _ in chosen]


def fair_share(points: int, idle_peers: int) -> int:
    """How many of `points` queued compatible points (the lead among them) one pass takes when `idle_peers` other
    workers wait on the same queue: an even split, so that idle workers get points of their own to train."""
    return max(1, math.ceil(points / (1 + max(0, idle_peers))))


def idle_peers(runtime, queue: Optional[str]) -> int:
    """Other live workers consuming `queue` with no job at the moment (worker/registry.py records); 0 when the
    registry cannot be read (the pass then takes what it may)."""
    if not queue or runtime.broker is None:
        return 0
    me = runtime.record.hostname if getattr(runtime, "record", None) is not None else None
    try:
        records = runtime.broker.live_workers()
    except Exception as exc:
        log.warning("co-training: the worker registry could not be read (%s); taking points as if alone", exc)
        return 0
    return sum(1 for record in records if record.get("hostname") != me and record.get("current_job") is None
               and queue in (record.get("queues") or []))


def train_with_siblings(spec: FinetuneSpec, session: Session, runtime, lease: Lease, on_progress) -> Optional[dict]:
    """The lead point's summary after a co-trained pass with the siblings it could claim; None when there are none
    (the caller trains it alone). A point that left the pass ends as its run alone would; the lead's own failure or
    cancel is raised for the runner."""
    from worker.jobs.cotrain import train_adapters_together
    from worker.ml.kinds import resolve_model_kind

    settings = runtime.settings
    if settings.cotrain <= 1 or lease.attempt != 1 or spec.search is not None:
        return None
    lead = session.get(Job, lease.job_id)
    spec = resolve_model_kind(spec)
    host = lead.worker_host or socket.gethostname()
    siblings = pick_siblings(session, settings.cotrain - 1, lead, spec, resolve_model_kind)
    siblings = siblings[:fair_share(len(siblings) + 1, idle_peers(runtime, lead.queue)) - 1]
    claimed = [(job, claim_sibling(session, job.id, host, lead.id)) for job in siblings]
    claimed = [(job, sibling_lease) for job, sibling_lease in claimed if sibling_lease is not None]
    if not claimed:
        return None
    log.info("job %s: co-training with jobs %s", lead.id, [job.id for job, _ in claimed])
    from worker.heartbeat import Heartbeat

    beats = [Heartbeat(runtime.sessions, sibling_lease, settings.heartbeat_seconds) for _, sibling_lease in claimed]
    for beat in beats:
        beat.start()
    progress_session = runtime.sessions()

    def sibling_progress(sibling_lease: Lease):
        return lambda progress: report_progress(progress_session, sibling_lease,
                                                {**progress, "co_trained_in_job": lead.id})

    specs = [spec] + [FinetuneSpec.model_validate(job.spec) for job, _ in claimed]
    try:
        results = train_adapters_together(
            specs, session, runtime.cache, settings.home, job_ids=[lead.id] + [job.id for job, _ in claimed],
            on_progress=[on_progress] + [sibling_progress(sibling_lease) for _, sibling_lease in claimed],
            leases=[lease] + [sibling_lease for _, sibling_lease in claimed])
    except BaseException as exc:
        session.rollback()
        for job, sibling_lease in claimed:  # each goes back to the queue, to run alone
            _retry_alone(session, runtime, job.id, sibling_lease, f"its co-trained pass (job {lead.id}) failed: "
                                                                  f"{exc.__class__.__name__}: {exc}")
        raise
    finally:
        for beat in beats:
            beat.stopped.set()
        progress_session.close()
    for (job, sibling_lease), result in zip(claimed, results[1:]):
        _end_sibling(session, runtime, job, sibling_lease, result, lead.id)
    own = results[0]
    if "failed" in own:
        raise JobFailed(own["failed"])
    if "cancelled" in own:
        raise JobCancelled(own["cancelled"])
    return own


def _retry_alone(session: Session, runtime, job_id: int, lease: Lease, error: str) -> None:
    from worker.lifecycle import publish

    status = fail_attempt(session, job_id, error, attempt=lease.attempt)
    if status == JobStatus.queued:
        publish(session, runtime.broker, session.get(Job, job_id))
    elif status == JobStatus.failed:
        _settle(session, runtime, job_id)


def _end_sibling(session: Session, runtime, job: Job, lease: Lease, result: dict, lead_id: int) -> None:
    if "failed" in result:
        status, error, recorded = JobStatus.failed, result["failed"], None
    elif "cancelled" in result:
        status, error, recorded = JobStatus.cancelled, result["cancelled"], None
    else:
        status, error, recorded = JobStatus.succeeded, None, {**result, "co_trained_in_job": lead_id}
    if not finish(session, lease, status, error=error, result=recorded):
        log.warning("job %s: lost before its co-trained outcome was recorded", job.id)
        return
    forget_checkpoints(runtime.settings.home, job.uid)
    log.info("job %s (finetune) %s in job %s's co-trained pass", job.id, status.value, lead_id)
    _settle(session, runtime, job.id)


def _settle(session: Session, runtime, job_id: int) -> None:
    from worker import notify
    from worker.lifecycle import settle_children

    settle_children(session, runtime.broker, job_id)
    notify.job_ended(runtime.settings, session, job_id)  # never raises
