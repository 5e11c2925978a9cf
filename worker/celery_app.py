"""The Celery application: Redis broker, JSON messages that carry only a job id, defaults for long GPU jobs.

`make_app(settings)` builds one; nothing is built at import. The CLI builds its app through `worker.broker.Broker`,
a worker process through its runtime (worker/runtime.py), which also registers the tasks. For operators' own
`celery -A worker.celery_app:app inspect ...` calls, the module attribute `app` is built from the environment on
first access.

Pool choice: CUDA is not fork-safe, and the `solo` pool runs the task in the consumer's own thread, so the worker
stops answering Flower and `celery inspect` while a job runs. The `threads` pool with concurrency 1 keeps the model
cache in one long-lived process, runs one job at a time, and leaves the main thread free for remote control and
heartbeats.
"""

from __future__ import annotations

import functools

from celery import Celery

from models.settings import Settings

TWELVE_HOURS = 12 * 3600
# How long any one Redis call (connect, or a command's reply) may take, for the CLI and the workers alike: a broker
# that accepts connections but never answers makes the call raise instead of hanging (kombu's and the result
# backend's own defaults wait forever or 120 s). A worker's loops log the error and try again next round; its
# consumer reconnects. Blocking reads (BRPOP, pub/sub) use their own shorter timeouts, so this never cuts one short.
BROKER_TIMEOUT_S = 5


def make_app(settings: Settings) -> Celery:
    # The result backend only mirrors task state (PROGRESS with step/loss meta, for Flower and AsyncResult);
    # outcomes and results live in the SQL database.
    app = Celery("tunequeue", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_extended=True,
        task_default_queue=settings.queue,
        task_acks_late=True,  # a job is acknowledged only once it has run
        task_reject_on_worker_lost=True,  # a killed worker's job goes back to the queue
        worker_prefetch_multiplier=1,  # never hold a second long job hostage while running one
        worker_concurrency=1,
        worker_pool="threads",
        worker_send_task_events=True,  # so Flower sees jobs start and finish
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=BROKER_TIMEOUT_S,
        # the result backend (PROGRESS mirrors): bounded waits, and few retries, so a hung broker stalls a job's
        # progress report for seconds, not minutes (its default is 20 retries of 120 s each)
        redis_socket_timeout=BROKER_TIMEOUT_S,
        redis_socket_connect_timeout=BROKER_TIMEOUT_S,
        result_backend_transport_options={
            "retry_policy": {"max_retries": 3, "interval_start": 0, "interval_step": 1, "interval_max": 1},
        },
        broker_transport_options={
            "socket_timeout": BROKER_TIMEOUT_S,
            "socket_connect_timeout": BROKER_TIMEOUT_S,
            "visibility_timeout": TWELVE_HOURS,  # longer than any job
            # --priority 0..9: one Redis list per level, served highest first (Redis counts 0 as the highest)
            "priority_steps": list(range(10)),
            "sep": ":",
            # kombu's "priority" order (fixed, not round robin) with the queues of the worker's loaded bases first;
            # BRPOP keys go by priority level first, so a job's priority still beats affinity (worker/routing.py)
            "queue_order_strategy": "worker.routing:AffinityCycle",
        },
        worker_hijack_root_logger=False,
    )
    return app


@functools.cache
def operator_app() -> Celery:
    """The app of Celery's own command line (`celery -A worker.celery_app:app inspect|worker ...`), from the
    environment. A worker started that way imports worker/standalone.py, which registers the job tasks."""
    app = make_app(Settings.from_env())
    app.conf.include = ["worker.standalone"]
    return app


def __getattr__(name: str):
    if name == "app":  # built on first access, never at import
        return operator_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
