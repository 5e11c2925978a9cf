"""Chained jobs: fine-tune → generate → score pipelines (each step waits in the database for its parent), and whole
sweeps, validated completely before the first job is enqueued: every point's fine-tune, then one generate job that
waits for all of them and evaluates every adapter (and the base) in mixed batches, then one score job."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.jobs import cancel, commit_staged, release, stage
from api.sweeps import SweepPlan
from api.validate import validate_finetune, validate_generate
from models.errors import InputError
from models.jobs import Job
from models.report import sweep_by_name, sweep_jobs
from models.specs import FinetuneSpec, GenerateSpec, ScoreSpec, Submission
from models.sweeps import Sweep


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
        raise InputError(f"sweep {plan.name!r} already exists; choose another name")
    points = []
    for point in plan.points:
        try:
            generate, finetune = validate_pipeline(session, home, point.generate, point.finetune)
        except InputError as exc:
            raise InputError(f"point {point.index}: {exc}") from None
        points.append(replace(point, generate=generate, finetune=finetune))
    return replace(plan, points=points, checked=True)


def enqueue_sweep(session: Session, broker, home: Path, plan: SweepPlan,
                  submission: Submission = Submission()) -> tuple[Sweep, list[Job]]:
    """The sweep row and all its jobs in one transaction, then the fine-tunes published: a broker that dies part
    way leaves a whole sweep that `jobs reconcile` finishes publishing, never half of one."""
    if not plan.checked:
        plan = validate_sweep(session, home, plan)
    sweep = Sweep(name=plan.name, spec=plan.spec, priority=submission.priority, points=len(plan.points))
    session.add(sweep)
    session.flush()
    common = {"priority": submission.priority, "sweep_id": sweep.id, "max_attempts": submission.max_attempts}
    finetunes = {point.index: stage(session, point.finetune, **common) for point in plan.points}
    jobs = list(finetunes.values())
    for evaluation in plan.evaluations:
        # runs once every fine-tune it waits for has finished; adapters whose fine-tune failed are left out
        generate_job = stage(session, evaluation.generate,
                             waits_for=[finetunes[point.index] for point in evaluation.points], **common)
        score_spec = ScoreSpec(generate_job_id=generate_job.id, metrics=plan.metrics)
        jobs += [generate_job, stage(session, score_spec, generate_job, **common)]
    try:
        commit_staged(session)
    except IntegrityError:  # another sweep of this name was stored since the validation read
        session.rollback()
        raise InputError(f"sweep {plan.name!r} already exists; choose another name") from None
    release(session, broker, jobs, what=f"sweep {plan.name!r} ({len(jobs)} jobs)")
    return sweep, jobs


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
