"""The one typed settings object of tunequeue, read from the environment.

`DATABASE_URL`, `REDIS_URL` and `TUNEQUEUE_HOME` are the settings users change; `TUNEQUEUE_QUEUE` names the Celery
queue (tests use a fresh one per run so that runs never see each other's messages). `TUNEQUEUE_MODEL_CACHE_BYTES`
caps the weights a worker keeps resident (`8GiB`, `500MB` or plain bytes); unset, the cache picks its default.
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


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """`8GiB`, `500MB`, `1.5gb` or a plain number of bytes, as an int."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in _BYTE_UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 8GiB, 500MB or a number of bytes)")
    return int(float(match[1]) * _BYTE_UNITS[match[2].lower()])


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
    model_cache_bytes: int | None = None  # None: half the free device memory, on CPU at most 8 GiB
    faults: str = ""  # fault injection for tests and chaos runs (worker/faults.py); empty in normal operation

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
            model_cache_bytes=parse_bytes(env["TUNEQUEUE_MODEL_CACHE_BYTES"])
            if env.get("TUNEQUEUE_MODEL_CACHE_BYTES") else None,
            faults=env.get("TUNEQUEUE_FAULTS", ""),
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
