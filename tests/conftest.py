"""Shared fixtures: a fresh SQLite file or PostgreSQL database, a fresh Redis queue name and a fresh
TUNEQUEUE_HOME per test run, against the real services on the machine (no mocked broker or database)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

# Idle OpenMP threads yield instead of spinning: with torch's default policy every CPU test runs 10-20x slower while
# a worker subprocess (or a neighbour) is busy. Set before anything imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("TUNEQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TUNEQUEUE_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def builtin_home(tmp_path_factory) -> Path:
    """A home whose built-in models are built once per test session and copied into each test's home."""
    from models.builtins import BUILTIN_MODELS
    from worker.ml.builtin import ensure_builtin

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
    return applied_env(make_env, monkeypatch, backend)


def settings_of(env: dict):
    from models.settings import Settings

    return Settings.from_env(env)


def session_of(env: dict):
    from models import make_session_factory

    return make_session_factory(settings_of(env).database_url)()


def queue_length(env: dict) -> int:
    """Messages waiting in the default queue and every base queue of this environment."""
    return broker_of(env).pending_messages()


def broker_of(env: dict):
    """The environment's broker handle (Celery app and Redis client), as the CLI builds it."""
    from worker.broker import Broker

    return Broker(settings_of(env))


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python manage.py ARGS` as a user would, in a separate process."""
    return subprocess.run([sys.executable, str(REPO / "manage.py"), *args], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def start_worker(env: dict, *extra: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, str(REPO / "manage.py"), "worker", *extra], env=env, cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT)


def applied_env(make_env, monkeypatch, backend: str) -> dict:
    """A fresh environment for `backend`, also applied to this process (for in-process CLI calls)."""
    env = make_env(backend)
    for key in ("TUNEQUEUE_HOME", "DATABASE_URL", "REDIS_URL", "TUNEQUEUE_QUEUE"):
        monkeypatch.setenv(key, env[key])
    return env


@pytest.fixture
def sqlite_env(make_env, monkeypatch):
    """A SQLite environment, also applied to this process (for in-process CLI calls)."""
    return applied_env(make_env, monkeypatch, "sqlite")


@pytest.fixture
def pg_env(make_env, monkeypatch):
    """A PostgreSQL environment, also applied to this process."""
    return applied_env(make_env, monkeypatch, "postgresql")


def wait_until(predicate, timeout: float, what: str, poll: float = 0.3):
    """The first truthy value of `predicate()`, polled until `timeout` seconds have passed (then the test fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def ok_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON a successful CLI run printed."""
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def job_count(env: dict) -> int:
    from sqlalchemy import func, select

    from models.jobs import Job

    with session_of(env) as session:
        return session.scalar(select(func.count(Job.id)))


def add_job(env: dict, kind, status, spec: dict) -> int:
    """A job row written directly (no queue), for tests of what reads jobs."""
    from models.jobs import Job

    with session_of(env) as session:
        job = Job(kind=kind, status=status, spec=spec, attempts=0, cancel_requested=False)
        session.add(job)
        session.commit()
        return job.id


def new_job(session, kind, spec):
    """A running job row for a spec, as the runner would have claimed it, for calling plain job functions."""
    from models.jobs import Job, JobStatus

    job = Job(kind=kind, status=JobStatus.running, spec=spec.model_dump(mode="json"), attempts=1,
              cancel_requested=False)
    session.add(job)
    session.commit()
    return job


def check_rejected(env: dict, args: list[str], expected: str, exit_code: int = 2) -> None:
    """The CLI refuses `args` in one line naming `expected`, exits with `exit_code` (2: the user's input is wrong),
    and writes no job row and publishes no message."""
    from click.testing import CliRunner

    from manage import cli as manage_cli

    before = job_count(env)
    result = CliRunner().invoke(manage_cli, args)
    assert result.exit_code == exit_code, result.output
    assert expected in result.output, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert job_count(env) == before, "a job row was written"
    assert queue_length(env) == 0, "a message was published"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    """A private redis-server on `port` (no persistence), for tests that kill or starve their broker."""
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(lambda: pings(client), 20, "the private redis-server")
    return server


def pings(client) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def enqueued_spec(env: dict, args: list[str]) -> dict:
    """The CLI accepts `args` and enqueues exactly one job; its stored spec. (The counterpart of check_rejected.)"""
    from click.testing import CliRunner
    from sqlalchemy import select

    from manage import cli as manage_cli
    from models.jobs import Job

    before = job_count(env)
    result = CliRunner().invoke(manage_cli, args)
    assert result.exit_code == 0, result.output
    assert job_count(env) == before + 1
    with session_of(env) as session:
        return session.scalars(select(Job).order_by(Job.id.desc())).first().spec


def start_api(env: dict, log: Path | None = None, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`manage.py api` on a free port of 127.0.0.1, answering /health: (the process, its base URL)."""
    import httpx

    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    server = subprocess.Popen([sys.executable, str(REPO / "manage.py"), "api", "--port", str(port),
                               "--log-level", "warning"], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"the API server exited with {server.returncode}")
        try:
            return httpx.get(base + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout, "the API server to answer /health")
    return server, base


def create_token(env: dict, name: str, read_only: bool = False) -> str:
    """A new API token made by the CLI, as an operator would."""
    return ok_json(cli(env, "tokens", "create", name, "--json", *(["--read-only"] if read_only else [])))["token"]
