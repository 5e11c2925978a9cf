"""tunequeue command line: enqueue fine-tune / generate / score jobs, run workers, read jobs and the report.

Commands build validated job specs and talk to Redis and the SQL database; no ML code runs here (torch is imported
only by the worker), so `--help`, `jobs` and `report` start fast.
"""

from __future__ import annotations

import json
import sys
import time
from functools import cached_property
from pathlib import Path

import click

from models.settings import Settings, mask_url
from models.specs import SpecError, parse_spec

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
PRIORITY_OPTION = click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True,
                               help="0..9; a job of higher priority is taken before queued jobs of lower.")
ATTEMPTS_OPTION = click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True,
                               help="Runs allowed (crashes and lost workers count) before the job fails.")


def _data_options(func):
    options = [
        click.option("--dataset", default="synthetic-dialogsum", show_default=True,
                     help="A built-in (synthetic-dialogsum, synthetic-sentiment); a local .jsonl, .json, .csv or "
                          ".parquet file or Dataset.save_to_disk folder (split 80/10/10 by --seed); a "
                          "DatasetDict.save_to_disk folder or a folder of per-split files (train.jsonl, "
                          "validation.csv, ...); or a Hugging Face dataset name (needs the network or its cache)."),
        click.option("--dataset-config", default=None,
                     help="Configuration of a hub dataset, as in load_dataset(name, config), e.g. 3.0.0."),
        click.option("--format", "data_format", type=click.Choice(["columns", "alpaca"]), default="columns",
                     show_default=True,
                     help="columns: --text-column -> --summary-column (or --label-column). alpaca: rows with "
                          "instruction / input / output; the prompt is the instruction (plus the input when "
                          "there is one), the target is the output."),
        click.option("--text-column", default=None,
                     help="Column with the input text. [default: the built-in dataset's, else dialogue]"),
        click.option("--summary-column", default=None,
                     help="Column with the reference output (seq2seq, causal). [default: summary]"),
        click.option("--label-column", default=None,
                     help="Column with the class label (classification). [default: label]"),
        click.option("--prompt-template", default=None,
                     help="Template with {text} (or {dialogue}) where the input text goes; with --format alpaca "
                          "also {instruction} and {input}. [default: 'Summarize the following conversation.' "
                          "prompt; the standard Alpaca prompt for --format alpaca; the bare text for "
                          "classification]"),
        click.option("--prompt-template-file", type=click.Path(), default=None,
                     help="Read the prompt template from this UTF-8 file (one final newline is dropped); "
                          "instead of --prompt-template."),
        click.option("--seed", default=42, show_default=True, type=int,
                     help="Seeds the 80/10/10 split of a single file or Dataset folder, the --train-limit subset "
                          "and training."),
        click.option("--wait", is_flag=True, help="Block until the job finishes, showing progress."),
        click.option("--json", "as_json", is_flag=True, help="Print the job as JSON."),
        PRIORITY_OPTION,
        ATTEMPTS_OPTION,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _data_fields(options: dict) -> dict:
    """The data options as spec fields: --prompt-template-file read into prompt_template."""
    path = options.pop("prompt_template_file", None)
    if path is not None:
        if options.get("prompt_template") is not None:
            fail("give either --prompt-template or --prompt-template-file, not both")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read --prompt-template-file {path}: {getattr(exc, 'strerror', None) or exc}")
        options["prompt_template"] = text.removesuffix("\n")
    return options


def _submit(ctx: Context, session, spec, *, wait: bool, as_json: bool, priority: int = 0, max_attempts: int = 3):
    from worker.lifecycle import BrokerUnavailable, check_broker, enqueue

    try:
        check_broker(ctx.app)
    except BrokerUnavailable as exc:
        fail(str(exc))
    job = enqueue(session, ctx.app, spec, priority=priority, max_attempts=max_attempts)
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
@click.option("--method", type=click.Choice(["lora", "qlora", "prompt-tuning", "full"]), default="lora",
              show_default=True,
              help="lora: LoRA layers (--lora-r, --target-modules) on the resident base. qlora: base loaded in 4-bit "
                   "NF4 with bitsandbytes, LoRA on top (needs a CUDA worker). prompt-tuning: --num-virtual-tokens "
                   "trained prompt embeddings. full: every weight; writes a whole model folder.")
@click.option("--task", type=click.Choice(["seq2seq", "causal", "classification"]), default=None,
              help="Model kind [default: read from the model's config]. seq2seq: T5/FLAN-T5/BART. causal: "
                   "Llama/Qwen/GPT-2 style, loss on the summary tokens only. classification: DistilBERT style, "
                   "text -> --label-column.")
@click.option("--num-virtual-tokens", type=int, default=20, show_default=True, help="Prompt tuning: prompt length.")
@click.option("--prompt-tuning-init", type=click.Choice(["text", "random"]), default="text", show_default=True,
              help="Prompt tuning: start from the embeddings of the prompt template's instruction, or at random.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--lora-r", "--r", "lora_r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", "--alpha", "lora_alpha", type=float, default=32, show_default=True)
@click.option("--lora-dropout", "--dropout", "lora_dropout", type=float, default=0.0, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True,
              help="'all-linear' or a comma-separated list such as q,v.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=None,
              help="[default: 3e-3 for lora/qlora, 3e-2 for prompt-tuning, 1e-3 for full]")
@click.option("--epochs", "num_train_epochs", type=float, default=3, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (overrides --epochs).")
@click.option("--batch-size", "per_device_train_batch_size", type=int, default=16, show_default=True)
@click.option("--max-tokens-per-batch", type=int, default=None,
              help="Also cap each batch at this many padded input tokens (length-bucketed batches).")
@click.option("--max-source-length", type=int, default=256, show_default=True)
@click.option("--max-target-length", type=int, default=64, show_default=True)
@click.option("--train-limit", type=int, default=None,
              help="Train on N examples of the split, a random subset chosen by --seed (the same seed, the same "
                   "subset).")
@click.option("--eval-split", default=None,
              help="Split for the eval loss (loss curves, early stopping). [default: validation]")
@click.option("--eval-limit", type=int, default=None, help="Evaluate on the first N examples. [default: 200]")
@click.option("--checkpoint-every", "checkpoint_every_steps", type=int, default=100, show_default=True,
              help="Save a resumable checkpoint every N steps; a re-run after a crash resumes from it.")
@click.option("--time-limit", "time_limit_s", type=float, default=None,
              help="Soft limit in seconds: checkpoint, then fail with the reason.")
@click.option("--replace", is_flag=True,
              help="Re-use the name of an existing adapter: it is replaced when this job succeeds.")
@_data_options
@pass_ctx
def finetune(ctx: Context, wait, as_json, priority, max_attempts, target_modules, **options):
    """Queue a fine-tune of a base model: LoRA, QLoRA, prompt tuning or full, on any of three model kinds.

    \b
    Methods (--method):  lora | qlora (CUDA + bitsandbytes) | prompt-tuning | full
    Model kinds (--task, read from the model's config.json unless given):
      seq2seq         T5 / FLAN-T5: prompt -> summary
      causal          Llama / Qwen / GPT-2: prompt + summary in one sequence, loss on the summary only
      classification  DistilBERT / BERT: text -> label (--label-column), scored by accuracy and F1

    A PEFT adapter (adapter_config.json + adapter_model.safetensors), or for --method full a whole model folder, is
    written under TUNEQUEUE_HOME/adapters/NAME and recorded with its trainable/total parameters and size on disk.

    \b
    Built-in offline models (built on first use under TUNEQUEUE_HOME, no download):
      tiny-t5 (seq2seq), tiny-llama (causal), tiny-bert (classification)
    Built-in datasets: synthetic-dialogsum (dialogue -> summary), synthetic-sentiment (text -> label)
    """
    from api.validate import validate_finetune

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    spec = _build({"kind": "finetune", "target_modules": targets, **_data_fields(options)})
    with ctx.session() as session:
        spec = _check(validate_finetune, spec, session)
        if spec.method == "qlora":
            _warn_without_cuda_worker(ctx)
        _submit(ctx, session, spec, wait=wait, as_json=as_json, priority=priority, max_attempts=max_attempts)


def _warn_without_cuda_worker(ctx: Context) -> None:
    """QLoRA runs only on a CUDA worker: say so now rather than when the job fails in the night."""
    from worker.registry import live_workers

    try:
        found = live_workers(ctx.app)
    except Exception:
        return
    if not any(w.get("cuda") for w in found):
        click.echo(f"warning: no running worker on queue {ctx.settings.queue!r} reports CUDA; a qlora job fails on "
                   "a worker without it (start a worker on a GPU machine)", err=True)


@cli.command()
@click.option("--model", default=None, help="Base model [default: the adapter's base, else tiny-t5].")
@click.option("--adapter", default=None, help="Name of a trained adapter; without it the base model alone.")
@click.option("--adapters", "adapter_list", default=None,
              help="Comma-separated adapters of one base, generated together in mixed batches (one row per "
                   "adapter and example); 'base' in the list adds the base model's own rows.")
@click.option("--task", type=click.Choice(["seq2seq", "causal", "classification"]), default=None,
              help="Model kind [default: the adapter's, else read from the model's config]. classification "
                   "stores the predicted label per example.")
@click.option("--split", "--test-split", "split", default="test", show_default=True,
              help="Split to generate for: train/validation/test of a built-in or carved file, or any split of a "
                   "folder or hub dataset.")
@click.option("--limit", type=int, default=None, help="Only the first N examples of the split.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--no-repeat-ngram-size", type=int, default=3, show_default=True,
              help="Never repeat an n-gram of this size (0: off).")
@_data_options
@pass_ctx
def generate(ctx: Context, wait, as_json, priority, max_attempts, model, adapter_list, **options):
    """Queue batched greedy generation (or classification) for every example of a split: one row per example.

    Built-in offline models: tiny-t5, tiny-llama, tiny-bert (built on first use under TUNEQUEUE_HOME, no
    download). Built-in datasets: synthetic-dialogsum, synthetic-sentiment.
    """
    from api.validate import validate_generate

    adapters = [a.strip() for a in adapter_list.split(",") if a.strip()] if adapter_list else []
    spec = _build({"kind": "generate", "model": model or "tiny-t5", "adapters": adapters, **_data_fields(options)})
    with ctx.session() as session:
        spec = _check(validate_generate, spec, session, ctx.settings.home, model_given=model is not None)
        _submit(ctx, session, spec, wait=wait, as_json=as_json, priority=priority, max_attempts=max_attempts)


@cli.command()
@click.argument("generate_job_id", type=int)
@click.option("--metric", "metrics", multiple=True, type=click.Choice(["rouge", "classification"]),
              help="rouge: ROUGE-1/2/L/Lsum F-measure with stemming (rouge_score, offline); classification: "
                   "accuracy, precision, recall, F1 (binary and macro). [default: from the generate job's task]")
@click.option("--wait", is_flag=True, help="Block until the job finishes.")
@click.option("--json", "as_json", is_flag=True)
@PRIORITY_OPTION
@ATTEMPTS_OPTION
@pass_ctx
def score(ctx: Context, generate_job_id, metrics, wait, as_json, priority, max_attempts):
    """Queue scoring of a finished generate job's rows against their references."""
    from api.validate import validate_score

    spec = _build({"kind": "score", "generate_job_id": generate_job_id, "metrics": list(metrics) or None})
    with ctx.session() as session:
        _check(validate_score, spec, session)
        _submit(ctx, session, spec, wait=wait, as_json=as_json, priority=priority, max_attempts=max_attempts)


# ---------------------------------------------------------------------------------------------------- jobs
def _job_dict(job, full: bool = False) -> dict:
    data = {
        "id": job.id, "kind": job.kind.value, "status": job.status.value, "parent_id": job.parent_id,
        "waits_for": job.waits_for_ids,
        "attempts": job.attempts, "worker_host": job.worker_host, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "duration_s": job.duration_s,
        "queued_at": job.queued_at, "queue_wait_s": job.queue_wait_s, "queue": job.queue,
        "error": job.error, "progress": job.progress, "result": job.result,
    }
    if full:
        data.update(spec=job.spec, celery_task_id=job.celery_task_id, cancel_requested=job.cancel_requested,
                    max_attempts=job.max_attempts, attempt_errors=job.attempt_errors)
    return data


def _describe(job) -> str:
    spec = job.spec
    if job.kind.value == "finetune":
        return f"{spec['name']} on {spec['model']} lr={spec['learning_rate']:g}"
    if job.kind.value == "generate":
        adapters = spec.get("adapters") or [spec.get("adapter") or "base"]
        shown = adapters[0] if len(adapters) == 1 else f"{len(adapters)} variants ({adapters[0]}, {adapters[1]}…)"
        return f"{shown} on {spec['model']} / {spec['split']}"
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
    from worker.lifecycle import latest_jobs

    with ctx.session() as session:
        found = latest_jobs(session, limit, JobStatus(status) if status else None)
    if as_json:
        echo_json([_job_dict(j) for j in found])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "kind", "status", "what", "attempts", "queue wait", "duration", "progress")
    for job in found:
        progress = job.progress or {}
        table.add_row(str(job.id), job.kind.value, job.status.value, _describe(job), str(job.attempts),
                      f"{job.queue_wait_s:.2f}s" if job.queue_wait_s is not None else "",
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
    from worker.lifecycle import cancel

    with ctx.session() as session:
        outcome = cancel(session, ctx.app, _get_job(session, job_id))
    click.echo(f"job {job_id}: {outcome}")


@jobs.command("reconcile")
@click.option("--stale-after", type=float, default=None, help="Seconds without heartbeat before a running job "
              "counts as lost [default: TUNEQUEUE_STALE_SECONDS or 60].")
@pass_ctx
def jobs_reconcile(ctx: Context, stale_after):
    """Put back lost work: running jobs whose worker died, queued jobs whose message the broker lost."""
    from worker.lifecycle import BrokerUnavailable, check_broker
    from worker.reaper import reconcile

    try:
        check_broker(ctx.app)
    except BrokerUnavailable as exc:
        fail(str(exc))
    with ctx.session() as session:
        outcome = reconcile(session, ctx.app, stale_after if stale_after is not None else ctx.settings.stale_seconds)
    lost = outcome["requeued_or_failed"]
    click.echo(f"{len(lost)} running jobs had lost their worker"
               + (f" ({', '.join(f'{i} → {s}' for i, s in lost)})" if lost else "")
               + f"; {len(outcome['republished'])} queued jobs re-published"
               + (f" ({', '.join(map(str, outcome['republished']))})" if outcome["republished"] else ""))


@jobs.command("watch")
@click.argument("job_id", type=int, required=False)
@click.option("--sweep", default=None, help="Watch every job of this sweep.")
@pass_ctx
def jobs_watch(ctx: Context, job_id, sweep):
    """Live progress bars until the job (or every job of the sweep) has finished."""
    if (job_id is None) == (sweep is None):
        fail("give a JOB_ID or --sweep NAME")
    with ctx.session() as session:
        if sweep:
            from models.report import ReportError, sweep_by_name, sweep_jobs

            try:
                ids = [job.id for job in sweep_jobs(session, sweep_by_name(session, sweep))]
            except ReportError as exc:
                fail(str(exc))
        else:
            ids = [_get_job(session, job_id).id]
    _wait_for(ctx, ids, force_bars=True)
    with ctx.sessions() as session:
        from models.jobs import Job

        states = [session.get(Job, i).status.value for i in ids]
    click.echo(", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))))


def _wait_for(ctx: Context, job_ids: list[int], quiet: bool = False, poll: float = 0.5, give_up=None,
              force_bars: bool = False) -> None:
    """Poll the job rows until all are finished (or `give_up()` says so), with a progress bar per job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.jobs import Job

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), disable=quiet or not (force_bars or sys.stderr.isatty()),
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


# -------------------------------------------------------------------------------------------------- sweeps
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--name", default=None, help="Sweep name [default: 'name:' in the file].")
@click.option("--dry-run", is_flag=True, help="Print the expanded jobs and enqueue nothing.")
@click.option("--json", "as_json", is_flag=True)
@PRIORITY_OPTION
@ATTEMPTS_OPTION
@pass_ctx
def sweep(ctx: Context, file, overrides, name, dry_run, as_json, priority, max_attempts):
    """Queue a sweep from a YAML file: one fine-tune per point, then one generate job that waits for all of them
    and evaluates every adapter and the base model in mixed batches, then one score job.

    OVERRIDES are key=value (into base, replacing a grid list of that key) or block.key=value, e.g.
    num_train_epochs=1 grid.learning_rate=[1e-3,3e-3]. The whole file is checked before anything is enqueued.
    """
    from api.sweeps import apply_overrides, expand, load_sweep_file

    from api.pipelines import enqueue_sweep, validate_sweep

    plan = _check(lambda: expand(apply_overrides(load_sweep_file(file), list(overrides)), name))
    with ctx.session() as session:
        _check(validate_sweep, session, ctx.settings.home, plan)
    if dry_run:
        points = [{"point": p.index, "adapter": p.finetune.name, **p.varied} for p in plan.points]
        if as_json:
            echo_json({"sweep": plan.name, "points": points, "jobs": plan.job_count})
            return
        from rich.console import Console
        from rich.table import Table

        keys = sorted({k for p in plan.points for k in p.varied})
        table = Table("point", "adapter", *keys, "jobs", title=f"sweep {plan.name} (dry run: nothing enqueued)")
        evaluations = plan.evaluations
        step = {p.index: number for number, e in enumerate(evaluations, start=1) for p in e.points}
        after = (lambda p: f"finetune → eval {step[p.index]}") if len(evaluations) > 1 else (lambda p: "finetune")
        table.add_row("base", "—", *["" for _ in keys], "eval" + (" 1" if len(evaluations) > 1 else ""))
        for p in plan.points:
            table.add_row(str(p.index), p.finetune.name, *[str(p.varied.get(k, "")) for k in keys], after(p))
        Console().print(table)
        click.echo(f"{len(plan.points)} points, {plan.job_count} jobs: {len(plan.points)} fine-tunes, then "
                   + (f"{len(evaluations)} evaluations" if len(evaluations) > 1 else "one evaluation")
                   + " (generate every adapter and the base in one job → score)")
        return
    from worker.lifecycle import BrokerUnavailable, check_broker

    with ctx.session() as session:
        try:
            check_broker(ctx.app)
        except BrokerUnavailable as exc:
            fail(str(exc))
        row, jobs = enqueue_sweep(session, ctx.app, ctx.settings.home, plan, priority, max_attempts)
    if as_json:
        echo_json({"sweep": row.name, "id": row.id, "points": row.points, "jobs": [j.id for j in jobs]})
    else:
        click.echo(f"sweep {row.name!r} queued: {row.points} points, {len(jobs)} jobs ({jobs[0].id}..{jobs[-1].id}); "
                   f"watch with 'jobs watch --sweep {row.name}'")


@cli.group()
def sweeps():
    """List, show and cancel sweeps."""


def _sweep_counts(session, sweep_row) -> dict:
    from models.report import sweep_jobs

    counts: dict[str, int] = {}
    for job in sweep_jobs(session, sweep_row):
        counts[job.status.value] = counts.get(job.status.value, 0) + 1
    return counts


@sweeps.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def sweeps_list(ctx: Context, as_json):
    """Every sweep with its job counts by status."""
    from sqlalchemy import select

    from models.sweeps import Sweep

    with ctx.session() as session:
        found = [(s, _sweep_counts(session, s)) for s in session.scalars(select(Sweep).order_by(Sweep.id.desc()))]
    if as_json:
        echo_json([{"name": s.name, "points": s.points, "priority": s.priority, "created_at": s.created_at,
                    "jobs": counts} for s, counts in found])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "points", "priority", "created", "jobs")
    for s, counts in found:
        table.add_row(s.name, str(s.points), str(s.priority), f"{s.created_at:%Y-%m-%d %H:%M}",
                      ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    Console().print(table)


def _get_sweep(session, name: str):
    from models.report import ReportError, sweep_by_name

    try:
        return sweep_by_name(session, name)
    except ReportError as exc:
        fail(str(exc))


@sweeps.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def sweeps_show(ctx: Context, name, as_json):
    """The sweep's file (as parsed) and its jobs."""
    from models.report import sweep_jobs

    with ctx.session() as session:
        row = _get_sweep(session, name)
        found = sweep_jobs(session, row)
    if as_json:
        echo_json({"name": row.name, "spec": row.spec, "priority": row.priority,
                   "jobs": [_job_dict(j) for j in found]})
        return
    from rich.console import Console
    from rich.table import Table

    click.echo(f"sweep {row.name}: {row.points} points, priority {row.priority}, created {row.created_at:%Y-%m-%d %H:%M}")
    table = Table("id", "kind", "status", "what", "parent", "duration", "error")
    for job in found:
        parents = [job.parent_id] if job.parent_id else job.waits_for_ids
        table.add_row(str(job.id), job.kind.value, job.status.value, _describe(job), ",".join(map(str, parents)),
                      f"{job.duration_s:.1f}s" if job.duration_s else "", (job.error or "")[:60])
    Console().print(table)


@sweeps.command("cancel")
@click.argument("name")
@pass_ctx
def sweeps_cancel(ctx: Context, name):
    """Cancel every queued job of the sweep and ask its running job to stop."""
    from models.report import sweep_jobs
    from worker.lifecycle import cancel

    with ctx.session() as session:
        outcomes: dict[str, int] = {}
        # children first, so that cancelling the last fine-tune does not release the evaluation it was waiting for
        for job in reversed(sweep_jobs(session, _get_sweep(session, name))):
            session.refresh(job)
            if not job.status.finished:
                outcome = cancel(session, ctx.app, job)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    click.echo(f"sweep {name}: " + (", ".join(f"{n} {k}" for k, n in outcomes.items()) or "nothing left to cancel"))


# ------------------------------------------------------------------------------------------------ adapters
from api.adapters_cli import adapters  # noqa: E402  (imports only Click)

cli.add_command(adapters)


# -------------------------------------------------------------------------------------------------- worker
@cli.command()
@click.option("--burst", is_flag=True, help="Exit once its queues are empty and no job is running (like rq).")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def worker(ctx: Context, burst, loglevel):
    """Start a Celery worker: one job at a time, base models kept loaded between jobs."""
    from worker.launch import run_worker

    run_worker(ctx.app, burst=burst, loglevel=loglevel)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def workers(ctx: Context, as_json):
    """Running workers of this queue: CUDA, loaded base models, current job (from their Redis records)."""
    from worker.registry import live_workers

    try:
        found = live_workers(ctx.app)
    except Exception as exc:
        fail(f"cannot read the worker registry at {mask_url(ctx.settings.redis_url)}: {exc}")
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo(f"no worker is running on queue {ctx.settings.queue!r}")
        return
    for w in found:  # plain lines: hostnames and model paths are long, a table would cut them
        cuda = {True: w.get("gpu") or "yes", False: "no"}.get(w.get("cuda"), "?")
        click.echo(f"{w['hostname']}  pid {w['pid']}  cuda {cuda}  job {w['current_job'] or '-'}  "
                   f"bases {', '.join(w['loaded_bases']) or '-'}  (seen {w['updated_at']})")


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
@cli.command()
@click.option("--metric", "metric_names", multiple=True, default=["rouge"], show_default=True,
              help="'rouge' (rouge1, rouge2, rougeL, rougeLsum) or any stored metric name; repeatable.")
@click.option("--sweep", default=None, help="Only the base row and adapters of this sweep.")
@click.option("--split", default="test", show_default=True)
@click.option("--sort", default=None, help="Sort rows by this metric, best first.")
@click.option("--top", type=int, default=None, help="Keep the base row and the N best adapters.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write box plots of per-example scores (one box per run) to this PNG.")
@click.option("--plot-loss", "plot_loss_path", type=click.Path(dir_okay=False), default=None,
              help="Write the runs' training / eval loss curves to this PNG.")
@click.option("--compare", nargs=2, default=None, metavar="A B",
              help="Show the examples where variants A and B differ most (use 'base' for the base model).")
@click.option("--limit", type=int, default=5, show_default=True, help="Examples shown by --compare.")
@pass_ctx
def report(ctx: Context, metric_names, sweep, split, sort, top, fmt, plot_path, plot_loss_path, compare, limit):
    """Compare base and adapters: one row per run with each metric's mean, 95% bootstrap interval and delta vs the
    base row, examples scored, training time and the hyperparameters that vary; the best row is marked."""
    from api.render import box_plot, loss_plot, render_report
    from models.report import (ReportError, compare_variants, comparison, expand_metrics, known_metric_names,
                               loss_curves, per_example_scores)

    metrics = expand_metrics(list(metric_names))
    if top is not None and top <= 0:
        fail("--top must be a positive number")
    with ctx.session() as session:
        known = known_metric_names(session)
        unknown = [m for m in metrics if known and m not in known]
        if unknown:
            fail(f"no metric named {unknown[0]!r} in the database (known: {', '.join(sorted(known))})")
        try:
            if compare:
                pairs = compare_variants(session, compare[0], compare[1], metrics[0], split, limit)
                click.echo(render_comparison(pairs, compare, metrics[0], fmt), nl=False)
                return
            rows = comparison(session, metrics, split, sweep=sweep, sort=sort, top=top)
        except ReportError as exc:
            fail(str(exc))
        if not rows:
            fail(f"no scored results on split {split!r}{f' in sweep {sweep!r}' if sweep else ''} yet; "
                 "run generate and score jobs first")
        click.echo(render_report(rows, metrics, fmt), nl=False)
        if plot_path:
            boxes = box_plot(per_example_scores(session, rows, sort or metrics[0], split, sweep), sort or metrics[0],
                             plot_path, title=f"{sort or metrics[0]} per example" + (f", sweep {sweep}" if sweep else ""))
            click.echo(f"box plot written to {plot_path} ({boxes} boxes)", err=True)
        if plot_loss_path:
            curves = loss_curves(session, [r["variant"] for r in rows if r["variant"] != "base"])
            if not any(curves.values()):
                fail("no loss curves recorded for these runs")
            loss_plot(curves, plot_loss_path, title="loss curves" + (f", sweep {sweep}" if sweep else ""))
            click.echo(f"loss curves written to {plot_loss_path}", err=True)


def render_comparison(pairs: list[dict], variants, metric: str, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(pairs, indent=2) + "\n"
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(pairs[0]) if pairs else ["example_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(pairs)
        return out.getvalue()
    a, b = variants
    blocks = []
    for pair in pairs:
        blocks.append("\n".join([
            f"── example {pair['example_id']}: {metric} {a}={pair[f'{metric}_{a}']:.3f} "
            f"{b}={pair[f'{metric}_{b}']:.3f} (Δ {pair['difference']:+.3f})",
            pair["source"], f"reference: {pair['reference']}", f"{a}: {pair[f'prediction_{a}']}",
            f"{b}: {pair[f'prediction_{b}']}"]))
    return "\n\n".join(blocks) + "\n" if blocks else "the two runs share no scored examples\n"


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
    from api.demo import run_demo

    rates = [float(x) for x in learning_rates.split(",") if x.strip()]
    from api.render import render_report

    run_demo(ctx, rates, epochs, wait=_wait_for, render=render_report)


if __name__ == "__main__":
    cli()
