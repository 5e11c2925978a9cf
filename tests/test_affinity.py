"""Base affinity and the worker registry with the real Redis and real worker subprocesses: per-base queues, the
BRPOP key order (priority first, then loaded bases), two workers that each keep to the base they hold, a new base
queue reaching a running worker at once, and `manage.py workers`."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

from sqlalchemy import select

from models.jobs import Job, JobStatus
from tests.conftest import broker_of, cli, session_of, settings_of, start_worker, wait_until


def jobs_of(env, ids: list[int]) -> list[Job]:
    with session_of(env) as session:
        return list(session.scalars(select(Job).where(Job.id.in_(ids))))


def second_base(env, tmp_path) -> str:
    """A copy of the built-in tiny-t5 folder: a second base model, referenced by its local path."""
    target = tmp_path / "other-t5"
    shutil.copytree(Path(env["TUNEQUEUE_HOME"]) / "builtin" / "tiny-t5", target)
    return str(target)


def ready_workers(broker, n: int, queues: set[str]) -> list[str]:
    """Hostnames of `n` live workers that consume `queues` and answer remote control (so their loop polls)."""
    def ready():
        found = [w for w in broker.live_workers() if queues <= set(w["queues"])]
        if len(found) != n:
            return None
        hosts = [w["hostname"] for w in found]
        replies = broker.app.control.ping(destination=hosts, timeout=1)
        return hosts if len(replies) == n else None

    return wait_until(ready, 120, f"{n} ready workers")


def stop(*workers) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=60)


def test_routes_by_base_model():
    from worker.routing import base_queue

    assert base_queue("tq", "tiny-t5") == "tq.base.tiny-t5"
    hub, path = base_queue("tq", "google/flan-t5-base"), base_queue("tq", "/data/models/t5:v2")
    assert hub.startswith("tq.base.google-flan-t5-base-") and ":" not in path and "/" not in path
    assert base_queue("tq", "/a/b-c") != base_queue("tq", "/a-b/c")  # cleaned-up names stay distinct


def test_kombu_key_order_priority_first_then_loaded_bases(make_env):
    """The real Redis transport with our transport options: a worker preferring base B takes B's message before
    A's at equal priority, but a more urgent job on A still comes first."""
    from kombu import Consumer

    from worker.routing import AffinityCycle, base_queue, prefer

    env = make_env("sqlite")
    app = broker_of(env).app
    a, b = base_queue(app.conf.task_default_queue, "model-a"), base_queue(app.conf.task_default_queue, "model-b")

    def first(sends: list[tuple[str, int, int]], loaded: list[str]) -> int:
        for queue, job_id, redis_priority in sends:
            app.send_task("worker.tasks.generate", args=[job_id], queue=queue, priority=redis_priority)
        prefer(app.conf.task_default_queue, loaded, loaded[0] if loaded else None)
        got = []
        with app.connection_for_read() as connection:
            def on_message(body, message):
                got.append(body[0][0])
                message.ack()

            with Consumer(connection, [app.amqp.queues[a], app.amqp.queues[b]], callbacks=[on_message],
                          accept=["json"]):
                connection.drain_events(timeout=5)
        with app.connection_for_write() as connection:  # leave nothing behind for the next case
            for queue in (a, b):
                connection.default_channel.queue_purge(queue)
        return got[0]

    try:
        assert first([(a, 1, 9), (b, 2, 9)], []) == 1  # no preference: consuming order (a, then b)
        assert first([(a, 1, 9), (b, 2, 9)], ["model-b"]) == 2  # same priority: the loaded base first
        assert first([(a, 1, 0), (b, 2, 9)], ["model-b"]) == 1  # a more urgent job beats affinity
    finally:
        AffinityCycle.preferred = ()


def test_two_workers_keep_their_bases(make_env, tmp_path):
    """Jobs for two bases queued alternately behind two warm workers: each worker keeps to the base it loaded and
    takes the other base only once none of its own is queued (plain queue order would make each worker alternate)."""
    from api.jobs import enqueue
    from api.validate import validate_generate
    from models import make_session_factory
    from models.specs import GenerateSpec
    from worker.routing import base_queue

    env = make_env("sqlite")
    broker, settings = broker_of(env), settings_of(env)
    bases = ["tiny-t5", second_base(env, tmp_path)]
    queues = {base_queue(settings.queue, b) for b in bases}
    for queue in queues:
        broker.register_queue(queue)
    workers = [start_worker(env, log=tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        ready_workers(broker, 2, queues | {settings.queue})
        sessions = make_session_factory(settings.database_url)
        with sessions() as session:
            def submit(base: str, priority: int) -> int:
                spec = validate_generate(GenerateSpec(model=base, limit=16, batch_size=16), session, settings.home)
                return enqueue(session, broker, spec, priority=priority).id

            # both workers are blocked in BRPOP: each urgent warm-up job goes to a different one
            warm = [submit(base, 9) for base in bases]
            batch = [submit(bases[i % 2], 0) for i in range(4)]
        wait_until(lambda: all(j.status.finished for j in jobs_of(env, warm + batch)), 240, "the batch")
    finally:
        stop(*workers)
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text()[-3000:] for i in range(2))
    jobs = {j.id: j for j in jobs_of(env, warm + batch)}
    assert all(j.status == JobStatus.succeeded for j in jobs.values()), logs
    hosts = {jobs[i].worker_host: jobs[i].spec["model"] for i in warm}
    assert len(hosts) == 2, logs
    ran = [(j.id, j.spec["model"], j.worker_host, j.started_at) for j in jobs.values()]
    for host, own in hosts.items():
        mine = [j for j in jobs.values() if j.worker_host == host and j.spec["model"] == own]
        assert len(mine) >= 2, ran  # the warm-up job and at least one job of the batch
        assert all(j.result["model_was_loaded"] is True and j.result["base_loads"] == 1
                   for j in mine if j.id in batch), ran
        # a worker only takes the other base once none of its own is left queued (the other worker may be slower)
        for stolen in (j for j in jobs.values() if j.worker_host == host and j.spec["model"] != own):
            assert all(j.started_at <= stolen.started_at for j in jobs.values() if j.spec["model"] == own), ran
    assert all(jobs[i].result["model_was_loaded"] is False for i in warm)
    assert {jobs[i].queue for i in warm + batch} == queues
    assert all(j.queued_at and j.queue_wait_s is not None for j in jobs.values())


def test_new_base_reaches_a_running_worker_and_the_registry(make_env, tmp_path):
    from worker.routing import base_queue

    env = make_env("postgresql")
    broker, settings = broker_of(env), settings_of(env)
    other = second_base(env, tmp_path)
    assert broker.known_queues() == [settings.queue]  # nothing registered: the worker starts on the default queue
    worker = start_worker(env, log=tmp_path / "worker.log")
    try:
        [host] = ready_workers(broker, 1, {settings.queue})
        record = wait_until(lambda: [w for w in broker.live_workers() if w["cuda"] is not None], 60, "the CUDA check")[0]
        assert record["cuda"] is False and record["loaded_bases"] == [] and record["current_job"] is None

        # a base queue seen for the first time: the add_consumer broadcast makes the idle worker consume it
        first = json.loads(cli(env, "generate", "--model", other, "--limit", "4", "--wait", "--json").stdout)
        second = json.loads(cli(env, "generate", "--model", other, "--limit", "4", "--wait", "--json").stdout)
        log = (tmp_path / "worker.log").read_text()
        assert first["status"] == second["status"] == "succeeded", log[-3000:]
        assert first["queue"] == second["queue"] == base_queue(settings.queue, other)
        assert f"Started consuming from {first['queue']}" in log
        assert first["queue_wait_s"] < 3  # at most one BRPOP timeout (1 s) while the new key joins the poll
        assert second["queue_wait_s"] < 1  # an idle worker blocked on the key: no polling
        assert second["result"]["model_was_loaded"] is True and first["worker_host"] == host

        listed = json.loads(cli(env, "workers", "--json").stdout)
        assert [(w["hostname"], w["loaded_bases"], w["current_job"]) for w in listed] == [(host, [other], None)]
        assert first["queue"] in listed[0]["queues"]
        assert host in cli(env, "workers").stdout
    finally:
        stop(worker)
    assert broker.live_workers() == []  # a stopped worker removes its record
    assert "no worker is running" in cli(env, "workers").stdout
