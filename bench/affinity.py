"""Base affinity across workers: how many base-model loads a backlog for two bases costs three workers.

Three real workers (processes of their own, one Redis, one database) and a backlog of 12 generate jobs, 6 per base,
queued interleaved (A B A B …) while all three are idle. The bases are the built-in tiny-t5 and a copy of it saved in
another folder (a different base to the model cache and to routing). Each worker's model cache holds one base
(TUNEQUEUE_MODEL_CACHE_BYTES: 1.5 times tiny-t5's weights), as a GPU holds one large base; `--budget two` lets it hold
both. Each budget runs two sides, each with three fresh workers:

- affinity: routing as it is (one queue per base; a worker reads the queues of the bases it holds first);
- base-blind: the same backlog with every job published to the default queue (`worker.lifecycle.route` replaced in
  this process only), so each worker takes the next job in queue order whatever it holds.

Loads are read from the workers' own results: each job's `base_loads` is its worker's model-cache load count so far,
so a worker's largest is its loads, and a job whose count exceeds its worker's previous one loaded its base.

    python bench/affinity.py                 # one-base and two-base budgets, 12 jobs of 16 examples
    python bench/affinity.py --tiny          # one-base budget, 12 jobs of 2 examples (the smoke test)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import REPO, emit, emit_machine, sig  # noqa: E402

WORKERS = 3
SIDES = ("affinity", "base-blind")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="one-base budget only, 2 examples per job")
    parser.add_argument("--jobs", type=int, default=12, help="backlog size, half per base [12]")
    parser.add_argument("--limit", type=int, default=None, help="examples per generate job [16; --tiny: 2]")
    parser.add_argument("--budget", choices=("one", "two", "both"), default=None,
                        help="bases each worker's model cache holds [both; --tiny: one]")
    args = parser.parse_args()
    limit = args.limit or (2 if args.tiny else 16)
    budgets = {"one": ["one"], "two": ["two"], "both": ["one", "two"]}[args.budget or ("one" if args.tiny else "both")]
    home = Path(tempfile.mkdtemp(prefix="tq-affinity-bench-"))
    os.environ["TUNEQUEUE_HOME"] = str(home)
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{home / 'bench.db'}")

    from models.migrate import upgrade
    from models.settings import Settings
    from worker.ml.builtin import ensure_builtin

    upgrade(Settings.from_env().database_url)
    tiny = ensure_builtin("tiny-t5", home)
    shutil.copytree(tiny, home / "other-t5")  # the same weights in another folder: another base
    bases = ["tiny-t5", str(home / "other-t5")]
    weights = sum(f.stat().st_size for f in Path(tiny).glob("*.safetensors"))
    emit(figure="setup", workers=WORKERS, jobs=args.jobs, per_base=args.jobs // 2, order="interleaved A B A B",
         kind="generate", examples_per_job=limit, base_weight_bytes=weights, repeats="each side runs once")
    rows = []
    try:
        for budget in budgets:
            cache_bytes = int(weights * (1.5 if budget == "one" else 2.5))
            for side in SIDES:
                rows.append(run_side(side, budget, cache_bytes, bases, args.jobs, limit))
                emit(**rows[-1])
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print_table(rows)
    emit_machine()


def run_side(side: str, budget: str, cache_bytes: int, bases: list[str], n: int, limit: int) -> dict:
    """Three fresh workers on a fresh queue take the backlog; the side's loads, per worker and in all."""
    from sqlalchemy import select

    import worker.lifecycle
    from api.jobs import enqueue
    from api.validate import validate_generate
    from models import Job, JobStatus, make_session_factory
    from models.settings import Settings
    from models.specs import GenerateSpec
    from worker.broker import Broker
    from worker.routing import base_queue, route

    queue = f"tq-affinity-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "TUNEQUEUE_QUEUE": queue, "TUNEQUEUE_MODEL_CACHE_BYTES": str(cache_bytes)}
    settings = Settings.from_env(env)
    broker = Broker(settings)
    for base in bases:  # known before the workers start: each consumes every base queue from its first poll
        broker.register_queue(base_queue(queue, base))
    names = [f"bench-{side}-{i}@affinity" for i in range(WORKERS)]
    workers = [subprocess.Popen([sys.executable, str(REPO / "manage.py"), "worker", "--name", name, "--loglevel",
                                 "WARNING"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for name in names]
    try:
        wait_ready(broker, names, workers)
        sessions = make_session_factory(settings.database_url)
        worker.lifecycle.route = route if side == "affinity" else (lambda default_queue, spec: default_queue)
        started = time.monotonic()
        with sessions() as session:
            ids = [enqueue(session, broker, validate_generate(
                GenerateSpec(model=bases[i % 2], limit=limit, batch_size=limit), session, settings.home)).id
                   for i in range(n)]
        while True:
            with sessions() as session:
                jobs = list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.started_at)))
            if all(j.status.finished for j in jobs):
                break
            if any(w.poll() is not None for w in workers):
                raise SystemExit(f"a worker exited during the {side} side")
            time.sleep(0.1)
        wall = time.monotonic() - started
    finally:
        worker.lifecycle.route = route
        for process in workers:
            process.terminate()
        for process in workers:
            process.wait(timeout=60)
        broker.redis.delete(*broker.redis.keys(f"*{queue}*") or ["-"])
    failed = [j.id for j in jobs if j.status != JobStatus.succeeded]
    if failed:
        raise SystemExit(f"{side}: jobs {failed} did not succeed")
    per_worker, order = {}, {}
    for job in jobs:  # by start time: a job whose worker's load count went up loaded its base
        host = job.worker_host.split("@")[0].rsplit("-", 1)[1]
        loads = job.result["base_loads"]
        before = per_worker.get(host, 0)
        order.setdefault(host, []).append(("A" if job.spec["model"] == bases[0] else "B") + ("*" if loads > before
                                                                                               else ""))
        per_worker[host] = loads
    return {"side": side, "budget": f"{budget} base" + ("s" if budget == "two" else ""), "cache_bytes": cache_bytes,
            "loads": sum(per_worker.values()), "loads_per_worker": [per_worker.get(str(i), 0) for i in range(WORKERS)],
            "jobs_per_worker": [len(order.get(str(i), [])) for i in range(WORKERS)],
            "taken": {f"worker-{h}": " ".join(o) for h, o in sorted(order.items())}, "wall_s": sig(wall)}


def wait_ready(broker, names: list[str], workers: list[subprocess.Popen], timeout: float = 180) -> None:
    """Until every worker has its registry record and answers a ping (its consumer loop polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            raise SystemExit("a worker exited while starting")
        live = {w["hostname"] for w in broker.live_workers()}
        if set(names) <= live and len(broker.app.control.ping(destination=names, timeout=1)) == len(names):
            return
        time.sleep(0.3)
    raise SystemExit("the workers did not start")


def print_table(rows: list[dict]) -> None:
    print("| model cache holds | routing | base loads | per worker | jobs per worker | wall s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['budget']} | {row['side']} | {row['loads']} | {row['loads_per_worker']} | "
              f"{row['jobs_per_worker']} | {row['wall_s']} |")


if __name__ == "__main__":
    main()
