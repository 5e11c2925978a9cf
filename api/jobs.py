"""Jobs as every door sees them: submit (validate, store, publish), wait, list, show, cancel and reconcile.

Enqueueing writes every row of a submission (a job, a pipeline, a whole sweep) in one transaction, then publishes
only the ids of the jobs that can run now (worker/lifecycle.py); a job with an unfinished parent (or join) is stored
but not published, and the worker that finishes the parent publishes it. If the broker fails while publishing, the
rows are kept and `jobs reconcile` (or any worker's reaper) publishes what is missing; the error says so.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Optional

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.context import AppContext
from api.validate import check_code_metrics, validate
from models.base import utcnow
from models.errors import InputError, NotFound, Unavailable
from models.jobs import Job, JobKind, JobStatus, JobWait, readiness
from models.report import sweep_by_name
from models.specs import MAX_ID, Submission, parse_spec
from models.tokens import ApiToken
from worker import notify
from worker.broker import MAX_PRIORITY
from worker.lifecycle import publish, settle_children, skip


def submit(ctx: AppContext, data: dict, submission: Submission = Submission(), *, model_given: bool = True,
           token_id: int | None = None) -> Job:
    """Build the spec from `data` (None values mean the defaults), check it against the world and the broker, then
    store and publish the job (recorded as submitted by API token `token_id`, if any). Raises InputError (nothing
    written) or Unavailable."""
    spec = parse_spec(data)
    check_code_metrics(ctx.code_metrics, getattr(spec, "metrics", None))
    with ctx.session() as session:
        spec = validate(spec, session, ctx.settings.home, model_given=model_given)
        ctx.broker.check()
        job = enqueue(session, ctx.broker, spec, priority=submission.priority, max_attempts=submission.max_attempts,
                      token_id=token_id)
        session.refresh(job)  # loads its join rows too, so the caller can show it after the session is gone
        return job


def enqueue(session: Session, broker, spec, parent: Job | None = None, *, waits_for: list[Job] = (),
            priority: int = 0, sweep_id: int | None = None, max_attempts: int = 3, token_id: int | None = None) -> Job:
    """Store one job (after `parent`, or after every job of `waits_for`) and publish it if it can run now."""
    job = stage(session, spec, parent, waits_for=waits_for, priority=priority, sweep_id=sweep_id,
                max_attempts=max_attempts, token_id=token_id)
    commit_staged(session)
    release(session, broker, [job], what=f"job {job.id}")
    return job


def stage(session: Session, spec, parent: Job | None = None, *, waits_for: list[Job] = (), priority: int = 0,
          sweep_id: int | None = None, max_attempts: int = 3, token_id: int | None = None) -> Job:
    """Add the job's rows to the session's transaction (flushed, so it has an id; nothing committed)."""
    if parent is not None and waits_for:
        raise ValueError("a job has one parent or a join of jobs it waits for, not both")
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between 0 and {MAX_PRIORITY}")
    job = Job(kind=JobKind(spec.kind), status=JobStatus.queued, spec=spec.model_dump(mode="json"),
              parent_id=parent.id if parent else None, attempts=0, cancel_requested=False, priority=priority,
              sweep_id=sweep_id, max_attempts=max_attempts, output_name=getattr(spec, "name", None),
              token_id=token_id)
    session.add(job)
    with reserving_names(session):
        session.flush()
    session.add_all([JobWait(job_id=job.id, waits_for_id=other.id) for other in waits_for])
    return job


def commit_staged(session: Session) -> None:
    """Commit every staged row at once."""
    with reserving_names(session):
        session.commit()


@contextlib.contextmanager
def reserving_names(session: Session):
    """A fine-tune whose adapter name another queued or running job has reserved meanwhile (a race the validation
    could not see: the unique index on active jobs' output_name) is an InputError, and nothing is written."""
    try:
        yield
    except IntegrityError as exc:
        session.rollback()
        if "output_name" not in str(exc.orig):
            raise
        raise InputError("the adapter name is already used by a queued or running fine-tune job (submitted at the "
                         "same moment); choose another --name") from None


def release(session: Session, broker, jobs: list[Job], *, what: str) -> None:
    """Publish the stored `jobs` that can run now and skip those that never can. When the broker fails part way,
    the rows stay queued and Unavailable says that `jobs reconcile` will publish them."""
    try:
        for job in jobs:
            state, reason = readiness(session, job)
            if state == "ready":
                publish(session, broker, job)
            elif state == "skip":
                skip(session, job.id, reason)
    except Exception as exc:
        session.rollback()
        raise Unavailable(f"{what} is stored, but the broker failed while publishing it "
                          f"({exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                          "run 'python manage.py jobs reconcile' once the broker is back") from None


def get_job(session: Session, job_id: int) -> Job:
    if not 0 < job_id <= MAX_ID:  # the database's ids are 64-bit: anything else names no job
        raise NotFound(f"job {job_id} does not exist")
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return job


def latest_jobs(session: Session, limit: int = 50, status: JobStatus | None = None) -> list[Job]:
    return find_jobs(session, limit=limit, status=status)[0]


def find_jobs(session: Session, *, status: JobStatus | None = None, kind: JobKind | None = None,
              sweep: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
    """One page of the jobs that match the filters, newest first, and how many match in all."""
    matching = select(Job)
    if status is not None:
        matching = matching.where(Job.status == status)
    if kind is not None:
        matching = matching.where(Job.kind == kind)
    if sweep is not None:
        matching = matching.where(Job.sweep_id == sweep_by_name(session, sweep).id)
    total = session.scalar(select(func.count()).select_from(matching.subquery()))
    page = list(session.scalars(matching.order_by(Job.id.desc()).limit(limit).offset(offset)))
    return page, total


def job_details(session: Session, job: Job, broker=None) -> dict:
    """Everything about one job (`job_full`, what `jobs show --json` prints) and the name of the API token that
    submitted it."""
    token = session.scalar(select(ApiToken.name).where(ApiToken.id == job.token_id)) if job.token_id else None
    return {**job_full(session, job, broker), "submitted_by": token}


def job_full(session: Session, job: Job, broker=None) -> dict:
    """Everything about one job: `job_dict(full=True)` (with its `waiting_reason` when `broker` is given) and
    `search` (`search_view`; None for a job with none)."""
    reason = wait_reasons(broker, [job]).get(job.id) if broker is not None else None
    return {**job_dict(job, full=True, waiting_reason=reason), "search": search_view(session, job)}


def job_dicts(broker, jobs: list[Job]) -> list[dict]:
    """`job_dict` of each job, with its `waiting_reason` (`wait_reasons`)."""
    reasons = wait_reasons(broker, jobs)
    return [job_dict(job, waiting_reason=reasons.get(job.id)) for job in jobs]


def wait_reasons(broker, jobs: list[Job]) -> dict[int, str]:
    """Why each queued job with needs (worker/capabilities.py) can be taken by no live worker: "no live worker has
    CUDA", "no live worker has 40 GiB free (largest: 24 GiB on host-b)". Computed from the live workers' records
    now, read once and only when such a job is among `jobs`; a broker that does not answer gives no reasons (the
    listing must not fail for it)."""
    from worker.capabilities import needs_of, unmet_reason

    needs = {job.id: needs_of(job.spec) for job in jobs if job.status == JobStatus.queued}
    needs = {job_id: wanted for job_id, wanted in needs.items() if wanted}
    if not needs:
        return {}
    try:
        workers = broker.live_workers()
    except Unavailable:
        return {}
    reasons = {job_id: unmet_reason(wanted, workers) for job_id, wanted in needs.items()}
    return {job_id: reason for job_id, reason in reasons.items() if reason}


def search_view(session: Session, job: Job) -> dict | None:
    """A fine-tune of an ASHA or TPE sweep: its study, trial, strategy, metric and direction, its `rung_steps`, its
    `rungs` rows (step, metric, value, decision, reason, decided_at) and `state`, one line on where it stands
    (`search_state`). None for any other job."""
    from models.search import Rung

    search = job.spec.get("search") if job.kind == JobKind.finetune else None
    if not search:
        return None
    rungs = [{"step": r.step, "rung": r.rung, "metric": r.metric, "value": r.value, "decision": r.decision,
              "reason": r.reason, "decided_at": r.decided_at}
             for r in session.scalars(select(Rung).where(Rung.job_id == job.id).order_by(Rung.step))]
    return {"job_id": job.id, "study": search["study"], "trial": search["trial"], "strategy": search["strategy"],
            "metric": search["metric"], "direction": search["direction"], "bracket": search.get("bracket", 0),
            "rung_steps": list(search.get("rungs") or []), "state": search_state(job, rungs), "rungs": rungs}


def search_state(job: Job, rungs: list[dict]) -> str | None:
    """Where a sweep point stands, in one line: the pruning reason ("pruned at step 4: eval_loss 0.008, rung median
    ..."), "promoted at step 12; queued to train on" (or "training on" once a worker has it), or the last decision;
    None before its first rung."""
    last = rungs[-1] if rungs else None
    pruned = (job.result or {}).get("pruned") if job.status == JobStatus.pruned else None
    if pruned:
        return pruned.get("reason") or (last or {}).get("reason")
    if last is None:
        return None
    if last["decision"] == "prune" and job.status in (JobStatus.queued, JobStatus.running):
        return f"{last['reason']}; its adapter is being kept at that step"
    if last["decision"] == "promote":
        if job.status == JobStatus.queued:
            return f"promoted at step {last['step']}; queued to train on"
        if job.status == JobStatus.running:
            return f"promoted at step {last['step']}; training on"
        return f"promoted at step {last['step']}; then {job.status.value}"
    return last["reason"]


def waiting_counts(session: Session, jobs: list[Job]) -> dict[int, int]:
    """For each queued job not published yet (a child or a join whose parents run first): how many of the jobs it
    waits for have not finished. Jobs that wait for nothing are left out."""
    unpublished = {job.id: ([job.parent_id] if job.parent_id else job.waits_for_ids) for job in jobs
                   if job.status == JobStatus.queued and job.queued_at is None}
    wanted = {i for ids in unpublished.values() for i in ids}
    if not wanted:
        return {}
    statuses = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(wanted))).tuples().all())
    counts = {job_id: sum(1 for i in ids if i in statuses and not JobStatus(statuses[i]).finished)
              for job_id, ids in unpublished.items()}
    return {job_id: count for job_id, count in counts.items() if count}


def status_label(job: Job, waiting: dict[int, int], reasons: dict[int, str] | None = None) -> str:
    """The status for people: `waiting (3 jobs)` for a queued job still waiting for its parents (from
    `waiting_counts`), `waiting: no live worker has CUDA` for one no live worker can take (from `wait_reasons`),
    `queued (promoted at step 12)` for a sweep point that passed a rung and waits to train on, `waiting at its rung
    (step 4)` for one whose rung has not decided yet (lazy ASHA), else the status
    itself (machine output keeps the raw status)."""
    count = waiting.get(job.id)
    if count:
        return f"waiting ({count} job{'s' if count != 1 else ''})"
    if reasons and reasons.get(job.id):
        return f"waiting: {reasons[job.id]}"
    promoted = (job.progress or {}).get("promoted_at_step")
    if job.status == JobStatus.queued and promoted is not None:
        return f"queued (promoted at step {promoted})"
    held = (job.progress or {}).get("held_at_step")
    if job.status == JobStatus.queued and held is not None:
        return f"waiting at its rung (step {held})"
    return job.status.value


def shown_progress(job: Job) -> dict:
    """The progress to show: the job's own, or for a pruned sweep point (which reports none at its end, and one that
    waited at its rung none at all) the step it stopped at out of its total."""
    if job.status == JobStatus.pruned and job.result and not (job.progress or {}).get("total_steps"):
        return {"step": job.result.get("steps"), "total_steps": job.result.get("total_steps")}
    return job.progress or {}


def cancel(session: Session, broker, job: Job) -> str:
    """Cancel a queued job at once; ask a running one to stop at its next step. Returns what happened."""
    if job.status == JobStatus.queued:
        done = session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.queued)
                               .values(status=JobStatus.cancelled, finished_at=utcnow(), error="cancelled by user"))
        session.commit()
        if done.rowcount:
            if job.celery_task_id:  # live workers drop its message and report the task REVOKED (best effort: a
                broker.revoke(job.celery_task_id)  # worker that missed it finds the row cancelled and says so)
            settle_children(session, broker, job.id)  # a join may run without this job
            notify.job_ended(broker.settings, session, job.id)  # the sweep may have ended with it
            return "cancelled"
    if job.status in (JobStatus.queued, JobStatus.running):
        session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
        session.commit()
        return "cancel requested"
    return f"already {job.status.value}"


def reconcile(ctx: AppContext, stale_after: Optional[float] = None) -> dict:
    """Put back lost work: running jobs whose worker died, queued jobs whose message the broker lost."""
    from worker.reaper import reconcile as reconcile_jobs

    ctx.broker.check()
    with ctx.session() as session:
        return reconcile_jobs(session, ctx.broker, ctx.settings.stale_seconds if stale_after is None else stale_after)


def job_dict(job: Job, full: bool = False, waiting_reason: str | None = None) -> dict:
    """The job as JSON-ready data, the same for `--json` and the HTTP API; `waiting_reason` (from `wait_reasons`,
    where the caller computed it) says why a queued job finds no live worker that can run it."""
    data = {
        "id": job.id, "kind": job.kind.value, "status": job.status.value, "waiting_reason": waiting_reason,
        "parent_id": job.parent_id,
        "waits_for": job.waits_for_ids,
        "attempts": job.attempts, "worker_host": job.worker_host, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "duration_s": job.duration_s,
        "queued_at": job.queued_at, "queue_wait_s": job.queue_wait_s, "queue": job.queue,
        "error": job.error, "progress": job.progress, "result": job.result,
    }
    if full:
        data.update(spec=job.spec, celery_task_id=job.celery_task_id, cancel_requested=job.cancel_requested,
                    max_attempts=job.max_attempts, attempt_errors=job.attempt_errors, traceback=job.traceback)
    return data


def variants_of(job: Job) -> list[str]:
    """The adapter a fine-tune writes, the variants a generate job evaluates (`base` for the base model alone)."""
    spec = job.spec
    if job.kind == JobKind.finetune:
        return [spec["name"]]
    if job.kind == JobKind.generate:
        return spec.get("adapters") or [spec.get("adapter") or "base"]
    return []


def _variants_text(names: list[str]) -> str:
    if len(names) <= 2:
        return ", ".join(names)
    return f"{len(names)} variants ({names[0]}, {names[1]}, +{len(names) - 2} more)"


def describe(job: Job) -> str:
    """One line of what the job does, for tables; names are given whole."""
    spec = job.spec
    if job.kind == JobKind.finetune:
        return f"{spec['name']} on {spec['model']} lr={spec['learning_rate']:g}"
    if job.kind == JobKind.generate:
        return f"{_variants_text(variants_of(job))} on {spec['model']} / {spec['split']}"
    return f"scores job {spec['generate_job_id']}"


def bar_fields(job: Job, waiting: dict[int, int]) -> dict:
    """What one progress bar of `jobs watch` shows: `description` (job id, kind, adapter name or variants),
    `info` (step / total, loss, eval loss, status), and the bar's `completed` / `total`."""
    info = shown_progress(job)
    what = _variants_text(variants_of(job)) if job.kind != JobKind.score else f"of job {job.spec['generate_job_id']}"
    parts = []
    if info.get("step") is not None:
        parts.append(f"step {info['step']}/{info.get('total_steps') or '?'}")
    for key, label in (("loss", "loss"), ("eval_loss", "eval loss")):
        if info.get(key) is not None:
            parts.append(f"{label} {info[key]:.4f}" if isinstance(info[key], float) else f"{label} {info[key]}")
    parts.append(status_label(job, waiting))
    return {"description": f"job {job.id} {job.kind.value} {what}", "info": " · ".join(parts),
            "completed": info.get("step", 0), "total": info.get("total_steps")}


def wait_for(ctx: AppContext, job_ids: list[int], *, quiet: bool = False, poll: float = 0.5,
             give_up: Optional[Callable[[], bool]] = None, force_bars: bool = False) -> dict[int, JobStatus]:
    """Poll the job rows until all are finished (or `give_up()` says so), with a progress bar per job on a
    terminal (see `bar_fields`); returns each job's last status."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    wrapping = Column(overflow="fold")  # a narrow terminal wraps a bar's text instead of cutting names with "…"
    with Progress(TextColumn("{task.description}", table_column=wrapping), BarColumn(bar_width=20),
                  TextColumn("{task.fields[info]}", table_column=Column(overflow="fold")), TimeElapsedColumn(),
                  disable=quiet or not (force_bars or sys.stderr.isatty())) as progress, \
            ctx.sessions() as session:
        bars = {job_id: progress.add_task(f"job {job_id}", total=None, info="") for job_id in job_ids}
        while True:
            session.expire_all()
            found = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
            waiting = waiting_counts(session, list(found.values()))
            for job_id, bar in bars.items():
                progress.update(bar, **bar_fields(found[job_id], waiting))
            if all(job.status.finished for job in found.values()) or (give_up and give_up()):
                return {job_id: job.status for job_id, job in found.items()}
            time.sleep(poll)
