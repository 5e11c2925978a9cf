"""`manage.py demo`: the whole loop through the real queue, offline, ending with the report.

It enqueues a base-only generate + score and, per learning rate, a fine-tune → generate → score chain (children
wait in the database until their parent succeeds), runs one burst worker subprocess that executes them all on one
resident base model, and prints the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from typing import Callable

from api.context import AppContext
from api.jobs import wait_for
from api.pipelines import enqueue_pipeline, validate_pipeline
from api.render import render_report
from models.errors import JobFailed
from models.jobs import Job, JobStatus
from models.migrate import upgrade
from models.report import comparison
from models.metrics import expand_metrics
from models.specs import FinetuneSpec, GenerateSpec


def run_demo(ctx: AppContext, learning_rates: list[float], epochs: float, echo: Callable[..., None]) -> None:
    """`echo(text, err=False)` prints a line (click.echo)."""
    started = time.monotonic()
    settings = ctx.settings
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    ctx.broker.check()
    tag = datetime.now().strftime("%m%d-%H%M%S")
    names = [f"demo-{tag}-lr{rate:g}" for rate in learning_rates]
    with ctx.sessions() as session:
        pipelines = [(GenerateSpec(), None)] + [
            (GenerateSpec(adapter=name), FinetuneSpec(name=name, learning_rate=rate, num_train_epochs=epochs))
            for name, rate in zip(names, learning_rates)]
        checked = [validate_pipeline(session, settings.home, *pipeline) for pipeline in pipelines]
        job_ids = [job.id for pipeline in checked for job in enqueue_pipeline(session, ctx.broker, *pipeline)]
    echo(f"queued {len(job_ids)} jobs ({job_ids[0]}..{job_ids[-1]}) on queue {settings.queue!r}; "
         "starting a burst worker")
    log_path = settings.home / "logs" / f"demo-worker-{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    echo(f"worker log: {log_path}")
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "manage", "worker", "--burst", "--loglevel", "INFO"],
                                  env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(ctx, job_ids, give_up=lambda: worker.poll() is not None)
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.terminate()
    with ctx.sessions() as session:
        finished = [session.get(Job, job_id) for job_id in job_ids]
        bad = [job for job in finished if job.status != JobStatus.succeeded]
        if bad:
            echo(log_path.read_text()[-3000:], err=True)
            raise JobFailed("; ".join(f"job {j.id} {j.kind.value} {j.status.value}: {j.error or ''}" for j in bad))
        metrics = expand_metrics(["rouge"])
        rows = comparison(session, metrics, "test", variants=["base", *names])
        loads = {job.result.get("base_loads") for job in finished if job.result and "base_loads" in job.result}
    echo(render_report(rows, metrics, "table").rstrip("\n"))
    echo(f"demo finished in {time.monotonic() - started:.1f}s; base model loads in the worker: "
         f"{max(loads) if loads else 'n/a'}. See it again with: python manage.py report --metric rouge")
