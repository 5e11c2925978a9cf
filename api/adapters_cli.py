"""`manage.py adapters ...`: list, show, export, merge and delete trained adapters.

A Click group registered by manage.py; the work is done by the plain functions of worker/adapters.py. Only Click is
imported at module level (torch and friends load inside `merge`), so `manage.py --help` stays fast. Commands use
the root command's context object (settings and database sessions) through `click.pass_obj`.
"""

from __future__ import annotations

import json

import click

DTYPES = ("bfloat16", "float16", "float32")


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _human_size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def _loss(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _run(function, *args, **kwargs):
    """Call a worker/adapters.py function; its AdapterError becomes the one-line CLI error."""
    from api.adapters import AdapterError

    try:
        return function(*args, **kwargs)
    except AdapterError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.pass_context
def adapters(ctx):
    """List, show, export, merge and delete trained adapters (names are unique)."""
    if ctx.obj is None:  # invoked on its own rather than under manage.py's root group
        from manage import Context

        ctx.obj = Context()


@adapters.command("list")
@click.option("--base", "base_model", default=None, help="Only adapters trained on this base model.")
@click.option("--json", "as_json", is_flag=True, help="Print the adapters as JSON.")
@click.pass_obj
def adapters_list(ctx, base_model, as_json):
    """Every adapter, oldest first: base, kind, method, parameters, size on disk, losses, training time."""
    from api.adapters import adapter_dict, list_adapters

    with ctx.session() as session:
        found = [adapter_dict(a, ctx.settings.home) for a in list_adapters(session, base_model)]
    if as_json:
        _echo_json(found)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "base", "task", "method", "trainable", "total", "% trainable", "size", "train loss",
                  "eval loss", "best eval", "duration")
    for a in found:
        table.add_row(a["name"], a["base_model"], a["task"], a["method"], f"{a['trainable_params']:,}",
                      f"{a['total_params']:,}", f"{a['percent_trainable']:.2f}", _human_size(a["size_bytes"]),
                      _loss(a["train_loss"]), _loss(a["eval_loss"]), _loss(a["best_eval_loss"]),
                      f"{a['duration_s']:.1f}s" if a["duration_s"] is not None else "")
    Console().print(table)


@adapters.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the adapter as JSON.")
@click.pass_obj
def adapters_show(ctx, name, as_json):
    """Everything recorded about one adapter, with its folder."""
    from api.adapters import adapter_dict, get_adapter

    with ctx.session() as session:
        data = adapter_dict(_run(get_adapter, session, name), ctx.settings.home)
    if as_json:
        _echo_json(data)
        return
    data["size"] = _human_size(data["size_bytes"])
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        click.echo(f"{key:>17}: {'' if value is None else value}")


@adapters.command("export")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@click.pass_obj
def adapters_export(ctx, name, directory):
    """Copy the adapter's folder (PEFT adapter, or whole model for --method full) to DIRECTORY (new or empty)."""
    from api.adapters import export_adapter

    with ctx.session() as session:
        target = _run(export_adapter, session, ctx.settings.home, name, directory)
    click.echo(f"adapter {name} exported to {target}")


@adapters.command("merge")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Load the base in this dtype before merging [default: float32]; required for a qlora adapter "
                   "(its 4-bit base cannot take merged weights: use bfloat16).")
@click.pass_obj
def adapters_merge(ctx, name, directory, dtype):
    """Write base + LoRA adapter merged into one full model at DIRECTORY (new or empty), with the base tokenizer,
    loadable with plain AutoModelFor...from_pretrained. Not for full or prompt-tuning adapters."""
    from api.adapters import merge_adapter

    with ctx.session() as session:
        target = _run(merge_adapter, session, ctx.settings.home, name, directory, dtype)
    click.echo(f"adapter {name} merged into a full model at {target}")


@adapters.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def adapters_delete(ctx, name, yes):
    """Remove the adapter's files and its row together (refused while a queued or running job uses it)."""
    from api.adapters import delete_adapter, get_adapter

    with ctx.session() as session:
        adapter = _run(get_adapter, session, name)
        if not yes:
            click.confirm(f"delete adapter {name} and its folder {ctx.settings.home / adapter.path}?", abort=True)
        _run(delete_adapter, session, ctx.settings.home, name)
    click.echo(f"adapter {name} deleted")
