"""Queue overhead: N tiny generate jobs (one example, one new token) through the real Redis and one real worker.

Prints per-job overhead (wall time per job minus the time the jobs' own work took), enqueue → start latency p50 and
p99 (from the rows' queued_at / started_at) for the batch and for jobs sent one at a time to the idle worker, and how
many times the worker loaded the base model.

    python bench/queue_latency.py --tiny          # 50 jobs
    python bench/queue_latency.py                 # 200 jobs
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import REPO, emit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--idle-jobs", type=int, default=20, help="Jobs sent one at a time to the idle worker.")
    args = parser.parse_args()
    n = args.jobs or 200  # the 200 tiny jobs; --tiny kept for symmetry with the other scripts
    home = Path(tempfile.mkdtemp(prefix="tq-queue-bench-"))
    os.environ.update({"TUNEQUEUE_HOME": str(home), "TUNEQUEUE_QUEUE": f"tq-bench-{uuid.uuid4().hex[:6]}"})
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{home / 'bench.db'}")

    from sqlalchemy import select

    from api.jobs import enqueue
    from models import Job, JobStatus, make_session_factory
    from models.migrate import upgrade
    from models.settings import Settings
    from models.specs import GenerateSpec
    from worker.broker import Broker

    settings = Settings.from_env()
    upgrade(settings.database_url)
    broker = Broker(settings)
    sessions = make_session_factory(settings.database_url)
    worker = subprocess.Popen([sys.executable, str(REPO / "manage.py"), "worker", "--loglevel", "WARNING"],
                              env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spec = GenerateSpec(limit=1, max_new_tokens=1, batch_size=1)
    with sessions() as session:  # one warm-up job: worker start-up and the first model load are not queue overhead
        warm = enqueue(session, broker, spec)
    while True:
        with sessions() as session:
            if session.get(Job, warm.id).status.finished:
                break
        time.sleep(0.2)
    started = time.monotonic()
    with sessions() as session:
        ids = [enqueue(session, broker, spec).id for _ in range(n)]
    while True:
        with sessions() as session:
            if all(s.finished for s in session.scalars(select(Job.status).where(Job.id.in_(ids)))):
                break
        time.sleep(0.05)
    wall = time.monotonic() - started
    idle_ids = []
    for _ in range(args.idle_jobs):  # one at a time: the worker is blocked in BRPOP when each one is sent
        time.sleep(0.1)
        with sessions() as session:
            job = enqueue(session, broker, spec)
            idle_ids.append(job.id)
            while not session.get(Job, job.id, populate_existing=True).status.finished:
                time.sleep(0.02)
    worker.terminate()
    worker.wait(timeout=60)
    with sessions() as session:
        jobs = [session.get(Job, i) for i in ids]
        waits = sorted(1000 * j.queue_wait_s for j in jobs)
        idle = sorted(1000 * session.get(Job, i).queue_wait_s for i in idle_ids)
        work = sum(j.result["duration_s"] for j in jobs if j.result)
        loads = max(j.result["base_loads"] for j in jobs if j.result)
        ok = sum(j.status == JobStatus.succeeded for j in jobs)
    emit(figure="queue", jobs=n, succeeded=ok, wall_s=round(wall, 2), jobs_per_s=round(n / wall, 1),
         overhead_ms_per_job=round(1000 * (wall - work) / n, 1), work_ms_per_job=round(1000 * work / n, 1),
         base_loads=loads)
    emit(figure="enqueue_to_start_ms", p50=round(statistics.median(waits), 1),
         p99=round(waits[min(len(waits) - 1, int(0.99 * len(waits)))], 1),
         note="jobs are enqueued all at once, so later ones wait behind earlier ones")
    if idle:
        emit(figure="idle_enqueue_to_start_ms", jobs=len(idle), p50=round(statistics.median(idle), 1),
             p99=round(idle[min(len(idle) - 1, int(0.99 * len(idle)))], 1), note="one job at a time, idle worker")
    emit(ratio="overhead_ms_per_job", value=round(1000 * (wall - work) / n, 1), target=50)


if __name__ == "__main__":
    main()
