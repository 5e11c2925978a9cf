"""The inputs of docs/scaling.md, measured on this machine: what one job writes to PostgreSQL and Redis, and what one
PostgreSQL and one Redis here can take.

1. A real 2-point sweep (tiny-t5, 40 steps a point, checkpoint every 20, eval limit 50, 50 test examples): `manage.py
   sweep` then one `manage.py worker --burst`, on a fresh PostgreSQL database and a private redis-server (so that
   `INFO commandstats` and `MONITOR` see this run only). Counted: rows per table per job (from the tables), the
   tuples the worker inserted / updated / deleted (`pg_stat_user_tables`, worker only: snapshots around it),
   transactions, and every Redis command the worker sent, by kind, split into the windows of the jobs it ran.
2. Round trips on the same PostgreSQL database through tunequeue's own functions (claim, heartbeat,
   report_progress, finish), raw single-row UPDATEs per second with psycopg (1 and 8 connections), and
   generation-like rows inserted per second (1 and 130 to a commit); the worker's open connections, sampled.
3. Redis: LPUSH + BRPOP round trip per message and PUBLISH per second on the private redis-server.
4. One reaper round (`worker.reaper.reconcile`) over a night's backlog: 2,000 queued fine-tunes with their messages
   and 250 sweeps' generate and score jobs waiting.
5. Flower's event state (`flower.events.EventsState`): events ingested per second, memory per task.

    python bench/scaling_inputs.py            # 1-3 minutes on 2 shared cores
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import REPO, emit, emit_machine, sig  # noqa: E402

PG_ADMIN = os.environ.get("TUNEQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = ("jobs", "loss_points", "adapters", "generations", "metrics", "example_scores", "rungs", "sweeps",
          "job_waits")
SWEEP = {"name": "scaling", "base": {"model": "tiny-t5", "max_steps": 40, "eval_limit": 50, "eval_steps": 20,
                                     "checkpoint_every_steps": 20, "target_modules": ["q", "v"]},
         "grid": {"learning_rate": [1e-3, 3e-3]}, "eval": {"split": "test", "limit": 50, "max_new_tokens": 32}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    import redis

    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            if client.ping():
                return server
        except redis.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("the private redis-server did not start")


def pg_stats(url: str) -> dict:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        tables = {name: {"ins": ins, "upd": upd, "hot": hot, "del": dele} for name, ins, upd, hot, dele in conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables")}
        commits, = conn.execute("SELECT xact_commit FROM pg_stat_database "
                                "WHERE datname = current_database()").fetchone()
    return {"tables": tables, "commits": commits}


def sample_connections(database: str, out: list, stop: threading.Event) -> None:
    """(open connections, of them idle in a transaction) to `database` (the worker's), every 0.2 s until `stop`."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        while not stop.wait(0.2):
            out.append(conn.execute("SELECT count(*), count(*) FILTER (WHERE state = 'idle in transaction') "
                                    "FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone())


def redis_commandstats(client) -> dict:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


MONITOR_LINE = re.compile(r"^(\d+\.\d+) \[\d+ [^\]]+\] (.*)$")


def classify(args: list[str]) -> str:
    """A Redis command of the worker, by what it is for (worker/registry.py, kombu's Redis transport, Celery)."""
    command = args[0].upper()
    key = args[1] if len(args) > 1 else ""
    if command == "PUBLISH":
        if "celery-task-meta" in key:
            return "PUBLISH result backend"
        event = re.search(r'routing_key\\?": \\?"([a-z.-]+)', " ".join(args))
        return f"PUBLISH event {event[1] if event else key}"
    if command in ("SET", "SETEX") and key.startswith("celery-task-meta"):
        return "SET result backend"
    if key.startswith("_tunequeue") or command in ("EVAL", "EVALSHA"):
        return f"{command} registry"
    if command in ("HSET", "HDEL", "ZADD", "ZREM", "HGET", "HVALS", "ZREVRANGEBYSCORE", "HMGET") and "unacked" in key:
        return f"{command} unacked (kombu acks)"
    if command in ("LPUSH", "RPUSH"):
        return "LPUSH message"
    if command in ("LLEN", "EXISTS"):
        return f"{command} (burst watcher's queue length)"
    if command == "GET" and key.startswith("celery-task-meta"):
        return "GET result backend (before each store)"
    return command


def parse_monitor(path: Path) -> list[tuple[float, str, int]]:
    """(time, kind, bytes of the command's arguments) of each command MONITOR saw."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        match = MONITOR_LINE.match(line)
        if not match:
            continue
        try:
            args = shlex.split(match[2])
        except ValueError:
            args = match[2].split()
        if args:
            out.append((float(match[1]), classify(args), sum(len(a) for a in args)))
    return out


def run_sweep(root: Path) -> dict:
    import psycopg
    import redis
    import yaml
    from sqlalchemy import func, select

    from models import make_session_factory
    from models.jobs import Job
    from models.migrate import upgrade
    from models.results import Adapter, ExampleScore, Generation, LossPoint, Metric
    from models.settings import Settings
    from worker.ml.builtin import ensure_builtin

    home = root / "home"
    ensure_builtin("tiny-t5", home)
    port = free_port()
    server = start_redis(port)
    name = f"tq_scaling_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": url, "REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "TUNEQUEUE_QUEUE": "tq-scaling", "PYTHONUNBUFFERED": "1"}
    settings = Settings.from_env(env)
    try:
        upgrade(settings.database_url)
        (root / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
        manage = [sys.executable, str(REPO / "manage.py")]
        subprocess.run(manage + ["sweep", str(root / "sweep.yaml")], env=env, cwd=REPO, check=True,
                       capture_output=True)
        client = redis.Redis(port=port)
        time.sleep(1.5)
        pg_before, redis_before = pg_stats(url), redis_commandstats(client)
        monitor_file = root / "monitor.txt"
        with open(monitor_file, "w") as out:
            monitor = subprocess.Popen(["redis-cli", "-p", str(port), "monitor"], stdout=out)
            time.sleep(0.5)
            launched = time.time()
            connections, stop = [], threading.Event()
            sampler = threading.Thread(target=sample_connections, args=(name, connections, stop))
            sampler.start()
            subprocess.run(manage + ["worker", "--burst", "--loglevel", "WARNING"], env=env, cwd=REPO, check=True,
                           capture_output=True)
            ended = time.time()
            stop.set()
            sampler.join()
            time.sleep(0.5)
            monitor.terminate()
            monitor.wait()
        time.sleep(1.5)  # backends flush their statistics at exit
        pg_after, redis_after = pg_stats(url), redis_commandstats(client)
        sessions = make_session_factory(settings.database_url)
        with sessions() as session:
            jobs = session.scalars(select(Job).order_by(Job.finished_at)).all()

            def count(model, job_id):
                return session.scalar(select(func.count()).select_from(model).where(model.job_id == job_id))

            per_job = [{"id": j.id, "kind": j.kind.value, "status": j.status.value, "attempts": j.attempts,
                        "duration_s": sig(j.duration_s), "started": j.started_at.timestamp(),
                        "finished": j.finished_at.timestamp(),
                        "loss_points": count(LossPoint, j.id), "generations": count(Generation, j.id),
                        "metrics": count(Metric, j.id), "example_scores": count(ExampleScore, j.id),
                        "steps": (j.result or {}).get("steps"), "rows": (j.result or {}).get("rows")} for j in jobs]
            adapters = [{"name": a.name, "size_bytes": a.size_bytes, "trainable_params": a.trainable_params,
                         "total_params": a.total_params,
                         "bytes_per_trainable_param": sig(a.size_bytes / a.trainable_params)}
                        for a in session.scalars(select(Adapter))]
            generation_bytes = session.scalar(select(func.avg(func.length(Generation.source) + func.length(
                Generation.prediction) + func.coalesce(func.length(Generation.reference), 0))))
        commands = parse_monitor(monitor_file)
        # windows: each job's (previous job's finish, its finish]; its delivery (BRPOP, unacked) falls in it
        windows, previous = [], launched
        for job in per_job:
            windows.append((job, previous, job["finished"]))
            previous = job["finished"]
        by_job = []
        for job, start, end in windows:
            kinds = collections.Counter(kind for t, kind, _ in commands if start < t <= end)
            sent = sum(size for t, _, size in commands if start < t <= end)
            sizes = collections.defaultdict(int)
            for t, kind, size in commands:
                if start < t <= end:
                    sizes[kind] += size
            by_job.append({"job": job["id"], "kind": job["kind"], "window_s": sig(end - start),
                           "commands": dict(kinds.most_common()), "argument_bytes": sent,
                           "bytes_by_kind": dict(sizes)})
        whole = collections.Counter(kind for _, kind, _ in commands)
        return {"jobs": per_job, "adapters": adapters, "avg_generation_text_bytes": sig(float(generation_bytes or 0)),
                "worker_wall_s": sig(ended - launched),
                "worker_pg_connections_max": max([c for c, _ in connections] or [0]),
                "worker_pg_idle_in_transaction_max": max([i for _, i in connections] or [0]),
                "worker_pg_samples": len(connections),
                "pg_worker_delta": {t: {k: pg_after["tables"][t][k] - pg_before["tables"].get(t, {}).get(k, 0)
                                        for k in ("ins", "upd", "hot", "del")}
                                    for t in TABLES if t in pg_after["tables"]},
                "pg_worker_commits": pg_after["commits"] - pg_before["commits"],
                "redis_worker_commands": {k: v - redis_before.get(k, 0) for k, v in redis_after.items()
                                          if v - redis_before.get(k, 0)},
                "redis_by_job": by_job, "redis_whole_run": dict(whole.most_common()),
                "redis_port": port, "url": url, "name": name, "server": server}
    except BaseException:
        server.terminate()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        raise


def time_calls(call, n: int) -> dict:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    times.sort()
    return {"p50_ms": sig(statistics.median(times)), "p90_ms": sig(times[int(0.9 * len(times))]), "n": n}


def pg_round_trips(url: str) -> None:
    """tunequeue's job-row statements, each its own transaction, as the worker runs them (SQLAlchemy session)."""
    from models import make_session_factory
    from models.jobs import Job, JobKind, JobStatus, Lease, claim, finish, heartbeat, report_progress

    sessions = make_session_factory(url.replace("postgresql://", "postgresql+psycopg://"))
    n = 300
    with sessions() as session:
        jobs = [Job(kind=JobKind.finetune, status=JobStatus.queued, spec={"name": f"p{i}"}) for i in range(n)]
        session.add_all(jobs)
        session.commit()
        ids = iter([j.id for j in jobs])
        leases = []
        emit(figure="pg_claim", **time_calls(lambda: leases.append(claim(session, next(ids), None, "bench")), n))
        lease = leases[0]
        emit(figure="pg_heartbeat", **time_calls(lambda: heartbeat(session, lease), n))
        progress = {"step": 10, "total_steps": 100, "loss": 1.234, "eval_loss": 1.3}
        emit(figure="pg_report_progress", **time_calls(lambda: report_progress(session, lease, progress), n))
        pending = iter(leases)
        emit(figure="pg_finish", **time_calls(lambda: finish(session, next(pending), JobStatus.succeeded,
                                                             result={"steps": 100}), n))


def pg_update_rate(url: str, connections: int, seconds: float = 5.0) -> float:
    """Single-row UPDATEs per second (autocommit: one transaction each, as a heartbeat) over `connections`."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_rows (id int PRIMARY KEY, beat timestamptz)")
        conn.execute("INSERT INTO bench_rows SELECT g, now() FROM generate_series(1, 2000) g ON CONFLICT DO NOTHING")
    counts = [0] * connections
    stop = time.monotonic() + seconds

    def hammer(index: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            row = index
            while time.monotonic() < stop:
                conn.execute("UPDATE bench_rows SET beat = now() WHERE id = %s", (row % 2000 + 1,))
                counts[index] += 1
                row += connections

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def pg_insert_rate(url: str, rows_per_commit: int, seconds: float = 5.0) -> float:
    """Generation-like rows (~1.2 KB of text each) inserted per second, `rows_per_commit` to a transaction."""
    import psycopg

    text = "x" * 600
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_generations (id serial PRIMARY KEY, job_id int, "
                     "example_id text, source text, prediction text, UNIQUE (job_id, example_id))")
        conn.commit()
        conn.execute("TRUNCATE bench_generations")
        conn.commit()
        done, stop, job = 0, time.monotonic() + seconds, 0
        while time.monotonic() < stop:
            job += 1
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO bench_generations (job_id, example_id, source, prediction) "
                                   "VALUES (%s, %s, %s, %s)",
                                   [(job, str(i), text, text[:200]) for i in range(rows_per_commit)])
            conn.commit()
            done += rows_per_commit
    return done / seconds


def reaper_round(url: str, port: int, finetunes: int = 2000, sweep_points: int = 8) -> None:
    """One worker's reaper round (`worker.reaper.reconcile`) over a night's backlog: `finetunes` queued fine-tunes
    with their messages in Redis, and per sweep of `sweep_points` one generate job (a join) and one score job
    waiting. Timed over 5 rounds; SQL statements and rows counted in-process, Redis bytes from INFO."""
    import redis
    from sqlalchemy import event

    from models import make_session_factory
    from models.jobs import Job, JobKind, JobStatus, JobWait
    from models.settings import Settings
    from worker.broker import Broker
    from worker.lifecycle import publish
    from worker.reaper import reconcile

    settings = Settings.from_env({**os.environ, "DATABASE_URL": url, "REDIS_URL": f"redis://127.0.0.1:{port}/0",
                                  "TUNEQUEUE_QUEUE": "tq-reaper"})
    broker = Broker(settings)
    sessions = make_session_factory(settings.database_url)
    with sessions() as session:
        points = [Job(kind=JobKind.finetune, status=JobStatus.queued, spec={"model": "tiny-t5", "name": f"r{i}"})
                  for i in range(finetunes)]
        session.add_all(points)
        session.commit()
        for job in points:
            publish(session, broker, job)
        for start in range(0, finetunes, sweep_points):
            generate = Job(kind=JobKind.generate, status=JobStatus.queued, spec={"model": "tiny-t5"})
            session.add(generate)
            session.flush()
            session.add_all([JobWait(job_id=generate.id, waits_for_id=p.id)
                             for p in points[start:start + sweep_points]])
            session.add(Job(kind=JobKind.score, status=JobStatus.queued, spec={"generate_job_id": generate.id},
                            parent_id=generate.id))
        session.commit()
    statements = []
    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", lambda *a, **k: statements.append(1))
    client = redis.Redis(port=port)
    times, out_bytes = [], []
    for _ in range(5):
        before = client.info("stats")["total_net_output_bytes"]
        statements.clear()
        started = time.perf_counter()
        with sessions() as session:
            outcome = reconcile(session, broker, settings.stale_seconds)
        times.append(time.perf_counter() - started)
        out_bytes.append(client.info("stats")["total_net_output_bytes"] - before)
    emit(figure="reaper_round", queued_finetunes=finetunes, waiting_joins=2 * (finetunes // sweep_points),
         seconds_p50=sig(statistics.median(times)), seconds_min=sig(min(times)), sql_statements=len(statements),
         redis_bytes_out=statistics.median(out_bytes), republished=len(outcome["republished"]))


def flower_ingest(tasks: int = 2500, progress_events: int = 20) -> None:
    """Flower's own event state (flower.events.EventsState, what its pages read): events ingested per second and
    memory per task, for `tasks` tasks with sent / received / started / `progress_events` progress / succeeded."""
    import tracemalloc

    from flower.events import EventsState

    state = EventsState(max_tasks_in_memory=100000)
    now = time.time()
    events = []
    for i in range(tasks):
        uid, host = str(uuid.uuid4()), f"tunequeue-gpu0@host{i % 100}"
        base = {"uuid": uid, "hostname": host, "clock": i, "pid": 1, "utcoffset": 0}
        events.append({**base, "type": "task-sent", "name": "worker.tasks.finetune", "args": f"[{i}]",
                       "kwargs": "{}", "queue": "tunequeue.base.x", "timestamp": now, "local_received": now})
        events.append({**base, "type": "task-received", "name": f"finetune p{i} · sweep s · job {i}",
                       "args": f"[{i}]", "kwargs": "{}", "timestamp": now, "local_received": now})
        for step in range(progress_events + 1):
            events.append({**base, "type": "task-started", "timestamp": now, "local_received": now + step,
                           "result": f"step {10 * step}/200 · loss 1.2345 · eval loss 1.3", "job_id": i,
                           "step": 10 * step, "total_steps": 200, "loss": 1.2345})
        events.append({**base, "type": "task-succeeded", "result": f"job {i} succeeded: adapter p{i}",
                       "runtime": 1800.0, "timestamp": now + 1800, "local_received": now + 1800})
    started = time.perf_counter()
    for item in events:
        state.event(item)
    seconds = time.perf_counter() - started
    state = EventsState(max_tasks_in_memory=100000)  # again, to count the memory the same tasks take
    tracemalloc.start()
    for item in events:
        state.event(item)
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    emit(figure="flower_events_state", tasks=tasks, events=len(events), events_per_s=sig(len(events) / seconds),
         bytes_per_task=sig(current / tasks))


def redis_rates(port: int, n: int = 2000) -> None:
    import redis

    client = redis.Redis(port=port)
    payload = b"x" * 1500  # about a kombu message of one job id with its headers (see the LPUSH bytes above)

    def push_pop():
        client.lpush("bench-q", payload)
        client.brpop(["bench-q"], timeout=1)

    emit(figure="redis_lpush_brpop", **time_calls(push_pop, n))
    started = time.perf_counter()
    for _ in range(n):
        client.publish("bench-events", payload)
    emit(figure="redis_publish_per_s", one_client_unpipelined=sig(n / (time.perf_counter() - started)))
    started = time.perf_counter()
    with client.pipeline(transaction=False) as pipe:
        for _ in range(10 * n):
            pipe.publish("bench-events", payload)
        pipe.execute()
    emit(figure="redis_publish_per_s", one_client_pipelined=sig(10 * n / (time.perf_counter() - started)))


def main() -> None:
    import psycopg

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

    emit_machine()
    with tempfile.TemporaryDirectory(prefix="tq-scaling-") as tmp:
        found = run_sweep(Path(tmp))
        server, url, name, port = found.pop("server"), found.pop("url"), found.pop("name"), found.pop("redis_port")
        try:
            for key, value in found.items():
                emit(figure=key, value=value)
            pg_round_trips(url)
            for connections in (1, 8):
                emit(figure="pg_single_row_updates_per_s", connections=connections,
                     value=sig(pg_update_rate(url, connections)))
            for rows in (1, 130):
                emit(figure="pg_generation_rows_inserted_per_s", rows_per_commit=rows,
                     value=sig(pg_insert_rate(url, rows)))
            redis_rates(port)
            reaper_round(url, port)
            flower_ingest()
        finally:
            server.terminate()
            server.wait()
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    emit_machine()


if __name__ == "__main__":
    main()
