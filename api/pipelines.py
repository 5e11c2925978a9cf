"""Chained jobs: fine-tune → generate → score pipelines (each step waits in the database for its parent), and whole
sweeps, validated completely before the first job is enqueued: every point's fine-tune, then one generate job that
waits for all of them and evaluates every adapter (and the base) in mixed batches, then one score job.

A sweep that ended with failed or cancelled points is finished by `retry_sweep` (its jobs re-queued in place, so
its report and joins stay valid) or removed with everything it made by `delete_sweep`, after which its name is free.
Both read the sweep's jobs under locks held until their commit, so no worker claims or finishes one meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.adapters import jobs_using
from api.context import AppContext
from api.jobs import cancel, commit_staged, job_dict, release, stage
from api.search import drop_study, start_search
from api.sweeps import SweepPlan, apply_overrides, expand
from api.validate import check_code_metrics, validate_finetune, validate_generate
from models.metrics import metric_families
from models.errors import InputError, NotFound
from models.jobs import ACTIVE_STATUSES, Job, JobKind, JobStatus, JobWait, parent_ids
from models.report import sweep_by_name, sweep_jobs
from models.results import Adapter, ExampleScore, Generation, LossPoint, Metric
from models.search import CLASSIFICATION_METRICS, GENERATION_METRICS, Rung
from models.settings import Settings, check_notify_url
from models.specs import FinetuneSpec, GenerateSpec, ScoreSpec, Submission
from models.sweeps import Sweep

RETRIED_STATUSES = (JobStatus.failed, JobStatus.cancelled, JobStatus.skipped)


def sweep_exists(name: str) -> InputError:
    return InputError(f"sweep {name!r} already exists: 'sweeps retry {name}' re-queues its failed and cancelled "
                      f"points, 'sweeps delete {name}' removes it (or give --name)")


def enqueue_pipeline(session: Session, broker, generate_spec: GenerateSpec, finetune_spec: FinetuneSpec | None = None,
                     *, metrics: list[str] | None = None, submission: Submission = Submission(),
                     sweep_id: int | None = None) -> list[Job]:
    """Fine-tune (optional) → generate → score, stored in one transaction, then published. The specs must already
    be validated. Returns the jobs."""
    common = {"priority": submission.priority, "max_attempts": submission.max_attempts, "sweep_id": sweep_id}
    parent = stage(session, finetune_spec, **common) if finetune_spec is not None else None
    generate_job = stage(session, generate_spec, parent, **common)
    score_job = stage(session, ScoreSpec(generate_job_id=generate_job.id, metrics=metrics), generate_job, **common)
    jobs = ([parent] if parent else []) + [generate_job, score_job]
    commit_staged(session)
    release(session, broker, jobs, what=f"pipeline {jobs[0].id}..{jobs[-1].id}")
    return jobs


def validate_pipeline(session: Session, home: Path, generate_spec: GenerateSpec,
                      finetune_spec: FinetuneSpec | None = None) -> tuple[GenerateSpec, FinetuneSpec | None]:
    """Both specs checked and completed (model kinds resolved)."""
    if finetune_spec is None:
        return validate_generate(generate_spec, session, home), None
    finetune_spec = validate_finetune(finetune_spec, session)
    # the adapter does not exist yet: check the rest of the generate spec against the fine-tune's base model
    checked = validate_generate(generate_spec.model_copy(update={"adapter": None, "adapters": []}), session, home)
    return generate_spec.with_model_kind(checked.model_kind), finetune_spec


def validate_sweep(session: Session, home: Path, plan: SweepPlan) -> SweepPlan:
    """The plan with every point checked and completed; InputError names the point."""
    if session.scalar(select(Sweep.id).where(Sweep.name == plan.name)) is not None:
        raise sweep_exists(plan.name)
    points = []
    for point in plan.points:
        try:
            generate, finetune = validate_pipeline(session, home, point.generate, point.finetune)
        except InputError as exc:
            raise InputError(f"point {point.index}: {exc}") from None
        points.append(replace(point, generate=generate, finetune=finetune))
    # the evaluation's metrics fit the model's kind (checked now, not after every fine-tune has run)
    metric_families(plan.metrics, points[0].generate.model_kind, 0, what="the sweep's evaluation")
    check_rung_metric(plan.strategy, points[0].finetune.model_kind)
    return replace(plan, points=points, checked=True)


def check_rung_metric(strategy, model_kind: str) -> None:
    """An ASHA or TPE metric the points' model kind can produce: ROUGE from generated text, accuracy and F1 from a
    classifier's labels."""
    metric = getattr(strategy, "metric", None)
    if metric in GENERATION_METRICS and model_kind == "classification":
        raise InputError(f"strategy.metric {metric}: a classifier generates no text; use accuracy, f1 or eval_loss")
    if metric in CLASSIFICATION_METRICS and model_kind != "classification":
        raise InputError(f"strategy.metric {metric}: only for classification; a {model_kind} model is decided on "
                         "eval_loss or rouge1 / rouge2 / rougeL / rougeLsum")


def enqueue_sweep(session: Session, broker, home: Path, plan: SweepPlan, submission: Submission = Submission(),
                  notify_url: str | None = None, token_id: int | None = None) -> tuple[Sweep, list[Job]]:
    """The sweep row and all its jobs in one transaction, then the fine-tunes published: a broker that dies part
    way leaves a whole sweep that `jobs reconcile` finishes publishing, never half of one. `notify_url` (already
    checked) is where the sweep's end is announced instead of TUNEQUEUE_NOTIFY_URL."""
    if not plan.checked:
        plan = validate_sweep(session, home, plan)
    database_url = session.get_bind().url.render_as_string(hide_password=False)
    session.commit()  # Optuna writes the study on its own connection: no transaction of ours may be open
    plan = start_search(database_url, plan)
    try:
        sweep, jobs = _store_sweep(session, plan, submission, notify_url, token_id)
    except BaseException:  # nothing of the sweep was stored: neither is its study kept
        study = (plan.spec.get("strategy") or {}).get("study")
        if study:
            drop_study(database_url, study)
        raise
    release(session, broker, queue_order(plan, jobs), what=f"sweep {plan.name!r} ({len(jobs)} jobs)")
    return sweep, jobs


def queue_order(plan: SweepPlan, jobs: list[Job]) -> list[Job]:
    """The order the sweep's jobs are published in: as staged, except an ASHA sweep's fine-tunes, shuffled with
    the strategy's seed unless it says `order: as-written` (its decisions assume points arrive in random order)."""
    strategy = plan.strategy
    if getattr(strategy, "kind", None) != "asha" or strategy.order != "shuffled":
        return jobs
    import random

    finetunes = [job for job in jobs if job.kind == JobKind.finetune]
    random.Random(strategy.seed).shuffle(finetunes)
    return finetunes + [job for job in jobs if job.kind != JobKind.finetune]


def _store_sweep(session: Session, plan: SweepPlan, submission: Submission, notify_url: str | None,
                 token_id: int | None) -> tuple[Sweep, list[Job]]:
    sweep = Sweep(name=plan.name, spec=plan.spec, priority=submission.priority, points=plan.trials,
                  notify_url=notify_url or None, token_id=token_id, trials_asked=len(plan.points))
    session.add(sweep)
    session.flush()
    common = {"priority": submission.priority, "sweep_id": sweep.id, "max_attempts": submission.max_attempts,
              "token_id": token_id}
    finetunes = {point.index: stage(session, point.finetune, **common) for point in plan.points}
    jobs = list(finetunes.values())
    for evaluation in plan.evaluations:
        # runs once every fine-tune it waits for has finished; adapters whose fine-tune failed are left out
        generate_job = stage(session, evaluation.generate,
                             waits_for=[finetunes[point.index] for point in evaluation.points], **common)
        score_spec = plan.score_spec(generate_job.id)
        jobs += [generate_job, stage(session, score_spec, generate_job, **common)]
    try:
        commit_staged(session)
    except IntegrityError:  # another sweep of this name was stored since the validation read
        session.rollback()
        raise sweep_exists(plan.name) from None
    return sweep, jobs


@dataclass
class SweepSubmission:
    """What `submit_sweep` did: the checked plan, and unless it was a dry run the stored sweep and its jobs."""

    plan: SweepPlan
    sweep: Sweep | None = None
    jobs: list[Job] = field(default_factory=list)

    def as_dict(self) -> dict:
        """`sweep --json` (and POST /sweeps): the plan of a dry run, else the queued sweep with its job ids."""
        if self.sweep is None:
            points = [{"point": p.index, "adapter": p.finetune.name, **p.varied} for p in self.plan.points]
            return {"sweep": self.plan.name, "points": points, "jobs": self.plan.job_count,
                    "strategy": self.plan.strategy_summary()}
        return {"sweep": self.sweep.name, "id": self.sweep.id, "points": self.sweep.points,
                "jobs": [job.id for job in self.jobs]}


def submit_sweep(ctx: AppContext, data: dict, *, name: str | None = None, overrides: list[str] = (),
                 dry_run: bool = False, notify_url: str | None = None, notify_option: str = "notify",
                 submission: Submission = Submission(), token_id: int | None = None) -> SweepSubmission:
    """A sweep file's data (as api/sweeps.load_sweep_file or load_sweep_text read it) with `overrides` applied,
    expanded and checked against the world; unless `dry_run`, stored and published (recorded as submitted by API
    token `token_id`). `notify_url` is checked first (InputError naming `notify_option`). Raises InputError with
    nothing written, or Unavailable."""
    notify_url = check_notify_url(notify_url, notify_option) if notify_url is not None else None
    plan = expand(apply_overrides(data, list(overrides)), name)
    check_code_metrics(ctx.code_metrics, plan.metrics)
    with ctx.session() as session:
        plan = validate_sweep(session, ctx.settings.home, plan)
        if dry_run:
            return SweepSubmission(plan)
        ctx.broker.check()
        sweep, jobs = enqueue_sweep(session, ctx.broker, ctx.settings.home, plan, submission, notify_url,
                                    token_id=token_id)
    return SweepSubmission(plan, sweep, jobs)


def sweep_details(session: Session, name: str) -> dict:
    """The sweep as `sweeps show --json` and GET /sweeps/NAME give it: its file (as parsed), settings and jobs."""
    sweep = sweep_by_name(session, name)
    return {"name": sweep.name, "spec": sweep.spec, "priority": sweep.priority, "points": sweep.points,
            "created_at": sweep.created_at, "finished_at": sweep.finished_at,
            "jobs": [job_dict(job) for job in sweep_jobs(session, sweep)]}


def sweep_summaries(session: Session) -> list[dict]:
    """Every sweep, newest first, with its job counts by status."""
    out = []
    for sweep in session.scalars(select(Sweep).order_by(Sweep.id.desc())):
        counts: dict[str, int] = {}
        for job in sweep_jobs(session, sweep):
            counts[job.status.value] = counts.get(job.status.value, 0) + 1
        out.append({"name": sweep.name, "points": sweep.points, "priority": sweep.priority,
                    "created_at": sweep.created_at, "jobs": counts})
    return out


def cancel_sweep(session: Session, broker, name: str) -> dict[str, int]:
    """Cancel every unfinished job of the sweep; returns how many got each outcome."""
    outcomes: dict[str, int] = {}
    # children first, so that cancelling the last fine-tune does not release the evaluation it was waiting for
    for job in reversed(sweep_jobs(session, sweep_by_name(session, name))):
        session.refresh(job)
        if not job.status.finished:
            outcome = cancel(session, broker, job)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def retry_sweep(session: Session, broker, name: str, max_attempts: int = Submission().max_attempts) -> list[Job]:
    """Re-queue, in place (same job ids), every fine-tune of the sweep that failed, was cancelled or was skipped,
    and every evaluation job that did not succeed or that waits for one of those fine-tunes; what succeeded is
    kept. Returns the re-queued jobs (none: nothing to retry).

    A retried fine-tune starts over: its checkpoint went when it ended (an ASHA point cancelled while queued
    after a promotion keeps its rung checkpoint, and resumes from it). An evaluation that had succeeded without
    the retried points runs again as the same jobs: generate keeps the rows it wrote (one per variant and
    example) and writes only the missing adapters' rows, and score replaces its metric rows as a whole, so no row
    is duplicated. Each re-queued job may run `max_attempts` more times; its attempt count goes on from where it
    was, so a worker still holding an old attempt's lease can never match the new one. Refused, with nothing
    changed, while a job of the sweep is queued or running, when another job has reserved a point's adapter name
    or an adapter of that name exists now, and when the broker cannot be reached. The fine-tunes are published;
    the evaluation jobs wait for them as at first enqueue."""
    sweep, jobs = _locked_sweep(session, name)
    busy = [job for job in jobs if job.status.value in ACTIVE_STATUSES]
    if busy:
        raise _refuse(session, f"sweep {name!r} has {len(busy)} queued or running job(s) ({_ids(busy)}): cancel it "
                               f"first ('sweeps cancel {name}') or wait until they finish")
    finetunes = [job for job in jobs if job.kind == JobKind.finetune and job.status in RETRIED_STATUSES]
    again, again_ids = list(finetunes), {job.id for job in finetunes}
    for job in jobs:  # by id: a generate job comes before its score job
        if job.kind != JobKind.finetune and (job.status != JobStatus.succeeded
                                             or again_ids & set(parent_ids(session, job))):
            again.append(job)
            again_ids.add(job.id)
    if not again:
        session.rollback()
        return []
    _check_retry(session, name, jobs, finetunes, again)
    try:
        broker.check()
    except Exception:
        session.rollback()
        raise
    for job in again:
        job.status, job.max_attempts, job.cancel_requested = JobStatus.queued, job.attempts + max_attempts, False
        job.error = job.traceback = job.progress = job.result = None
        # queued_at None: settle_children publishes a waiting evaluation job once, when its join is ready
        job.queued_at = job.started_at = job.finished_at = job.heartbeat_at = job.worker_host = None
    sweep.finished_at = None  # it is running again: its end is announced again
    commit_staged(session)
    release(session, broker, again, what=f"sweep {name!r} ({len(again)} jobs re-queued)")
    return again


def _check_retry(session: Session, name: str, jobs: list[Job], finetunes: list[Job], again: list[Job]) -> None:
    """InputError (after a rollback) when re-queueing would take an adapter name that is someone else's now, or
    when an evaluation would run again without an adapter a succeeded point made."""
    for job in finetunes:
        other = session.scalar(select(Job.id).where(Job.output_name == job.output_name, Job.id != job.id,
                                                    Job.status.in_(ACTIVE_STATUSES)))
        if other is not None:
            raise _refuse(session, f"adapter name {job.output_name!r} (job {job.id} of sweep {name!r}) is reserved "
                                   f"by queued or running job {other}; cancel it or wait until it finishes")
        made_by = session.execute(select(Adapter.id, Adapter.job_id).where(Adapter.name == job.output_name)).first()
        if made_by is not None and made_by.job_id != job.id:
            raise _refuse(session, f"an adapter named {job.output_name!r} exists now (not made by job {job.id} of "
                                   f"sweep {name!r}), and retrying would replace it: delete it first "
                                   f"('adapters delete {job.output_name}')")
    evaluated = {wait for job in again if job.kind == JobKind.generate for wait in parent_ids(session, job)}
    kept = [job for job in jobs if job.id in evaluated and job.status == JobStatus.succeeded]
    present = set(session.scalars(select(Adapter.name).where(Adapter.name.in_([j.output_name for j in kept]))))
    gone = [job for job in kept if job.output_name not in present]
    if gone:
        raise _refuse(session, f"adapter {gone[0].output_name!r} of sweep {name!r} was deleted after its fine-tune "
                               f"(job {gone[0].id}) succeeded, so the sweep's evaluation cannot run again; "
                               f"'sweeps delete {name}' and run the sweep again")


def sweep_contents(session: Session, name: str) -> dict:
    """What `delete_sweep` would remove: the sweep's jobs by status, the adapters its fine-tunes made, and the
    result rows of its jobs (or read from them) by table."""
    sweep = sweep_by_name(session, name)
    return _contents(session, sweep, sweep_jobs(session, sweep))


def delete_sweep(session: Session, broker, settings: Settings, name: str) -> dict:
    """Remove the sweep with everything it made, in one transaction: its jobs (queued ones included: their messages
    are revoked, and a worker drops a message whose job is gone), their joins, every result row of its jobs (and
    the metric and per-example rows other jobs computed from them), the adapters its fine-tunes made, and the sweep
    row, so its name can be used again. The adapter folders, checkpoints and job logs go after the commit: a crash
    in between leaves orphan files, never a row pointing at a missing folder. Refused, with nothing changed, while
    a job of the sweep is running, or while a queued or running job outside it reads one of its adapters or waits
    for one of its jobs. Returns what was removed (as `sweep_contents`)."""
    sweep, jobs = _locked_sweep(session, name)
    running = [job for job in jobs if job.status == JobStatus.running]
    if running:
        raise _refuse(session, f"sweep {name!r} has running job(s) {_ids(running)}: cancel it first "
                               f"('sweeps cancel {name}') and wait until they stop")
    ids = [job.id for job in jobs]
    adapters = list(session.scalars(select(Adapter).where(Adapter.job_id.in_(ids)).order_by(Adapter.id)))
    users = [user for adapter in adapters for user in jobs_using(session, adapter.name) if user.id not in ids]
    if users:
        raise _refuse(session, f"queued or running job(s) {_ids(users)} outside sweep {name!r} read its adapters; "
                               "cancel them or wait until they finish")
    waiting = list(session.scalars(select(Job).where(
        Job.id.not_in(ids), Job.status.in_(ACTIVE_STATUSES),
        or_(Job.parent_id.in_(ids), Job.id.in_(select(JobWait.job_id).where(JobWait.waits_for_id.in_(ids)))))))
    if waiting:
        raise _refuse(session, f"queued or running job(s) {_ids(waiting)} outside sweep {name!r} wait for its jobs; "
                               "cancel them or wait until they finish")
    removed = _contents(session, sweep, jobs, adapters)
    sweep_spec = sweep.spec
    keys = [adapter.path for adapter in adapters]
    queued = [job.celery_task_id for job in jobs if job.status == JobStatus.queued and job.celery_task_id]
    uids = [job.uid for job in jobs]
    generations = select(Generation.id).where(Generation.job_id.in_(ids))
    for statement in (
            delete(ExampleScore).where(or_(ExampleScore.job_id.in_(ids), ExampleScore.generation_id.in_(generations))),
            delete(Metric).where(or_(Metric.job_id.in_(ids), Metric.generate_job_id.in_(ids))),
            delete(Generation).where(Generation.job_id.in_(ids)),
            delete(LossPoint).where(LossPoint.job_id.in_(ids)),
            delete(Rung).where(Rung.job_id.in_(ids)),
            delete(JobWait).where(or_(JobWait.job_id.in_(ids), JobWait.waits_for_id.in_(ids))),
            update(Job).where(Job.parent_id.in_(ids), Job.id.not_in(ids)).values(parent_id=None),
            delete(Adapter).where(Adapter.id.in_([adapter.id for adapter in adapters])),
            delete(Job).where(Job.id.in_(ids)),
            delete(Sweep).where(Sweep.id == sweep.id)):
        session.execute(statement.execution_options(synchronize_session=False))
    session.commit()
    session.expunge_all()  # its objects are rows that are gone
    for task_id in queued:
        broker.revoke(task_id)  # best effort: SQLite may give a deleted job's id to the next job
    _remove_files(settings, keys, uids, ids)
    study = (sweep_spec.get("strategy") or {}).get("study") if isinstance(sweep_spec, dict) else None
    if study:
        from api.search import drop_study

        drop_study(settings.database_url, study)
    return removed


def _remove_files(settings: Settings, keys: list[str], uids: list[str], job_ids: list[int]) -> None:
    """The deleted adapters' folders and the jobs' checkpoints, from the artifact store; the jobs' logs."""
    from worker.jobs.checkpoint import forget_checkpoints
    from worker.joblog import job_log_path
    from worker.store import LocalStore, store_for

    store = store_for(settings.home, settings)
    for key in keys:
        parts = key.split("/")
        if len(parts) < 2 or parts[0] != "adapters" or ".." in parts:  # never anything else, whatever a row says
            continue
        if isinstance(store, LocalStore) and (store.root / "adapters").resolve() not in \
                store.path(key).resolve().parents:
            continue  # a link out of the store
        store.delete(key)
    for uid in uids:
        forget_checkpoints(settings.home, uid)
    for job_id in job_ids:  # the next job given a reused id (SQLite) must not append to a deleted job's log
        job_log_path(settings, job_id).unlink(missing_ok=True)


def _contents(session: Session, sweep: Sweep, jobs: list[Job], adapters: list[Adapter] | None = None) -> dict:
    ids = [job.id for job in jobs]
    if adapters is None:
        adapters = list(session.scalars(select(Adapter).where(Adapter.job_id.in_(ids)).order_by(Adapter.id)))
    statuses: dict[str, int] = {}
    for job in jobs:
        statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
    generations = select(Generation.id).where(Generation.job_id.in_(ids))
    count = {
        "generations": select(func.count()).select_from(Generation).where(Generation.job_id.in_(ids)),
        "metrics": select(func.count()).select_from(Metric).where(
            or_(Metric.job_id.in_(ids), Metric.generate_job_id.in_(ids))),
        "example_scores": select(func.count()).select_from(ExampleScore).where(
            or_(ExampleScore.job_id.in_(ids), ExampleScore.generation_id.in_(generations))),
        "loss_points": select(func.count()).select_from(LossPoint).where(LossPoint.job_id.in_(ids)),
    }
    return {"sweep": sweep.name, "jobs": statuses, "adapters": [adapter.name for adapter in adapters],
            "rows": {table: session.scalar(query) for table, query in count.items()}}


def _locked_sweep(session: Session, name: str) -> tuple[Sweep, list[Job]]:
    """The sweep and its jobs, read again under locks held until the session's commit or rollback: on PostgreSQL
    the jobs' rows (a worker can neither claim nor finish one meanwhile), then the sweep's row; on SQLite the
    touch of the sweep's row takes the database's write lock."""
    sweep = sweep_by_name(session, name)
    query = (select(Job).where(Job.sweep_id == sweep.id).order_by(Job.id).with_for_update()
             .execution_options(populate_existing=True))  # the session may hold these rows from before
    session.execute(query).all()
    touched = session.execute(update(Sweep).where(Sweep.id == sweep.id).values(points=Sweep.points)
                              .execution_options(synchronize_session=False))
    if touched.rowcount != 1:  # deleted since it was read
        session.rollback()
        raise NotFound(f"sweep {name!r} does not exist")
    session.refresh(sweep)
    return sweep, list(session.scalars(query))


def _refuse(session: Session, message: str) -> InputError:
    session.rollback()  # releases the locks
    return InputError(message)


def _ids(jobs: list[Job]) -> str:
    return ", ".join(str(job.id) for job in jobs)
