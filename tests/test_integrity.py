"""Nothing a stalled worker, a dying broker or a race can corrupt: fenced attempts, checkpoints that belong to one
job, atomic enqueueing, reserved names, a loss that stops being a number, a full disk. Real workers, Redis servers,
databases and file systems throughout."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml
from sqlalchemy import func, select

from models import make_session_factory
from models.errors import DiskFull
from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter, LossPoint
from models.specs import FinetuneSpec
from models.sweeps import Sweep
from tests.conftest import (REPO, broker_of, cli, free_port, new_job, ok_json, session_of, sqlite_home, start_redis,
                            start_worker, wait_until)

FAST_REAPER = {"TUNEQUEUE_HEARTBEAT_SECONDS": "0.5", "TUNEQUEUE_STALE_SECONDS": "4", "TUNEQUEUE_REAP_SECONDS": "1"}


def job_row(env, job_id) -> Job:
    with session_of(env) as session:
        return session.get(Job, job_id)


def stop(*workers) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGCONT)
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


@pytest.mark.slow
def test_a_stalled_worker_writes_nothing_once_its_job_went_elsewhere(make_env, tmp_path):
    """Worker A is frozen (SIGSTOP) mid-training; B's reaper hands the job to B, which finishes it; when A wakes up
    it finds its attempt fenced off and stops: the row, the result rows and the adapter files all stay B's."""
    env = {**make_env("postgresql"), **FAST_REAPER}
    home = Path(env["TUNEQUEUE_HOME"])
    job_id = ok_json(cli(env, "finetune", "--name", "fenced", "--max-steps", "300", "--checkpoint-every", "1000",
                         "--eval-limit", "20", "--json"))["id"]
    a = start_worker(env, log=tmp_path / "a.log")
    b = None
    try:
        first = wait_until(lambda: (j := job_row(env, job_id)).progress and j.progress["step"] >= 20 and j, 180,
                           "worker A to train")
        a.send_signal(signal.SIGSTOP)
        b = start_worker(env, log=tmp_path / "b.log")
        done = wait_until(lambda: (j := job_row(env, job_id)).status.finished and j, 300, "worker B to finish")
        assert done.status == JobStatus.succeeded, (tmp_path / "b.log").read_text()[-3000:]
        assert done.attempts == 2 and done.worker_host != first.worker_host
        adapter_file = home / "adapters" / "fenced" / "adapter_model.safetensors"
        before = adapter_file.read_bytes(), adapter_file.stat().st_mtime_ns
        with session_of(env) as session:
            rows_before = (session.scalars(select(Adapter.id)).all(),
                           session.scalar(select(func.count(LossPoint.id)).where(LossPoint.job_id == job_id)))
        a.send_signal(signal.SIGCONT)
        wait_until(lambda: "writing nothing" in (tmp_path / "a.log").read_text(), 120, "worker A to give up")
    finally:
        stop(a, *([b] if b else []))
    after = job_row(env, job_id)
    assert (after.status, after.attempts, after.worker_host, after.result, after.finished_at) == \
        (done.status, done.attempts, done.worker_host, done.result, done.finished_at)
    assert (adapter_file.read_bytes(), adapter_file.stat().st_mtime_ns) == before
    with session_of(env) as session:
        assert (session.scalars(select(Adapter.id)).all(),
                session.scalar(select(func.count(LossPoint.id)).where(LossPoint.job_id == job_id))) == rows_before
    assert not [p for p in (home / "adapters").iterdir() if p.name.startswith(".")], "a staging folder was left"
    assert "Traceback" not in (tmp_path / "a.log").read_text().split("writing nothing")[-1]


@pytest.mark.slow
def test_a_second_database_sharing_the_home_never_resumes_another_run(tmp_path_factory, builtin_home, caplog):
    from worker.faults import Faults
    from worker.jobs.finetune import train_adapter
    from worker.ml.model_cache import ModelCache

    home, url_a = sqlite_home(tmp_path_factory, builtin_home, "shared-home")
    url_b = f"sqlite:///{home / 'second.sqlite'}"
    from models.migrate import upgrade

    upgrade(url_b)
    cache = ModelCache(home)
    spec = FinetuneSpec(name="first", max_steps=30, checkpoint_every_steps=10, eval_split=None)
    with make_session_factory(url_a)() as session:
        job_a = new_job(session, JobKind.finetune, spec)
        with pytest.raises(RuntimeError, match="crash injected"):
            train_adapter(spec, session, cache, home, job_id=job_a.id, faults=Faults(crash_at_step=15))
    assert (home / "checkpoints" / job_a.uid / "checkpoint.pt").exists()
    other = FinetuneSpec(name="second", max_steps=30, learning_rate=1e-3, checkpoint_every_steps=10, eval_split=None)
    with make_session_factory(url_b)() as session:
        job_b = new_job(session, JobKind.finetune, other)
        assert job_b.id == job_a.id  # the same id in another database: once enough to resume the wrong run
        assert train_adapter(other, session, cache, home, job_id=job_b.id)["resumed_from_step"] == 0
    with make_session_factory(url_a)() as session:
        changed = spec.model_copy(update={"learning_rate": 1e-2})  # a checkpoint of another spec is not used
        with caplog.at_level("WARNING", logger="tunequeue.train"), pytest.raises(RuntimeError, match="crash"):
            train_adapter(changed, session, cache, home, job_id=job_a.id, faults=Faults(crash_at_step=5))
        assert "belongs to another spec; starting over" in caplog.text
        assert train_adapter(spec, session, cache, home, job_id=job_a.id)["resumed_from_step"] == 10


def sweep_file(tmp_path: Path, name: str, points: int) -> Path:
    rates = [round(1e-3 * (i + 1), 4) for i in range(points // 10)]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": {"max_steps": 5},
                                    "grid": {"learning_rate": rates, "lora_r": list(range(1, 11))}}))
    return path


@pytest.mark.slow
def test_a_broker_killed_mid_enqueue_leaves_a_whole_sweep_that_reconcile_publishes(make_env, tmp_path):
    port = free_port()
    server = start_redis(port)
    env = {**make_env("postgresql"), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        sweep = subprocess.Popen([sys.executable, str(REPO / "manage.py"), "sweep", str(sweep_file(tmp_path, "big", 120))],
                                 env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: _sweep_stored(env, "big") or sweep.poll() is not None, 240, "the sweep's rows")
        server.kill()  # mid-publish, or just after: either way the rows must be whole and nothing lost
        server.wait()
        out, err = sweep.communicate(timeout=120)
        assert "Traceback" not in err
        assert sweep.returncode == 0 or (sweep.returncode == 1 and len(err.strip().splitlines()) == 1
                                         and "jobs reconcile" in err), err
        with session_of(env) as session:
            assert session.scalar(select(Sweep.points).where(Sweep.name == "big")) == 120
            finetunes = set(session.scalars(select(Job.id).where(Job.kind == JobKind.finetune)))
            assert len(finetunes) == 120 and session.scalar(select(func.count(Job.id))) == 122
        server = start_redis(port)  # a restarted Redis without persistence: every message is gone
        reconciled = cli(env, "jobs", "reconcile")
        assert reconciled.returncode == 0 and "120 queued jobs re-published" in reconciled.stdout, reconciled.stderr
        broker = broker_of(env)
        assert broker.waiting_job_ids(broker.known_queues()) == finetunes
        assert broker.pending_messages() == 120  # each once
    finally:
        server.kill()


def _sweep_stored(env, name: str) -> bool:
    with session_of(env) as session:
        return session.scalar(select(Sweep.id).where(Sweep.name == name)) is not None


def test_a_broker_refusing_writes_keeps_the_job_and_says_so(make_env, tmp_path):
    port = free_port()
    server = start_redis(port)
    env = {**make_env("sqlite"), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        redis.Redis(port=port).config_set("maxmemory", 1)  # out of memory: every write is refused
        refused = cli(env, "generate", "--limit", "2")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "jobs reconcile" in refused.stderr
        with session_of(env) as session:
            [job] = session.scalars(select(Job)).all()
        assert job.status == JobStatus.queued
        redis.Redis(port=port).config_set("maxmemory", 0)
        assert "1 queued jobs re-published" in cli(env, "jobs", "reconcile").stdout
        broker = broker_of(env)
        assert broker.waiting_job_ids(broker.known_queues()) == {job.id}
    finally:
        server.kill()


def test_one_name_submitted_six_times_at_once_is_accepted_once(make_env):
    env = make_env("postgresql")
    runs = [subprocess.Popen([sys.executable, str(REPO / "manage.py"), "finetune", "--name", "same"], env=env,
                             cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    accepted = [r for r in results if r[0] == 0]
    assert len(accepted) == 1, results
    for code, _out, err in results:
        if code != 0:
            assert code == 2 and "already used by a queued or running fine-tune job" in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with session_of(env) as session:
        assert session.scalar(select(func.count(Job.id))) == 1
    assert broker_of(env).pending_messages() == 1


@pytest.mark.slow
def test_a_loss_that_becomes_nan_fails_the_job_for_good(make_env, tmp_path):
    env = {**make_env("sqlite"), "TUNEQUEUE_FAULTS": "nan_at_step:3"}
    queued = cli(env, "finetune", "--name", "diverged", "--max-steps", "40", "--max-attempts", "3")
    job_id = int(queued.stdout.split()[1])
    worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0
    job = job_row(env, job_id)
    assert job.status == JobStatus.failed and job.attempts == 1, (tmp_path / "worker.log").read_text()[-2000:]
    assert "the training loss became nan at or before step 10" in job.error
    assert not (Path(env["TUNEQUEUE_HOME"]) / "adapters" / "diverged").exists()
    with session_of(env) as session:
        assert session.scalar(select(func.count(Adapter.id))) == 0


@pytest.fixture
def tiny_disk():
    """Mount small tmpfs file systems (root in this sandbox can); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_says_where_and_leaves_nothing_half_written(tmp_path_factory, builtin_home, tiny_disk):
    from worker.jobs.finetune import train_adapter
    from worker.ml.model_cache import ModelCache

    home, url = sqlite_home(tmp_path_factory, builtin_home, "full-disk")
    cache = ModelCache(home)
    checkpoints = tiny_disk(home / "checkpoints", "64k")
    spec = FinetuneSpec(name="cramped", max_steps=12, checkpoint_every_steps=10, eval_split=None)
    with make_session_factory(url)() as session:
        job = new_job(session, JobKind.finetune, spec)
        with pytest.raises(DiskFull, match=f"disk full at {checkpoints / job.uid}: could not write checkpoint.pt.tmp"):
            train_adapter(spec, session, cache, home, job_id=job.id)
        assert not list((checkpoints / job.uid).iterdir())  # no .tmp left filling the disk
        adapters = tiny_disk(home / "adapters", "32k")
        no_checkpoints = spec.model_copy(update={"checkpoint_every_steps": None})
        with pytest.raises(DiskFull, match=f"disk full at {adapters}"):
            train_adapter(no_checkpoints, session, cache, home, job_id=job.id)
        assert list(adapters.iterdir()) == []  # no staging folder left
        assert session.scalar(select(func.count(Adapter.id))) == 0
