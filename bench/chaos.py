"""Chaos benchmark: N random kill -9 of the worker while a small sweep runs (training, generation, scoring).

Prints one JSON line per kill and a summary line: jobs finished, failed, lost (never finished), duplicated result
rows, and recovery times (kill → the interrupted job put back in the queue by the next worker's reaper; it then runs
when that worker is free). Uses the real Redis, a
fresh SQLite database (or $DATABASE_URL) and a fresh queue; the worker's reaper runs with short timeouts.

    python bench/chaos.py --kills 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SWEEP = """
name: chaos
base: {max_steps: 120, checkpoint_every_steps: 15, eval_limit: 20, per_device_train_batch_size: 8}
grid: {learning_rate: [1.0e-3, 3.0e-3, 2.0e-3]}
eval: {split: test, limit: 60, batch_size: 2}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-gap", type=float, default=1.5, help="seconds a worker lives at least before a kill")
    parser.add_argument("--max-gap", type=float, default=5.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="tq-chaos-"))
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "TUNEQUEUE_QUEUE": f"tq-chaos-{uuid.uuid4().hex[:6]}",
           "TUNEQUEUE_HEARTBEAT_SECONDS": "0.5", "TUNEQUEUE_STALE_SECONDS": "3", "TUNEQUEUE_REAP_SECONDS": "0.5",
           "PYTHONUNBUFFERED": "1"}
    env.setdefault("DATABASE_URL", f"sqlite:///{home / 'chaos.db'}")
    os.environ.update(env)

    def manage(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "manage.py"), *argv], env=env, capture_output=True,
                              text=True, check=True)

    from sqlalchemy import func, select

    from models import Adapter, ExampleScore, Generation, Job, JobStatus, Metric, make_session_factory
    from models.settings import Settings

    manage("db", "upgrade")
    (home / "sweep.yaml").write_text(SWEEP)
    manage("sweep", str(home / "sweep.yaml"), "--max-attempts", "50")
    sessions = make_session_factory(Settings.from_env().database_url)

    def running() -> list[tuple[int, str, int]]:
        with sessions() as session:
            return [(j.id, j.kind.value, j.attempts) for j in session.scalars(select(Job).where(
                Job.status == JobStatus.running))]

    def unfinished() -> int:
        with sessions() as session:
            return session.scalar(select(func.count(Job.id)).where(Job.status.in_([JobStatus.queued,
                                                                                   JobStatus.running])))

    def start_worker() -> subprocess.Popen:
        log = open(home / "workers.log", "a")
        return subprocess.Popen([sys.executable, str(REPO / "manage.py"), "worker", "--loglevel", "WARNING"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)

    started = time.monotonic()
    recoveries, kills_done = [], 0
    worker = start_worker()
    while kills_done < args.kills and unfinished():
        time.sleep(rng.uniform(args.min_gap, args.max_gap))
        victims = running()
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        killed_at = time.monotonic()
        kills_done += 1
        worker = start_worker()
        record = {"kill": kills_done, "running": [f"{kind} {job_id}" for job_id, kind, _ in victims]}
        if victims:  # recovery: the lost job is back in the queue (or already running again)
            job_id, _, attempts = victims[0]
            deadline = killed_at + 60
            while time.monotonic() < deadline:
                with sessions() as session:
                    job = session.get(Job, job_id)
                    if job.attempts > attempts or job.status != JobStatus.running:
                        break
                time.sleep(0.1)
            record["recovery_s"] = round(time.monotonic() - killed_at, 2)
            recoveries.append(record["recovery_s"])
        print(json.dumps(record), flush=True)
    deadline = time.monotonic() + 600
    while unfinished() and time.monotonic() < deadline:
        time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)

    with sessions() as session:
        statuses = [j.status.value for j in session.scalars(select(Job))]
        attempts = [j.attempts for j in session.scalars(select(Job))]
        dup_generations = session.scalar(select(func.count()).select_from(
            select(Generation.job_id).group_by(Generation.job_id, Generation.variant, Generation.example_id)
            .having(func.count() > 1).subquery()))
        dup_metrics = session.scalar(select(func.count()).select_from(
            select(Metric.job_id).group_by(Metric.job_id, Metric.variant, Metric.split, Metric.name)
            .having(func.count() > 1).subquery()))
        dup_scores = session.scalar(select(func.count()).select_from(
            select(ExampleScore.job_id).group_by(ExampleScore.job_id, ExampleScore.generation_id, ExampleScore.name)
            .having(func.count() > 1).subquery()))
        adapters = session.scalar(select(func.count(Adapter.id)))
    summary = {
        "kills": kills_done, "jobs": len(statuses), "finished": statuses.count("succeeded"),
        "failed": statuses.count("failed"), "lost": statuses.count("queued") + statuses.count("running"),
        "duplicated_rows": dup_generations + dup_metrics + dup_scores, "adapters": adapters,
        "max_attempts_used": max(attempts), "recovery_s_median": statistics.median(recoveries) if recoveries else None,
        "recovery_s_max": max(recoveries) if recoveries else None, "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary), flush=True)
    if not os.environ.get("TUNEQUEUE_CHAOS_KEEP"):
        shutil.rmtree(home, ignore_errors=True)
    sys.exit(0 if summary["lost"] == 0 and summary["duplicated_rows"] == 0 else 1)


if __name__ == "__main__":
    main()
