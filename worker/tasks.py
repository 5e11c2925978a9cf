"""Thin Celery tasks: each takes a job id and hands it to the runner, which calls one plain function."""

from __future__ import annotations

from worker.celery_app import app
from worker.runner import run_job


@app.task(name="worker.tasks.finetune", bind=True)
def finetune(self, job_id: int) -> str:
    return run_job(self, job_id, "finetune")


@app.task(name="worker.tasks.generate", bind=True)
def generate(self, job_id: int) -> str:
    return run_job(self, job_id, "generate")


@app.task(name="worker.tasks.score", bind=True)
def score(self, job_id: int) -> str:
    return run_job(self, job_id, "score")
