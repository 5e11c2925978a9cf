"""The whole loop as a user drives it: CLI → Redis → real Celery worker subprocess → SQL → report, on SQLite and
on PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys

from sqlalchemy import func, select

from models.jobs import Job, JobStatus
from models.results import Adapter, ExampleScore, Generation, Metric
from tests.conftest import REPO, cli, ok_json, queue_length, session_of, start_worker

LIMIT = 30


def test_cli_worker_database_report(env, tmp_path):
    worker = start_worker(env, log=tmp_path / "worker.log")
    try:
        base = ok_json(cli(env, "generate", "--limit", str(LIMIT), "--wait", "--json"))
        tuned = ok_json(cli(env, "finetune", "--name", "e2e", "--max-steps", "40", "--lr", "3e-3", "--wait", "--json"))
        adapted = ok_json(cli(env, "generate", "--adapter", "e2e", "--limit", str(LIMIT), "--wait", "--json"))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    log = (tmp_path / "worker.log").read_text()
    assert base["status"] == tuned["status"] == adapted["status"] == "succeeded", log[-3000:]
    # the second generate job found the base model resident: one load for three jobs in this worker
    assert base["result"]["model_was_loaded"] is False
    assert adapted["result"]["model_was_loaded"] is True and adapted["result"]["base_loads"] == 1

    # score both, then a burst worker drains the queue and exits by itself
    for job in (base, adapted):
        queued = cli(env, "score", str(job["id"]))
        assert queued.returncode == 0 and "queued" in queued.stdout, queued.stderr
    assert queue_length(env) == 2
    burst = start_worker(env, "--burst", log=tmp_path / "burst.log")
    assert burst.wait(timeout=240) == 0, (tmp_path / "burst.log").read_text()[-3000:]
    assert queue_length(env) == 0

    with session_of(env) as session:
        jobs = list(session.scalars(select(Job).order_by(Job.id)))
        assert [j.status for j in jobs] == [JobStatus.succeeded] * 5
        assert all(j.attempts == 1 and j.worker_host and j.started_at and j.finished_at for j in jobs)
        adapter = session.scalar(select(Adapter).where(Adapter.name == "e2e"))
        assert adapter.job_id == tuned["id"] and adapter.trainable_params > 0
        for job in (base, adapted):
            assert session.scalar(select(func.count(Generation.id)).where(Generation.job_id == job["id"])) == LIMIT
        assert session.scalar(select(func.count(Metric.id))) == 8
        assert session.scalar(select(func.count(ExampleScore.id))) == 8 * LIMIT

    rows = ok_json(cli(env, "report", "--metric", "rouge", "--format", "json"))
    assert [r["variant"] for r in rows] == ["base", "e2e"]
    assert all(r["examples"] == LIMIT for r in rows)
    assert rows[0]["delta_rouge1"] == 0
    assert rows[1]["delta_rouge1"] == rows[1]["rouge1"] - rows[0]["rouge1"]
    assert rows[1]["rouge1"] > rows[0]["rouge1"]  # even 40 steps beat the untrained base

    table_csv = cli(env, "report", "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(table_csv.stdout)))
    assert [float(r["rouge1"]) for r in parsed] == [r["rouge1"] for r in rows]
    table = cli(env, "report")
    assert table.returncode == 0 and "e2e" in table.stdout
    assert f"{rows[1]['rouge1']:.3f} [" in table.stdout  # mean [95% CI]

    listed = ok_json(cli(env, "jobs", "list", "--json"))
    assert [j["id"] for j in listed] == sorted((j.id for j in jobs), reverse=True)
    shown = ok_json(cli(env, "jobs", "show", str(tuned["id"]), "--json"))
    assert shown["spec"]["name"] == "e2e" and shown["progress"]["step"] == 40


def test_cancelled_queued_job_never_runs(env, tmp_path):
    queued = cli(env, "generate", "--limit", "5")
    assert queued.returncode == 0, queued.stderr
    job_id = int(queued.stdout.split()[1])
    cancelled = cli(env, "jobs", "cancel", str(job_id))
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    burst = start_worker(env, "--burst", log=tmp_path / "burst.log")
    assert burst.wait(timeout=120) == 0
    assert "is cancelled, not queued" in (tmp_path / "burst.log").read_text()
    with session_of(env) as session:
        assert session.get(Job, job_id).status == JobStatus.cancelled
        assert session.scalar(select(func.count(Generation.id))) == 0


def test_cancel_running_training(make_env, tmp_path):
    import time

    env = make_env("sqlite")
    worker = start_worker(env, log=tmp_path / "worker.log")
    try:
        queued = cli(env, "finetune", "--name", "long", "--epochs", "100")
        job_id = int(queued.stdout.split()[1])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = ok_json(cli(env, "jobs", "show", str(job_id), "--json"))
            if job["progress"] and job["progress"]["step"] > 0:
                break
            time.sleep(0.5)
        assert job["status"] == "running", job
        # the threads pool keeps answering remote control while a job runs (Flower, celery inspect); asked by name,
        # since every worker on this Redis answers a broadcast
        inspect = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "inspect", "active",
                                  "--json", "--timeout", "10", "--destination", job["worker_host"]], env=env,
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert inspect.returncode == 0, inspect.stdout + inspect.stderr
        active = [task for tasks in json.loads(inspect.stdout.strip().splitlines()[-1]).values() for task in tasks]
        assert [task["args"] for task in active] == [[job_id]]
        # progress is mirrored to Celery's task state for Flower / AsyncResult
        from worker.celery_app import make_app
        from models.settings import Settings

        shown = ok_json(cli(env, "jobs", "show", str(job_id), "--json"))
        state = make_app(Settings.from_env(env)).AsyncResult(shown["celery_task_id"])
        assert state.state == "PROGRESS" and state.info["job_id"] == job_id and state.info["step"] > 0
        assert "cancel requested" in cli(env, "jobs", "cancel", str(job_id)).stdout
        while time.monotonic() < deadline:
            job = ok_json(cli(env, "jobs", "show", str(job_id), "--json"))
            if job["status"] != "running":
                break
            time.sleep(0.5)
        assert job["status"] == "cancelled" and job["error"].startswith("cancelled at step")
        assert job["progress"]["step"] < job["progress"]["total_steps"]
        # the worker is free for the next job
        after = ok_json(cli(env, "generate", "--limit", "5", "--wait", "--json"))
        assert after["status"] == "succeeded"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
