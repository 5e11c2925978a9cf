"""Presentation of report rows: rich table, CSV, JSON, Markdown, and PNG plots (box plots, loss curves).

Shared by the CLI and the HTTP API; takes the dicts that `models.report` queries return, never touches the database.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os


def _columns(rows: list[dict], metrics: list[str]) -> list[str]:
    params = list(rows[0]["hyperparameters"]) if rows else []
    cols = ["model", "variant", *params]
    for m in metrics:
        cols += [m, f"{m}_ci_low", f"{m}_ci_high", f"delta_{m}"]
    return cols + ["examples", "train_time_s", "queue_wait_s", "best"]


def _flat(row: dict) -> dict:
    return {**{k: v for k, v in row.items() if k != "hyperparameters"}, **row.get("hyperparameters", {})}


def _fmt(value, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return str(value)


def _cells(row: dict, metrics: list[str]) -> list[str]:
    cells = [row["model"], row["variant"] + (" ★" if row.get("best") else "")]
    cells += [_fmt(v, 4) if isinstance(v, float) else ("" if v is None else str(v))
              for v in row["hyperparameters"].values()]
    for m in metrics:
        value = _fmt(row.get(m))
        if row.get(f"{m}_ci_low") is not None and value:
            value += f" [{row[f'{m}_ci_low']:.3f}–{row[f'{m}_ci_high']:.3f}]"
        cells += [value, _fmt(row.get(f"delta_{m}"), sign=True)]
    return cells + [str(row["examples"]), _fmt(row.get("train_time_s"), 1), _fmt(row.get("queue_wait_s"), 2)]


def _headers(rows: list[dict], metrics: list[str]) -> list[str]:
    params = list(rows[0]["hyperparameters"]) if rows else []
    heads = ["model", "variant", *params]
    for m in metrics:
        heads += [f"{m} [95% CI]", f"Δ {m}"]
    return heads + ["examples", "train s", "queue wait s"]


def render_report(rows: list[dict], metrics: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{c: _flat(r).get(c) for c in _columns(rows, metrics)} for r in rows], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_columns(rows, metrics), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(_flat(r) for r in rows)
        return out.getvalue()
    if fmt == "markdown":
        heads = _headers(rows, metrics)
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(_cells(r, metrics)) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(*[Column(h, no_wrap=True) for h in _headers(rows, metrics)],
                  title=f"{', '.join(metrics)} on {rows[0]['split'] if rows else ''} (★ best)")
    for row in rows:
        table.add_row(*_cells(row, metrics))
    console = Console(file=io.StringIO(), width=1000, force_terminal=False)  # tables keep their natural width
    console.print(table)
    return console.file.getvalue()


def box_plot(scores: dict[str, list[float]], metric: str, path: str, title: str = "") -> int:
    """One box of per-example scores per run (base and adapters); returns the number of boxes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(scores)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 4.5))
    drawn = ax.boxplot([scores[label] for label in labels], tick_labels=labels, showmeans=True)
    ax.set_ylabel(f"{metric} per example")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"{metric} per example, {len(labels)} runs")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _save(fig, path)
    return len(drawn["boxes"])


def loss_plot(curves: dict[str, list[tuple]], path: str, title: str = "") -> None:
    """Training (solid) and eval (dashed) loss per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, points) in enumerate(curves.items()):
        color = f"C{index % 10}"
        train = [(s, t) for s, t, _ in points if t is not None]
        evals = [(s, e) for s, _, e in points if e is not None]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title or "loss curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    """Write the figure to `path` whole or not at all: into a hidden file beside it, then renamed over it; the figure
    is closed either way. The format is the suffix's (none: PNG)."""
    import matplotlib.pyplot as plt

    folder, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(folder, f".{name}.{os.getpid()}.partial")
    try:
        fig.savefig(partial, dpi=110, format=os.path.splitext(name)[1].lstrip(".").lower() or "png")
        os.replace(partial, path)
    finally:
        plt.close(fig)
        if os.path.exists(partial):
            os.unlink(partial)


def render_comparison(pairs: list[dict], variants, metric: str, fmt: str) -> str:
    """The examples where two runs differ most: JSON, CSV, or blocks of source, reference and both predictions."""
    if fmt == "json":
        return json.dumps(pairs, indent=2) + "\n"
    if fmt == "csv":
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
