"""The live-worker registry: each worker keeps a short-lived Redis record of itself, so that the CLI can see who runs.

A record holds the worker's Celery hostname, pid, whether CUDA is available (torch is imported lazily, in the worker
only; `null` until known), the loaded bases, the current job and the queues consumed. It expires a few refresh
intervals after the last refresh, so a killed worker drops out by itself. `Broker.live_workers()` reads them (the
QLoRA enqueue warning looks at `cuda`); `manage.py workers` prints them. The same thread also makes sure the worker
consumes every registered base queue, in case it missed an `add_consumer` broadcast while starting.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone

from celery import bootsteps

from worker.broker import Broker

log = logging.getLogger("tunequeue.registry")


def _cuda() -> tuple[bool | None, str | None]:
    try:
        import torch

        if torch.cuda.is_available():
            return True, torch.cuda.get_device_name(0)
        return False, None
    except Exception as exc:  # a broken torch install must not stop the worker from registering
        log.warning("could not tell whether CUDA is available: %s", exc)
        return None, None


class WorkerRecord(threading.Thread):
    """Writes this worker's record every `interval` seconds (and at once on `update()`); deletes it on stop."""

    def __init__(self, consumer, broker: Broker, interval: float):
        super().__init__(daemon=True, name="tunequeue-registry")
        self.consumer, self.broker, self.hostname = consumer, broker, consumer.hostname
        self.interval, self.ttl = interval, max(3 * interval, 10)
        self.key = broker.key(f"worker.{self.hostname}")
        self.state = {"hostname": self.hostname, "pid": os.getpid(), "cuda": None, "gpu": None, "loaded_bases": [],
                      "current_job": None, "started_at": _now()}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def consumed(self) -> list[str]:
        task_consumer = getattr(self.consumer, "task_consumer", None)
        return [q.name for q in task_consumer.queues] if task_consumer else []

    def update(self, **changes) -> None:
        with self.lock:
            self.state.update(changes)
        self.write()

    def write(self) -> None:
        if self.stopped.is_set():
            return
        with self.lock:
            record = {**self.state, "queues": self.consumed(), "updated_at": _now()}
        try:  # waits at most BROKER_TIMEOUT_S (worker/celery_app.py) for a hung broker, then the next round tries again
            with self.broker.reaching(), self.broker.redis.pipeline() as pipe:
                pipe.set(self.key, json.dumps(record), ex=int(self.ttl + 0.999))
                pipe.sadd(self.broker.key("workers"), self.hostname)
                pipe.execute()
        except Exception as exc:  # the broker may be briefly away; the next round writes again
            log.warning("could not write the worker record: %s", exc)

    def sync_queues(self) -> None:
        missing = [q for q in self.broker.known_queues() if q not in self.consumed()]
        for queue in missing:
            self.broker.app.control.add_consumer(queue, destination=[self.hostname], reply=False)

    def run(self) -> None:
        self.write()
        cuda, gpu = _cuda()
        self.update(cuda=cuda, gpu=gpu)
        while not self.stopped.wait(self.interval):
            self.write()
            try:
                self.sync_queues()
            except Exception as exc:
                log.warning("could not check the registered queues: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
        try:  # one round trip: a hung broker delays the shutdown by BROKER_TIMEOUT_S at most
            with self.broker.reaching(), self.broker.redis.pipeline() as pipe:
                pipe.delete(self.key)
                pipe.srem(self.broker.key("workers"), self.hostname)
                pipe.execute()
        except Exception as exc:  # the record expires by itself
            log.warning("could not delete the worker record: %s", exc)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def registry_step(runtime) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep, bound to the worker's runtime, that runs one `WorkerRecord` for the worker's lifetime
    (across broker reconnects) and hands it to the runtime."""

    class RegistryStep(bootsteps.StartStopStep):
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent, **kwargs):
            super().__init__(parent, **kwargs)
            self.record = None

        def start(self, c):
            if self.record is None:
                self.record = WorkerRecord(c, runtime.broker, runtime.settings.heartbeat_seconds)
                runtime.record = self.record
                self.record.start()

        def stop(self, c):
            pass  # a broker reconnect restarts the consumer's steps; the record lives on

        def shutdown(self, c):
            if self.record is not None:
                self.record.stop()

    return RegistryStep
