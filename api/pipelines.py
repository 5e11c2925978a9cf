"""Chained jobs: fine-tune → generate → score pipelines (each step waits in the database for its parent), and whole
sweeps, validated completely before the first job is enqueued: every point's fine-tune, then one generate job that
waits for all of them and evaluates every adapter (and the base) in mixed batches, then one score job."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.jobs import Job
from models.sweeps import Sweep
from worker.lifecycle import enqueue
from models.specs import FinetuneSpec, GenerateSpec, ScoreSpec, SpecError
from api.sweeps import SweepPlan
from api.validate import validate_finetune, validate_generate


def enqueue_pipeline(session: Session, app, home: Path, generate_spec: GenerateSpec,
                     finetune_spec: FinetuneSpec | None = None, *, metrics: list[str] | None = None,
                     priority: int = 0, sweep_id: int | None = None, max_attempts: int = 3) -> list[Job]:
    """Fine-tune (optional) → generate → score. The specs must already be validated. Returns the jobs."""
    jobs: list[Job] = []
    parent = None
    if finetune_spec is not None:
        parent = enqueue(session, app, finetune_spec, priority=priority, sweep_id=sweep_id, max_attempts=max_attempts)
        jobs.append(parent)
    generate_job = enqueue(session, app, generate_spec, parent, priority=priority, sweep_id=sweep_id,
                           max_attempts=max_attempts)
    score_spec = ScoreSpec(generate_job_id=generate_job.id, metrics=metrics)
    jobs += [generate_job, enqueue(session, app, score_spec, generate_job, priority=priority, sweep_id=sweep_id,
                                   max_attempts=max_attempts)]
    return jobs


def validate_pipeline(session: Session, home: Path, generate_spec: GenerateSpec,
                      finetune_spec: FinetuneSpec | None = None) -> GenerateSpec:
    if finetune_spec is None:
        return validate_generate(generate_spec, session, home)
    validate_finetune(finetune_spec, session)
    # the adapter does not exist yet: check the rest of the generate spec against the fine-tune's base model
    validate_generate(generate_spec.model_copy(update={"adapter": None}), session, home)
    return generate_spec


def validate_sweep(session: Session, home: Path, plan: SweepPlan) -> None:
    if session.scalar(select(Sweep.id).where(Sweep.name == plan.name)) is not None:
        raise SpecError(f"sweep {plan.name!r} already exists; choose another name")
    for point in plan.points:
        try:
            validate_pipeline(session, home, point.generate, point.finetune)
        except SpecError as exc:
            raise SpecError(f"point {point.index}: {exc}") from None


def enqueue_sweep(session: Session, app, home: Path, plan: SweepPlan, priority: int = 0,
                  max_attempts: int = 3) -> tuple[Sweep, list[Job]]:
    validate_sweep(session, home, plan)
    sweep = Sweep(name=plan.name, spec=plan.spec, priority=priority, points=len(plan.points))
    session.add(sweep)
    session.commit()
    common = {"priority": priority, "sweep_id": sweep.id, "max_attempts": max_attempts}
    finetunes = {point.index: enqueue(session, app, point.finetune, **common) for point in plan.points}
    jobs = list(finetunes.values())
    for evaluation in plan.evaluations:
        # runs once every fine-tune it waits for has finished; adapters whose fine-tune failed are left out
        generate_job = enqueue(session, app, evaluation.generate,
                               waits_for=[finetunes[point.index] for point in evaluation.points], **common)
        score_spec = ScoreSpec(generate_job_id=generate_job.id, metrics=plan.metrics)
        jobs += [generate_job, enqueue(session, app, score_spec, generate_job, **common)]
    return sweep, jobs
