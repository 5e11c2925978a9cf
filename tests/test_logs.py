"""Logs: a worker's rotating file, each job's own log (every attempt, tracebacks included), `jobs logs ID
[--follow]` and the traceback section of `jobs show`."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from models.jobs import Job, JobKind, JobStatus
from models.settings import Settings
from tests.conftest import add_job, cli, session_of, settings_of, start_worker
from worker import joblog
from worker.joblog import job_log_path, job_logging, setup_worker_logging

log = logging.getLogger("tunequeue.test_logs")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", database_url="sqlite://", redis_url="redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def info_level():
    level = log.level
    log.setLevel(logging.INFO)  # pytest leaves the root logger at WARNING
    yield
    log.setLevel(level)


def in_thread(target) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


def test_job_logging_keeps_the_jobs_own_records_and_every_attempt(settings):
    bystander_may_log, bystander_logged = threading.Event(), threading.Event()

    def bystander():  # a worker thread that was there before the job (the consumer, the reaper)
        bystander_may_log.wait(10)
        log.warning("not the job's business")
        bystander_logged.set()

    other = threading.Thread(target=bystander)
    other.start()
    with job_logging(settings, 7, attempt=1) as path:
        log.info("loading the base model")
        log.debug("too fine to keep")
        in_thread(lambda: log.warning("from a thread the job started"))
        bystander_may_log.set()
        bystander_logged.wait(10)
    other.join()
    log.info("after the attempt")
    with pytest.raises(RuntimeError):
        with job_logging(settings, 7, attempt=2):
            try:
                raise RuntimeError("boom in the second attempt")
            except RuntimeError:
                log.exception("job 7 failed")
                raise
    log.error("after the failed attempt")

    assert path == job_log_path(settings, 7) == settings.home / "logs" / "jobs" / "7.log"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("=== attempt 1 on ") and " at 20" in lines[0]
    assert "INFO tunequeue.test_logs [MainThread] loading the base model" in lines[1]
    assert "from a thread the job started" in text
    assert "=== attempt 2 on " in text and "Traceback (most recent call last)" in text
    assert "RuntimeError: boom in the second attempt" in text
    for absent in ("too fine to keep", "not the job's business", "after the attempt", "after the failed attempt"):
        assert absent not in text
    assert not any(isinstance(h, joblog.JobLogHandler) for h in logging.getLogger().handlers)


def test_job_logging_without_a_writable_folder_warns_and_runs_the_job(tmp_path, caplog):
    home = tmp_path / "a-file"
    home.write_text("not a folder")
    settings = Settings(home=home, database_url="sqlite://", redis_url="redis://127.0.0.1:6379/0")
    with job_logging(settings, 3, attempt=1) as path:
        log.info("the job runs all the same")
    assert path is None
    assert "job 3: cannot write its log" in caplog.text


def test_worker_log_is_a_rotating_file_under_logs(settings):
    from celery.signals import after_setup_logger

    root = logging.getLogger()
    try:
        path = setup_worker_logging(settings, "tunequeue-gpu1@%h", "INFO")
        assert setup_worker_logging(settings, "another@name", "INFO") == path  # once per process
        assert path.parent == settings.logs_dir and path.name.startswith("worker-tunequeue-gpu1_")
        assert "%" not in path.name and "@" not in path.name
        handler = joblog._worker["handler"]
        assert handler not in root.handlers  # Celery sets up stderr first: a root with a handler it leaves alone
        after_setup_logger.send(sender=None, logger=root, loglevel=logging.INFO, logfile=None, format="",
                                colorize=False)
        after_setup_logger.send(sender=None, logger=root, loglevel=logging.INFO, logfile=None, format="",
                                colorize=False)
        assert root.handlers.count(handler) == 1
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        assert handler.maxBytes == 10 * 1024 * 1024 and handler.backupCount == 5
        log.info("job 12 (finetune) started, attempt 1")
        handler.flush()
        assert "INFO tunequeue.test_logs [MainThread] job 12 (finetune) started" in path.read_text()
    finally:
        handler = joblog._worker["handler"]
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        joblog._worker.update(handler=None, node=None)


def test_jobs_logs_without_a_file_shows_the_stored_traceback(sqlite_env):
    from manage import cli as manage_cli

    job_id = add_job(sqlite_env, JobKind.finetune, JobStatus.failed, {"name": "elsewhere"})
    with session_of(sqlite_env) as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            attempts=1, worker_host="tunequeue-b@gpu2", error="ValueError: bad",
            traceback="Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad"))
        session.commit()
    result = CliRunner().invoke(manage_cli, ["jobs", "logs", str(job_id)])
    assert result.exit_code == 0, result.output
    assert f"job {job_id} has no log at " in result.output and "ran on tunequeue-b@gpu2" in result.output
    assert result.output.rstrip().endswith("ValueError: bad")
    shown = CliRunner().invoke(manage_cli, ["jobs", "show", str(job_id)])
    assert shown.exit_code == 0 and "\ntraceback:" in shown.output and "  ValueError: bad" in shown.output

    queued = add_job(sqlite_env, JobKind.finetune, JobStatus.queued, {"name": "later"})
    waiting = CliRunner().invoke(manage_cli, ["jobs", "logs", str(queued)])
    assert waiting.exit_code == 0 and "it has not started yet" in waiting.output

    unknown = CliRunner().invoke(manage_cli, ["jobs", "logs", "999999"])
    assert unknown.exit_code == 2 and unknown.output.strip() == "Error: job 999999 does not exist"


def test_follow_prints_lines_as_they_come_until_the_job_ends(sqlite_env):
    from api.context import AppContext
    from api.logs import follow_job_log, read_job_log

    settings = settings_of(sqlite_env)
    job_id = add_job(sqlite_env, JobKind.finetune, JobStatus.running, {"name": "live"})
    path = job_log_path(settings, job_id)
    path.parent.mkdir(parents=True)
    path.write_text("=== attempt 1 ===\nearly line\n")
    seen: list[str] = []

    def worker_side():
        time.sleep(0.3)
        with open(path, "a") as file:
            file.write("step 1\nstep 2 half")
            file.flush()
            time.sleep(0.3)
            file.write(" done\nfailed: RuntimeError\n")
        with session_of(sqlite_env) as session:
            session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.failed))
            session.commit()

    writer = threading.Thread(target=worker_side)
    writer.start()
    started = time.monotonic()
    status = follow_job_log(AppContext(settings), job_id, seen.append, poll=0.05, tail=1)
    writer.join()
    assert status == JobStatus.failed and time.monotonic() - started < 10
    assert seen == ["early line", "step 1", "step 2 half done", "failed: RuntimeError"]
    assert read_job_log(settings, job_id, tail=2) == "step 2 half done\nfailed: RuntimeError\n"
    assert read_job_log(settings, job_id + 1) is None


@pytest.mark.slow
def test_a_failed_jobs_traceback_reaches_jobs_logs_and_jobs_show(make_env, tmp_path):
    """End to end with a burst worker. Needs worker/runner.py to run each job inside `job_logging` and store the
    traceback on the row."""
    env = {**make_env("sqlite"), "TUNEQUEUE_FAULTS": "crash_at_step:1"}
    queued = cli(env, "finetune", "--name", "doomed", "--max-steps", "3", "--max-attempts", "1")
    assert queued.returncode == 0, queued.stderr
    job_id = int(queued.stdout.split()[1])
    worker = start_worker(env, "--burst", log=tmp_path / "worker.out")
    try:
        assert worker.wait(timeout=180) == 0, (tmp_path / "worker.out").read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()

    logs = Path(env["TUNEQUEUE_HOME"]) / "logs"
    worker_logs = list(logs.glob("worker-*.log"))
    assert len(worker_logs) == 1 and f"job {job_id} (finetune) started" in worker_logs[0].read_text()

    started = time.monotonic()
    followed = cli(env, "jobs", "logs", "--follow", str(job_id))
    assert followed.returncode == 0 and time.monotonic() - started < 20, followed.stderr
    shown_logs = cli(env, "jobs", "logs", str(job_id))
    assert shown_logs.returncode == 0, shown_logs.stderr
    assert shown_logs.stdout.startswith("=== attempt 1 on tunequeue"), shown_logs.stdout
    assert "Traceback (most recent call last)" in shown_logs.stdout
    assert "RuntimeError: crash injected by TUNEQUEUE_FAULTS at step 1" in shown_logs.stdout
    assert followed.stdout == shown_logs.stdout
    shown = cli(env, "jobs", "show", str(job_id))
    assert shown.returncode == 0 and "\ntraceback:" in shown.stdout, shown.stdout
    assert "RuntimeError: crash injected" in shown.stdout.split("\ntraceback:")[1]
