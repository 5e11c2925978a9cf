"""Where a worker's log records go besides stderr: one rotating file per worker, and one file per job.

`setup_worker_logging` (worker/launch.py) adds `TUNEQUEUE_HOME/logs/worker-NODE.log`, rotated at 10 MB with five
old files kept. `job_logging` (worker/runner.py) wraps one attempt of a job: every record at INFO or above that the
attempt's thread (or a thread started during the attempt) logs, whatever its logger, is appended to
`TUNEQUEUE_HOME/logs/jobs/ID.log` after a header line, so the file keeps every attempt, tracebacks included.
`manage.py jobs logs ID` reads it (api/logs.py). Library messages written to stderr (transformers has its own
stderr handler) arrive as records too: the worker redirects stderr into logging.

Logging never makes a job fail: a log file that cannot be opened is a warning, a write error is swallowed by
logging's `handleError`.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import re
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

from models.settings import Settings

log = logging.getLogger("tunequeue.worker")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
WORKER_LOG_BYTES = 10 * 1024 * 1024
WORKER_LOG_BACKUPS = 5

# The process's one worker log (a worker process is one Celery node): kept so that a second call changes nothing.
_worker = {"handler": None, "node": None}


def job_log_path(settings: Settings, job_id: int) -> Path:
    return settings.logs_dir / "jobs" / f"{job_id}.log"


def worker_log_path(settings: Settings, node: str) -> Path:
    """`tunequeue-gpu1@host` → logs/worker-tunequeue-gpu1_host.log (Celery's %h, %n and %d expanded first)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", expand_node(node)).strip("._") or "worker"
    return settings.logs_dir / f"worker-{safe[:150]}.log"


def expand_node(node: str) -> str:
    from celery.utils.nodenames import host_format

    return host_format(node)


def setup_worker_logging(settings: Settings, hostname: str, loglevel: str = "INFO") -> Path:
    """Add the worker's rotating log file to the root logger once Celery has set up its own (stderr) logging, and
    return the file's path. Celery leaves a root logger that already has a handler alone, so the file handler is
    added from Celery's `after_setup_logger` signal, not before. A second call in the process returns the first
    path."""
    from celery.signals import after_setup_logger

    if _worker["handler"] is not None:
        return Path(_worker["handler"].baseFilename)
    path = worker_log_path(settings, hostname)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=WORKER_LOG_BYTES, backupCount=WORKER_LOG_BACKUPS,
                                                       encoding="utf-8", errors="backslashreplace")
    except OSError as exc:
        log.warning("cannot write the worker log %s, logging to stderr only: %s", path, exc)
        return path
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level = logging.getLevelName(str(loglevel).upper())
    handler.setLevel(level if isinstance(level, int) else logging.INFO)  # a bad --loglevel is Celery's to refuse
    _worker.update(handler=handler, node=expand_node(hostname))
    after_setup_logger.connect(_attach_worker_log)
    return path


def _attach_worker_log(**_signal_arguments) -> None:
    root, handler = logging.getLogger(), _worker["handler"]
    if handler is not None and handler not in root.handlers:
        root.addHandler(handler)


class JobLogHandler(logging.FileHandler):
    """Appends the records of one job attempt: those of the thread that runs it, and of threads started while it
    runs (one job at a time per worker, so those are the job's own: its heartbeat, data loaders)."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", errors="backslashreplace")
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.setLevel(logging.INFO)
        self.job_thread = threading.get_ident()
        self.older_threads = {t.ident for t in threading.enumerate()} - {self.job_thread}

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.thread == self.job_thread or record.thread not in self.older_threads
        return ours and super().filter(record)


@contextlib.contextmanager
def job_logging(settings: Settings, job_id: int, attempt: int):
    """Around one attempt of job `job_id`, in the thread that runs it: its records go to the job's log file too.
    Yields the file's path, or None when the file cannot be written (a warning; the job runs all the same)."""
    path = job_log_path(settings, job_id)
    node = _worker["node"] or socket.gethostname()
    handler = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = JobLogHandler(path)
        handler.stream.write(f"=== attempt {attempt} on {node} at {datetime.now(timezone.utc).isoformat()} ===\n")
        handler.flush()
    except OSError as exc:
        if handler is not None:
            with contextlib.suppress(OSError):
                handler.close()
        log.warning("job %s: cannot write its log %s: %s", job_id, path, exc)
        yield None
        return
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
