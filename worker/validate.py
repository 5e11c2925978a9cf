"""Checks a spec against the world before it is enqueued: models, datasets, adapters and parent jobs exist.

Each failure raises `SpecError` with a one-line message; nothing is written before all checks pass.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter
from worker.refs import RefError, check_dataset, check_model
from worker.specs import FinetuneSpec, GenerateSpec, ScoreSpec, SpecError

ACTIVE = (JobStatus.queued, JobStatus.running)


def _refs(check, *args):
    try:
        return check(*args)
    except RefError as exc:
        raise SpecError(str(exc)) from None


def pending_finetune(session: Session, adapter_name: str) -> Job | None:
    """A queued or running fine-tune job that will produce `adapter_name`."""
    for job in session.scalars(select(Job).where(Job.kind == JobKind.finetune, Job.status.in_(ACTIVE))):
        if job.spec.get("name") == adapter_name:
            return job
    return None


def validate_finetune(spec: FinetuneSpec, session: Session) -> None:
    _refs(check_model, spec.model)
    _refs(check_dataset, spec.dataset, [spec.text_column, spec.summary_column], [spec.train_split])
    if session.scalar(select(Adapter.id).where(Adapter.name == spec.name)) is not None:
        raise SpecError(f"adapter name {spec.name!r} is already taken; choose another --name")
    if pending_finetune(session, spec.name) is not None:
        raise SpecError(f"adapter name {spec.name!r} is already used by a queued or running fine-tune job")


def validate_generate(spec: GenerateSpec, session: Session, home: Path, *, model_given: bool = True) -> GenerateSpec:
    """Returns the spec with the adapter's base model filled in."""
    if spec.adapter:
        adapter = session.scalar(select(Adapter).where(Adapter.name == spec.adapter))
        if adapter is None:
            raise SpecError(f"adapter {spec.adapter!r} does not exist (see the adapters of finished fine-tune "
                            "jobs with 'jobs list')")
        if not (home / adapter.path / "adapter_config.json").exists():
            raise SpecError(f"adapter {spec.adapter!r} is recorded but its folder {home / adapter.path} is missing")
        base_model = adapter.base_model
        if model_given and spec.model != base_model:
            raise SpecError(f"adapter {spec.adapter!r} was trained on {base_model!r}, not {spec.model!r}")
        spec = spec.model_copy(update={"model": base_model})
    _refs(check_model, spec.model)
    _refs(check_dataset, spec.dataset, [spec.text_column], [spec.split])
    return spec


def validate_score(spec: ScoreSpec, session: Session) -> Job:
    """Returns the generate job to score; it must be a succeeded generate job."""
    job = session.get(Job, spec.generate_job_id)
    if job is None:
        raise SpecError(f"job {spec.generate_job_id} does not exist")
    if job.kind != JobKind.generate:
        raise SpecError(f"job {job.id} is a {job.kind.value} job; score takes a generate job")
    if job.status != JobStatus.succeeded:
        raise SpecError(f"generate job {job.id} is {job.status.value}; only a succeeded generate job can be scored")
    return job
