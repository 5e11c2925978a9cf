"""Starting a worker process, with rq-style `--burst`: exit once its queues are empty and no job is in hand.

A worker consumes the default queue and every registered base queue (worker/affinity.py) and keeps a record of
itself in Redis (worker/registry.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid

log = logging.getLogger("tunequeue.worker")


def queue_length(app, queue: str) -> int:
    from amqp.exceptions import ChannelError

    with app.connection_for_read() as connection:
        try:
            return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError as exc:
            if "NOT_FOUND" in str(exc):  # Redis drops an empty list's key: an unknown queue is an empty one
                return 0
            raise


def pending_messages(app) -> int:
    """Messages waiting in the default queue and every registered base queue."""
    from worker.routing import known_queues

    return sum(queue_length(app, queue) for queue in known_queues(app))


class BurstWatcher(threading.Thread):
    """Stops the worker (warm shutdown) after its queues have been seen empty, with nothing reserved or running."""

    def __init__(self, app, interval: float = 0.5, quiet_checks: int = 3):
        super().__init__(daemon=True, name="burst-watcher")
        self.app, self.interval, self.quiet_checks = app, interval, quiet_checks

    def run(self) -> None:
        from celery.worker import state

        quiet = 0
        while True:
            time.sleep(self.interval)
            try:
                busy = bool(state.active_requests or state.reserved_requests) or pending_messages(self.app) > 0
            except Exception as exc:  # broker hiccup: keep going rather than exit early
                log.warning("burst watcher could not read the queue: %s", exc)
                busy = True
            quiet = 0 if busy else quiet + 1
            if quiet >= self.quiet_checks:
                log.info("burst: the queues are empty, shutting down")
                os.kill(os.getpid(), signal.SIGTERM)
                return


def run_worker(app, *, burst: bool = False, loglevel: str = "INFO", hostname: str | None = None) -> None:
    from models import make_session_factory
    from worker.routing import known_queues
    from worker.reaper import ReaperThread
    from worker.registry import RegistryStep

    settings = app.tunequeue_settings
    app.steps["consumer"].add(RegistryStep)
    if burst:
        BurstWatcher(app).start()
    ReaperThread(app, make_session_factory(settings.database_url), settings.reap_seconds,
                 settings.stale_seconds).start()
    app.worker_main([
        "worker",
        "--pool=threads",
        "--concurrency=1",
        f"--queues={','.join(known_queues(app))}",
        f"--loglevel={loglevel}",
        f"--hostname={hostname or f'tunequeue-{uuid.uuid4().hex[:6]}@%h'}",
        "--without-mingle",
        "--without-gossip",
    ])
