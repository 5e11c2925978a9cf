"""Each job kind's Celery task name and the readable title its messages carry.

Apart from worker/tasks.py (the plain functions the tasks run) so that the publisher (worker/broker.py,
worker/lifecycle.py) needs nothing of the worker's job code.
"""

from __future__ import annotations

from models.jobs import JobKind

# The names stay those of the first releases, so that messages queued before an upgrade still find their task.
TASK_NAMES = {kind: f"worker.tasks.{kind.value}" for kind in JobKind}
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
