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

    return train_adapter(spec, session, runtime.cache, runtime.settings.home, job_id=lease.job_id, lease=lease,
                         on_progress=on_progress, faults=runtime.faults())


def _generate(spec, session, runtime, lease, on_progress) -> dict:
    from worker.jobs.generate import generate_summaries

    return generate_summaries(spec, session, runtime.cache, runtime.settings.home, job_id=lease.job_id, lease=lease,
                              on_progress=on_progress, faults=runtime.faults())


def _score(spec, session, runtime, lease, on_progress) -> dict:
    from worker.jobs.score import score_rows

    return score_rows(spec, session, job_id=lease.job_id, lease=lease, on_progress=on_progress,
                      faults=runtime.faults())


JOBS: dict[JobKind, Callable[..., dict]] = {JobKind.finetune: _finetune, JobKind.generate: _generate,
                                             JobKind.score: _score}
# The names stay those of the first releases, so that messages queued before an upgrade still find their task.
TASK_NAMES = {kind: f"worker.tasks.{kind.value}" for kind in JOBS}
