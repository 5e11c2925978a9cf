"""Queue overhead: rounds of N tiny generate jobs (one example, one new token) enqueued at once, through the real
Redis and one real worker.

Prints per-job overhead (a round's wall time per job minus the time the jobs' own work took: the median over the
rounds, with min and max), enqueue → start latency p50, p99, min and max (from the rows' queued_at / started_at)
for the rounds' jobs and for jobs sent one at a time to the idle worker, and how many times the worker loaded the
base model.

    python bench/queue_latency.py                 # 5 rounds of 200 jobs
    python bench/queue_latency.py --jobs 50       # 5 rounds of 50 jobs
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

from bench._common import REPO, add_bench_args, emit, emit_machine, rate, sig, spread  # noqa: E402


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": sig(statistics.median(values)), "p99": sig(values[min(len(values) - 1, int(0.99 * len(values)))]),
            "min": sig(values[0]), "max": sig(values[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="jobs enqueued at once in each round [200]")
    parser.add_argument("--idle-jobs", type=int, default=20, help="Jobs sent one at a time to the idle worker.")
    add_bench_args(parser, threads=False)
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
    rounds = []  # (job ids, wall seconds) of each round of n jobs enqueued at once
    for _ in range(args.pairs):
        started = time.monotonic()
        with sessions() as session:
            ids = [enqueue(session, broker, spec).id for _ in range(n)]
        while True:
            with sessions() as session:
                if all(s.finished for s in session.scalars(select(Job.status).where(Job.id.in_(ids)))):
                    break
            time.sleep(0.05)
        rounds.append((ids, time.monotonic() - started))
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
        overheads, per_s, waits, works, ok, loads = [], [], [], [], 0, 0
        for ids, wall in rounds:
            jobs = [session.get(Job, i) for i in ids]
            work = [j.result["duration_s"] for j in jobs if j.result]
            overheads.append(1000 * (wall - sum(work)) / n)  # the round's wall time less the jobs' own work
            per_s.append(n / wall)
            waits += [1000 * j.queue_wait_s for j in jobs]
            works += [1000 * w for w in work]
            ok += sum(j.status == JobStatus.succeeded for j in jobs)
            loads = max([loads] + [j.result["base_loads"] for j in jobs if j.result])
        idle = [1000 * session.get(Job, i).queue_wait_s for i in idle_ids]
    emit(figure="queue", rounds=len(rounds), jobs_per_round=n, succeeded=ok, **rate("jobs_per_s", per_s),
         **rate("overhead_ms_per_job", overheads), work_ms_per_job=percentiles(works), base_loads=loads)
    emit(figure="enqueue_to_start_ms", **percentiles(waits),
         note="jobs are enqueued all at once, so later ones wait behind earlier ones")
    if idle:
        emit(figure="idle_enqueue_to_start_ms", jobs=len(idle), **percentiles(idle),
             note="one job at a time, idle worker")
    # not an A/B pair: each round's overhead is its own figure; the spread is over the rounds
    emit(ratio="overhead_ms_per_job", **spread(overheads), target=50)
    emit_machine()

if __name__ == "__main__":
    main()
