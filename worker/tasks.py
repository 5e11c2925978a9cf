"""The table of job kinds: each kind's Celery task name and the plain function its task runs.

The publisher sends a job id to the kind's task name; the worker registers one thin task per row
(`worker.runner.register_tasks`), which claims the row, calls the plain function with what the worker holds and
records the outcome. Messages carry the job id only.
"""

from __future__ import annotations

from typing import Callable

from models.jobs import JobKind


def _finetune(spec, session, runtime, lease, on_progress) -> dict:
    from worker.jobs.finetune import train_adapter
    from worker.search import rung_decision

    if runtime.settings.cotrain > 1:  # compatible queued points of its sweep trained in the same pass
        from worker.cotrain_run import train_with_siblings

        together = train_with_siblings(spec, session, runtime, lease, on_progress)
        if together is not None:
            return together

    def on_rung(step, value_of):  # an ASHA point at a rung: the decision recorded in the database
        decision = rung_decision(runtime.settings, session, lease, spec.search, step, value_of)
        if decision.released:  # points waiting at a rung that this result decided
            from worker.lifecycle import release

            release(session, runtime.broker, decision.released)
        return decision

    return train_adapter(spec, session, runtime.cache, runtime.settings.home, job_id=lease.job_id, lease=lease,
                         on_progress=on_progress, faults=runtime.faults(), on_rung=on_rung if spec.search else None)


def _generate(spec, session, runtime, lease, on_progress) -> dict:
    from worker.jobs.generate import generate_summaries

    return generate_summaries(spec, session, runtime.cache, runtime.settings.home, job_id=lease.job_id, lease=lease,
                              on_progress=on_progress, faults=runtime.faults())


def _score(spec, session, runtime, lease, on_progress) -> dict:
    from worker.jobs.score import score_rows

    # the model cache only for the judge's local model: building it imports torch
    cache = runtime.cache if "judge" in (spec.metrics or []) and spec.judge_backend == "local" else None
    return score_rows(spec, session, job_id=lease.job_id, lease=lease, on_progress=on_progress,
                      faults=runtime.faults(), cache=cache, settings=runtime.settings)


JOBS: dict[JobKind, Callable[..., dict]] = {JobKind.finetune: _finetune, JobKind.generate: _generate,
                                             JobKind.score: _score}
# The names stay those of the first releases, so that messages queued before an upgrade still find their task.
TASK_NAMES = {kind: f"worker.tasks.{kind.value}" for kind in JOBS}
MAX_TITLE = 120


def task_title(kind: JobKind, job_id: int, spec: dict, *, sweep: str | None = None, attempt: int = 1) -> str:
    """What Flower, `celery events` and the worker's log lines call the task (Celery's `shadow` name): the kind, what
    it works on, its sweep, the job id and, from the second attempt on, the attempt, e.g.
    `finetune lr-1e-3 · sweep lr-rank · job 12` or `generate 3 variants (base, lr-1e-3, …) · job 14 · attempt 2`."""
    if kind == JobKind.finetune:
        what = str(spec.get("name"))
    elif kind == JobKind.generate:
        variants = spec.get("adapters") or [spec.get("adapter") or "base"]
        what = variants[0] if len(variants) == 1 else \
            f"{len(variants)} variants ({', '.join(variants[:2])}{', …' if len(variants) > 2 else ''})"
    else:
        what = f"of job {spec.get('generate_job_id')}"
    parts = [f"{kind.value} {what}"[:MAX_TITLE // 2]]
    if sweep:
        parts.append(f"sweep {sweep}")
    parts.append(f"job {job_id}")
    if attempt > 1:
        parts.append(f"attempt {attempt}")
    return " · ".join(parts)
