"""Checks a spec against the world before it is enqueued: models, datasets, adapters and parent jobs exist.

Each failure raises `SpecError` with a one-line message; nothing is written before all checks pass.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter
from worker.data.refs import RefError, check_dataset, check_model, required_columns
from models.specs import FinetuneSpec, GenerateSpec, ScoreSpec, SpecError

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


def resolve_task(spec):
    """The spec with `task` filled in from the model's config (an explicit --task wins)."""
    if spec.task:
        return spec
    from worker.ml.kinds import TaskError, detect_task

    try:
        return spec.model_copy(update={"task": detect_task(spec.model)})
    except TaskError as exc:
        if spec.kind == "generate" and (spec.adapter or spec.adapters):
            return spec  # the adapter's row knows its task
        raise SpecError(str(exc)) from None


def target_column(spec) -> str:
    return spec.label_column if spec.task == "classification" else spec.summary_column


def validate_finetune(spec: FinetuneSpec, session: Session) -> FinetuneSpec:
    """Returns the spec with its task filled in."""
    _refs(check_model, spec.model)
    spec = resolve_task(spec)
    splits = [spec.train_split] + ([spec.eval_split] if spec.eval_split else [])
    _check_data(spec, target_column(spec), splits)
    if not spec.replace and session.scalar(select(Adapter.id).where(Adapter.name == spec.name)) is not None:
        raise SpecError(f"adapter name {spec.name!r} is already taken; choose another --name, or pass --replace "
                        "to replace that adapter when this job succeeds")
    if pending_finetune(session, spec.name) is not None:
        raise SpecError(f"adapter name {spec.name!r} is already used by a queued or running fine-tune job")
    return spec


def validate_generate(spec: GenerateSpec, session: Session, home: Path, *, model_given: bool = True) -> GenerateSpec:
    """Returns the spec with the adapters' base model and task filled in."""
    if spec.adapters:
        if spec.adapter:
            raise SpecError("give either --adapter or --adapters, not both")
        if len(set(spec.adapters)) != len(spec.adapters):
            raise SpecError("--adapters names an adapter twice")
        found = {}
        for name in spec.adapters:
            if name != "base":  # the base model's own rows, side by side with the adapters'
                found[name] = _existing_adapter(session, home, name)
        if not found:
            raise SpecError("--adapters needs at least one adapter besides 'base'")
        bases = {a.base_model for a in found.values()}
        if len(bases) > 1:
            raise SpecError(f"adapters of one generate job must share a base model; got {', '.join(sorted(bases))}")
        base_model = bases.pop()
        if model_given and spec.model != base_model:
            raise SpecError(f"the adapters were trained on {base_model!r}, not {spec.model!r}")
        spec = spec.model_copy(update={"model": base_model, "task": spec.task or next(iter(found.values())).task})
    if spec.adapter:
        adapter = _existing_adapter(session, home, spec.adapter)
        base_model = adapter.base_model
        if model_given and spec.model != base_model:
            raise SpecError(f"adapter {spec.adapter!r} was trained on {base_model!r}, not {spec.model!r}")
        spec = spec.model_copy(update={"model": base_model, "task": spec.task or adapter.task})
    _refs(check_model, spec.model)
    spec = resolve_task(spec)
    _check_data(spec, None, [spec.split])
    return spec


def _check_data(spec, target: str | None, splits: list[str]) -> None:
    """The dataset exists, has `splits` and the columns the job reads (its target column when it trains)."""
    columns = required_columns(spec.data_format, spec.text_column, target)
    try:
        check_dataset(spec.dataset, columns, splits, dataset_config=spec.dataset_config, data_format=spec.data_format)
    except RefError as exc:
        raise SpecError(str(exc)) from None


def _existing_adapter(session: Session, home: Path, name: str) -> Adapter:
    adapter = session.scalar(select(Adapter).where(Adapter.name == name))
    if adapter is None:
        raise SpecError(f"adapter {name!r} does not exist (see 'adapters list')")
    folder = home / adapter.path
    if not ((folder / "adapter_config.json").exists() or (folder / "config.json").exists()):
        raise SpecError(f"adapter {name!r} is recorded but its folder {folder} is missing")
    return adapter


def validate_score(spec: ScoreSpec, session: Session) -> Job:
    """Returns the generate job to score; it must be a succeeded generate job."""
    job = session.get(Job, spec.generate_job_id)
    if job is None:
        raise SpecError(f"job {spec.generate_job_id} does not exist")
    if job.kind != JobKind.generate:
        raise SpecError(f"job {job.id} is a {job.kind.value} job; score takes a generate job")
    if job.status != JobStatus.succeeded:
        raise SpecError(f"generate job {job.id} is {job.status.value}; only a succeeded generate job can be scored")
    check_metric_fits(spec, job.spec.get("task") or (job.result or {}).get("task") or "seq2seq", job.id)
    return job


def check_metric_fits(spec: ScoreSpec, task: str, generate_job_id) -> None:
    from worker.jobs.score import METRICS_FOR_TASK

    for family in spec.metrics or []:
        if family != METRICS_FOR_TASK[task]:
            raise SpecError(f"generate job {generate_job_id} is a {task} job: score it with --metric "
                            f"{METRICS_FOR_TASK[task]}, not {family}")
