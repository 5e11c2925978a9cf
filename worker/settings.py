"""The one typed settings object of tunequeue, read from the environment.

`DATABASE_URL`, `REDIS_URL` and `TUNEQUEUE_HOME` are the settings users change; `TUNEQUEUE_QUEUE` names the Celery
queue (tests use a fresh one per run so that runs never see each other's messages).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def _normalise_database_url(url: str) -> str:
    # SQLAlchemy maps plain postgresql:// to psycopg2; we ship psycopg 3.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for printing and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    redis_url: str
    queue: str = "tunequeue"
    heartbeat_seconds: float = 10.0  # a running job's row is touched this often
    stale_seconds: float = 60.0  # a running job whose heartbeat is older is taken as lost
    reap_seconds: float = 30.0  # how often each worker runs the reaper

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        home = Path(env.get("TUNEQUEUE_HOME", "./.tunequeue")).expanduser().resolve()
        database_url = env.get("DATABASE_URL") or f"sqlite:///{home / 'tunequeue.db'}"
        return cls(
            home=home,
            database_url=_normalise_database_url(database_url),
            redis_url=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            queue=env.get("TUNEQUEUE_QUEUE", "tunequeue"),
            heartbeat_seconds=float(env.get("TUNEQUEUE_HEARTBEAT_SECONDS", 10)),
            stale_seconds=float(env.get("TUNEQUEUE_STALE_SECONDS", 60)),
            reap_seconds=float(env.get("TUNEQUEUE_REAP_SECONDS", 30)),
        )

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def builtin_dir(self) -> Path:
        return self.home / "builtin"

    def resolve(self, relative: str) -> Path:
        """A path stored relative to the home, made absolute."""
        return self.home / relative
