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

import click

from models.migrate import upgrade
from api.pipelines import enqueue_pipeline, validate_pipeline
from worker.lifecycle import BrokerUnavailable, check_broker
from models.specs import FinetuneSpec, GenerateSpec, SpecError


def run_demo(ctx, learning_rates: list[float], epochs: float, *, wait, render) -> None:
    started = time.monotonic()
    settings = ctx.settings
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    try:
        check_broker(ctx.app)
    except BrokerUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    tag = datetime.now().strftime("%m%d-%H%M%S")
    names = [f"demo-{tag}-lr{rate:g}" for rate in learning_rates]
    with ctx.sessions() as session:
        pipelines = [(GenerateSpec(), None)] + [
            (GenerateSpec(adapter=name), FinetuneSpec(name=name, learning_rate=rate, num_train_epochs=epochs))
            for name, rate in zip(names, learning_rates)]
        try:
            for generate_spec, finetune_spec in pipelines:
                validate_pipeline(session, settings.home, generate_spec, finetune_spec)
        except SpecError as exc:
            raise click.ClickException(str(exc)) from None
        jobs = []
        for generate_spec, finetune_spec in pipelines:
            jobs += enqueue_pipeline(session, ctx.app, settings.home, generate_spec, finetune_spec)
        job_ids = [job.id for job in jobs]
    click.echo(f"queued {len(job_ids)} jobs ({job_ids[0]}..{job_ids[-1]}) on queue {settings.queue!r}; "
               "starting a burst worker")
    log_path = settings.home / "logs" / f"demo-worker-{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    click.echo(f"worker log: {log_path}")
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "manage", "worker", "--burst", "--loglevel", "INFO"],
                                  env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(ctx, job_ids, give_up=lambda: worker.poll() is not None)
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.terminate()
    from models.jobs import Job

    with ctx.sessions() as session:
        finished = [session.get(Job, job_id) for job_id in job_ids]
        bad = [job for job in finished if job.status.value != "succeeded"]
        if bad:
            click.echo(log_path.read_text()[-3000:], err=True)
            raise click.ClickException("; ".join(f"job {j.id} {j.kind.value} {j.status.value}: {j.error or ''}"
                                                 for j in bad))
        from models.report import comparison, expand_metrics

        metrics = expand_metrics(["rouge"])
        rows = comparison(session, metrics, "test", variants=["base", *names])
        loads = {job.result.get("base_loads") for job in finished if job.result and "base_loads" in job.result}
    click.echo(render(rows, metrics, "table"), nl=False)
    click.echo(f"demo finished in {time.monotonic() - started:.1f}s; base model loads in the worker: "
               f"{max(loads) if loads else 'n/a'}. See it again with: python manage.py report --metric rouge")
