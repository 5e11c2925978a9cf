"""The live-worker registry: each worker keeps a short-lived Redis record of itself, so that the CLI can see who runs.

A record holds the worker's Celery hostname, pid, its `capabilities` (worker/capabilities.py: CUDA, GPU name, total
and free GPU memory, bf16, bitsandbytes; free memory measured again at every refresh) with `cuda` and `gpu` (its
name) also at the top level, its `CUDA_VISIBLE_DEVICES` (set by `worker --gpu N`), the loaded bases, the current job
and the queues consumed. It expires a few refresh intervals after the last refresh, so a killed worker drops out
by itself. `Broker.live_workers()` reads them; `manage.py workers` prints them. The same thread also makes sure the
worker consumes every registered base queue whose needs it meets (in case it missed an `add_consumer` broadcast
while starting, or its free memory grew) and stops consuming a needs queue it no longer meets.

Node names are stable (`tunequeue@host`, `tunequeue-gpu1@host`) and never shared by two live workers: a worker
claims its name in Redis before Celery starts (`claim_node_name`) and its record thread keeps the claim alive. The
claim is global to the Redis database, not to one queue, because Celery's remote control (add_consumer, ping)
reaches workers by node name across every deployment on that Redis. A claim whose process is gone (the name holds
this machine's host name, so its pid can be checked here) is taken over, so a restarted worker gets its name back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from datetime import datetime, timezone

from celery import bootsteps

from models.errors import InputError, Unavailable
from worker.broker import Broker

log = logging.getLogger("tunequeue.registry")

NAME_CLAIM_S = 300  # a fresh claim outlives a slow start; the record thread then renews it with the record's TTL
MAX_SAME_NAME = 99  # tunequeue@host, tunequeue-2@host ... tunequeue-99@host
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# SET the claim when it is absent or already ours (ARGV[1] is our pid), in one step; 1 when it is ours now
_RENEW = "local v = redis.call('GET', KEYS[1]) if (not v) or v == ARGV[1] then " \
         "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def node_claim_key(hostname: str) -> str:
    return f"_tunequeue.node.{hostname}"


def default_node_name(gpu: int | None) -> str:
    return f"tunequeue-gpu{gpu}@%h" if gpu is not None else "tunequeue@%h"


def check_node_name(name: str) -> str:
    """`--name NAME` (or NAME@HOST): letters, digits, '.', '_' and '-'; '@%h' (this machine) is added when no host
    is given. InputError otherwise."""
    short, at, host = name.partition("@")
    if not NODE_NAME.fullmatch(short) or (at and not re.fullmatch(r"(%h|[A-Za-z0-9][A-Za-z0-9.-]{0,252})", host)):
        raise InputError(f"--name {name[:60]!r}: a worker name is letters, digits, '.', '_' and '-' "
                         "(optionally NAME@HOST)")
    return name if at else f"{name}@%h"


def claim_node_name(broker: Broker, name: str, *, exact: bool = False) -> str:
    """Claim `name` (with '%h' for this machine's host name) for this process and return it expanded; when a live
    worker holds it, the first free of NAME-2@host, NAME-3@host ... (`exact`: an InputError instead). A broker that
    cannot be reached is not an error here (Celery waits for it): the name is used unclaimed, with a warning."""
    from celery.utils.nodenames import host_format

    short, _, host = host_format(name).partition("@")
    host = host or socket.gethostname()
    candidates = [f"{short}@{host}"] + ([] if exact else [f"{short}-{n}@{host}" for n in range(2, MAX_SAME_NAME + 1)])
    try:
        for candidate in candidates:
            holder = _claim(broker, candidate)
            if holder is None:
                return candidate
            if exact:
                raise InputError(f"a worker named {candidate} is already running (pid {holder}); choose another "
                                 "--name or stop that one")
    except InputError:
        raise
    except Unavailable as exc:  # the worker's own broker check says so next, in one line
        log.debug("could not claim the worker name %s (%s); using it unclaimed", candidates[0], exc)
        return candidates[0]
    except Exception as exc:
        log.warning("could not claim the worker name %s (%s); using it unclaimed", candidates[0], exc)
        return candidates[0]
    raise InputError(f"{MAX_SAME_NAME} workers named {short}[-N]@{host} are already running; use --name")


def _claim(broker: Broker, hostname: str) -> str | None:
    """None when this process now holds the name; else the pid of the live process that does."""
    from redis.exceptions import WatchError

    key, me = node_claim_key(hostname), str(os.getpid())
    with broker.reaching():
        if broker.redis.set(key, me, nx=True, ex=NAME_CLAIM_S):
            return None
        with broker.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                holder = (pipe.get(key) or b"").decode()
                if holder and holder != me and _alive(holder):
                    return holder
                pipe.multi()
                pipe.set(key, me, ex=NAME_CLAIM_S)
                pipe.execute()
                return None
            except WatchError:  # another process claimed it between our read and our write
                return "?"


def _alive(pid: str) -> bool:
    """Whether process `pid` of this machine exists (a process that cannot be signalled still exists)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class WorkerRecord(threading.Thread):
    """Writes this worker's record every `interval` seconds (and at once on `update()`); deletes it on stop.
    `runtime` (the worker's) gives the capabilities and which queues the worker may consume; without one (a test's
    bare record) the capabilities are unknown and every registered queue counts."""

    def __init__(self, consumer, broker: Broker, interval: float, runtime=None):
        super().__init__(daemon=True, name="tunequeue-registry")
        self.consumer, self.broker, self.hostname, self.runtime = consumer, broker, consumer.hostname, runtime
        self.interval, self.ttl = interval, max(3 * interval, 10)
        self.key = broker.key(f"worker.{self.hostname}")
        self.claim_key = node_claim_key(self.hostname)
        self.state = {"hostname": self.hostname, "pid": os.getpid(), "cuda": None, "gpu": None, "capabilities": None,
                      "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "loaded_bases": [],
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
        if self.runtime is not None and self.runtime.capabilities:
            record.update(_capability_fields(self.runtime.capabilities))
        try:  # waits at most BROKER_TIMEOUT_S (worker/celery_app.py) for a hung broker, then the next round tries again
            with self.broker.reaching(), self.broker.redis.pipeline() as pipe:
                pipe.set(self.key, json.dumps(record), ex=int(self.ttl + 0.999))
                pipe.sadd(self.broker.key("workers"), self.hostname)
                pipe.eval(_RENEW, 1, self.claim_key, str(os.getpid()), int(self.ttl + 0.999))
                *_, renewed = pipe.execute()
            if not renewed:
                log.warning("the worker name %s is claimed by another process", self.hostname)
        except Exception as exc:  # the broker may be briefly away; the next round writes again
            log.warning("could not write the worker record: %s", exc)

    def refresh_capabilities(self) -> None:
        """Measure free GPU memory again (worker/capabilities.py `refresh`) and put it in the record."""
        from worker.capabilities import refresh

        if self.runtime is not None and self.runtime.capabilities:
            self.runtime.capabilities = refresh(self.runtime.capabilities)

    def sync_queues(self) -> None:
        """Consume every registered queue this worker meets the needs of; stop consuming those it no longer meets."""
        known = self.broker.known_queues()
        wanted = self.runtime.consumable(known) if self.runtime is not None else known
        consumed = self.consumed()
        control = self.broker.app.control
        for queue in [q for q in wanted if q not in consumed]:
            control.add_consumer(queue, destination=[self.hostname], reply=False)
        for queue in [q for q in consumed if q in known and q not in wanted]:
            log.info("no longer meeting the needs of %s: not consuming it", queue)
            control.cancel_consumer(queue, destination=[self.hostname], reply=False)

    def run(self) -> None:
        self.write()
        while not self.stopped.wait(self.interval):
            self.refresh_capabilities()
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
                pipe.eval(_RELEASE, 1, self.claim_key, str(os.getpid()))
                pipe.execute()
        except Exception as exc:  # the record expires by itself
            log.warning("could not delete the worker record: %s", exc)


def _capability_fields(capabilities: dict) -> dict:
    return {"capabilities": capabilities, "cuda": capabilities.get("cuda"), "gpu": capabilities.get("gpu_name")}


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
                self.record = WorkerRecord(c, runtime.broker, runtime.settings.heartbeat_seconds, runtime)
                runtime.record = self.record
                self.record.start()

        def stop(self, c):
            pass  # a broker reconnect restarts the consumer's steps; the record lives on

        def shutdown(self, c):
            if self.record is not None:
                self.record.stop()

    return RegistryStep
