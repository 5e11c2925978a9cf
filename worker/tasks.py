"""The table of job kinds: the plain function each kind's task runs (its Celery name: worker/task_names.py).

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
