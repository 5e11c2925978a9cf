"""Starting a worker process, with rq-style `--burst`: exit once its queues are empty and no job is in hand.

A worker builds its runtime (worker/runtime.py), registers the job tasks on its Celery app, consumes the default
queue and every registered base queue (worker/routing.py) and keeps a record of itself in Redis
(worker/registry.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid

from models.settings import Settings
from worker.broker import Broker

log = logging.getLogger("tunequeue.worker")


class BurstWatcher(threading.Thread):
    """Stops the worker (warm shutdown) after its queues have been seen empty, with nothing reserved or running."""

    def __init__(self, broker: Broker, interval: float = 0.5, quiet_checks: int = 3):
        super().__init__(daemon=True, name="burst-watcher")
        self.broker, self.interval, self.quiet_checks = broker, interval, quiet_checks

    def run(self) -> None:
        from celery.worker import state

        quiet = 0
        while True:
            time.sleep(self.interval)
            try:
                busy = bool(state.active_requests or state.reserved_requests) or self.broker.pending_messages() > 0
            except Exception as exc:  # broker hiccup: keep going rather than exit early
                log.warning("burst watcher could not read the queue: %s", exc)
                busy = True
            quiet = 0 if busy else quiet + 1
            if quiet >= self.quiet_checks:
                log.info("burst: the queues are empty, shutting down")
                os.kill(os.getpid(), signal.SIGTERM)
                return


def run_worker(settings: Settings, *, burst: bool = False, loglevel: str = "INFO", hostname: str | None = None) -> None:
    from worker.joblog import setup_worker_logging
    from worker.reaper import ReaperThread
    from worker.registry import registry_step
    from worker.runner import register_tasks
    from worker.runtime import WorkerRuntime

    node = hostname or f"tunequeue-{uuid.uuid4().hex[:6]}@%h"
    setup_worker_logging(settings, node, loglevel)
    runtime = WorkerRuntime(settings)
    app = runtime.broker.app
    register_tasks(app, runtime)
    app.steps["consumer"].add(registry_step(runtime))
    if burst:
        BurstWatcher(runtime.broker).start()
    ReaperThread(runtime.broker, runtime.sessions, settings.reap_seconds, settings.stale_seconds).start()
    app.worker_main([
        "worker",
        "--pool=threads",
        "--concurrency=1",
        f"--queues={','.join(runtime.broker.known_queues())}",
        f"--loglevel={loglevel}",
        f"--hostname={node}",
        "--without-mingle",
        "--without-gossip",
    ])
