"""The job tasks of a worker started with Celery's own command line (`celery -A worker.celery_app:app worker`), so
that it runs jobs instead of discarding their messages as unregistered. It has the same tasks and runner as
`manage.py worker` but not its reaper, registry record or base-queue discovery: `manage.py worker` is the way to
run one; this keeps the plain Celery command from losing work. Imported by Celery (the app's `include`) when such a
worker starts, once per process, which is why the runtime is built at import.
"""

from __future__ import annotations

from celery import current_app

from models.settings import Settings
from worker.broker import Broker
from worker.runner import register_tasks
from worker.runtime import WorkerRuntime

register_tasks(current_app, WorkerRuntime(Settings.from_env(), Broker(Settings.from_env(), current_app)))
