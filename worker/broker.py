"""The deployment's broker handle: its Celery app (to publish and to reach workers) and a Redis client (for the
queue registry and the worker records), built once per process and passed where needed.

The CLI's context builds one per invocation, a worker's runtime one per process. Keys of one deployment share the
prefix `_tunequeue.{queue}.`, so deployments on one Redis (and test runs) never see each other.
"""

from __future__ import annotations

import base64
import json
import logging
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

        return redis.Redis.from_url(self.settings.redis_url)

    def key(self, what: str) -> str:
        return f"_tunequeue.{self.queue}.{what}"

    def check(self) -> None:
        """Fail fast, before any row is written, when Redis cannot be reached."""
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=3)
        except Exception as exc:
            raise Unavailable(f"cannot reach the broker at {mask_url(self.settings.redis_url)}: {exc}") from None

    def send(self, kind, job_id: int, *, queue: str, priority: int, task_id: str) -> None:
        """Publish job `job_id` of `kind` to `queue`; tunequeue's priority grows with urgency, Redis serves 0 first."""
        from worker.tasks import TASK_NAMES

        self.app.send_task(TASK_NAMES[kind], args=[job_id], queue=queue, priority=MAX_PRIORITY - priority,
                           task_id=task_id)

    # ------------------------------------------------------------------------------------------ queue registry
    def known_queues(self) -> list[str]:
        """The default queue and every registered base queue: what a worker consumes."""
        members = sorted(m.decode() for m in self.redis.smembers(self.key("queues")))
        return [self.queue] + members

    def register_queue(self, queue: str) -> None:
        """Record a base queue; when it is new, tell the deployment's running workers to consume it now."""
        if queue == self.queue or not self.redis.sadd(self.key("queues"), queue):
            return
        hosts = [w["hostname"] for w in self.live_workers()]
        if hosts:  # only this deployment's workers: other deployments may share the broker
            self.app.control.add_consumer(queue, destination=hosts, reply=False)

    def queue_length(self, queue: str) -> int:
        from amqp.exceptions import ChannelError

        with self.app.connection_for_read() as connection:
            try:
                return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError as exc:
                if "NOT_FOUND" in str(exc):  # Redis drops an empty list's key: an unknown queue is an empty one
                    return 0
                raise

    def pending_messages(self) -> int:
        """Messages waiting in the default queue and every registered base queue."""
        return sum(self.queue_length(queue) for queue in self.known_queues())

    def waiting_job_ids(self, queues: list[str]) -> set[int]:
        """Job ids of the messages waiting in the queues' priority lists or delivered but not yet acknowledged."""
        keys = [key for queue in queues for key in [queue] + [f"{queue}:{level}" for level in range(1, MAX_PRIORITY + 1)]]
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
        hosts = sorted(h.decode() for h in self.redis.smembers(index))
        if not hosts:
            return []
        values = self.redis.mget([self.key(f"worker.{host}") for host in hosts])
        gone = [host for host, value in zip(hosts, values) if value is None]
        if gone:
            self.redis.srem(index, *gone)
        return [json.loads(value) for value in values if value is not None]
