"""Starting a worker process, with rq-style `--burst`: exit once its queues are empty and no job is in hand.

A worker checks that its database can be shared with its broker's other workers (`check_shared_database`), detects
its capabilities (worker/capabilities.py), builds its runtime (worker/runtime.py), registers the job tasks on its
Celery app, consumes the default queue and every registered base queue whose needs it meets (worker/routing.py) and
keeps a record of itself in Redis (worker/registry.py).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
import uuid
from urllib.parse import urlsplit

from models.errors import InputError
from models.settings import Settings
from worker.broker import Broker

log = logging.getLogger("tunequeue.worker")


class BurstWatcher(threading.Thread):
    """Stops the worker (warm shutdown) after its queues have been seen empty, with nothing reserved or running."""

    def __init__(self, broker: Broker, interval: float = 0.5, quiet_checks: int = 3, consumable=None):
        super().__init__(daemon=True, name="burst-watcher")
        self.broker, self.interval, self.quiet_checks = broker, interval, quiet_checks
        # the queues this worker may take from (a job no worker here can run does not keep it waiting)
        self.consumable = consumable or (lambda queues: queues)

    def run(self) -> None:
        from celery.worker import state

        quiet = 0
        while True:
            time.sleep(self.interval)
            try:
                waiting = self.broker.pending_messages(self.consumable(self.broker.known_queues()))
                busy = bool(state.active_requests or state.reserved_requests) or waiting > 0
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

    from worker.capabilities import describe, detect

    check_shared_database(settings)
    node = hostname or f"tunequeue-{uuid.uuid4().hex[:6]}@%h"
    setup_worker_logging(settings, node, loglevel)
    runtime = WorkerRuntime(settings)
    runtime.capabilities = detect()
    log.info("capabilities: %s", describe(runtime.capabilities))
    app = runtime.broker.app
    register_tasks(app, runtime)
    app.steps["consumer"].add(registry_step(runtime))
    if burst:
        BurstWatcher(runtime.broker, consumable=runtime.consumable).start()
    ReaperThread(runtime.broker, runtime.sessions, settings.reap_seconds, settings.stale_seconds).start()
    app.worker_main([
        "worker",
        "--pool=threads",
        "--concurrency=1",
        f"--queues={','.join(runtime.consumable(runtime.broker.known_queues()))}",
        f"--loglevel={loglevel}",
        f"--hostname={node}",
        "--without-mingle",
        "--without-gossip",
    ])


def check_shared_database(settings: Settings) -> None:
    """A worker whose broker is on another machine may have peers on other machines, which cannot share its SQLite
    file: InputError (one line, exit 2) unless the database is not SQLite or the broker is on this machine."""
    if not settings.database_url.startswith("sqlite") or broker_is_local(settings.redis_url):
        return
    host = urlsplit(settings.redis_url).hostname or "?"
    raise InputError(f"DATABASE_URL is a SQLite file but REDIS_URL points at {host}: workers on other machines "
                     "cannot share a SQLite file; use PostgreSQL")


def broker_is_local(url: str) -> bool:
    """Whether a Redis URL reaches this machine only: a unix socket, localhost, 127.0.0.0/8 or ::1 (a name is not
    resolved: any other name counts as another machine)."""
    parts = urlsplit(url)
    if parts.scheme in ("unix", "socket", "redis+socket") or not parts.netloc.rpartition("@")[2]:
        return True  # a socket path, or redis:// with no host (redis-py and kombu then use localhost)
    host = (parts.hostname or "").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
