"""The deployment's broker handle: its Celery app (to publish and to reach workers) and a Redis client (for the
queue registry and the worker records), built once per process and passed where needed.

The CLI's context builds one per invocation, a worker's runtime one per process. Keys of one deployment share the
prefix `_tunequeue.{queue}.`, so deployments on one Redis (and test runs) never see each other.

Every call waits at most `BROKER_TIMEOUT_S` (worker/celery_app.py) for Redis to answer, and a broker that cannot be
reached or does not answer raises `Unavailable` naming it (the CLI prints one line; a worker's loops log it and try
again next round).
"""

from __future__ import annotations

import base64
import json
import logging
from contextlib import contextmanager
from functools import cached_property

from models.errors import Unavailable
from models.settings import Settings, mask_url

log = logging.getLogger("tunequeue.broker")
MAX_PRIORITY = 9


class Broker:
    def __init__(self, settings: Settings, app=None):
        self.settings = settings
        self.queue = settings.queue  # the default queue: score jobs, and every worker consumes it
        self._app = app

    @cached_property
    def app(self):
        if self._app is None:
            from worker.celery_app import make_app

            self._app = make_app(self.settings)
        return self._app

    @cached_property
    def redis(self):
        import redis
        from redis.backoff import ExponentialWithJitterBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.retry import Retry

        from worker.celery_app import BROKER_TIMEOUT_S

        # A dropped connection is retried a few times at once (a restarted Redis); a timeout is not: it already
        # waited BROKER_TIMEOUT_S, and the caller (the CLI, or a worker loop's next round) decides what follows.
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1), 3, supported_errors=(RedisConnectionError,))
        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=BROKER_TIMEOUT_S,
                                    socket_connect_timeout=BROKER_TIMEOUT_S, retry=retry)

    def key(self, what: str) -> str:
        return f"_tunequeue.{self.queue}.{what}"

    def unavailable(self, exc: BaseException) -> Unavailable:
        """The one-line error for a failed call to the broker: it did not answer in time, or could not be reached."""
        from worker.celery_app import BROKER_TIMEOUT_S

        url = mask_url(self.settings.redis_url)
        if _timed_out(exc):
            return Unavailable(f"the broker at {url} did not answer within {BROKER_TIMEOUT_S:g}s")
        return Unavailable(f"cannot reach the broker at {url}: {_reason(exc)}")

    @contextmanager
    def reaching(self):
        """Calls to Redis inside this block raise `Unavailable` when the broker is unreachable or does not answer."""
        try:
            yield
        except Unavailable:
            raise
        except Exception as exc:
            if not _connection_failure(exc):
                raise
            raise self.unavailable(exc) from exc

    def check(self) -> None:
        """Fail fast, before any row is written, when Redis cannot be reached or does not answer."""
        try:
            with self.app.connection_for_write() as connection:
                # timeout bounds the retries; each attempt is bounded by the transport's socket timeouts
                connection.ensure_connection(max_retries=1, timeout=3)
                connection.default_channel.client.ping()  # the connection may come from a pool: ask Redis itself
        except Exception as exc:
            raise self.unavailable(exc) from None

    def send(self, kind, job_id: int, *, queue: str, priority: int, task_id: str, title: str | None = None,
             retries: int = 0) -> None:
        """Publish job `job_id` of `kind` to `queue`; tunequeue's priority grows with urgency, Redis serves 0 first.
        `title` is the name monitors show (Celery's shadow name), `retries` the attempts made before this one."""
        from worker.task_names import TASK_NAMES

        with self.reaching():
            self.app.send_task(TASK_NAMES[kind], args=[job_id], queue=queue, priority=MAX_PRIORITY - priority,
                               task_id=task_id, shadow=title, retries=retries)

    def revoke(self, task_id: str) -> None:
        """Ask live workers to drop a queued task's message when it arrives (Celery reports it REVOKED); best effort:
        a broker that does not answer only loses the early notice."""
        try:
            with self.reaching():
                self.app.control.revoke(task_id)
        except Unavailable as exc:
            log.warning("could not broadcast the revocation of task %s: %s", task_id, exc)

    # ------------------------------------------------------------------------------------------ queue registry
    def known_queues(self) -> list[str]:
        """The default queue and every registered base queue: what a worker consumes."""
        with self.reaching():
            members = sorted(m.decode() for m in self.redis.smembers(self.key("queues")))
        return [self.queue] + members

    def register_queue(self, queue: str) -> None:
        """Record a base queue; when it is new, tell the deployment's running workers that meet its needs
        (worker/routing.py) to consume it now."""
        from worker.capabilities import meets
        from worker.routing import needs_of_queue

        with self.reaching():
            if queue == self.queue or not self.redis.sadd(self.key("queues"), queue):
                return
            needs = needs_of_queue(queue)
            hosts = [w["hostname"] for w in self.live_workers() if meets(w.get("capabilities"), needs)]
            if hosts:  # only this deployment's workers: other deployments may share the broker
                self.app.control.add_consumer(queue, destination=hosts, reply=False)

    def queue_length(self, queue: str) -> int:
        from amqp.exceptions import ChannelError

        with self.reaching(), self.app.connection_for_read() as connection:
            try:
                return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError as exc:
                if "NOT_FOUND" in str(exc):  # Redis drops an empty list's key: an unknown queue is an empty one
                    return 0
                raise

    def pending_messages(self, queues: list[str] | None = None) -> int:
        """Messages waiting in `queues` (default: the default queue and every registered base queue)."""
        return sum(self.queue_length(queue) for queue in (self.known_queues() if queues is None else queues))

    def waiting_job_ids(self, queues: list[str]) -> set[int]:
        """Job ids of the messages waiting in the queues' priority lists or delivered but not yet acknowledged."""
        keys = [key for queue in queues for key in [queue] + [f"{queue}:{level}" for level in range(1, MAX_PRIORITY + 1)]]
        with self.reaching():
            raw = [m for key in keys for m in self.redis.lrange(key, 0, -1)]
            raw += [json.loads(v)[0] for v in self.redis.hvals("unacked")]  # [message, exchange, routing key]
        ids = set()
        for item in raw:
            message = json.loads(item) if isinstance(item, (bytes, str)) else item
            body = message.get("body", "")
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            if args and isinstance(args[0], int):
                ids.add(args[0])
        return ids

    # ----------------------------------------------------------------------------------------- worker records
    def live_workers(self) -> list[dict]:
        """Records of this deployment's running workers (worker/registry.py writes them), by hostname."""
        index = self.key("workers")
        with self.reaching():
            hosts = sorted(h.decode() for h in self.redis.smembers(index))
            if not hosts:
                return []
            values = self.redis.mget([self.key(f"worker.{host}") for host in hosts])
            gone = [host for host, value in zip(hosts, values) if value is None]
            if gone:
                self.redis.srem(index, *gone)
        return [json.loads(value) for value in values if value is not None]


def _chain(exc: BaseException):
    """The exception and its causes (kombu wraps redis-py's errors in its own OperationalError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _timed_out(exc: BaseException) -> bool:
    from redis.exceptions import TimeoutError as RedisTimeout

    return any(isinstance(e, (RedisTimeout, TimeoutError)) for e in _chain(exc))


def _connection_failure(exc: BaseException) -> bool:
    """Whether `exc` says the broker could not be reached or did not answer (not a bug, not a bad reply)."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeout

    return any(isinstance(e, (RedisConnectionError, RedisTimeout, OperationalError, OSError)) for e in _chain(exc))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
