"""The jobs table: one row per fine-tune, generate or score job, with its validated spec and its lifecycle.

Ownership is fenced: each claim of a job is a new attempt, and the attempt number is the worker's lease. Every
write a worker makes about the job (its row, its result rows, its files) happens inside a transaction that first
touches the job row on the condition that the job is still running under that attempt (`Lease.hold`); the row lock
that update takes keeps the reaper and a newer attempt out until the commit. A worker that stalled and lost the job
finds the condition false, raises `LeaseLost`, and writes nothing.
"""

from __future__ import annotations

import contextlib
import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator, Optional

from sqlalchemy import JSON, DateTime, Enum, ForeignKey, Index, Integer, String, Text, select, text, true, update
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from models import sweeps  # noqa: F401 (jobs.sweep_id points at its table, which must be loaded)
from models.base import Base, utcnow
from models.errors import LeaseLost


class JobKind(str, enum.Enum):
    finetune = "finetune"
    generate = "generate"
    score = "score"


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"  # a parent job failed or was cancelled
    pruned = "pruned"  # a sweep point stopped early by successive halving; its adapter is kept at that step

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.skipped,
                        JobStatus.pruned)


ACTIVE_STATUSES = ("queued", "running")


def new_uid() -> str:
    return uuid.uuid4().hex


class Job(Base):
    __tablename__ = "jobs"
    # an adapter name is reserved by the fine-tune that will write it while that job is queued or running, so two
    # submissions of one name cannot both be accepted, however close together they come
    __table_args__ = (Index("uq_active_output_name", "output_name", unique=True,
                            postgresql_where=text("status IN ('queued', 'running')"),
                            sqlite_where=text("status IN ('queued', 'running')")),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # unique across databases that share a TUNEQUEUE_HOME: checkpoints are kept under it, never under the id
    uid: Mapped[str] = mapped_column(String(32), default=new_uid, unique=True)
    output_name: Mapped[Optional[str]] = mapped_column(String(64))  # the adapter a fine-tune writes
    kind: Mapped[JobKind] = mapped_column(Enum(JobKind, native_enum=False, length=16))
    status: Mapped[JobStatus] = mapped_column(Enum(JobStatus, native_enum=False, length=16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    sweep_id: Mapped[Optional[int]] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"), index=True)
    # the API token that submitted it (NULL: the CLI, or a sweep's or pipeline's own follow-up jobs from the CLI)
    token_id: Mapped[Optional[int]] = mapped_column(ForeignKey("api_tokens.id", ondelete="SET NULL"))
    priority: Mapped[int] = mapped_column(Integer, default=0)  # 0..9, higher runs first
    celery_task_id: Mapped[Optional[str]] = mapped_column(String(64))
    queue: Mapped[Optional[str]] = mapped_column(String(255))  # the broker queue it was last published to
    queued_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))  # when it was last published
    worker_host: Mapped[Optional[str]] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    attempt_errors: Mapped[Optional[list]] = mapped_column(JSON)  # one entry per failed or lost attempt
    error: Mapped[Optional[str]] = mapped_column(Text)
    traceback: Mapped[Optional[str]] = mapped_column(Text)  # the last lines of the latest failed attempt's traceback
    progress: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    result: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    # a join's rows (JobWait), loaded with the job so lists show them after the session is gone
    waits: Mapped[list["JobWait"]] = relationship(foreign_keys="JobWait.job_id", lazy="selectin", viewonly=True)

    @property
    def waits_for_ids(self) -> list[int]:
        """The jobs a join waits for (a sweep's evaluation: its fine-tunes); empty for a job with a parent or none."""
        return sorted(w.waits_for_id for w in self.waits)

    @property
    def duration_s(self) -> Optional[float]:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    @property
    def queue_wait_s(self) -> Optional[float]:
        """Seconds between the last publish and the start of the last attempt."""
        if self.queued_at and self.started_at:
            return max(0.0, (_aware(self.started_at) - _aware(self.queued_at)).total_seconds())
        return None


@dataclass(frozen=True)
class Lease:
    """Attempt `attempt` of job `job_id`: what a worker holds between its claim and the job's outcome."""

    job_id: int
    attempt: int

    def hold(self, session: Session) -> None:
        """Fence: touch the job row in the session's transaction, on the condition that this attempt still runs the
        job. Call it first in every transaction that writes for the job; the lock lasts until that commit. Raises
        LeaseLost (after a rollback) when another attempt has the job now."""
        held = session.execute(update(Job).where(*self._mine()).values(heartbeat_at=utcnow()))
        if held.rowcount != 1:
            session.rollback()
            raise LeaseLost(f"job {self.job_id}: attempt {self.attempt} no longer holds it; another attempt runs it")

    @contextlib.contextmanager
    def held(self, session: Session) -> Iterator[None]:
        """The block runs while this attempt holds the job (the row stays locked until the commit at its end)."""
        self.hold(session)
        try:
            yield
            session.commit()
        except BaseException:
            session.rollback()
            raise

    def _mine(self) -> tuple:
        return Job.id == self.job_id, Job.attempts == self.attempt, Job.status == JobStatus.running


def claim(session: Session, job_id: int, task_id: str | None, host: str) -> Lease | None:
    """Move a queued job to running as a new attempt; None when another delivery already took it, it was cancelled,
    or the message is not the job's latest publish (`task_id` differs: an older message, or one left for a deleted
    job whose id a new job took)."""
    now = utcnow()
    latest = (Job.celery_task_id.is_(None) | (Job.celery_task_id == task_id)) if task_id else true()
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, latest)
        .values(status=JobStatus.running, started_at=now, heartbeat_at=now, celery_task_id=task_id,
                worker_host=host, attempts=Job.attempts + 1, error=None)
        .returning(Job.attempts)
    ).scalar()
    session.commit()
    return None if attempt is None else Lease(job_id, attempt)


def claim_sibling(session: Session, job_id: int, host: str, lead_id: int) -> Lease | None:
    """Claim a queued fine-tune that never ran for the co-trained pass job `lead_id` runs (its message stays in the
    broker, and finds the job taken); None when it is no longer queued or has run before."""
    now = utcnow()
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, Job.attempts == 0, Job.cancel_requested.is_(False))
        .values(status=JobStatus.running, started_at=now, heartbeat_at=now, worker_host=host,
                attempts=Job.attempts + 1, error=None, progress={"co_trained_in_job": lead_id})
        .returning(Job.attempts)
    ).scalar()
    session.commit()
    return None if attempt is None else Lease(job_id, attempt)


def finish(session: Session, lease: Lease, status: JobStatus, *, error: str | None = None,
           result: dict | None = None, traceback: str | None = None) -> bool:
    """Record the outcome of the attempt `lease` holds (guarded: only that running attempt can finish the job)."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
    if result is not None:
        values["result"] = result
    if traceback is not None:
        values["traceback"] = traceback
    updated = session.execute(update(Job).where(*lease._mine()).values(**values))
    session.commit()
    return updated.rowcount == 1


def fail_attempt(session: Session, job_id: int, error: str, *, attempt: int | None = None,
                 only_if_stale_before: datetime | None = None, traceback: str | None = None) -> JobStatus | None:
    """Record a failed (or lost) attempt of a running job: back to queued while attempts remain, else failed.

    Guarded: returns None when the job is no longer running, when `attempt` is given and is not the current one, or
    (for the reaper) when its heartbeat is fresh.
    """
    query = (select(Job).where(Job.id == job_id, Job.status == JobStatus.running).with_for_update()
             .execution_options(populate_existing=True))  # the session may hold this row from before the claim
    job = session.scalar(query)
    if job is None or (attempt is not None and job.attempts != attempt) or (
            only_if_stale_before is not None and job.heartbeat_at and _aware(job.heartbeat_at) >= only_if_stale_before):
        session.rollback()
        return None
    history = list(job.attempt_errors or []) + [{"attempt": job.attempts, "error": error, "at": utcnow().isoformat(),
                                                  "worker_host": job.worker_host}]
    # a successive-halving promotion re-queues the job as a new attempt (a new lease) without being a failure
    retry = job.attempts - promotions(session, job_id) < job.max_attempts
    job.attempt_errors = history
    job.status = JobStatus.queued if retry else JobStatus.failed
    job.error = error if not retry else None
    job.finished_at = None if retry else utcnow()
    if traceback is not None:
        job.traceback = traceback
    session.commit()
    return job.status


def promotions(session: Session, job_id: int) -> int:
    """How many rungs re-queued the job as a new attempt that is not a failure: each it passed, and under lazy
    promotion each it waited at (promoted or pruned there later, or still waiting: it resumes there)."""
    from sqlalchemy import func

    from models.search import Rung

    lazy = ((session.scalar(select(Job.spec).where(Job.id == job_id)) or {}).get("search") or {}).get(
        "promotion") == "lazy"
    requeued = ("promote", "prune", "wait") if lazy else ("promote",)
    return session.scalar(select(func.count()).select_from(Rung).where(Rung.job_id == job_id,
                                                                       Rung.decision.in_(requeued))) or 0


def requeue_promoted(session: Session, lease: Lease, progress: dict, *, publish_later: bool = False) -> bool:
    """A sweep point that passed its rung (or waits there, `publish_later`: the caller commits) goes back to queued
    (guarded by its lease), to resume from its checkpoint on whichever worker takes it next; False when the attempt
    no longer holds the job."""
    updated = session.execute(update(Job).where(*lease._mine()).values(status=JobStatus.queued, progress=progress,
                                                                       error=None))
    if not publish_later or updated.rowcount != 1:
        session.commit()
    return updated.rowcount == 1


def _aware(moment: datetime) -> datetime:
    from datetime import timezone

    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def stale_running(session: Session, stale_before: datetime) -> list[Job]:
    jobs = session.scalars(select(Job).where(Job.status == JobStatus.running)).all()
    return [j for j in jobs if j.heartbeat_at is None or _aware(j.heartbeat_at) < stale_before]


def heartbeat(session: Session, lease: Lease) -> bool:
    """Touch the row while this attempt still holds the job; False once it does not."""
    touched = session.execute(update(Job).where(*lease._mine()).values(heartbeat_at=utcnow()))
    session.commit()
    return touched.rowcount == 1


def report_progress(session: Session, lease: Lease, progress: dict) -> bool:
    """Store progress and beat the heartbeat (fenced: LeaseLost when this attempt lost the job); returns whether a
    cancel was requested."""
    lease.hold(session)
    session.execute(update(Job).where(Job.id == lease.job_id).values(progress=progress))
    cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == lease.job_id)))
    session.commit()
    return cancel


class JobWait(Base):
    """A join: the job runs once every job it waits for has finished and at least one of them succeeded (a sweep's
    evaluation waits for all its fine-tunes). A job has either one `parent_id` or rows here."""

    __tablename__ = "job_waits"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    waits_for_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True, index=True)


def parent_ids(session: Session, job: Job) -> list[int]:
    """Every job `job` waits for: its parent, or the jobs of its join."""
    if job.parent_id is not None:
        return [job.parent_id]
    return list(session.scalars(select(JobWait.waits_for_id).where(JobWait.job_id == job.id)
                                .order_by(JobWait.waits_for_id)))


def readiness(session: Session, job: Job) -> tuple[str, str]:
    """("ready" | "wait" | "skip", reason): a job runs when all its parents have finished and one succeeded."""
    if job.kind == JobKind.finetune and ((job.spec or {}).get("search") or {}).get("promotion") == "lazy":
        from models.search import Rung

        last = session.scalar(select(Rung.decision).where(Rung.job_id == job.id).order_by(Rung.step.desc()).limit(1))
        if last == "wait":
            return "wait", "waits at its rung"
    ids = parent_ids(session, job)
    if not ids:
        return "ready", ""
    statuses = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).tuples().all())
    statuses = {i: JobStatus(s) for i, s in statuses.items()}
    if any(not s.finished for s in statuses.values()):
        return "wait", ""
    if any(s == JobStatus.succeeded for s in statuses.values()):
        return "ready", ""
    if len(ids) == 1:
        status = statuses.get(ids[0])
        verb = {JobStatus.failed: "failed", JobStatus.cancelled: "was cancelled"}.get(status, "was skipped")
        return "skip", f"parent job {ids[0]} {verb}"
    return "skip", f"none of the jobs it waits for ({', '.join(map(str, ids))}) succeeded"


def unfinished_outputs(session: Session, job: Job) -> list[str]:
    """Adapter names that fine-tunes this job waits for did not produce (they failed, were cancelled or skipped)."""
    ids = parent_ids(session, job)
    rows = session.execute(select(Job.spec).where(Job.id.in_(ids), Job.kind == JobKind.finetune,
                                                  Job.status != JobStatus.succeeded)).scalars()
    return sorted(spec["name"] for spec in rows if spec.get("name"))


def children(session: Session, job_id: int) -> list[Job]:
    """Jobs that wait for `job_id`, as their parent or in a join."""
    joined = select(JobWait.job_id).where(JobWait.waits_for_id == job_id)
    query = select(Job).where((Job.parent_id == job_id) | Job.id.in_(joined)).order_by(Job.id)
    return list(session.scalars(query.execution_options(populate_existing=True)))  # sessions keep rows past commits
