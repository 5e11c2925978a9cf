"""Fault tests with real processes, Redis and PostgreSQL: killed workers, lost broker messages, duplicate
deliveries, crashes, injected out-of-memory. The database stays the source of truth throughout."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models.jobs import Job, JobStatus
from models.results import Adapter, Generation, LossPoint
from tests.conftest import cli, free_port, queue_length, session_of, start_redis, start_worker, wait_until

FAST_REAPER = {"TUNEQUEUE_HEARTBEAT_SECONDS": "0.5", "TUNEQUEUE_STALE_SECONDS": "4", "TUNEQUEUE_REAP_SECONDS": "1"}


def job_row(env, job_id) -> Job:
    with session_of(env) as session:
        return session.get(Job, job_id)


def enqueue_id(result) -> int:
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[1])


def drain(env, tmp_path, timeout: float = 180) -> None:
    """Run a burst worker until the queue is empty."""
    worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
    assert worker.wait(timeout=timeout) == 0, (tmp_path / "worker.log").read_text()[-3000:]


def stop(worker) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def test_kill_9_mid_training_resumes_from_checkpoint(make_env, tmp_path):
    env = {**make_env("postgresql"), **FAST_REAPER}
    job_id = enqueue_id(cli(env, "finetune", "--name", "survivor", "--epochs", "2", "--checkpoint-every", "40"))
    checkpoint = Path(env["TUNEQUEUE_HOME"]) / "checkpoints" / job_row(env, job_id).uid / "checkpoint.pt"
    first = start_worker(env, log=tmp_path / "first.log")
    try:
        wait_until(checkpoint.exists, 120, "the first checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop(first)
    assert job_row(env, job_id).status == JobStatus.running  # the dead worker never finished it
    second = start_worker(env, log=tmp_path / "second.log")
    try:
        job = wait_until(lambda: (j := job_row(env, job_id)).status.finished and j, 240, "the job to finish")
    finally:
        stop(second)
    assert job.status == JobStatus.succeeded, (tmp_path / "second.log").read_text()[-3000:]
    assert job.attempts == 2 and len(job.attempt_errors) == 1
    assert job.attempt_errors[0]["error"].startswith("worker lost: no heartbeat")
    assert job.result["resumed_from_step"] >= 40 and job.result["steps"] == job.result["total_steps"] == 250
    assert not checkpoint.exists()  # removed once the adapter was saved
    with session_of(env) as session:
        assert session.scalar(select(func.count(Adapter.id))) == 1
        steps = session.scalars(select(LossPoint.step).where(LossPoint.job_id == job_id)).all()
        assert len(steps) == len(set(steps)) and max(steps) == 250


def test_duplicate_delivery_runs_once(make_env, tmp_path):
    env = make_env("sqlite")
    job_id = enqueue_id(cli(env, "finetune", "--name", "once", "--max-steps", "60"))
    worker = start_worker(env, log=tmp_path / "worker.log")
    try:
        wait_until(lambda: job_row(env, job_id).status == JobStatus.running, 60, "the job to start")
        from worker.celery_app import make_app
        from models.settings import Settings

        settings = Settings.from_env(env)
        make_app(settings).send_task("worker.tasks.finetune", args=[job_id], queue=settings.queue)
        wait_until(lambda: job_row(env, job_id).status.finished and queue_length(env) == 0, 120, "both deliveries")
        time.sleep(2)
    finally:
        stop(worker)
    job = job_row(env, job_id)
    assert job.status == JobStatus.succeeded and job.attempts == 1
    assert "is succeeded, not queued; this delivery does nothing" in (tmp_path / "worker.log").read_text()
    with session_of(env) as session:
        assert session.scalar(select(func.count(Adapter.id))) == 1


def test_always_crashing_job_fails_after_max_attempts(make_env, tmp_path):
    env = {**make_env("sqlite"), "TUNEQUEUE_FAULTS": "crash_at_step:5"}
    job_id = enqueue_id(cli(env, "finetune", "--name", "doomed", "--max-steps", "20", "--max-attempts", "3"))
    drain(env, tmp_path)
    job = job_row(env, job_id)
    assert job.status == JobStatus.failed and job.attempts == 3
    assert [e["attempt"] for e in job.attempt_errors] == [1, 2, 3]
    assert all("crash injected by TUNEQUEUE_FAULTS at step 5" in e["error"] for e in job.attempt_errors)
    assert "RuntimeError: crash injected" in job.error


def test_injected_oom_halves_the_micro_batch(make_env, tmp_path):
    env = {**make_env("sqlite"), "TUNEQUEUE_FAULTS": "oom_at_step:3"}
    job_id = enqueue_id(cli(env, "finetune", "--name", "squeezed", "--max-steps", "20", "--batch-size", "16"))
    drain(env, tmp_path)
    job = job_row(env, job_id)
    assert job.status == JobStatus.succeeded and job.attempts == 1
    assert job.result["micro_batch_size"] == 8 and job.result["steps"] == 20
    assert "out of memory at step 3: micro-batch now 8" in (tmp_path / "worker.log").read_text()


def test_soft_time_limit_checkpoints_resumes_and_fails_clearly(make_env, tmp_path):
    """Each attempt stops at the limit with a checkpoint; the retry resumes from it and gets further; once the
    attempts are spent the job fails with the reason and its checkpoint is removed (an ended job never resumes)."""
    env = make_env("sqlite")
    job_id = enqueue_id(cli(env, "finetune", "--name", "slow", "--epochs", "50", "--time-limit", "3",
                            "--checkpoint-every", "1000", "--max-attempts", "2"))
    drain(env, tmp_path)
    job = job_row(env, job_id)
    assert job.status == JobStatus.failed and "JobTimeLimit: time limit of 3s reached at step" in job.error
    steps = [int(e["error"].split("reached at step ")[1].split()[0]) for e in job.attempt_errors]
    assert len(steps) == 2 and steps[1] > steps[0], job.attempt_errors
    assert job.progress["resumed_from_step"] == steps[0]  # the retry went on from the first attempt's checkpoint
    assert not (Path(env["TUNEQUEUE_HOME"]) / "checkpoints" / job.uid).exists()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start a private broker")
def test_broker_restart_without_persistence(make_env, tmp_path):
    port = free_port()
    env = {**make_env("sqlite"), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    broker = start_redis(port)
    try:
        ids = [enqueue_id(cli(env, "generate", "--limit", "3")) for _ in range(3)]
        assert queue_length(env) == 3
        broker.send_signal(signal.SIGKILL)
        broker.wait(timeout=10)
        broker = start_redis(port)  # back, empty
        assert queue_length(env) == 0  # the messages died with the broker; the rows did not
        with session_of(env) as session:
            assert set(session.scalars(select(Job.status))) == {JobStatus.queued}
        first = cli(env, "jobs", "reconcile")
        assert f"3 queued jobs re-published ({', '.join(map(str, ids))})" in first.stdout, first.stdout + first.stderr
        assert queue_length(env) == 3
        again = cli(env, "jobs", "reconcile")
        assert "0 queued jobs re-published" in again.stdout  # nothing is sent twice
        worker = start_worker(env, log=tmp_path / "worker.log")
        try:
            wait_until(lambda: all(job_row(env, i).status.finished for i in ids), 120, "the re-published jobs")
            # the broker goes away again under the running worker, which reconnects by itself
            broker.send_signal(signal.SIGKILL)
            broker.wait(timeout=10)
            time.sleep(2)
            broker = start_redis(port)  # back again
            later = [enqueue_id(cli(env, "generate", "--limit", "3")) for _ in range(2)]
            wait_until(lambda: all(job_row(env, i).status.finished for i in later), 120, "jobs after reconnecting")
            assert worker.poll() is None  # the same worker process did them
        finally:
            stop(worker)
        with session_of(env) as session:
            jobs = [session.get(Job, i) for i in ids + later]
            assert all(j.status == JobStatus.succeeded and j.attempts == 1 for j in jobs)
            assert session.scalar(select(func.count(Generation.id))) == 15
    finally:
        broker.kill()
        broker.wait(timeout=10)


def test_kill_9_mid_generation_keeps_rows_and_finishes_the_rest(make_env, tmp_path):
    env = {**make_env("sqlite"), **FAST_REAPER}
    job_id = enqueue_id(cli(env, "generate", "--limit", "80", "--batch-size", "1"))

    def rows() -> int:
        with session_of(env) as session:
            return session.scalar(select(func.count(Generation.id)).where(Generation.job_id == job_id))

    first = start_worker(env, log=tmp_path / "first.log")
    try:
        wait_until(lambda: rows() >= 5, 120, "the first rows")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop(first)
    kept = rows()
    assert 5 <= kept < 80
    second = start_worker(env, log=tmp_path / "second.log")
    try:
        job = wait_until(lambda: (j := job_row(env, job_id)).status.finished and j, 240, "the job to finish")
    finally:
        stop(second)
    assert job.status == JobStatus.succeeded and job.attempts == 2
    assert job.result["resumed_from"] >= kept and job.result["examples"] == 80
    assert rows() == 80  # each example once: kept rows plus the rest


def test_injected_oom_halves_the_generation_batch(make_env, tmp_path):
    env = {**make_env("sqlite"), "TUNEQUEUE_FAULTS": "oom_at_batch:2"}
    job_id = enqueue_id(cli(env, "generate", "--limit", "40", "--batch-size", "16"))
    drain(env, tmp_path)
    job = job_row(env, job_id)
    assert job.status == JobStatus.succeeded and job.result["batch_size"] == 8 and job.result["examples"] == 40
    with session_of(env) as session:
        assert session.scalar(select(func.count(Generation.id))) == 40


def test_kill_9_mid_scoring_writes_everything_once(make_env, tmp_path):
    from models.results import ExampleScore, Metric

    env = {**make_env("sqlite"), **FAST_REAPER}
    generate_id = enqueue_id(cli(env, "generate", "--limit", "20"))
    worker = start_worker(env, "--burst", log=tmp_path / "generate.log")
    assert worker.wait(timeout=120) == 0
    score_id = enqueue_id(cli(env, "score", str(generate_id)))
    slow = start_worker({**env, "TUNEQUEUE_FAULTS": "score_delay_s:30"}, log=tmp_path / "slow.log")
    try:
        wait_until(lambda: job_row(env, score_id).status == JobStatus.running, 60, "scoring to start")
        time.sleep(1)
        slow.send_signal(signal.SIGKILL)
        slow.wait(timeout=30)
    finally:
        stop(slow)
    with session_of(env) as session:
        assert session.scalar(select(func.count(Metric.id))) == 0  # scores are written in one transaction
    second = start_worker(env, log=tmp_path / "second.log")
    try:
        job = wait_until(lambda: (j := job_row(env, score_id)).status.finished and j, 120, "scoring to finish")
    finally:
        stop(second)
    assert job.status == JobStatus.succeeded and job.attempts == 2
    with session_of(env) as session:
        assert session.scalar(select(func.count(Metric.id))) == 4
        assert session.scalar(select(func.count(ExampleScore.id))) == 4 * 20
