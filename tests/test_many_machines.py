"""Three machines that share nothing but PostgreSQL, Redis and an S3 bucket (moto's server on 127.0.0.1).

Each worker is a process of its own with its own TUNEQUEUE_HOME (built-in models copied in, no shared folder). A
4-point sweep runs across them; one worker is killed with SIGKILL while it trains a point past a checkpoint, and
another resumes that point from the bucket's checkpoint. Every point finishes once, no row is written twice, the
bucket holds only the adapters of adapter rows (no checkpoints, no key without its manifest), and each home holds
only caches and logs. The timeline (which worker ran which job when, the kill, the resume step) is printed and
written to test-artifacts/many_machines_timeline.txt.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter, Generation, LossPoint, Metric
from tests.conftest import REPO, cli, session_of, start_worker, wait_until
from tests.test_store import FAST_REAPER, bucket, home_files, objects, s3, stop  # noqa: F401 (fixtures)

MACHINES = ("machine-a", "machine-b", "machine-c")
# 4 points of 120 steps (a few seconds each on a loaded CPU), a checkpoint every 10 steps; no eval loss
SWEEP = {"name": "spread",
         "base": {"model": "tiny-t5", "max_steps": 120, "per_device_train_batch_size": 4, "train_limit": 64,
                  "eval_split": "none", "max_source_length": 64, "max_target_length": 16,
                  "checkpoint_every_steps": 10, "warmup_steps": 0},
         "grid": {"learning_rate": [1e-3, 3e-3], "lora_r": [4, 8]},
         "eval": {"split": "test", "limit": 6, "max_new_tokens": 8}}


class Timeline:
    """Polls the sweep's job rows and notes each change of (status, worker, attempt) with its time."""

    def __init__(self, env: dict):
        self.env, self.start, self.lines, self.seen = env, time.monotonic(), [], {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.start:6.1f}s  {text}"
        self.lines.append(line)
        print(line, flush=True)

    def _poll(self) -> None:
        while not self.done.is_set():
            try:
                self.check()
            except Exception as error:  # a poll racing the database's drop at teardown
                self.note(f"(poll failed: {error!r})")
            self.done.wait(0.2)

    def check(self) -> None:
        with session_of(self.env) as session:
            for job in session.scalars(select(Job).order_by(Job.id)):
                resumed = (job.progress or {}).get("resumed_from_step") if job.status == JobStatus.running else None
                state = (job.status.value, job.worker_host, job.attempts, resumed)
                if self.seen.get(job.id) == state:
                    continue
                self.seen[job.id] = state
                what = f"job {job.id} ({job.kind.value} {job.output_name or ''})".replace(" )", ")")
                if job.status == JobStatus.running:
                    self.note(f"{what} running on {job.worker_host}, attempt {job.attempts}"
                              + (f", resumed from step {resumed} (at step {job.progress['step']})" if resumed else ""))
                elif job.status.finished:
                    extra = ""
                    if job.result and job.result.get("resumed_from_step"):
                        extra = f", resumed from step {job.result['resumed_from_step']}"
                    self.note(f"{what} {job.status.value} on {job.worker_host} after {job.attempts} attempt(s)"
                              + extra)
                else:
                    lost = f" again: {job.attempt_errors[-1]['error'][:90]}" if job.attempt_errors else ""
                    self.note(f"{what} {job.status.value}{lost}")

    def stop(self) -> str:
        self.done.set()
        self.thread.join(timeout=10)
        self.check()
        return "\n".join(self.lines)


def jobs_of(env) -> list[Job]:
    with session_of(env) as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def training_past_a_checkpoint(env, bucket_name: str, prefix: str) -> Job | None:
    """A running fine-tune whose checkpoint is in the bucket and whose progress is past it."""
    stored = set(objects(bucket_name, f"{prefix}/checkpoints/"))
    for job in jobs_of(env):
        step = (job.progress or {}).get("step") or 0
        if (job.kind == JobKind.finetune and job.status == JobStatus.running and step >= 20
                and f"{prefix}/checkpoints/{job.uid}/checkpoint.pt" in stored):
            return job
    return None


@pytest.mark.slow
def test_three_homes_run_a_sweep_and_survive_a_kill(make_env, bucket, s3, tmp_path):  # noqa: F811
    prefix = "team"
    # one point per worker at a time (co-training would let the first worker take all four points into one pass;
    # tests/test_cotrain.py kills a pass)
    first = {**make_env("postgresql"), **s3, **FAST_REAPER, "TUNEQUEUE_ARTIFACTS": f"s3://{bucket}/{prefix}",
             "TUNEQUEUE_COTRAIN": "1"}
    homes = [Path(first["TUNEQUEUE_HOME"])]
    for machine in MACHINES[1:]:  # another machine each: its own home with its own copy of the built-in models
        home = tmp_path / f"home-{machine}"
        shutil.copytree(homes[0] / "builtin", home / "builtin")
        homes.append(home)
    envs = {m: {**first, "TUNEQUEUE_HOME": str(h)} for m, h in zip(MACHINES, homes)}
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))

    timeline = Timeline(first)
    workers = {m: start_worker(env, "--name", f"tunequeue@{m}", log=tmp_path / f"{m}.log")
               for m, env in envs.items()}
    try:
        queued = cli(first, "sweep", str(sweep_file))
        assert queued.returncode == 0, queued.stdout + queued.stderr
        timeline.note("sweep queued: 4 fine-tunes, 1 evaluation, 1 score")
        victim = wait_until(lambda: training_past_a_checkpoint(first, bucket, prefix), 150,
                            "a fine-tune past its first checkpoint in the bucket", poll=0.1)
        killed = victim.worker_host.split("@")[1]
        workers[killed].send_signal(signal.SIGKILL)  # the machine dies mid-training
        workers[killed].wait(timeout=30)
        checkpoints = objects(bucket, f"{prefix}/checkpoints/{victim.uid}/")
        timeline.note(f"SIGKILL {victim.worker_host} while it trains job {victim.id} at step "
                      f"{victim.progress['step']} of {victim.progress['total_steps']} ({checkpoints[0]} in the bucket)")
        wait_until(lambda: all(j.status.finished for j in jobs_of(first)), 170, "every job of the sweep", poll=0.5)
    finally:
        for worker in workers.values():
            stop(worker)
        text = timeline.stop()
        (REPO / "test-artifacts").mkdir(exist_ok=True)
        (REPO / "test-artifacts" / "many_machines_timeline.txt").write_text(text + "\n")
    logs = "\n".join(f"--- {m}\n" + (tmp_path / f"{m}.log").read_text()[-2000:] for m in MACHINES)

    jobs = jobs_of(first)
    assert [j.kind for j in jobs].count(JobKind.finetune) == 4 and len(jobs) == 6
    assert all(j.status == JobStatus.succeeded for j in jobs), ([(j.id, j.status, j.error) for j in jobs], logs)
    resumed = next(j for j in jobs if j.id == victim.id)
    assert resumed.attempts == 2 and resumed.attempt_errors[0]["error"].startswith("worker lost"), logs
    assert resumed.result["resumed_from_step"] >= 10 and resumed.result["steps"] == 120
    assert resumed.worker_host != victim.worker_host and killed not in resumed.worker_host
    assert {j.worker_host for j in jobs} - {victim.worker_host}, "no other worker ran anything"
    assert all(j.attempts == 1 for j in jobs if j.id != victim.id)

    with session_of(first) as session:  # no duplicate rows
        adapters = session.scalars(select(Adapter)).all()
        steps = session.execute(select(LossPoint.job_id, LossPoint.step)).all()
        generations = session.execute(select(Generation.variant, Generation.example_id)).all()
        metrics = session.execute(select(Metric.job_id, Metric.variant, Metric.split, Metric.name)).all()
    assert sorted(a.name for a in adapters) == [f"spread-0{i}" for i in range(1, 5)]
    assert len({a.job_id for a in adapters}) == 4 and len({a.path for a in adapters}) == 4
    assert not [k for k, n in Counter(steps).items() if n > 1]
    assert {s for job_id, s in steps if job_id == victim.id} >= {10 * i for i in range(1, 13)}
    assert len(generations) == 5 * 6 and len(set(generations)) == len(generations)  # 4 adapters and the base
    assert metrics and len(set(metrics)) == len(metrics)

    stored = objects(bucket)  # no orphan objects
    assert stored and all(key.startswith(f"{prefix}/adapters/") for key in stored), stored  # no checkpoints left
    folders = {"/".join(key.split("/")[1:4]) for key in stored}
    assert folders == {a.path for a in adapters}, (folders, [a.path for a in adapters])
    assert all(f"{prefix}/{folder}/.manifest.json" in stored for folder in folders)
    for machine, home in zip(MACHINES, homes):  # nothing but caches and logs on any machine
        assert home_files(home) <= {"cache", "logs"}, sorted(home.rglob("*"))
        # a checkpoint's working copy lives between its save and its upload; the killed machine may have died there
        left = sorted(home.rglob("checkpoint.pt*"))
        allowed = home / "cache" / "files" / "checkpoints" / victim.uid
        assert all(machine == killed and path.parent == allowed for path in left), left
