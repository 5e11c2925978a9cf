"""tunequeue command line: enqueue fine-tune / generate / score jobs, run workers, read jobs and the report.

Commands build validated job specs and talk to Redis and the SQL database; no ML code runs here (torch is imported
only by the worker), so `--help`, `jobs` and `report` start fast.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from functools import cached_property

import click

from worker.builtin import DEFAULT_PROMPT_TEMPLATE
from worker.settings import Settings, mask_url
from worker.specs import SpecError, parse_spec

class Context:
    """Lazily opened settings, database and Celery app shared by the commands of one invocation."""

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()

    @cached_property
    def sessions(self):
        from models import make_session_factory

        return make_session_factory(self.settings.database_url)

    @cached_property
    def app(self):
        from worker.celery_app import make_app

        return make_app(self.settings)

    def session(self):
        from sqlalchemy.exc import OperationalError, ProgrammingError

        session = self.sessions()
        try:
            from models.migrate import current_revision

            if current_revision(self.settings.database_url) is None:
                raise click.ClickException(f"database {mask_url(self.settings.database_url)} has no tunequeue "
                                           "tables; run 'python manage.py db upgrade' first")
        except (OperationalError, ProgrammingError) as exc:
            raise click.ClickException(f"cannot open database {mask_url(self.settings.database_url)}: "
                                       f"{str(exc.orig).strip().splitlines()[0]}") from None
        return session


pass_ctx = click.make_pass_decorator(Context, ensure=True)


def fail(message: str) -> None:
    raise click.ClickException(message)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------------- cli
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option("0.1.0", prog_name="tunequeue")
@click.pass_context
def cli(ctx):
    """tunequeue: queue LoRA fine-tuning, generation and scoring jobs, read the comparison in the morning.

    Settings come from the environment: DATABASE_URL (default: SQLite under TUNEQUEUE_HOME), REDIS_URL
    (default redis://127.0.0.1:6379/0), TUNEQUEUE_HOME (default ./.tunequeue: adapters, built-in models).
    """
    ctx.ensure_object(Context)


@cli.group()
def db():
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def db_upgrade(ctx: Context, revision):
    """Apply the migrations to DATABASE_URL (creates the SQLite file if needed)."""
    from models.migrate import current_revision, upgrade

    ctx.settings.home.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(ctx.settings.database_url, revision)
    except Exception as exc:
        fail(f"cannot migrate {mask_url(ctx.settings.database_url)}: {str(exc).strip().splitlines()[0]}")
    click.echo(f"database {mask_url(ctx.settings.database_url)} at revision "
               f"{current_revision(ctx.settings.database_url)}")


# ------------------------------------------------------------------------------------------------ enqueueing
def _data_options(func):
    options = [
        click.option("--dataset", default="synthetic-dialogsum", show_default=True,
                     help="synthetic-dialogsum, a local .jsonl/.csv file (split 80/10/10 by seed) or a folder of "
                          "train/validation/test files, or a Hugging Face dataset name."),
        click.option("--text-column", default="dialogue", show_default=True, help="Column with the input text."),
        click.option("--summary-column", default="summary", show_default=True, help="Column with the reference."),
        click.option("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                     help="Template with {dialogue} for the input text. [default: the seeds' "
                          "'Summarize the following conversation.' prompt]"),
        click.option("--seed", default=42, show_default=True, type=int),
        click.option("--wait", is_flag=True, help="Block until the job finishes, showing progress."),
        click.option("--json", "as_json", is_flag=True, help="Print the job as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _submit(ctx: Context, session, spec, parent=None, *, wait: bool, as_json: bool):
    from worker.queue import BrokerUnavailable, check_broker, enqueue

    try:
        check_broker(ctx.app)
    except BrokerUnavailable as exc:
        fail(str(exc))
    job = enqueue(session, ctx.app, spec, parent)
    if as_json and not wait:
        echo_json(_job_dict(job))
    elif not as_json:
        click.echo(f"job {job.id} queued ({job.kind.value})")
    if wait:
        _wait_for(ctx, [job.id], quiet=as_json)
        session.refresh(job)
        if as_json:
            echo_json(_job_dict(job))
        if job.status.value != "succeeded":
            fail(f"job {job.id} {job.status.value}: {job.error or ''}".strip())
    return job


def _check(validate, *args, **kwargs):
    """Run a validate_* function; its SpecError becomes the one-line CLI error."""
    try:
        return validate(*args, **kwargs)
    except SpecError as exc:
        fail(str(exc))


def _build(data: dict):
    return _check(parse_spec, data)


@cli.command()
@click.option("--name", required=True, help="Adapter name (letters, digits, . _ -); unique.")
@click.option("--model", default="tiny-t5", show_default=True,
              help="Base model: built-in name, local folder, or hub id (e.g. google/flan-t5-base).")
@click.option("--method", type=click.Choice(["lora"]), default="lora", show_default=True,
              help="lora: LoRA adapter via PEFT on a seq2seq (T5 family) model.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--lora-r", "--r", "lora_r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", "--alpha", "lora_alpha", type=float, default=32, show_default=True)
@click.option("--lora-dropout", "--dropout", "lora_dropout", type=float, default=0.0, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True,
              help="'all-linear' or a comma-separated list such as q,v.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=3e-3, show_default=True)
@click.option("--epochs", "num_train_epochs", type=float, default=3, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (overrides --epochs).")
@click.option("--batch-size", "per_device_train_batch_size", type=int, default=16, show_default=True)
@click.option("--max-source-length", type=int, default=256, show_default=True)
@click.option("--max-target-length", type=int, default=64, show_default=True)
@click.option("--train-limit", type=int, default=None, help="Use only the first N training examples.")
@_data_options
@pass_ctx
def finetune(ctx: Context, wait, as_json, target_modules, **options):
    """Queue a LoRA fine-tune of a base model on a dialogue-summary dataset.

    The adapter is saved in PEFT's format under TUNEQUEUE_HOME/adapters/NAME and recorded in the database.

    Built-in offline model: tiny-t5 (built on first use under TUNEQUEUE_HOME, no download). Built-in dataset:
    synthetic-dialogsum.
    """
    from worker.validate import validate_finetune

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    spec = _build({"kind": "finetune", "target_modules": targets, **options})
    with ctx.session() as session:
        _check(validate_finetune, spec, session)
        _submit(ctx, session, spec, wait=wait, as_json=as_json)


@cli.command()
@click.option("--model", default=None, help="Base model [default: the adapter's base, else tiny-t5].")
@click.option("--adapter", default=None, help="Name of a trained adapter; without it the base model alone.")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N examples of the split.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--no-repeat-ngram-size", type=int, default=3, show_default=True,
              help="Never repeat an n-gram of this size (0: off).")
@_data_options
@pass_ctx
def generate(ctx: Context, wait, as_json, model, **options):
    """Queue batched greedy generation for every example of a split (one row per example).

    Built-in offline model: tiny-t5 (built on first use under TUNEQUEUE_HOME, no download). Built-in dataset:
    synthetic-dialogsum.
    """
    from worker.validate import validate_generate

    spec = _build({"kind": "generate", "model": model or "tiny-t5", **options})
    with ctx.session() as session:
        spec, _ = _check(validate_generate, spec, session, ctx.settings.home, model_given=model is not None)
        _submit(ctx, session, spec, wait=wait, as_json=as_json)


@cli.command()
@click.argument("generate_job_id", type=int)
@click.option("--metric", "metrics", multiple=True, type=click.Choice(["rouge"]), default=["rouge"],
              show_default=True, help="ROUGE-1/2/L/Lsum F-measure with stemming (rouge_score, offline).")
@click.option("--wait", is_flag=True, help="Block until the job finishes.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def score(ctx: Context, generate_job_id, metrics, wait, as_json):
    """Queue scoring of a finished generate job's rows against their references."""
    from worker.validate import validate_score

    spec = _build({"kind": "score", "generate_job_id": generate_job_id, "metrics": list(metrics)})
    with ctx.session() as session:
        _check(validate_score, spec, session)
        _submit(ctx, session, spec, wait=wait, as_json=as_json)


# ---------------------------------------------------------------------------------------------------- jobs
def _job_dict(job, full: bool = False) -> dict:
    data = {
        "id": job.id, "kind": job.kind.value, "status": job.status.value, "parent_id": job.parent_id,
        "attempts": job.attempts, "worker_host": job.worker_host, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "duration_s": job.duration_s,
        "error": job.error, "progress": job.progress, "result": job.result,
    }
    if full:
        data.update(spec=job.spec, celery_task_id=job.celery_task_id, cancel_requested=job.cancel_requested)
    return data


def _describe(job) -> str:
    spec = job.spec
    if job.kind.value == "finetune":
        return f"{spec['name']} on {spec['model']} lr={spec['learning_rate']:g}"
    if job.kind.value == "generate":
        return f"{spec.get('adapter') or 'base'} on {spec['model']} / {spec['split']}"
    return f"job {spec['generate_job_id']}"


@cli.group()
def jobs():
    """List, show and cancel jobs."""


@jobs.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled", "skipped"]))
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def jobs_list(ctx: Context, status, limit, as_json):
    """The newest jobs first."""
    from models.jobs import JobStatus
    from worker.queue import latest_jobs

    with ctx.session() as session:
        found = latest_jobs(session, limit, JobStatus(status) if status else None)
    if as_json:
        echo_json([_job_dict(j) for j in found])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "kind", "status", "what", "attempts", "duration", "progress")
    for job in found:
        progress = job.progress or {}
        table.add_row(str(job.id), job.kind.value, job.status.value, _describe(job), str(job.attempts),
                      f"{job.duration_s:.1f}s" if job.duration_s else "",
                      f"{progress.get('step', '')}/{progress.get('total_steps', '')}" if progress else "")
    Console().print(table)


def _get_job(session, job_id: int):
    from models.jobs import Job

    job = session.get(Job, job_id)
    if job is None:
        fail(f"job {job_id} does not exist")
    return job


@jobs.command("show")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def jobs_show(ctx: Context, job_id, as_json):
    """Everything about one job: spec, status, timing, result or error."""
    with ctx.session() as session:
        job = _get_job(session, job_id)
    data = _job_dict(job, full=True)
    if as_json:
        echo_json(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = json.dumps(value, default=str)
        click.echo(f"{key:>16}: {'' if value is None else value}")


@jobs.command("cancel")
@click.argument("job_id", type=int)
@pass_ctx
def jobs_cancel(ctx: Context, job_id):
    """Cancel a queued job, or ask a running one to stop at its next step."""
    from worker.queue import cancel

    with ctx.session() as session:
        outcome = cancel(session, _get_job(session, job_id))
    click.echo(f"job {job_id}: {outcome}")


def _wait_for(ctx: Context, job_ids: list[int], quiet: bool = False, poll: float = 0.5, give_up=None) -> None:
    """Poll the job rows until all are finished (or `give_up()` says so), with a progress bar per job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.jobs import Job

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), disable=quiet or not sys.stderr.isatty(),
                  console=None) as progress, ctx.sessions() as session:
        bars = {job_id: progress.add_task(f"job {job_id}", total=None, info="") for job_id in job_ids}
        while True:
            session.expire_all()
            found = {job.id: job for job in session.query(Job).filter(Job.id.in_(job_ids))}
            for job_id, bar in bars.items():
                job = found[job_id]
                info = job.progress or {}
                progress.update(bar, total=info.get("total_steps"), completed=info.get("step", 0),
                                description=f"job {job_id} {job.kind.value}",
                                info=f"{job.status.value} loss={info['loss']}" if "loss" in info else job.status.value)
            if all(job.status.finished for job in found.values()) or (give_up and give_up()):
                return
            time.sleep(poll)


# -------------------------------------------------------------------------------------------------- worker
@cli.command()
@click.option("--burst", is_flag=True, help="Exit once the queue is empty and no job is running (like rq).")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def worker(ctx: Context, burst, loglevel):
    """Start a Celery worker: one job at a time, base models kept loaded between jobs."""
    from worker.launch import run_worker

    run_worker(ctx.app, burst=burst, loglevel=loglevel)


@cli.command()
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@pass_ctx
def flower(ctx: Context, port, address):
    """Start Flower, the Celery web monitor, against the same broker (http://ADDRESS:PORT)."""
    import os
    import subprocess

    env = {**os.environ, "REDIS_URL": ctx.settings.redis_url}
    sys.exit(subprocess.call([sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "flower",
                              f"--port={port}", f"--address={address}"], env=env))


# -------------------------------------------------------------------------------------------------- report
def render_report(rows: list[dict], metrics: list[str], fmt: str) -> str:
    columns = ["model", "variant", *metrics, "examples", *[f"delta_{m}" for m in metrics]]
    if fmt == "json":
        return json.dumps([{c: row.get(c) for c in columns} for row in rows], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(*["model", "variant", *metrics, "examples", *[f"Δ {m}" for m in metrics]],
                  title="ROUGE F-measure vs base" if metrics and metrics[0].startswith("rouge") else None)
    for row in rows:
        values = [f"{row[m]:.4f}" if row.get(m) is not None else "" for m in metrics]
        deltas = [f"{row[f'delta_{m}']:+.4f}" if row.get(f"delta_{m}") is not None else "" for m in metrics]
        table.add_row(row["model"], row["variant"], *values, str(row["examples"]), *deltas)
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


@cli.command()
@click.option("--metric", "metric_names", multiple=True, default=["rouge"], show_default=True,
              help="'rouge' (rouge1, rouge2, rougeL, rougeLsum) or any stored metric name; repeatable.")
@click.option("--split", default="test", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@pass_ctx
def report(ctx: Context, metric_names, split, fmt):
    """Compare base and adapters: one row per base/adapter with each metric and its delta vs the base row."""
    from models.report import comparison, expand_metrics, known_metric_names

    metrics = expand_metrics(list(metric_names))
    with ctx.session() as session:
        known = known_metric_names(session)
        unknown = [m for m in metrics if known and m not in known]
        if unknown:
            fail(f"no metric named {unknown[0]!r} in the database (known: {', '.join(sorted(known))})")
        rows = comparison(session, metrics, split)
    if not rows:
        fail(f"no scored results on split {split!r} yet; run generate and score jobs first")
    click.echo(render_report(rows, metrics, fmt), nl=False)


# ---------------------------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--epochs", type=float, default=3, show_default=True)
@click.option("--learning-rates", default="1e-3,3e-3", show_default=True, help="One LoRA adapter per rate.")
@pass_ctx
def demo(ctx: Context, epochs, learning_rates):
    """Run the whole loop offline through the real queue and print the report.

    Base-only generate + score on the test split, two LoRA adapters on the built-in tiny-t5 and
    synthetic-dialogsum, generate + score each, all executed by a burst worker subprocess.
    """
    from worker.demo import run_demo

    rates = [float(x) for x in learning_rates.split(",") if x.strip()]
    run_demo(ctx, rates, epochs, wait=_wait_for, render=render_report)


if __name__ == "__main__":
    cli()
