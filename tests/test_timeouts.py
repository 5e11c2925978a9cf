"""A broker or database that accepts connections and never answers makes a command fail in one line, within a bound,
instead of hanging: each test opens a hung listener on a loopback port (it accepts and holds every connection, and
never writes a byte) and points REDIS_URL or DATABASE_URL at it."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import broker_of, cli, job_count, queue_length, settings_of

TIMEOUT_S = 5  # BROKER_TIMEOUT_S (worker/celery_app.py) and DATABASE_CONNECT_TIMEOUT_S (models/base.py)
BOUND_S = 60  # generous: the test machine is loaded; without the timeouts these calls never end (or take minutes)
SUBPROCESS_S = 180


class HungListener:
    """A TCP listener on 127.0.0.1 that accepts connections, holds them open and never answers."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True, name="hung-listener")
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.held.append(conn)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()


@pytest.fixture
def hung():
    listener = HungListener()
    yield listener
    listener.close()


def run_timed(env: dict, *args: str):
    start = time.monotonic()
    result = cli(env, *args, timeout=SUBPROCESS_S)
    return result, time.monotonic() - start


def assert_one_line_error(result, elapsed: float, *expected: str) -> None:
    output = result.stdout + result.stderr
    assert elapsed < BOUND_S, f"took {elapsed:.1f}s: {output}"
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], output
    assert len(result.stderr.strip().splitlines()) == 1, output


@pytest.mark.parametrize("args", [
    ["finetune", "--name", "x"],
    ["generate", "--limit", "2"],
    ["jobs", "reconcile"],
    ["workers"],
    ["worker", "--burst"],
], ids=lambda args: "-".join(args[:2]))
def test_hung_broker(make_env, hung, args):
    env = make_env("sqlite")
    hung_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{hung.port}/0"}
    before = job_count(env)
    result, elapsed = run_timed(hung_env, *args)
    assert_one_line_error(result, elapsed, f"the broker at redis://127.0.0.1:{hung.port}/0",
                          f"did not answer within {TIMEOUT_S}s")
    assert job_count(env) == before, "a job row was written"
    assert hung.held, "the command never connected to the hung listener"


def test_hung_broker_leaves_database_commands_alone(make_env, hung):
    env = make_env("sqlite")
    result, elapsed = run_timed({**env, "REDIS_URL": f"redis://127.0.0.1:{hung.port}/0"}, "jobs", "list")
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < BOUND_S


@pytest.mark.parametrize("args", [
    ["jobs", "list"],
    ["finetune", "--name", "x"],
    ["jobs", "reconcile"],
    ["jobs", "show", "1"],
], ids=lambda args: "-".join(args[:2]))
def test_hung_database(make_env, hung, args):
    env = make_env("sqlite")
    hung_env = {**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{hung.port}/test"}
    result, elapsed = run_timed(hung_env, *args)
    assert_one_line_error(result, elapsed, f"the database at postgresql+psycopg://postgres@127.0.0.1:{hung.port}/test",
                          f"did not answer within {TIMEOUT_S}s")
    assert queue_length(env) == 0, "a message was published"
    assert job_count(env) == 0
    assert hung.held, "the command never connected to the hung listener"


def test_hung_database_url_timeout_wins(make_env, hung):
    """A connect_timeout in the URL is the user's choice, and the message names it."""
    env = make_env("sqlite")
    url = f"postgresql://postgres@127.0.0.1:{hung.port}/test?connect_timeout=3"
    result, elapsed = run_timed({**env, "DATABASE_URL": url}, "jobs", "list")
    assert_one_line_error(result, elapsed, "did not answer within 3s")


def test_worker_side_calls_raise_instead_of_hanging(make_env, hung, caplog):
    """What a worker's loops call (the registry, the reaper, the burst watcher, the result backend, a publish) raises
    within the bound on a hung broker, so each loop logs and tries again; the registry's write logs by itself."""
    from models.errors import Unavailable
    from worker.registry import WorkerRecord

    env = make_env("sqlite")
    broker = broker_of({**env, "REDIS_URL": f"redis://127.0.0.1:{hung.port}/0"})

    class Consumer:
        hostname = "hung-test@host"

    record = WorkerRecord(Consumer(), broker, interval=1.0)
    calls = {
        "known_queues": broker.known_queues,
        "live_workers": broker.live_workers,
        "pending_messages": broker.pending_messages,
        "waiting_job_ids": lambda: broker.waiting_job_ids([broker.queue]),
        "check": broker.check,
        "result backend": lambda: broker.app.backend.get("celery-task-meta-x"),
        "registry write": record.write,
    }

    def timed(call):
        start = time.monotonic()
        try:
            call()
            outcome = None
        except Exception as exc:
            outcome = exc
        return outcome, time.monotonic() - start

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(timed, call) for name, call in calls.items()}
        done = {name: future.result(timeout=SUBPROCESS_S) for name, future in futures.items()}
    for name, (outcome, elapsed) in done.items():
        assert elapsed < BOUND_S, f"{name} took {elapsed:.1f}s"
        if name == "registry write":
            assert outcome is None, repr(outcome)  # it logs and returns: the next round writes again
        elif name == "result backend":
            assert outcome is not None and "Timeout" in str(outcome), repr(outcome)
        else:
            assert isinstance(outcome, Unavailable), f"{name}: {outcome!r}"
            assert f"did not answer within {TIMEOUT_S}s" in str(outcome), f"{name}: {outcome}"
    assert "could not write the worker record: the broker at" in caplog.text


def test_engine_connect_times_out(hung):
    """models/base.py's engines (the CLI's and the workers') give up on a hung PostgreSQL server."""
    from sqlalchemy.exc import OperationalError

    from models.base import make_engine

    engine = make_engine(settings_of({"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{hung.port}/test"})
                         .database_url)
    start = time.monotonic()
    with pytest.raises(OperationalError, match="timeout"):
        with engine.connect():
            pass
    assert time.monotonic() - start < BOUND_S
    engine.dispose()
