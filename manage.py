"""tunequeue command line: the Click face of the application in api/.

Commands parse flags (the job options are built from the spec fields in models/specs.py), call one api/ function
and render what it returns. Errors from models/errors.py are caught once, by the root group: an input error is one
line and exit 2, an unreachable service one line and exit 1. No ML code runs here (torch is imported only by the
worker), so `--help`, `jobs` and `report` start fast.
"""

from __future__ import annotations

import json
import os
import sys
import typing
from pathlib import Path

import click

from api.context import AppContext
from models.errors import TunequeueError
from models.specs import MAX_ID, NOT_OPTIONS, FinetuneSpec, GenerateSpec, ScoreSpec, Submission


class CliError(click.ClickException):
    def __init__(self, error: TunequeueError):
        # one line whatever the message holds (a name that ends in a newline is shown as \n, not as a second line)
        text = str(error).strip() or type(error).__name__
        super().__init__(text.replace("\r", "\\r").replace("\n", "\\n"))
        self.exit_code = getattr(error, "exit_code", 1)


class Root(click.Group):
    """The root group: every tunequeue error of any command becomes one line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TunequeueError as exc:
            raise CliError(exc) from None


pass_ctx = click.make_pass_decorator(AppContext, ensure=True)

# Ids and counts are 64-bit in every database: a bigger number is refused by Click (one line, exit 2) before any
# query could overflow.
JOB_ID = click.IntRange(1, MAX_ID)
COUNT = click.IntRange(1, MAX_ID)


class Seconds(click.ParamType):
    """A finite number of seconds above 0 and at most a week (Click's FLOAT also takes inf and nan)."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:60]!r} is not a number of seconds", param, ctx)
        if not (0 < number <= 7 * 24 * 3600):  # False for nan too
            self.fail(f"{value} is not a number of seconds above 0 and at most a week", param, ctx)
        return number


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_table(table) -> None:
    """A rich table, fitted to the width api/render.py's `output_width` gives (COLUMNS, the terminal, or 120)."""
    from rich.console import Console

    from api.render import output_width

    Console(width=output_width()).print(table)


def echo_table(cols, rows, *, title=None, wide=False) -> None:
    """Columns (api/render.py's Col) and rows of strings as a table fitted to the width: names and ids whole, the
    less important columns left out when it is too narrow; `wide`: every column at the width it needs."""
    from api.render import render_table

    click.echo(render_table(cols, rows, title=title, wide=wide), nl=False)


def table_options(func):
    """--wide and --format, for the commands that list things."""
    func = click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
                        show_default=True, help="csv or json: every field, for scripts (json as --json).")(func)
    return click.option("--wide", is_flag=True, help="Show every column at the width it needs (tables are "
                        "otherwise fitted to COLUMNS or the terminal, 120 when piped).")(func)


def echo_records(records: list[dict], fmt: str) -> None:
    from api.render import render_records

    click.echo(render_records(records, fmt), nl=False)


# ------------------------------------------------------------------------------------ options from spec fields
def _unwrap(annotation):
    """(base type, list?) of a field annotation: Optional[...] dropped, list[...] and Union[Literal, list] opened."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:
        lists = [a for a in args if typing.get_origin(a) is list]
        return (typing.get_args(lists[0])[0], True) if lists else _unwrap(args[0])
    if typing.get_origin(annotation) is list:
        return args[0], True
    return annotation, False


def _comma_list(_ctx, _param, value):
    """'a,b' → ['a', 'b'] (the spec decides what a one-word list such as ['all-linear'] means)."""
    return None if value is None else [part.strip() for part in value.strip("[]").split(",") if part.strip()]


def spec_option(spec_type, name: str):
    """A Click option for one spec field: its flags, type or choices, and help come from the field; its default
    stays the spec's (the option's own default is None, which the spec reads as "not given")."""
    field = spec_type.model_fields[name]
    extra = field.json_schema_extra or {}
    flags = extra.get("flags") or [f"--{name.replace('_', '-')}"]
    base, is_list = _unwrap(field.annotation)
    default = field.get_default(call_default_factory=True)
    shown = extra.get("shown") or (None if default is None or default is False or default == [] else default)
    if field.is_required():
        return click.option(*flags, name, type=str, required=True, help=field.description)
    kwargs: dict = {"help": (field.description or "") + (f"  [default: {shown}]" if shown is not None else "")}
    if base is bool:
        kwargs.update(is_flag=True, default=None)
    elif typing.get_origin(base) is typing.Literal and is_list:
        kwargs.update(type=click.Choice(typing.get_args(base)), multiple=True, default=None)
    elif typing.get_origin(base) is typing.Literal:
        kwargs.update(type=click.Choice(typing.get_args(base)), default=None)
    elif is_list and extra.get("repeat"):
        kwargs.update(type=str, multiple=True, default=None)
    elif is_list:
        kwargs.update(type=str, default=None, callback=_comma_list)
    else:
        kwargs.update(type=base if base in (int, float) else str, default=None)
    return click.option(*flags, name, **kwargs)


def spec_options(spec_type, *names: str, skip: tuple[str, ...] = ()):
    """Options for the named fields of `spec_type` (default: every field but `kind` and `skip`): the spec's own
    fields first, then those it shares with other specs (the data options), each group in field order."""
    own = spec_type.__dict__.get("__annotations__", {})
    names = names or tuple(sorted((n for n in spec_type.model_fields if n not in ("kind", *skip)),
                                  key=lambda n: n not in own))

    def decorate(func):
        for name in reversed(names):
            func = spec_option(spec_type, name)(func)
        return func
    return decorate


def submit_options(func):
    """--wait, --json, --priority, --max-attempts: how a job is queued, beside its spec."""
    func = spec_options(Submission)(func)
    func = click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")(func)
    return click.option("--wait", is_flag=True, help="Block until the job finishes, showing progress.")(func)


def template_file_option(func):
    return click.option("--prompt-template-file", type=click.Path(), default=None,
                        help="Read the prompt template from this UTF-8 file (one final newline is dropped); "
                             "instead of --prompt-template.")(func)


def read_template_file(fields: dict, path: str | None) -> dict:
    if path is None:
        return fields
    if fields.get("prompt_template") is not None:
        raise click.UsageError("give either --prompt-template or --prompt-template-file, not both")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.UsageError(f"cannot read --prompt-template-file {path}: {getattr(exc, 'strerror', None) or exc}")
    return {**fields, "prompt_template": text.removesuffix("\n")}


def submission_of(priority, max_attempts) -> Submission:
    from models.specs import build

    return build(Submission, given({"priority": priority, "max_attempts": max_attempts}))


def given(options: dict) -> dict:
    """The options the user gave: an option left out is None here, and the spec's default applies."""
    return {k: v for k, v in options.items() if v is not None}


def submit_and_show(ctx: AppContext, data: dict, *, wait: bool, as_json: bool, priority, max_attempts,
                    model_given: bool = True) -> None:
    """Submit, print the job (or its JSON), then wait if asked."""
    from api.jobs import job_dicts, submit

    job = submit(ctx, given(data), submission_of(priority, max_attempts), model_given=model_given)
    shown = job_dicts(ctx.broker, [job])[0]
    if as_json and not wait:
        echo_json(shown)
    elif not as_json:
        reason = f"; waiting: {shown['waiting_reason']}" if shown["waiting_reason"] else ""
        click.echo(f"job {job.id} queued ({job.kind.value}){reason}")
    if wait:
        wait_and_show(ctx, job.id, as_json)


def wait_and_show(ctx: AppContext, job_id: int, as_json: bool) -> None:
    from api.jobs import get_job, job_dict, wait_for

    wait_for(ctx, [job_id], quiet=as_json)
    with ctx.sessions() as session:
        job = get_job(session, job_id)
    if as_json:
        echo_json(job_dict(job))
    if job.status.value != "succeeded":
        raise click.ClickException(f"job {job.id} {job.status.value}: {job.error or ''}".strip())


# ---------------------------------------------------------------------------------------------------------- cli
@click.group(cls=Root, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option("0.1.0", prog_name="tunequeue")
@click.pass_context
def cli(ctx):
    """tunequeue: queue LoRA fine-tuning, generation and scoring jobs, read the comparison in the morning.

    Settings come from the environment: DATABASE_URL (default: SQLite under TUNEQUEUE_HOME), REDIS_URL
    (default redis://127.0.0.1:6379/0), TUNEQUEUE_HOME (default ./.tunequeue: adapters, built-in models).
    """
    ctx.ensure_object(AppContext)


@cli.group()
def db():
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def db_upgrade(ctx: AppContext, revision):
    """Apply the migrations to DATABASE_URL (creates the SQLite file if needed)."""
    from models.migrate import current_revision, upgrade
    from models.settings import mask_url

    ctx.settings.home.mkdir(parents=True, exist_ok=True)
    url = mask_url(ctx.settings.database_url)
    try:
        upgrade(ctx.settings.database_url, revision)
    except Exception as exc:
        raise click.ClickException(f"cannot migrate {url}: {str(exc).strip().splitlines()[0]}") from None
    click.echo(f"database {url} at revision {current_revision(ctx.settings.database_url)}")


# ------------------------------------------------------------------------------------------------ enqueueing
@cli.command()
@spec_options(FinetuneSpec, skip=NOT_OPTIONS)
@template_file_option
@submit_options
@pass_ctx
def finetune(ctx: AppContext, wait, as_json, priority, max_attempts, prompt_template_file, **fields):
    """Queue a fine-tune of a base model: LoRA, QLoRA, prompt tuning or full, on any of three model kinds.

    \b
    Methods (--method):  lora (--load-in-8bit: on an int8 base) | qlora (4-bit base) | prompt-tuning | full
    Every method: --optim adamw | adamw_8bit | paged_adamw_8bit, --gradient-checkpointing
    Model kinds (--model-kind, read from the model's config.json unless given):
      seq2seq         T5 / FLAN-T5: prompt -> summary
      causal          Llama / Qwen / GPT-2: prompt + summary in one sequence, loss on the summary only
      classification  DistilBERT / BERT: text -> label (--label-column), scored by accuracy and F1

    A PEFT adapter (adapter_config.json + adapter_model.safetensors), or for --method full a whole model folder, is
    written under TUNEQUEUE_HOME/adapters/NAME and recorded with its trainable/total parameters and size on disk.
    Built-in models and datasets (offline, built on first use under TUNEQUEUE_HOME) are listed under --model and
    --dataset.
    """
    data = {"kind": "finetune", **read_template_file(fields, prompt_template_file)}
    submit_and_show(ctx, data, wait=wait, as_json=as_json, priority=priority, max_attempts=max_attempts)


@cli.command()
@spec_options(GenerateSpec)
@template_file_option
@submit_options
@pass_ctx
def generate(ctx: AppContext, wait, as_json, priority, max_attempts, prompt_template_file, **fields):
    """Queue batched greedy generation (or classification) for every example of a split: one row per example.

    Built-in models and datasets (offline, built on first use under TUNEQUEUE_HOME) are listed under --model and
    --dataset.
    """
    data = {"kind": "generate", **read_template_file(fields, prompt_template_file)}
    submit_and_show(ctx, data, wait=wait, as_json=as_json, priority=priority, max_attempts=max_attempts,
                    model_given=fields.get("model") is not None)


def score_help() -> str:
    """score --help: what a score job does, then every metric with one line on what it needs (models/metrics.py)."""
    from models.metrics import METRIC_NEEDS

    lines = "\n".join(f"  {name}: {needs}" for name, needs in METRIC_NEEDS.items())
    return ("Queue scoring of a finished generate job's rows: each --metric is one family of metric rows, stored per "
            "example and aggregated per run (see 'report --metric NAME'); each family resumes on its own after a "
            f"crash.\n\n\b\nMetrics (--metric, repeatable):\n{lines}")


@cli.command(help=score_help())
@click.argument("generate_job_id", type=JOB_ID)
@spec_options(ScoreSpec, skip=("generate_job_id", "use_stemmer"))
@submit_options
@pass_ctx
def score(ctx: AppContext, generate_job_id, wait, as_json, priority, max_attempts, metrics, **fields):
    data = {"kind": "score", "generate_job_id": generate_job_id, "metrics": list(metrics or []) or None, **fields}
    submit_and_show(ctx, data, wait=wait, as_json=as_json, priority=priority, max_attempts=max_attempts)


# ---------------------------------------------------------------------------------------------------- jobs
@cli.group()
def jobs():
    """List, show, watch, cancel and reconcile jobs."""


class JobStatusChoice(click.Choice):
    """One of models.jobs.JobStatus, read when first asked for (so that `--help` imports no SQLAlchemy)."""

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        from models.jobs import JobStatus

        return tuple(status.value for status in JobStatus)

    @choices.setter
    def choices(self, _value):
        pass


@jobs.command("list")
@click.option("--status", type=JobStatusChoice(), help="Only jobs in this state (pruned: sweep points "
              "stopped early by successive halving).")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@table_options
@pass_ctx
def jobs_list(ctx: AppContext, status, limit, as_json, wide, fmt):
    """The newest jobs first; a job still waiting for the jobs it follows shows `waiting (N jobs)`, one that no live
    worker can run (its --require / --min-gpu-mem) `waiting: no live worker has CUDA`, a sweep point promoted at a
    rung and queued to train on `queued (promoted at step N)`."""
    from api.jobs import describe, job_dicts, latest_jobs, shown_progress, status_label, wait_reasons, waiting_counts
    from api.render import Col
    from models.jobs import JobStatus

    with ctx.session() as session:
        found = latest_jobs(session, limit, JobStatus(status) if status else None)
        waiting = waiting_counts(session, found)
    if as_json or fmt != "table":
        echo_records(job_dicts(ctx.broker, found), "json" if as_json else fmt)
        return
    reasons = wait_reasons(ctx.broker, found)
    cols = [Col("id", name=True, justify="right"), Col("kind", drop=1), Col("status"), Col("what", name=True),
            Col("attempts", drop=3, justify="right"), Col("queue wait", drop=5, justify="right"),
            Col("duration", drop=4, justify="right"), Col("progress", drop=2, justify="right")]
    rows = []
    for job in found:
        progress = shown_progress(job)
        rows.append([str(job.id), job.kind.value, status_label(job, waiting, reasons), describe(job), str(job.attempts),
                     f"{job.queue_wait_s:.2f}s" if job.queue_wait_s is not None else "",
                     f"{job.duration_s:.1f}s" if job.duration_s else "",
                     f"{progress.get('step', '')}/{progress.get('total_steps', '')}" if progress else ""])
    echo_table(cols, rows, wide=wide)


@jobs.command("show")
@click.argument("job_id", type=JOB_ID)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def jobs_show(ctx: AppContext, job_id, as_json):
    """Everything about one job: spec, status, timing, result or error; for a point of an ASHA or TPE sweep, its
    search (study, trial, where it stands) and the decision taken at each of its rungs."""
    from api.jobs import get_job, job_full

    with ctx.session() as session:
        data = job_full(session, get_job(session, job_id), ctx.broker)
    if as_json:
        echo_json(data)
        return
    traceback = data.pop("traceback", None)
    search = data.pop("search", None)
    show_fields(data, width=16)
    if search:
        show_search(search, width=16)
    if traceback and data["status"] != "succeeded":
        click.echo(f"traceback: (latest failed attempt, last {SHOWN_TRACEBACK_LINES} lines; all: jobs logs {job_id})")
        for line in traceback.splitlines()[-SHOWN_TRACEBACK_LINES:]:
            click.echo(f"  {line}")


SHOWN_TRACEBACK_LINES = 15


def show_search(search: dict, width: int) -> None:
    """A sweep point's search under `jobs show`: study and trial, where it stands, then its rungs as a table."""
    from api.render import Col, render_table

    rungs = (f"rungs at steps {', '.join(map(str, search['rung_steps']))}" if search["rung_steps"] else
             "no rungs (the trial trains to its end)")
    click.echo(f"{'search':>{width}}: {search['strategy'].upper()} trial {search['trial']} of study "
               f"{search['study']}, on {search['metric']} ({search['direction']}); {rungs}")
    if search["state"]:
        click.echo(f"{'':>{width}}  {search['state']}")
    if search["rungs"]:
        cols = [Col("step", justify="right"), Col("metric"), Col("value", justify="right"), Col("decision"),
                Col("reason", drop=1)]
        click.echo(render_table(cols, [[str(r["step"]), r["metric"], "" if r["value"] is None else f"{r['value']:.4g}",
                                        r["decision"], r["reason"]] for r in search["rungs"]],
                                title=f"rungs of job {search['job_id']}"), nl=False)


@jobs.command("logs")
@click.argument("job_id", type=JOB_ID)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job has finished.")
@click.option("--tail", type=COUNT, default=None, help="Only the last N lines (with --follow: to start with).")
@pass_ctx
def jobs_logs(ctx: AppContext, job_id, follow, tail):
    """The job's log: every attempt's lines from its worker, tracebacks included."""
    from api.logs import follow_job_log, show_job_log

    if follow:
        follow_job_log(ctx, job_id, click.echo, tail=tail)
    else:
        show_job_log(ctx, job_id, click.echo, tail)


def show_fields(data: dict, width: int) -> None:
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        click.echo(f"{key:>{width}}: {'' if value is None else value}")


@jobs.command("cancel")
@click.argument("job_id", type=JOB_ID)
@pass_ctx
def jobs_cancel(ctx: AppContext, job_id):
    """Cancel a queued job, or ask a running one to stop at its next step."""
    from api.jobs import cancel, get_job

    with ctx.session() as session:
        outcome = cancel(session, ctx.broker, get_job(session, job_id))
    click.echo(f"job {job_id}: {outcome}")


@jobs.command("reconcile")
@click.option("--stale-after", type=Seconds(), default=None, help="Seconds without heartbeat before a running job "
              "counts as lost [default: TUNEQUEUE_STALE_SECONDS or 60].")
@pass_ctx
def jobs_reconcile(ctx: AppContext, stale_after):
    """Put back lost work: running jobs whose worker died, queued jobs whose message the broker lost."""
    from api.jobs import reconcile
    from models.errors import InputError

    if stale_after is not None and stale_after <= ctx.settings.heartbeat_seconds:
        raise InputError(f"--stale-after {stale_after:g} is not more than the heartbeat interval "
                         f"({ctx.settings.heartbeat_seconds:g}s, TUNEQUEUE_HEARTBEAT_SECONDS): every running job "
                         "would look lost")
    outcome = reconcile(ctx, stale_after)
    lost = outcome["requeued_or_failed"]
    click.echo(f"{len(lost)} running jobs had lost their worker"
               + (f" ({', '.join(f'{i} → {s}' for i, s in lost)})" if lost else "")
               + f"; {len(outcome['republished'])} queued jobs re-published"
               + (f" ({', '.join(map(str, outcome['republished']))})" if outcome["republished"] else ""))


@jobs.command("watch")
@click.argument("job_id", type=JOB_ID, required=False)
@click.option("--sweep", default=None, help="Watch every job of this sweep.")
@pass_ctx
def jobs_watch(ctx: AppContext, job_id, sweep):
    """Live progress bars until the job (or every job of the sweep) has finished: per job its id, kind, adapter
    name (or the variants it evaluates), step / total, loss, eval loss and status."""
    from api.jobs import get_job, wait_for
    from api.report import sweep_job_ids

    if (job_id is None) == (sweep is None):
        raise click.UsageError("give a JOB_ID or --sweep NAME")
    with ctx.session() as session:
        ids = sweep_job_ids(session, sweep) if sweep else [get_job(session, job_id).id]
    states = [status.value for status in wait_for(ctx, ids, force_bars=True).values()]
    click.echo(", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))))


# -------------------------------------------------------------------------------------------------- sweeps
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--name", default=None, help="Sweep name [default: 'name:' in the file].")
@click.option("--dry-run", is_flag=True, help="Print the expanded jobs and enqueue nothing.")
@click.option("--notify", "notify_url", default=None, metavar="URL",
              help="POST a JSON summary here when the sweep ends [default: TUNEQUEUE_NOTIFY_URL].")
@click.option("--json", "as_json", is_flag=True)
@spec_options(Submission)
@pass_ctx
def sweep(ctx: AppContext, file, overrides, name, dry_run, notify_url, as_json, priority, max_attempts):
    """Queue a sweep from a YAML file: one fine-tune per point, then one generate job that waits for all of them
    and evaluates every adapter and the base model in mixed batches, then one score job.

    OVERRIDES are key=value (into base, replacing a grid list of that key) or block.key=value, e.g.
    num_train_epochs=1 grid.learning_rate=[1e-3,3e-3]. The whole file is checked before anything is enqueued.
    """
    from api.pipelines import submit_sweep
    from api.sweeps import load_sweep_file

    done = submit_sweep(ctx, load_sweep_file(file), name=name, overrides=list(overrides), dry_run=dry_run,
                        notify_url=notify_url, notify_option="--notify",
                        submission=submission_of(priority, max_attempts))
    if as_json:
        echo_json(done.as_dict())
    elif dry_run:
        show_sweep_plan(done.plan)
    else:
        click.echo(sweep_queued_line(done))


def sweep_queued_line(done) -> str:
    """What `sweep FILE` says once the sweep is queued; a TPE sweep's trials are proposed as earlier ones end."""
    row, queued = done.sweep, done.jobs
    ids = f"({queued[0].id}..{queued[-1].id})"
    watch = f"watch with 'jobs watch --sweep {row.name}'"
    summary = done.plan.strategy_summary()
    if summary["kind"] == "tpe":
        now = sum(job.kind.value == "finetune" for job in queued)
        return (f"sweep {row.name!r} queued: {summary['n']} trials ({now} queued now; TPE proposes the rest as trials "
                f"end), {len(queued)} jobs so far {ids}; {watch}")
    line = f"sweep {row.name!r} queued: {row.points} points, {len(queued)} jobs {ids}"
    if summary["kind"] == "asha":
        steps = sorted({step for rungs in summary["rungs"].values() for step in rungs})
        line += f"; ASHA decides at steps {', '.join(map(str, steps[:-1]))} (max {steps[-1]})"
    return f"{line}; {watch}"


def show_sweep_plan(plan) -> None:
    from rich.table import Table

    keys = sorted({k for p in plan.points for k in p.varied})
    evaluations = plan.evaluations
    step = {p.index: number for number, e in enumerate(evaluations, start=1) for p in e.points}
    after = (lambda p: f"finetune → eval {step[p.index]}") if len(evaluations) > 1 else (lambda p: "finetune")
    table = Table("point", "adapter", *keys, "jobs", title=f"sweep {plan.name} (dry run: nothing enqueued)")
    table.add_row("base", "—", *["" for _ in keys], "eval" + (" 1" if len(evaluations) > 1 else ""))
    for p in plan.points:
        table.add_row(str(p.index), p.finetune.name, *[str(p.varied.get(k, "")) for k in keys], after(p))
    print_table(table)
    click.echo(f"{plan.trials} points, {plan.job_count} jobs: {plan.trials} fine-tunes, then "
               + (f"{len(evaluations)} evaluations" if len(evaluations) > 1 else "one evaluation")
               + " (generate every adapter and the base in one job → score)")
    for line in strategy_lines(plan.strategy_summary()):
        click.echo(line)


def strategy_lines(summary: dict) -> list[str]:
    """A dry run's account of an ASHA or TPE strategy: rungs and steps, or trials and distributions."""
    if summary["kind"] == "asha":
        lines = [f"ASHA on {summary['metric']} ({summary['mode']}), η = {summary['reduction_factor']}: a point "
                 f"goes on past a rung only while it is in the best 1/{summary['reduction_factor']} there"
                 + ("; it waits at the rung until it is, or is pruned once no more points can arrive (lazy "
                    "promotion)" if summary.get("promotion") == "lazy" else
                    "; decided the moment it arrives, against the points there before it (eager promotion)")]
        for bracket, rungs in summary["rungs"].items():
            lines.append(f"  bracket {bracket} ({summary['points_per_bracket'][bracket]} points): rungs at steps "
                         + ", ".join(map(str, rungs)))
        lines.append(f"training steps: at most {summary['worst_case_steps']:,} (every point to the end), "
                     f"{summary['halving_steps']:,} when each rung keeps its best 1/{summary['reduction_factor']}")
        lines.append("points are queued in a shuffled order (seed {}), as ASHA assumes".format(summary["seed"])
                     if summary["order"] == "shuffled" else "points are queued in the file's order")
        return lines
    if summary["kind"] == "tpe":
        shown = ", ".join(f"{key} {_distribution_text(d)}" for key, d in summary["distributions"].items())
        return [f"TPE on {summary['metric']} ({summary['mode']}): {summary['n']} trials, {summary['parallel']} at a "
                f"time, the first {summary['startup_trials']} at random (seed {summary['seed']}); samples {shown}",
                "the points above are the ends of those ranges, checked like grid points; TPE proposes the real ones"]
    return []


def _distribution_text(distribution: dict) -> str:
    attributes = distribution["attributes"]
    if distribution["name"] == "CategoricalDistribution":
        return "one of " + ", ".join(map(str, attributes["choices"]))
    scale = "log-uniform" if attributes.get("log") else "uniform"
    kind = "integers" if distribution["name"] == "IntDistribution" else scale
    return f"{kind} in [{attributes['low']:g}, {attributes['high']:g}]"


@cli.group()
def sweeps():
    """List, show, cancel, retry and delete sweeps."""


@sweeps.command("list")
@click.option("--json", "as_json", is_flag=True)
@table_options
@pass_ctx
def sweeps_list(ctx: AppContext, as_json, wide, fmt):
    """Every sweep with its job counts by status."""
    from api.pipelines import sweep_summaries
    from api.render import Col

    with ctx.session() as session:
        found = sweep_summaries(session)
    if as_json or fmt != "table":
        echo_records(found, "json" if as_json else fmt)
        return
    cols = [Col("name", name=True), Col("points", justify="right"), Col("priority", drop=2, justify="right"),
            Col("created", drop=1), Col("jobs")]
    echo_table(cols, [[s["name"], str(s["points"]), str(s["priority"]), f"{s['created_at']:%Y-%m-%d %H:%M}",
                       ", ".join(f"{n} {k}" for k, n in sorted(s["jobs"].items()))] for s in found], wide=wide)


@sweeps.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.option("--wide", is_flag=True, help="Show every column at the width it needs.")
@pass_ctx
def sweeps_show(ctx: AppContext, name, as_json, wide):
    """The sweep's file (as parsed) and its jobs."""
    from api.jobs import describe, status_label, waiting_counts
    from api.pipelines import sweep_details
    from api.render import Col
    from models.report import sweep_by_name, sweep_jobs

    with ctx.session() as session:
        if as_json:  # what GET /sweeps/NAME answers
            echo_json(sweep_details(session, name))
            return
        row = sweep_by_name(session, name)
        found = sweep_jobs(session, row)
        waiting = waiting_counts(session, found)
    click.echo(f"sweep {row.name}: {row.points} points, priority {row.priority}, "
               f"created {row.created_at:%Y-%m-%d %H:%M}")
    cols = [Col("id", name=True, justify="right"), Col("kind", drop=2), Col("status"), Col("what", name=True),
            Col("after", drop=3), Col("duration", drop=4, justify="right"), Col("error", drop=1)]
    rows = []
    for job in found:
        parents = [job.parent_id] if job.parent_id else job.waits_for_ids
        rows.append([str(job.id), job.kind.value, status_label(job, waiting), describe(job),
                     ", ".join(map(str, parents)), f"{job.duration_s:.1f}s" if job.duration_s else "",
                     (job.error or "").strip().splitlines()[0] if (job.error or "").strip() else ""])
    echo_table(cols, rows, wide=wide)


@sweeps.command("cancel")
@click.argument("name")
@pass_ctx
def sweeps_cancel(ctx: AppContext, name):
    """Cancel every queued job of the sweep and ask its running job to stop."""
    from api.pipelines import cancel_sweep

    with ctx.session() as session:
        outcomes = cancel_sweep(session, ctx.broker, name)
    click.echo(f"sweep {name}: " + (", ".join(f"{n} {k}" for k, n in outcomes.items()) or "nothing left to cancel"))


@sweeps.command("retry")
@click.argument("name")
@click.option("--max-attempts", type=click.IntRange(1, 100), default=None,
              help="Runs each re-queued job is allowed from now on  [default: "
                   f"{Submission.model_fields['max_attempts'].default}]")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def sweeps_retry(ctx: AppContext, name, max_attempts, as_json):
    """Re-queue the sweep's failed, cancelled and skipped points (a fine-tune starts over) and the evaluation that
    must include them, keeping what succeeded; the same job ids, so its report stays one table."""
    from api.pipelines import retry_sweep

    with ctx.session() as session:
        again = retry_sweep(session, ctx.broker, name, **given({"max_attempts": max_attempts}))
        finetunes = [job.id for job in again if job.kind.value == "finetune"]
        evaluation = [job.id for job in again if job.kind.value != "finetune"]
    if as_json:
        echo_json({"sweep": name, "finetunes": finetunes, "evaluation": evaluation})
    elif not again:
        click.echo(f"sweep {name}: nothing to retry (every job succeeded)")
    else:
        click.echo(f"sweep {name}: re-queued {len(finetunes)} fine-tune(s) and {len(evaluation)} evaluation job(s) "
                   f"({', '.join(str(job.id) for job in again)}); watch with 'jobs watch --sweep {name}'")


@sweeps.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def sweeps_delete(ctx: AppContext, name, yes, as_json):
    """Remove a sweep that has no running job, with its jobs, result rows and the adapters (rows and folders) its
    fine-tunes made; its name (and file) can then be run again."""
    from api.pipelines import delete_sweep, sweep_contents

    with ctx.session() as session:
        if not yes:
            found = sweep_contents(session, name)
            session.rollback()
            click.echo(f"sweep {name} has {describe_contents(found)}", err=True)  # stdout stays for --json
            if not click.confirm("delete all of it?", default=False, err=True):
                click.echo("nothing deleted", err=True)
                raise click.exceptions.Exit(1)
        removed = delete_sweep(session, ctx.broker, ctx.settings, name)
    if as_json:
        echo_json(removed)
    else:
        click.echo(f"sweep {name} deleted: {describe_contents(removed)}")


def describe_contents(found: dict) -> str:
    jobs = sum(found["jobs"].values())
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(found["jobs"].items()))
    adapters = found["adapters"]
    return (f"{jobs} job(s)" + (f" ({statuses})" if statuses else "")
            + f", {len(adapters)} adapter(s)" + (f" ({', '.join(adapters)}) with their folders" if adapters else "")
            + f", {sum(found['rows'].values())} result row(s)")


# ------------------------------------------------------------------------------------------------ adapters
@cli.group()
def adapters():
    """List, show, export, merge and delete trained adapters (names are unique)."""


def loss_cell(value) -> str:
    return "" if value is None else f"{value:.4f}"


@adapters.command("list")
@click.option("--base", "base_model", default=None, help="Only adapters trained on this base model.")
@click.option("--json", "as_json", is_flag=True, help="Print the adapters as JSON.")
@table_options
@pass_ctx
def adapters_list(ctx: AppContext, base_model, as_json, wide, fmt):
    """Every adapter, oldest first: base, kind, method, parameters, size on disk, losses, training time."""
    from api.adapters import adapter_dict, list_adapters
    from api.render import Col, human_size

    with ctx.session() as session:
        found = [adapter_dict(a, ctx.settings.home) for a in list_adapters(session, base_model)]
    if as_json or fmt != "table":
        echo_records(found, "json" if as_json else fmt)
        return
    right = "right"
    # left out first when too narrow: total, trainable, best eval, duration, ...; the base last
    cols = [Col("name", name=True), Col("base", name=True, drop=1), Col("kind", drop=5), Col("method", drop=3),
            Col("trainable", drop=10, justify=right), Col("total", drop=11, justify=right),
            Col("% trainable", drop=4, justify=right), Col("size", drop=7, justify=right),
            Col("train loss", drop=6, justify=right), Col("eval loss", drop=2, justify=right),
            Col("best eval", drop=9, justify=right), Col("duration", drop=8, justify=right)]
    rows = [[a["name"], a["base_model"], a["model_kind"], a["method"], f"{a['trainable_params']:,}",
             f"{a['total_params']:,}", f"{a['percent_trainable']:.2f}", human_size(a["size_bytes"]),
             loss_cell(a["train_loss"]), loss_cell(a["eval_loss"]), loss_cell(a["best_eval_loss"]),
             f"{a['duration_s']:.1f}s" if a["duration_s"] is not None else ""] for a in found]
    echo_table(cols, rows, wide=wide)


@adapters.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the adapter as JSON.")
@pass_ctx
def adapters_show(ctx: AppContext, name, as_json):
    """Everything recorded about one adapter, with its folder."""
    from api.adapters import adapter_dict, get_adapter
    from api.render import human_size

    with ctx.session() as session:
        data = adapter_dict(get_adapter(session, name), ctx.settings.home)
    if as_json:
        echo_json(data)
        return
    show_fields({**data, "size": human_size(data["size_bytes"])}, width=17)


@adapters.command("export")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@pass_ctx
def adapters_export(ctx: AppContext, name, directory):
    """Copy the adapter's folder (PEFT adapter, or whole model for --method full) to DIRECTORY (new or empty)."""
    from api.adapters import export_adapter

    with ctx.session() as session:
        target = export_adapter(session, ctx.settings.home, name, directory)
    click.echo(f"adapter {name} exported to {target}")


@adapters.command("merge")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Load the base in this dtype before merging [default: float32, also for a qlora adapter: its 4-bit "
                   "base is never the merge target]; bfloat16/float16 halve the file, and a merge that loses the "
                   "adapter's change to rounding is refused.")
@pass_ctx
def adapters_merge(ctx: AppContext, name, directory, dtype):
    """Write base + LoRA adapter merged into one full model at DIRECTORY (new or empty), with the base tokenizer,
    loadable with plain AutoModelFor...from_pretrained. Not for full or prompt-tuning adapters."""
    from api.adapters import merge_adapter

    with ctx.session() as session:
        target = merge_adapter(session, ctx.settings.home, name, directory, dtype)
    click.echo(f"adapter {name} merged into a full model at {target}")


@adapters.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def adapters_delete(ctx: AppContext, name, yes):
    """Remove the adapter's files and its row together (refused while a queued or running job uses it)."""
    from api.adapters import delete_adapter, get_adapter
    from worker.store import store_for

    with ctx.session() as session:
        adapter = get_adapter(session, name)
        if not yes:
            where = store_for(ctx.settings.home, ctx.settings).describe(adapter.path)
            click.confirm(f"delete adapter {name} and its folder {where}?", abort=True)
        delete_adapter(session, ctx.settings.home, name)
    click.echo(f"adapter {name} deleted")


# -------------------------------------------------------------------------------------------------- workers
@cli.command()
@click.option("--burst", is_flag=True, help="Exit once its queues are empty and no job is running (like rq).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--gpu", type=click.IntRange(0, 1023), default=None,
              help="Pin this worker to GPU N (CUDA_VISIBLE_DEVICES=N, nvidia-smi's numbering); its name is "
                   "tunequeue-gpuN@host.")
@click.option("--gpus", default=None, metavar="all|0,1,3",
              help="Start and supervise one worker per GPU (each a `worker --gpu N`), restarting one that dies.")
@click.option("--name", default=None, metavar="NAME[@HOST]",
              help="This worker's node name (default tunequeue@host, or tunequeue-N@host when that one runs).")
@pass_ctx
def worker(ctx: AppContext, burst, loglevel, gpu, gpus, name):
    """Start a Celery worker: one job at a time, base models kept loaded between jobs."""
    from models.errors import InputError
    from worker.gpus import check_gpu, pin_gpu, resolve_gpus, supervise

    if gpu is not None and gpus is not None:
        raise InputError("--gpu and --gpus cannot be used together (--gpu N runs one worker, --gpus one per GPU)")
    if gpus is not None and name is not None:
        raise InputError("--name names one worker; with --gpus each worker is named tunequeue-gpuN@host")
    settings = ctx.settings  # a bad setting is one line here, not one per child
    from worker.launch import check_shared_database

    check_shared_database(settings)  # a SQLite file with a broker on another machine: refused, one line
    if gpus is not None:
        indices = resolve_gpus(gpus)
        sys.exit(supervise(indices, ["--loglevel", loglevel] + (["--burst"] if burst else []), burst=burst))
    if gpu is not None:
        check_gpu(gpu)
        pin_gpu(gpu)  # before anything imports torch (the worker imports it at its first job)
    from worker.launch import run_worker
    from worker.registry import check_node_name, claim_node_name, default_node_name

    wanted = check_node_name(name) if name is not None else default_node_name(gpu)
    hostname = claim_node_name(ctx.broker, wanted, exact=name is not None)
    run_worker(settings, burst=burst, loglevel=loglevel, hostname=hostname)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def workers(ctx: AppContext, as_json):
    """Running workers of this queue: capabilities (CUDA, GPU, free memory, bf16, bitsandbytes), loaded base models,
    current job (from their Redis records)."""
    from models.settings import mask_url

    url = mask_url(ctx.settings.redis_url)  # a bad setting is its own one-line error, not a registry failure
    try:
        found = ctx.broker.live_workers()
    except TunequeueError:
        raise
    except Exception as exc:
        raise click.ClickException(f"cannot read the worker registry at {url}: {exc}")
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo(f"no worker is running on queue {ctx.settings.queue!r}")
        return
    from worker.capabilities import describe

    for w in found:  # plain lines: hostnames and model paths are long, a table would cut them
        click.echo(f"{w['hostname']}  pid {w['pid']}  {describe(w.get('capabilities'))}  "
                   f"job {w['current_job'] or '-'}  bases {', '.join(w['loaded_bases']) or '-'}  "
                   f"(seen {w['updated_at']})")


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--basic-auth", "basic_auth", default=None, metavar="USER:PASSWORD",
              help="Credentials for the web UI and its API [env FLOWER_BASIC_AUTH, which keeps them out of `ps`]; "
                   "several pairs separated by commas.")
@click.option("--no-auth", is_flag=True, help="Start without credentials (anyone who reaches the port can revoke "
              "and terminate tasks).")
@click.option("--persistent/--no-persistent", default=True, show_default=True,
              help="Keep Flower's task history in TUNEQUEUE_HOME/flower/flower.db across restarts.")
@pass_ctx
def flower(ctx: AppContext, port, address, basic_auth, no_auth, persistent):
    """Start Flower, the Celery web monitor, against the same broker (http://ADDRESS:PORT).

    Tasks are named after their jobs (`finetune lr-1e-3 · sweep lr-rank · job 12`) and end in the job's state:
    SUCCESS, FAILURE (the job's error), RETRY (an attempt failed, the next one is queued) or REVOKED (cancelled); a
    sweep point of an ASHA search ends PRUNED (stopped at a rung, the reason as its result) or PROMOTED (it passed a
    rung and trains on as a new task).
    A running task's Result shows step / total, loss and eval loss. Its API (/api/tasks, /api/task/info/ID) takes
    the same credentials.
    """
    from api.monitor import flower_arguments

    arguments, environment = flower_arguments(ctx.settings, port=port, address=address, basic_auth=basic_auth,
                                              no_auth=no_auth, persistent=persistent, env=os.environ)
    for name, value in environment.items():  # Flower reads FLOWER_* variables itself
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    click.echo(f"Flower on http://{address}:{port} ({'no auth' if no_auth else 'basic auth'}"
               f"{', history in ' + str(ctx.settings.home / 'flower') if persistent else ''})", err=True)
    sys.exit(ctx.broker.app.start(["flower", *arguments]) or 0)


# ------------------------------------------------------------------------------------------------- http api
@cli.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@pass_ctx
def api_server(ctx: AppContext, host, port, log_level):
    """Serve the HTTP API and the results page (uvicorn) at http://HOST:PORT.

    Every route but /health needs a token ('tokens create NAME'): 'Authorization: Bearer TOKEN' for the API
    (/docs and /openapi.json describe it), a login with the token for the pages at /.
    """
    import uvicorn

    from api.web.app import create_app

    with ctx.session():  # a missing or unmigrated database is one line here, not an error on every request;
        pass  # the context remembers the check, so requests do not repeat it
    click.echo(f"tunequeue API and results page on http://{host}:{port}", err=True)
    uvicorn.run(create_app(ctx), host=host, port=port, log_level=log_level)


@cli.group()
def tokens():
    """Create, list and revoke the tokens of the HTTP API and results page."""


@tokens.command("create")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="May read everything, may not submit, cancel or retry (403).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def tokens_create(ctx: AppContext, name, read_only, as_json):
    """Create a token named NAME and print it once: only its hash is stored."""
    from api.tokens import create_token, token_dict

    with ctx.session() as session:
        row, token = create_token(session, name, read_only)
        data = token_dict(row)
    if as_json:
        echo_json({**data, "token": token})
        return
    click.echo(token)
    click.echo(f"token {name!r} created{' (read-only)' if read_only else ''}: keep it now, it cannot be shown "
               "again", err=True)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True)
@table_options
@pass_ctx
def tokens_list(ctx: AppContext, as_json, wide, fmt):
    """Every token (never the token itself): name, first characters, access, last use, revoked."""
    from api.render import Col
    from api.tokens import list_tokens, token_dict

    with ctx.session() as session:
        found = [token_dict(t) for t in list_tokens(session)]
    if as_json or fmt != "table":
        echo_records(found, "json" if as_json else fmt)
        return

    def when(value) -> str:
        return f"{value:%Y-%m-%d %H:%M}" if value else ""

    cols = [Col("name", name=True), Col("starts"), Col("access"), Col("created", drop=2), Col("last used", drop=1),
            Col("revoked")]
    echo_table(cols, [[t["name"], t["prefix"] + "…", "read-only" if t["read_only"] else "read-write",
                       when(t["created_at"]), when(t["last_used_at"]), when(t["revoked_at"])] for t in found],
               wide=wide)


@tokens.command("revoke")
@click.argument("name")
@pass_ctx
def tokens_revoke(ctx: AppContext, name):
    """Revoke the token NAME: refused (401) from its next request on."""
    from api.tokens import revoke_token

    with ctx.session() as session:
        revoke_token(session, name)
    click.echo(f"token {name!r} revoked")


# -------------------------------------------------------------------------------------------------- report
@cli.command()
@click.option("--metric", "metric_names", multiple=True, default=["rouge"], show_default=True,
              help="A family (rouge, bleu, bertscore, judge, classification: each stands for its metrics, e.g. "
                   "judge_relevance ...), evaluate:NAME_OR_PATH, or any stored metric name; repeatable: several "
                   "metrics make one table.")
@click.option("--sweep", default=None, help="Only the base row and adapters of this sweep.")
@click.option("--split", default="test", show_default=True)
@click.option("--sort", default=None, help="Sort rows by this metric, best first.")
@click.option("--top", type=COUNT, default=None, help="Keep the base row and the N best adapters.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True, help="csv, json and markdown hold every column.")
@click.option("--wide", is_flag=True, help="Every column (each metric with its interval and Δ, rougeLsum, train "
              "and queue times) at the width it needs; the table otherwise shows the headline metrics fitted to "
              "COLUMNS or the terminal (120 when piped).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write box plots of per-example scores (one box per run) to this PNG.")
@click.option("--plot-loss", "plot_loss_path", type=click.Path(dir_okay=False), default=None,
              help="Write the runs' training / eval loss curves to this PNG.")
@click.option("--plot-rungs", "plot_rungs_path", type=click.Path(dir_okay=False), default=None,
              help="With --sweep of an ASHA or TPE sweep: write the successive-halving picture (the rung metric vs "
                   "training step, one line per point, pruned points ending early in an x) to this PNG or SVG.")
@click.option("--compare", nargs=2, default=None, metavar="A B",
              help="Say which of variants A and B is better on the first metric (over the examples both were "
                   "scored on) and show the examples where they differ most (use 'base' for the base model).")
@click.option("--limit", type=COUNT, default=5, show_default=True, help="Examples shown by --compare.")
@click.option("--agreement", is_flag=True, help="Instead of the table: per pair of the metrics, Spearman's rank "
              "correlation of their per-example scores over the examples both scored (does the judge agree with "
              "ROUGE?).")
@pass_ctx
def report(ctx: AppContext, metric_names, sweep, split, sort, top, fmt, wide, plot_path, plot_loss_path,
           plot_rungs_path, compare, limit, agreement):
    """Compare base and adapters: one row per run with each metric's mean, 95% bootstrap interval and delta vs the
    base row, examples scored, training time and the hyperparameters that vary; the best row is marked.

    Runs scored on different example sets are compared on the examples they all share, and a line says so. The
    report of an ASHA or TPE sweep (--sweep) also says how far each point got: its decision (promoted, pruned,
    complete), its last rung's step, the steps it trained and its rung metric there, with a row for each point that
    was not evaluated.
    """
    from api.render import comparison_sentence, example_set_note, render_agreement, render_comparison, render_report
    from api.report import (ReportQuery, check_plot_path, compare_runs, metric_agreement, report_rows,
                            resolve_metrics, write_box_plot, write_loss_plot, write_rungs_plot)
    from models.errors import InputError

    if plot_rungs_path and not sweep:
        raise InputError("--plot-rungs draws one sweep's search: give --sweep NAME too")
    for path, option in ((plot_path, "--plot"), (plot_loss_path, "--plot-loss"), (plot_rungs_path, "--plot-rungs")):
        if path:
            check_plot_path(path, option)  # before anything is queried, printed or drawn
    query = ReportQuery(list(metric_names), split, sweep, sort, top)
    with ctx.session() as session:
        if plot_rungs_path:  # the search's picture needs no scores: it can be drawn while the sweep runs
            points = write_rungs_plot(session, sweep, plot_rungs_path)
            click.echo(f"rungs plot written to {plot_rungs_path} ({points} points)", err=True)
        query = resolve_metrics(session, query)
        if agreement:
            click.echo(render_agreement(metric_agreement(session, query), fmt), nl=False)
            return
        if compare:
            summary, pairs = compare_runs(session, query, compare[0], compare[1], limit)
            click.echo(render_comparison(summary, pairs, fmt), nl=False)
            if fmt in ("csv", "json"):
                click.echo(comparison_sentence(summary), err=True)
            return
        rows = report_rows(session, query)
        click.echo(render_report(rows, query.metric_names, fmt, wide=wide), nl=False)
        if fmt in ("csv", "json") and (note := example_set_note(rows)):
            click.echo(note, err=True)
        if plot_path:
            boxes = write_box_plot(session, query, rows, plot_path)
            click.echo(f"box plot written to {plot_path} ({boxes} boxes)", err=True)
        if plot_loss_path:
            write_loss_plot(session, query, rows, plot_loss_path)
            click.echo(f"loss curves written to {plot_loss_path}", err=True)


# ---------------------------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--epochs", type=float, default=3, show_default=True)
@click.option("--learning-rates", default="1e-3,3e-3", show_default=True, help="One LoRA adapter per rate.")
@pass_ctx
def demo(ctx: AppContext, epochs, learning_rates):
    """Run the whole loop offline through the real queue and print the report.

    Base-only generate + score on the test split, two LoRA adapters on the built-in tiny-t5 and
    synthetic-dialogsum, generate + score each, all executed by a burst worker subprocess.
    """
    from api.demo import run_demo
    from models.errors import InputError
    from models.specs import build

    try:
        rates = [float(x) for x in learning_rates.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--learning-rates {learning_rates[:60]!r}: write numbers separated by commas, "
                         "e.g. 1e-3,3e-3") from None
    if not rates:
        raise InputError("--learning-rates: give at least one learning rate")
    for rate in rates:  # the spec's own ranges, before anything is started
        build(FinetuneSpec, {"name": "demo", "learning_rate": rate, "num_train_epochs": epochs})
    run_demo(ctx, rates, epochs, echo=click.echo)


if __name__ == "__main__":
    cli()
