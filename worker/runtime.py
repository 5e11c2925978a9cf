"""The worker's long-lived state, one object per worker process: settings, broker handle, database sessions, the
model cache, the worker's capabilities and its registry record. Built at worker start (worker/launch.py) and passed
to the tasks, the runner, the reaper and the registry step; nothing is hung on the Celery app or kept in module
globals.
"""

from __future__ import annotations

from functools import cached_property

from models import make_session_factory
from models.settings import Settings
from worker.broker import Broker
from worker.faults import Faults, parse_faults
from worker.capabilities import meets
from worker.routing import needs_of_queue, prefer


class WorkerRuntime:
    def __init__(self, settings: Settings, broker: Broker | None = None):
        self.settings = settings
        self.broker = broker or Broker(settings)
        self.sessions = make_session_factory(settings.database_url)
        self.record = None  # the WorkerRecord, once the consumer has started (worker/registry.py)
        # worker/capabilities.py `detect()`, set at start; the record thread refreshes the free memory
        self.capabilities: dict = {}

    def consumable(self, queues: list[str]) -> list[str]:
        """The queues whose needs this worker meets now (worker/routing.py `needs_of_queue`)."""
        return [queue for queue in queues if meets(self.capabilities, needs_of_queue(queue))]

    @cached_property
    def cache(self):
        """Made on the first job: building it imports torch to find the device."""
        from worker.ml.model_cache import ModelCache

        return ModelCache(self.settings.home, budget_bytes=self.settings.model_cache_bytes)

    def faults(self) -> Faults:
        """Fault injection for one job (each job starts with its one-shot faults armed again)."""
        return parse_faults(self.settings.faults)

    def note_job(self, job_id: int | None, base: str | None) -> None:
        """Called by the runner when a job starts (`job_id`) and ends (None), in the task thread: when it ends,
        re-rank the queues before the message is acknowledged (so before the next BRPOP); either way refresh this
        worker's registry record."""
        loaded = self.cache.loaded_refs
        if job_id is None:
            prefer(self.broker.queue, loaded, base)
        if self.record is not None:
            self.record.update(current_job=job_id, loaded_bases=loaded, model_cache=self.cache.stats())
