"""The heartbeat of a running attempt: a thread that touches the job's row while the attempt holds it."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import sessionmaker

from models.jobs import Lease, heartbeat

log = logging.getLogger("tunequeue.worker")


class Heartbeat(threading.Thread):
    """Touches the running job's row every few seconds, even while one long step runs, so the reaper can tell a
    slow job from a dead worker."""

    def __init__(self, sessions: sessionmaker, lease: Lease, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{lease.job_id}")
        self.sessions, self.lease, self.interval = sessions, lease, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with self.sessions() as session:
                    if not heartbeat(session, self.lease):
                        return  # the attempt lost the job: the job's next step finds out and stops
            except Exception as exc:
                log.warning("heartbeat of job %s failed: %s", self.lease.job_id, exc)
