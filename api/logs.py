"""A job's log, as `jobs logs ID [--follow]` shows it: the lines its attempts wrote to TUNEQUEUE_HOME/logs/jobs/ID.log
(worker/joblog.py), or, where that file is not on this machine, what the job row keeps (the last traceback)."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from api.context import AppContext
from api.jobs import get_job
from models.jobs import Job, JobStatus
from models.settings import Settings
from worker.joblog import job_log_path

__all__ = ["job_log_path", "read_job_log", "show_job_log", "follow_job_log"]


def _settings(ctx_or_settings: AppContext | Settings) -> Settings:
    return ctx_or_settings if isinstance(ctx_or_settings, Settings) else ctx_or_settings.settings


def read_job_log(ctx_or_settings: AppContext | Settings, job_id: int, tail: int | None = None) -> str | None:
    """The job's log file (its last `tail` lines), or None when this machine has no log file for the job."""
    path = job_log_path(_settings(ctx_or_settings), job_id)
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return "".join(deque(file, maxlen=tail) if tail else file)
    except FileNotFoundError:
        return None


def show_job_log(ctx: AppContext, job_id: int, echo: Callable[[str], None], tail: int | None = None) -> None:
    """Echo the job's log lines; without a log file, one line saying why and the traceback the job row keeps."""
    with ctx.session() as session:
        job = get_job(session, job_id)
        text = read_job_log(ctx, job_id, tail)
        if text is None:
            for line in _without_file(ctx.settings, job):
                echo(line)
            return
    for line in text.splitlines():
        echo(line)


def follow_job_log(ctx: AppContext, job_id: int, echo: Callable[[str], None], poll: float = 0.5,
                   tail: int | None = None) -> JobStatus:
    """Echo the job's log lines (the last `tail` first, if given) and then each new line as it is appended, until
    the job has finished; returns its final status."""
    path = job_log_path(ctx.settings, job_id)
    with ctx.session() as session:
        get_job(session, job_id)
    offset, partial, said_waiting = 0, b"", False
    if tail:
        data = _read_from(path, 0)
        offset = len(data)
        lines = data.split(b"\n")
        partial = lines.pop()
        for line in lines[-tail:]:
            echo(line.decode("utf-8", errors="replace"))
    with ctx.sessions() as session:
        while True:
            session.expire_all()
            job = session.get(Job, job_id)
            if job.status.finished:
                time.sleep(poll)  # the worker logs the outcome just after it commits it
            if _size(path) < offset:  # cut short by hand: start over
                offset, partial = 0, b""
            data = _read_from(path, offset)
            offset += len(data)
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                echo(line.decode("utf-8", errors="replace"))
            if job.status.finished:
                if partial:
                    echo(partial.decode("utf-8", errors="replace"))
                if not path.exists():
                    for line in _without_file(ctx.settings, job):
                        echo(line)
                return job.status
            if not path.exists() and not said_waiting:
                echo(f"job {job_id} is {job.status.value}; waiting for its log at {path}")
                said_waiting = True
            time.sleep(poll)


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path, offset: int) -> bytes:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read()
    except FileNotFoundError:
        return b""


def _without_file(settings: Settings, job: Job) -> list[str]:
    """What to show for a job that has no log file here: why, then the traceback (or error) its row keeps."""
    path = job_log_path(settings, job.id)
    if not job.attempts:
        why = "it has not started yet" if not job.status.finished else f"it never ran ({job.status.value})"
    else:
        why = (f"it ran on {job.worker_host or 'a worker'}, which does not share this TUNEQUEUE_HOME "
               "(its log is under that machine's TUNEQUEUE_HOME/logs/jobs/)")
    lines = [f"job {job.id} has no log at {path}: {why}"]
    if job.traceback:
        lines += ["traceback of its latest failed attempt (kept with the job):", *job.traceback.splitlines()]
    elif job.status == JobStatus.failed and job.error:
        lines.append(f"error: {job.error}")
    return lines
