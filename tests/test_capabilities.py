"""Capability routing: queue names that encode a job's needs, the reasons a queued job finds no taker, a CPU-only
worker that leaves a CUDA job queued (with its reason in `jobs list`, `jobs show` and the API) while it runs a job
without needs on the same base, a worker that claims CUDA (TUNEQUEUE_FAKE_CAPABILITIES, tests only) taking it, and a
SQLite worker refusing a broker on another machine."""

from __future__ import annotations

import json
import time

import pytest

from models.errors import InputError
from tests.test_affinity import stop
from tests.conftest import (broker_of, check_rejected, cli, create_token, ok_json, settings_of, start_worker,
                            wait_until)

GIB = 2**30


# --------------------------------------------------------------------------------------------- needs and queues
def test_queue_names_encode_declared_and_implied_needs():
    from worker.capabilities import Needs, needs_of
    from worker.routing import base_queue, needs_of_queue, route

    cuda40 = route("tq", {"model": "tiny-t5", "requires": ["cuda"], "min_gpu_mem": 40 * GIB})
    assert cuda40 == "tq.base.tiny-t5.needs-cuda-mem40g"
    assert needs_of_queue(cuda40) == Needs(cuda=True, gpu_mem_bytes=40 * GIB)
    # implied: a memory floor needs CUDA; QLoRA, an int8 base and the 8-bit optimizers need bitsandbytes
    assert route("tq", {"model": "tiny-t5", "min_gpu_mem": 1536 * 2**20}) == "tq.base.tiny-t5.needs-cuda-mem1536m"
    for implied in ({"method": "qlora"}, {"load_in_8bit": True}, {"optim": "paged_adamw_8bit"}):
        assert needs_of({"model": "m", **implied}) == Needs(bitsandbytes=True), implied
    assert route("tq", {"model": "tiny-t5", "requires": ["bf16", "cuda"]}) == "tq.base.tiny-t5.needs-cuda-bf16"
    # no needs: the plain base queue, the default queue for a score job; a ref can never pose as a needs suffix
    assert route("tq", {"model": "tiny-t5"}) == base_queue("tq", "tiny-t5") and route("tq", {"kind": "score"}) == "tq"
    sly = base_queue("tq", "/models/x.needs-cuda")
    assert needs_of_queue(sly) == Needs() and ".needs-" not in sly
    assert needs_of_queue("tq.base.tiny-t5") == Needs() == needs_of_queue("tq")


def test_reasons_name_the_first_need_no_live_worker_meets():
    from worker.capabilities import Needs, meets, unmet_reason

    cpu = {"hostname": "cpu@a", "capabilities": {"cuda": False, "bitsandbytes": True}}
    small = {"hostname": "host-b", "capabilities": {"cuda": True, "bf16": True, "gpu_mem_free_bytes": 24 * GIB}}
    tiny = {"hostname": "host-c", "capabilities": {"cuda": True, "gpu_mem_free_bytes": 8 * GIB}}
    assert unmet_reason(Needs(cuda=True), [cpu]) == "no live worker has CUDA"
    assert unmet_reason(Needs(cuda=True), []) == "no live worker has CUDA (no worker is running)"
    assert unmet_reason(Needs(cuda=True, gpu_mem_bytes=40 * GIB), [cpu, small, tiny]) == \
        "no live worker has 40 GiB free (largest: 24 GiB on host-b)"
    assert unmet_reason(Needs(cuda=True, bitsandbytes=True), [cpu, small]) == \
        "no live worker has CUDA and bitsandbytes"
    assert unmet_reason(Needs(cuda=True, gpu_mem_bytes=20 * GIB), [cpu, small]) is None
    assert unmet_reason(Needs(), []) is None  # a job without needs never gets a reason
    assert meets(small["capabilities"], Needs(cuda=True, bf16=True, gpu_mem_bytes=24 * GIB))
    assert not meets(None, Needs(cuda=True)) and meets(None, Needs())  # a record without capabilities: plain only


def test_fake_capabilities_are_read_for_tests_only_and_checked(monkeypatch):
    from worker.capabilities import FAKE_CAPABILITIES, detect

    monkeypatch.delenv(FAKE_CAPABILITIES, raising=False)
    real = detect()
    assert real["cuda"] is False and "fake" not in real  # this machine has no GPU
    monkeypatch.setenv(FAKE_CAPABILITIES, json.dumps({"cuda": True, "gpu_mem_free_bytes": 24 * GIB}))
    fake = detect()
    assert fake["cuda"] is True and fake["gpu_mem_free_bytes"] == 24 * GIB and fake["fake"] is True
    monkeypatch.setenv(FAKE_CAPABILITIES, '{"tpu": true}')
    with pytest.raises(InputError, match="tests only"):
        detect()


def test_a_worker_consumes_only_the_queues_it_meets(make_env, monkeypatch):
    """The record thread's queue sync: it adds the registered queues the worker meets and cancels a needs queue it
    stopped meeting (its free memory fell); the registry's broadcast for a new queue reaches capable workers only."""
    from types import SimpleNamespace

    from worker.registry import WorkerRecord
    from worker.routing import route
    from worker.runtime import WorkerRuntime

    env = make_env("sqlite")
    broker, queue = broker_of(env), settings_of(env).queue
    plain, cuda, big = (route(queue, {"model": "tiny-t5", **needs}) for needs in
                        ({}, {"requires": ["cuda"]}, {"min_gpu_mem": 40 * GIB}))
    calls = []
    monkeypatch.setattr(broker.app.control, "add_consumer", lambda q, **kw: calls.append(("add", q, kw["destination"])))
    monkeypatch.setattr(broker.app.control, "cancel_consumer",
                        lambda q, **kw: calls.append(("cancel", q, kw["destination"])))
    runtime = WorkerRuntime(settings_of(env), broker)
    runtime.capabilities = {"cuda": True, "gpu_mem_free_bytes": 48 * GIB, "fake": True}
    consumer = SimpleNamespace(hostname="gpu@test", task_consumer=SimpleNamespace(queues=[
        SimpleNamespace(name=name) for name in (queue, big)]))
    record = WorkerRecord(consumer, broker, interval=1.0, runtime=runtime)
    record.write()
    for name in (plain, cuda, big):
        broker.register_queue(name)
    assert calls == [("add", plain, ["gpu@test"]), ("add", cuda, ["gpu@test"]), ("add", big, ["gpu@test"])]
    calls.clear()
    runtime.capabilities = {**runtime.capabilities, "gpu_mem_free_bytes": 24 * GIB}
    record.sync_queues()
    assert sorted(calls) == sorted([("add", cuda, ["gpu@test"]), ("add", plain, ["gpu@test"]),
                                    ("cancel", big, ["gpu@test"])])
    runtime.capabilities = {"cuda": False}
    record.write()
    calls.clear()
    broker.register_queue(route(queue, {"model": "other", "requires": ["cuda"]}))
    broker.register_queue(route(queue, {"model": "other"}))
    assert calls == [("add", f"{queue}.base.other", ["gpu@test"])]  # the CPU worker hears of the plain queue only
    record.stop()


# ------------------------------------------------------------------------------------------ SQLite and brokers
def test_broker_locality():
    from models.settings import Settings
    from worker.launch import broker_is_local, check_shared_database

    local = ["redis://127.0.0.1:6379/0", "redis://127.3.2.1/1", "redis://localhost", "redis://:pw@localhost:6380/0",
             "redis://[::1]:6379/0", "unix:///run/redis.sock", "redis+socket:///tmp/r.sock", "redis://"]
    remote = ["redis://redis-host:6379/0", "redis://10.0.0.5", "rediss://cache.example.com:6380",
              "redis://user:pw@redis-host/0", "redis://[::2]/0"]
    assert all(broker_is_local(url) for url in local)
    assert not any(broker_is_local(url) for url in remote)

    def settings(database: str, redis_url: str) -> Settings:
        return Settings.from_env({"DATABASE_URL": database, "REDIS_URL": redis_url, "TUNEQUEUE_HOME": "/tmp/tq"})

    for url in local:
        check_shared_database(settings("sqlite:////tmp/tq/db.sqlite", url))
    check_shared_database(settings("postgresql://u@db-host/tq", "redis://redis-host:6379/0"))
    with pytest.raises(InputError) as refused:
        check_shared_database(settings("sqlite:////tmp/tq/db.sqlite", "redis://redis-host:6379/0"))
    assert str(refused.value) == ("DATABASE_URL is a SQLite file but REDIS_URL points at redis-host: workers on other "
                                  "machines cannot share a SQLite file; use PostgreSQL")


def test_sqlite_worker_refuses_a_remote_broker_in_one_line(make_env):
    env = {**make_env("sqlite"), "REDIS_URL": "redis://redis-host:6379/0"}
    for extra in ([], ["--gpus", "0"]):
        start = time.monotonic()
        result = cli(env, "worker", *extra, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip() == ("Error: DATABASE_URL is a SQLite file but REDIS_URL points at redis-host: "
                                         "workers on other machines cannot share a SQLite file; use PostgreSQL")
        assert time.monotonic() - start < 20  # refused before any attempt to reach the broker


# ----------------------------------------------------------------------------------------- submitting needs
def test_bad_needs_are_one_line_errors_with_nothing_enqueued(sqlite_env):
    check_rejected(sqlite_env, ["finetune", "--name", "x", "--min-gpu-mem", "lots"], "min_gpu_mem: not a size")
    check_rejected(sqlite_env, ["generate", "--min-gpu-mem", "0"], "min_gpu_mem: not a size: '0' (more than 0 bytes")
    check_rejected(sqlite_env, ["finetune", "--name", "x", "--require", "tpu"], "'tpu' is not one of")


def test_needs_from_the_command_line_a_sweep_file_and_the_api(sqlite_env, tmp_path):
    """With no worker running: the declared and implied needs land in the spec and the queue name, and every door
    shows the reason."""
    from fastapi.testclient import TestClient

    from api.web.app import create_app

    env = sqlite_env
    queued = ok_json(cli(env, "finetune", "--name", "big", "--require", "cuda", "--require", "bf16",
                         "--min-gpu-mem", "40GiB", "--json"))
    assert queued["queue"].endswith(".base.tiny-t5.needs-cuda-bf16-mem40g")
    assert queued["waiting_reason"] == "no live worker has CUDA (no worker is running)"

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: gpu-sweep\nbase: {model: tiny-t5, max_steps: 2, requires: [cuda], min_gpu_mem: 24GiB}\n"
                     "grid: {learning_rate: [0.001, 0.002]}\n")
    ok_json(cli(env, "sweep", str(sweep), "--json"))
    listed = ok_json(cli(env, "jobs", "list", "--json"))
    by_kind = {(job["kind"], job["queue"]) for job in listed if job["id"] != queued["id"]}
    needs_queue = queued["queue"].replace("needs-cuda-bf16-mem40g", "needs-cuda-mem24g")
    # the sweep's evaluation loads the same base, so it needs what its fine-tunes need; score jobs need nothing
    assert by_kind == {("finetune", needs_queue), ("generate", None), ("score", None)}

    token = create_token(env, "caps")
    with TestClient(create_app()) as client:
        headers = {"Authorization": f"Bearer {token}"}
        answer = client.post("/jobs", headers=headers, json={"kind": "generate", "requires": ["tpu"]})
        assert answer.status_code == 422 and "requires.0" in answer.json()["detail"]
        made = client.post("/jobs", headers=headers, json={"kind": "generate", "min_gpu_mem": "8GiB", "limit": 2})
        assert made.status_code == 201, made.text
        assert made.json()["queue"].endswith(".needs-cuda-mem8g")
        assert made.json()["waiting_reason"].startswith("no live worker has CUDA")
        shown = client.get(f"/jobs/{queued['id']}", headers=headers).json()
        assert shown["spec"]["requires"] == ["cuda", "bf16"] and shown["spec"]["min_gpu_mem"] == 40 * GIB
        assert shown["waiting_reason"] == queued["waiting_reason"]


# --------------------------------------------------------------------------------------------- real workers
def live(broker, count: int) -> list[dict]:
    """The records of `count` live workers that answer remote control."""
    def ready():
        found = broker.live_workers()
        if len(found) != count:
            return None
        replies = broker.app.control.ping(destination=[w["hostname"] for w in found], timeout=1)
        return found if len(replies) == count else None

    return wait_until(ready, 120, f"{count} live workers")


@pytest.mark.slow
def test_a_cuda_job_waits_for_a_cuda_worker(pg_env, tmp_path):
    from fastapi.testclient import TestClient

    from api.web.app import create_app
    from worker.capabilities import FAKE_CAPABILITIES

    env = {**pg_env, "COLUMNS": "200"}
    broker, queue = broker_of(env), settings_of(env).queue
    cpu_worker = start_worker(env, "--name", "cpu", log=tmp_path / "cpu.log")
    gpu_worker = None
    try:
        [cpu] = live(broker, 1)
        assert cpu["cuda"] is False and cpu["capabilities"]["cuda"] is False and "fake" not in cpu["capabilities"]
        needy = ok_json(cli(env, "finetune", "--name", "on-gpu", "--require", "cuda", "--max-steps", "2",
                            "--train-limit", "16", "--eval-split", "none", "--json"))
        assert needy["waiting_reason"] == "no live worker has CUDA"
        # a job without needs on the same base runs meanwhile, on the CPU worker
        plain = ok_json(cli(env, "generate", "--limit", "4", "--wait", "--json"))
        assert plain["status"] == "succeeded" and plain["worker_host"] == cpu["hostname"]
        assert needy["queue"] not in broker.live_workers()[0]["queues"]  # registered, but not consumed here

        reason = "waiting: no live worker has CUDA"
        row = next(line for line in cli(env, "jobs", "list").stdout.splitlines() if "on-gpu on tiny-t5" in line)
        assert reason in row, row
        shown = cli(env, "jobs", "show", str(needy["id"])).stdout
        assert "waiting_reason: no live worker has CUDA" in shown and "status: queued" in shown
        token = create_token(env, "watcher", read_only=True)
        with TestClient(create_app()) as client:
            headers = {"Authorization": f"Bearer {token}"}
            assert client.get(f"/jobs/{needy['id']}", headers=headers).json()["waiting_reason"] == \
                "no live worker has CUDA"
            listed = {job["id"]: job for job in client.get("/jobs", headers=headers).json()["jobs"]}
            assert listed[needy["id"]]["waiting_reason"] == "no live worker has CUDA"
            assert listed[plain["id"]]["waiting_reason"] is None

        # a worker that claims a 24 GiB GPU takes the waiting job; one needing 40 GiB keeps waiting, with the figure
        fake = {"cuda": True, "gpu_name": "Fake GPU", "gpu_mem_total_bytes": 24 * GIB,
                "gpu_mem_free_bytes": 24 * GIB, "bf16": True}
        gpu_worker = start_worker({**env, FAKE_CAPABILITIES: json.dumps(fake)}, "--name", "gpu",
                                  log=tmp_path / "gpu.log")
        job = wait_until(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
            ok_json(cli(env, "jobs", "show", str(needy["id"]), "--json"))), 180, "the CUDA job", poll=1)
        log = (tmp_path / "gpu.log").read_text()
        assert job["status"] == "succeeded", (job["error"], log[-3000:])
        gpu = next(w for w in broker.live_workers() if w["hostname"] != cpu["hostname"])
        assert job["worker_host"] == gpu["hostname"] and gpu["capabilities"]["fake"] is True
        assert "cuda Fake GPU (24 GiB, 24 GiB free), bf16" in cli(env, "workers").stdout

        big = ok_json(cli(env, "generate", "--limit", "2", "--min-gpu-mem", "40GiB", "--json"))
        assert big["waiting_reason"] == f"no live worker has 40 GiB free (largest: 24 GiB on {gpu['hostname']})"
        time.sleep(2)  # a capable-looking worker would have taken it by now
        still = ok_json(cli(env, "jobs", "show", str(big["id"]), "--json"))
        assert still["status"] == "queued" and still["waiting_reason"] == big["waiting_reason"]
        assert big["queue"] == f"{queue}.base.tiny-t5.needs-cuda-mem40g"
        assert all(big["queue"] not in w["queues"] for w in broker.live_workers())
        assert cli(env, "jobs", "cancel", str(big["id"])).returncode == 0
    finally:
        stop(*[w for w in (cpu_worker, gpu_worker) if w is not None])
