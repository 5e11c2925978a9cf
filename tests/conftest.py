"""Shared fixtures: a fresh SQLite file or PostgreSQL database, a fresh Redis queue name and a fresh
TUNEQUEUE_HOME per test run, against the real services on the machine (no mocked broker or database)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("TUNEQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TUNEQUEUE_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def builtin_home(tmp_path_factory) -> Path:
    """A home whose built-in models are built once per test session and copied into each test's home."""
    from worker.ml.builtin import BUILTIN_MODELS, ensure_builtin

    home = tmp_path_factory.mktemp("builtin-home")
    for name in BUILTIN_MODELS:
        ensure_builtin(name, home)
    return home


def _pg_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def _drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_home(tmp_path_factory, builtin_home: Path, name: str) -> tuple[Path, str]:
    """A fresh home holding the built-in models and a migrated SQLite database: (home, database url)."""
    from models.migrate import upgrade

    home = tmp_path_factory.mktemp(name)
    shutil.copytree(builtin_home / "builtin", home / "builtin")
    url = f"sqlite:///{home / 'db.sqlite'}"
    upgrade(url)
    return home, url


@pytest.fixture
def make_env(tmp_path, builtin_home):
    """Build an environment (dict) for one backend: fresh database, fresh queue, fresh home."""
    created: list[str] = []
    queues: list[str] = []

    def build(backend: str = "sqlite") -> dict:
        home = tmp_path / f"home-{backend}"
        shutil.copytree(builtin_home / "builtin", home / "builtin")
        if backend == "postgresql":
            name = f"tq_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
            url = _pg_database(name)
            created.append(name)
        else:
            url = f"sqlite:///{home / 'tunequeue.db'}"
        queue = f"tq-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
        queues.append(queue)
        env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": url, "REDIS_URL": REDIS_URL,
               "TUNEQUEUE_QUEUE": queue, "PYTHONUNBUFFERED": "1"}
        from models.migrate import upgrade
        from models.settings import Settings

        upgrade(Settings.from_env(env).database_url)
        return env

    yield build
    for name in created:
        _drop_pg_database(name)
    client = redis.Redis.from_url(REDIS_URL)
    for queue in queues:
        for key in client.scan_iter(f"*{queue}*"):
            client.delete(key)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def env(make_env, backend, monkeypatch) -> dict:
    """Environment for the parametrized backend, also applied to this process (for in-process CLI calls)."""
    built = make_env(backend)
    for key in ("TUNEQUEUE_HOME", "DATABASE_URL", "REDIS_URL", "TUNEQUEUE_QUEUE"):
        monkeypatch.setenv(key, built[key])
    return built


def settings_of(env: dict):
    from models.settings import Settings

    return Settings.from_env(env)


def session_of(env: dict):
    from models import make_session_factory

    return make_session_factory(settings_of(env).database_url)()


def queue_length(env: dict) -> int:
    """Messages waiting in the default queue and every base queue of this environment."""
    from worker.celery_app import make_app
    from worker.launch import pending_messages

    return pending_messages(make_app(settings_of(env)))


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python manage.py ARGS` as a user would, in a separate process."""
    return subprocess.run([sys.executable, str(REPO / "manage.py"), *args], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def start_worker(env: dict, *extra: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, str(REPO / "manage.py"), "worker", *extra], env=env, cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT)
