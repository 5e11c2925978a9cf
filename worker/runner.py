"""Runs one job inside a worker: claim the row, call the plain function, record the outcome, release children.

The worker's long-lived state (settings, session factory, model cache) is one `WorkerRuntime` object hung on the
Celery app, created on the first job in the process.
"""

from __future__ import annotations

import logging
import socket
import traceback
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from models import make_session_factory
import threading

from models.jobs import (Job, JobStatus, claim, fail_attempt, finish, heartbeat, report_progress,
                         unfinished_outputs)
from worker.routing import note_job
from worker.ml.model_cache import ModelCache
from worker.lifecycle import publish, settle_children
from models.settings import Settings
from models.specs import parse_spec
from worker.ml.methods import PermanentJobError
from worker.jobs.finetune import JobCancelled

log = logging.getLogger("tunequeue.worker")


class Heartbeat(threading.Thread):
    """Touches the running job's row every few seconds, even while one long step runs, so the reaper can tell a
    slow job from a dead worker."""

    def __init__(self, sessions: sessionmaker, job_id: int, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.sessions, self.job_id, self.interval = sessions, job_id, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with self.sessions() as session:
                    heartbeat(session, self.job_id)
            except Exception as exc:
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)


@dataclass
class WorkerRuntime:
    settings: Settings
    sessions: sessionmaker
    cache: ModelCache


def runtime_for(app) -> WorkerRuntime:
    runtime = getattr(app, "tunequeue_runtime", None)
    if runtime is None:
        settings = app.tunequeue_settings
        runtime = WorkerRuntime(settings, make_session_factory(settings.database_url),
                                ModelCache(settings.home, budget_bytes=settings.model_cache_bytes))
        app.tunequeue_runtime = runtime
    return runtime


def _dispatch(kind: str, spec, session, runtime: WorkerRuntime, job_id: int, on_progress) -> dict:
    if kind == "finetune":
        from worker.jobs.finetune import train_adapter

        return train_adapter(spec, session, runtime.cache, runtime.settings.home, job_id=job_id,
                             on_progress=on_progress)
    if kind == "generate":
        from worker.jobs.generate import generate_summaries

        return generate_summaries(spec, session, runtime.cache, runtime.settings.home, job_id=job_id,
                                  on_progress=on_progress)
    from worker.jobs.score import score_rows

    return score_rows(spec, session, job_id=job_id, on_progress=on_progress)


def run_job(task, job_id: int, kind: str) -> str:
    """Run job `job_id` for Celery task `task` (bound); returns the outcome as a word."""
    app, task_id = task.app, task.request.id
    if not isinstance(job_id, int) or job_id <= 0:
        raise ValueError(f"job id must be a positive integer, got {job_id!r}")
    runtime = runtime_for(app)
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.kind.value != kind:
            log.error("job %s is not a %s job in the database; message dropped", job_id, kind)
            return "missing"
        # the Celery node name tells apart two workers on one machine (and matches `manage.py workers`)
        if not claim(session, job_id, task_id, task.request.hostname or socket.gethostname()):
            log.warning("job %s is %s, not queued; this delivery does nothing", job_id, job.status.value)
            return "not-queued"
        log.info("job %s (%s) started", job_id, kind)
        base = job.spec.get("model")
        note_job(app, runtime.cache, job_id, base)
        progress_session = runtime.sessions()
        beat = Heartbeat(runtime.sessions, job_id, runtime.settings.heartbeat_seconds)
        beat.start()

        def on_progress(progress: dict) -> bool:
            if task_id:  # mirrored to Celery so Flower and AsyncResult see PROGRESS with the same meta
                task.update_state(state="PROGRESS", meta={"job_id": job_id, **progress})
                task.send_event("task-progress", job_id=job_id, **progress)
            return report_progress(progress_session, job_id, progress)

        try:
            spec = parse_spec(job.spec)
            left_out = unfinished_outputs(session, job) if kind == "generate" and spec.adapters else []
            if left_out:  # a sweep's evaluation goes on with the adapters whose fine-tunes succeeded
                spec = spec.model_copy(update={"adapters": [a for a in spec.adapters if a not in left_out]})
            result = _dispatch(kind, spec, session, runtime, job_id, on_progress)
            if left_out:
                result = {**result, "left_out_adapters": left_out}
        except JobCancelled as exc:
            session.rollback()
            finish(session, job_id, JobStatus.cancelled, error=str(exc))
            settle_children(session, app, job_id)
            return "cancelled"
        except PermanentJobError as exc:  # no retry can help (e.g. QLoRA on a worker without CUDA)
            session.rollback()
            log.error("job %s failed: %s", job_id, exc)
            finish(session, job_id, JobStatus.failed, error=f"{exc}")
            settle_children(session, app, job_id)
            return "failed"
        except Exception as exc:
            session.rollback()
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            status = fail_attempt(session, job_id, f"{exc.__class__.__name__}: {exc}")
            if status == JobStatus.queued:  # attempts remain: run it again
                publish(session, app, session.get(Job, job_id))
                return "retrying"
            settle_children(session, app, job_id)
            return "failed"
        finally:
            beat.stopped.set()
            progress_session.close()
            note_job(app, runtime.cache, None, base)  # loaded bases' queues first from the next message on
        finish(session, job_id, JobStatus.succeeded, result=result)
        log.info("job %s (%s) succeeded: %s", job_id, kind, result)
        settle_children(session, app, job_id)
        return "succeeded"
