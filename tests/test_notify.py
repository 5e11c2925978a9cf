"""Webhook notifications (worker/notify.py) against a small HTTP server on 127.0.0.1: a job that failed for good and
a finished sweep are each announced once, with a Slack-compatible `text`; a dead or hanging webhook neither raises
nor holds up the caller, and the rows are the same as without it."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter, Metric
from models.sweeps import Sweep
from tests.conftest import cli, free_port, session_of, settings_of, start_worker, wait_until
from worker import notify


class Webhook:
    """An HTTP server on 127.0.0.1 that records each POSTed JSON body; answers `statuses` in turn (then 200), or
    holds every request until closed (`hang`)."""

    def __init__(self, statuses: tuple[int, ...] = (), hang: bool = False):
        self.received: list[dict] = []
        self.headers: list[dict] = []
        self.statuses, self.released = list(statuses), threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.received.append(body)
                hook.headers.append(dict(self.headers))
                if hang:
                    hook.released.wait(30)
                    return
                self.send_response(hook.statuses.pop(0) if hook.statuses else 200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://hook:s3cret@127.0.0.1:{self.server.server_port}/hook?token=t0ken"

    def events(self, name: str) -> list[dict]:
        return [body for body in self.received if body.get("event") == name]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hooks = []

    def make(**kwargs) -> Webhook:
        hooks.append(Webhook(**kwargs))
        return hooks[-1]

    yield make
    for hook in hooks:
        hook.close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(notify, "TIMEOUT_S", 0.5)
    monkeypatch.setattr(notify, "RETRIES", 1)
    monkeypatch.setattr(notify, "BACKOFF_S", 0.05)


def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    return f"http://hook:s3cret@127.0.0.1:{free_port()}/hook?token=t0ken"


def make_sweep(env, url: str | None, *, running: bool) -> dict:
    """A finished-looking sweep: fine-tunes a (succeeded, scored best) and b (failed for good, or still running),
    a generate and a score job with rouge rows for base and a. Returns the ids."""
    with session_of(env) as session:
        sweep = Sweep(name="night", spec={"eval": {"metrics": ["rouge"]}}, points=2, notify_url=url)
        session.add(sweep)
        session.flush()

        def job(kind, status, spec, **extra) -> Job:
            row = Job(kind=kind, status=status, spec=spec, sweep_id=sweep.id, cancel_requested=False,
                      **{"attempts": 1, **extra})
            session.add(row)
            session.flush()
            return row

        ft_a = job(JobKind.finetune, JobStatus.succeeded, {"name": "night-01", "model": "tiny-t5"})
        ft_b = job(JobKind.finetune, JobStatus.running if running else JobStatus.failed,
                   {"name": "night-02", "model": "tiny-t5"}, attempts=3, max_attempts=3,
                   error=None if running else "RuntimeError: boom\nsecond line", worker_host="tunequeue-gpu1@box")
        generate = job(JobKind.generate, JobStatus.succeeded,
                       {"model": "tiny-t5", "adapters": ["base", "night-01", "night-02"]})
        score = job(JobKind.score, JobStatus.succeeded, {"generate_job_id": generate.id})
        adapter = Adapter(name="night-01", job_id=ft_a.id, base_model="tiny-t5", method="lora",
                          hyperparameters={"lora_r": 8}, path="adapters/night-01", size_bytes=1, trainable_params=1,
                          total_params=2)
        session.add(adapter)
        session.flush()
        for variant, adapter_id, value in (("base", None, 0.25), ("night-01", adapter.id, 0.31)):
            for name in ("rouge1", "rouge2"):
                session.add(Metric(job_id=score.id, generate_job_id=generate.id, variant=variant,
                                   adapter_id=adapter_id, base_model="tiny-t5", split="test", name=name,
                                   value=value if name == "rouge1" else value / 2, n_examples=10))
        session.commit()
        return {"sweep": sweep.id, "a": ft_a.id, "b": ft_b.id, "score": score.id}


def rows_of(env, ids: dict) -> tuple:
    with session_of(env) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        return [(j.id, j.status, j.error, j.attempts, j.finished_at) for j in jobs]


def finished_at(env, sweep_id: int):
    with session_of(env) as session:
        return session.get(Sweep, sweep_id).finished_at


def job_ended(env, job_id: int, **settings) -> float:
    """Call the hook as the runner does; the seconds it took."""
    from dataclasses import replace

    started = time.monotonic()
    with session_of(env) as session:
        notify.job_ended(replace(settings_of(env), **settings), session, job_id)
    return time.monotonic() - started


def test_failed_job_and_finished_sweep_are_announced_once(env, webhook, fast_retries):
    hook = webhook()
    ids = make_sweep(env, hook.url, running=True)
    job_ended(env, ids["a"])  # b still runs: nothing to say yet
    assert notify.wait_pending(10) and hook.received == [] and finished_at(env, ids["sweep"]) is None

    with session_of(env) as session:  # b fails for good
        job = session.get(Job, ids["b"])
        job.status, job.error = JobStatus.failed, "RuntimeError: boom\nsecond line"
        session.commit()
    job_ended(env, ids["b"])
    job_ended(env, ids["score"])  # a later caller finds the sweep already finished
    assert notify.wait_pending(10)

    [failed] = hook.events("job_failed")
    assert failed["job_id"] == ids["b"] and failed["kind"] == "finetune" and failed["sweep"] == "night"
    assert failed["attempts"] == 3 and failed["error"] == "RuntimeError: boom\nsecond line"
    assert failed["worker_host"] == "tunequeue-gpu1@box" and "night-02" in failed["what"]
    assert failed["text"].startswith(f"tunequeue: job {ids['b']} failed for good (sweep night)")
    assert "RuntimeError: boom" in failed["text"] and "second line" not in failed["text"]

    [done] = hook.events("sweep_finished")
    assert done["sweep"] == "night" and done["counts"] == {"succeeded": 3, "failed": 1} and done["jobs"] == 4
    assert done["metric"] == "rouge1" and done["wall_time_s"] >= 0 and done["finished_at"]
    assert done["best"]["variant"] == "night-01" and done["best"]["value"] == pytest.approx(0.31)
    assert done["best"]["delta"] == pytest.approx(0.06)
    assert done["text"].startswith("tunequeue: sweep night finished in ") and "3 succeeded, 1 failed" in done["text"]
    assert "best night-01: rouge1 0.3100 (+0.0600 vs base)" in done["text"]
    assert len(hook.received) == 2 and all(h["Content-Type"] == "application/json" for h in hook.headers)
    assert all(h["Authorization"] == "Basic aG9vazpzM2NyZXQ=" for h in hook.headers)  # hook:s3cret
    assert finished_at(env, ids["sweep"]) is not None


def test_many_workers_ending_a_sweep_together_announce_it_once(env, webhook):
    hook = webhook()
    ids = make_sweep(env, hook.url, running=False)
    callers = [threading.Thread(target=job_ended, args=(env, ids[key])) for key in ("a", "score", "a", "score")]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert notify.wait_pending(10)
    assert len(hook.events("sweep_finished")) == 1 and hook.events("job_failed") == []


def test_settings_url_standalone_job_and_no_scores(sqlite_env, webhook):
    hook = webhook()
    with session_of(sqlite_env) as session:
        lone = Job(kind=JobKind.score, status=JobStatus.failed, spec={"generate_job_id": 7}, attempts=1,
                   cancel_requested=False, error="JobFailed: no generations")
        sweep = Sweep(name="quiet", spec={}, points=1)
        session.add_all([lone, sweep])
        session.flush()
        skipped = Job(kind=JobKind.generate, status=JobStatus.skipped, spec={"model": "tiny-t5"}, sweep_id=sweep.id,
                      attempts=0, cancel_requested=False)
        session.add(skipped)
        session.commit()
        lone_id, skipped_id, sweep_id = lone.id, skipped.id, sweep.id
    job_ended(sqlite_env, lone_id, notify_url=hook.url)  # no sweep: the settings' URL
    job_ended(sqlite_env, skipped_id, notify_url=hook.url)
    assert notify.wait_pending(10)
    [failed] = hook.events("job_failed")
    assert failed["sweep"] is None and failed["what"] == "score of generate job 7"
    [done] = hook.events("sweep_finished")
    assert done["counts"] == {"skipped": 1} and done["best"] is None and done["text"].endswith("\nno scores")

    with session_of(sqlite_env) as session:  # no URL anywhere: the sweep is still marked finished, nothing is sent
        again = Sweep(name="silent", spec={}, points=1)
        session.add(again)
        session.flush()
        session.add(Job(kind=JobKind.score, status=JobStatus.failed, spec={"generate_job_id": 1}, sweep_id=again.id,
                        attempts=1, cancel_requested=False))
        session.commit()
        job_id, again_id = session.scalar(select(Job.id).where(Job.sweep_id == again.id)), again.id
    job_ended(sqlite_env, job_id)
    assert notify.wait_pending(10) and len(hook.received) == 2 and finished_at(sqlite_env, again_id) is not None


def test_retries_a_5xx_then_delivers(webhook, fast_retries):
    hook = webhook(statuses=(503,))
    thread = notify.post(hook.url, {"event": "test", "text": "hello"})
    thread.join(10)
    assert hook.received == [{"event": "test", "text": "hello"}] * 2
    refused = webhook(statuses=(400,))  # a client error is final: no retry
    notify.post(refused.url, {"event": "test", "text": "x"}).join(10)
    assert len(refused.received) == 1


@pytest.mark.parametrize("kind", ["dead", "hanging"])
def test_a_dead_or_hanging_webhook_neither_raises_nor_blocks(sqlite_env, webhook, fast_retries, caplog, kind):
    hook = webhook(hang=True) if kind == "hanging" else None
    url = hook.url if hook else dead_url()
    ids = make_sweep(sqlite_env, url, running=False)
    before = rows_of(sqlite_env, ids)
    caplog.set_level(logging.WARNING, logger="tunequeue.notify")
    took = job_ended(sqlite_env, ids["b"])
    assert took < 1.0, f"the caller waited {took:.1f}s for the webhook"
    assert rows_of(sqlite_env, ids) == before and finished_at(sqlite_env, ids["sweep"]) is not None
    assert notify.wait_pending(15)  # the threads gave up: timeout 0.5 s, one retry
    if hook:
        assert len(hook.received) == 4  # two notifications, each tried twice
    warnings = [r.getMessage() for r in caplog.records if r.name == "tunequeue.notify"]
    assert len(warnings) == 2 and all("not delivered after 2 attempts" in w for w in warnings), warnings
    assert all("s3cret" not in w and "t0ken" not in w and "127.0.0.1" in w for w in warnings), warnings


def test_a_real_worker_announces_a_job_that_failed_for_good(make_env, webhook, tmp_path):
    """Through the runner (worker/runner.py calls notify.job_ended) of a `worker --gpu 1 --burst`."""
    hook = webhook()
    env = {**make_env("sqlite"), "TUNEQUEUE_FAULTS": "crash_at_step:2", "TUNEQUEUE_NOTIFY_URL": hook.url}
    queued = cli(env, "finetune", "--name", "doomed", "--max-steps", "5", "--max-attempts", "1")
    assert queued.returncode == 0, queued.stderr
    job_id = int(queued.stdout.split()[1])
    worker = start_worker(env, "--burst", "--gpu", "1", log=tmp_path / "worker.log")
    assert worker.wait(timeout=180) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    [failed] = wait_until(lambda: hook.events("job_failed"), 10, "the job-failed notification")
    assert failed["job_id"] == job_id and "crash injected" in failed["error"] and failed["attempts"] == 1
    assert failed["worker_host"].startswith("tunequeue-gpu1") and failed["worker_host"].endswith(
        f"@{socket.gethostname()}")
    assert hook.events("sweep_finished") == []
