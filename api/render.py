"""Presentation for people and scripts: tables fitted to the terminal, CSV and JSON of any records, the report
(table, CSV, JSON, Markdown), two runs compared in words, and plots (box plots, loss curves, a sweep's rungs).

Shared by the CLI and the demo; takes the dicts that `models.report` and `api/` return, never touches the database.

Every table follows one rule (`output_width`, `fit_columns`, `render_table`): it is fitted to COLUMNS, else to the
terminal, else to 120 columns when the output is piped. Names and ids (job id, adapter, sweep, base model) are never
cut or folded, so `grep` finds them whole: a column that holds them keeps its longest word on one line. When a table
is too wide, the less important columns are left out first and a last line says which; `wide=True` shows every
column at the width it needs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass

from models.metrics import METRIC_FAMILIES

PIPED_WIDTH = 120  # into a file, a pager or grep: room for every default view, still readable
FOLD_AT = 12  # in a column that holds no names, a longer word (a path in an error) may be folded over lines
COMFORTABLE = 30  # free text wider than this wraps before a column is left out for it
# what the default report view shows of a family asked for as a whole; the rest with --wide, csv or json
HEADLINE_METRICS = {"rouge": ("rouge1", "rouge2", "rougeL"), "classification": ("accuracy", "f1", "f1_macro"),
                    "bertscore": ("bertscore_f1",)}


def output_width(stream=None) -> int:
    """The width tables are fitted to: COLUMNS when it is a positive number (as rich, less and most tools read it);
    else the terminal's width when `stream` (default: stdout) is a terminal; else PIPED_WIDTH."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    stream = stream or sys.stdout
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # a captured stream has no file number
        pass
    return PIPED_WIDTH


@dataclass(frozen=True)
class Col:
    """One table column. `name`: its cells are names or ids, never folded inside a word. `whole`: its cells are
    never wrapped at all (a mean with its interval). `drop`: when the table does not fit, columns with a higher
    `drop` are left out first (0: never left out)."""

    header: str
    name: bool = False
    drop: int = 0
    justify: str = "left"
    whole: bool = False


def _cell_width(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.splitlines()), default=0)


def _longest_word(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(word) for word in text.split()), default=0)


def _natural_widths(cols: list[Col], rows: list[list[str]]) -> list[int]:
    return [max(_cell_width(col.header), *(_cell_width(row[i]) for row in rows), 1) for i, col in enumerate(cols)]


def _table_width(widths: list[int]) -> int:
    return sum(widths) + 3 * len(widths) + 1  # rich's default box: a border and one space each side of each cell


def fit_columns(cols: list[Col], rows: list[list[str]], width: int) -> tuple[list[int], list[int], int]:
    """The columns shown within `width` (indexes into `cols`), the width of each, and the table's width.

    Each column has a least width (its longest word, for names and `whole` columns its longest word or cell, else
    at most FOLD_AT), a comfortable one (its natural width, or COMFORTABLE if that is less and above the least: long
    free text wraps) and its natural width. The columns that may be left out are taken, lowest `drop` first, while
    they fit at their comfortable widths (or, when even the others do not, at their least ones); the room left goes
    towards the natural widths. Should even the columns never left out not fit at their least widths, the table
    takes the width they need: the terminal wraps its lines, but no name is ever cut or folded."""
    natural = _natural_widths(cols, rows)
    least = []
    for i, col in enumerate(cols):
        body = max(((_cell_width if col.whole else _longest_word)(row[i]) for row in rows), default=0)
        least.append(max(_longest_word(col.header), body if col.name or col.whole else min(body, FOLD_AT), 1))
    comfortable = [min(n, max(m, COMFORTABLE)) for n, m in zip(natural, least)]

    def shown_within(sizes: list[int]) -> list[int]:
        shown = [i for i, col in enumerate(cols) if not col.drop]
        for i in sorted((i for i, col in enumerate(cols) if col.drop), key=lambda i: (cols[i].drop, i)):
            if _table_width([sizes[j] for j in shown] + [sizes[i]]) <= width:
                shown.append(i)
        return sorted(shown)

    shown, start = shown_within(comfortable), comfortable
    if _table_width([comfortable[i] for i in shown]) > width:
        shown, start = shown_within(least), least
    widths = {i: start[i] for i in shown}
    spare = width - _table_width(list(widths.values()))
    while spare > 0:
        short = [i for i in shown if widths[i] < natural[i]]
        if not short:
            break
        share = max(1, spare // len(short))
        for i in short:
            grant = min(share, natural[i] - widths[i], spare)
            widths[i] += grant
            spare -= grant
    sizes = [widths[i] for i in shown]
    return shown, sizes, max(width, _table_width(sizes))


def render_table(cols: list[Col], rows: list[list[str]], *, title: str | None = None, wide: bool = False,
                 width: int | None = None, notes: list[str] = ()) -> str:
    """A rich table as text, fitted to `width` (default: `output_width()`) or, `wide`, at its natural width with
    every column. `notes` are lines printed above it (wrapped to the width)."""
    from rich.console import Console
    from rich.table import Column, Table
    from rich.text import Text

    width = width or output_width()
    rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    if wide:
        shown, widths, console_width = list(range(len(cols))), None, _table_width(_natural_widths(cols, rows))
    else:
        shown, widths, console_width = fit_columns(cols, rows, width)
    columns = [Column(Text(cols[i].header), justify=cols[i].justify, no_wrap=wide, overflow="fold",
                      width=widths[n] if widths else None) for n, i in enumerate(shown)]
    table = Table(*columns, title=Text(title) if title else None)
    for row in rows:
        table.add_row(*[Text(row[i]) for i in shown])  # Text: a name with [brackets] is not markup
    console = Console(file=io.StringIO(), width=console_width, force_terminal=False, color_system=None,
                      highlight=False)
    console.print(table)
    out = "".join(_wrapped(note, width) for note in notes) + console.file.getvalue()
    left_out = [cols[i].header for i in range(len(cols)) if i not in shown]
    if left_out:
        out += _wrapped(f"({', '.join(left_out)} left out to fit {width} columns; --wide shows every column)", width)
    return out


def _wrapped(text: str, width: int) -> str:
    return textwrap.fill(text, width=max(width, 20), break_long_words=False, break_on_hyphens=False) + "\n"


def render_records(records: list[dict], fmt: str) -> str:
    """Records as JSON (as `--json` prints them) or CSV (nested values as JSON, one column per key)."""
    if fmt == "json":
        return json.dumps(records, indent=2, default=str) + "\n"
    fields = list(dict.fromkeys(key for record in records for key in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
                         for key, value in record.items()})
    return out.getvalue()


# ------------------------------------------------------------------------------------------------------- report
def headline_metrics(metrics: list[str]) -> list[str]:
    """What the default report view shows: of a family asked for as a whole ('rouge'), its headline metrics."""
    hidden: set[str] = set()
    for family, names in METRIC_FAMILIES.items():
        if set(names) <= set(metrics):
            hidden |= set(names) - set(HEADLINE_METRICS.get(family, names))
    return [m for m in metrics if m not in hidden]


SEARCH_COLUMNS = ("last_rung", "steps", "decision", "rung_metric", "rung_value")  # an ASHA or TPE sweep's report


def _searched(rows: list[dict]) -> bool:
    return any("decision" in r for r in rows)


def _columns(rows: list[dict], metrics: list[str]) -> list[str]:
    params = list(rows[0]["hyperparameters"]) if rows else []
    cols = ["model", "variant", *params]
    for m in metrics:
        cols += [m, f"{m}_ci_low", f"{m}_ci_high", f"delta_{m}"]
    cols += list(SEARCH_COLUMNS) if _searched(rows) else []
    return cols + ["examples", "examples_scored", "example_set", "train_time_s", "queue_wait_s", "best"]


def _flat(row: dict) -> dict:
    return {**{k: v for k, v in row.items() if k != "hyperparameters"}, **row.get("hyperparameters", {})}


def _fmt(value, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return str(value)


def _has_interval(row: dict, metric: str) -> bool:
    low = row.get(f"{metric}_ci_low")
    return low is not None and not math.isnan(low) and row.get(metric) is not None


def _examples_cell(row: dict) -> str:
    if row.get("examples") is None:  # a sweep point that was not evaluated
        return ""
    scored = row.get("examples_scored", row["examples"])
    return f"{row['examples']} of {scored}" if scored != row["examples"] else str(row["examples"])


def _cells(row: dict, metrics: list[str]) -> list[str]:
    """Every column, in detail (--wide and Markdown)."""
    cells = [row["model"], row["variant"] + (" ★" if row.get("best") else "")]
    cells += [_fmt(v, 4) if isinstance(v, float) else ("" if v is None else str(v))
              for v in row["hyperparameters"].values()]
    for m in metrics:
        value = _fmt(row.get(m))
        if _has_interval(row, m):
            value += f" [{row[f'{m}_ci_low']:.3f}–{row[f'{m}_ci_high']:.3f}]"
        cells += [value, _fmt(row.get(f"delta_{m}"), sign=True)]
    cells += _search_cells(row) if "decision" in row else []
    return cells + [_examples_cell(row), _fmt(row.get("train_time_s"), 1), _fmt(row.get("queue_wait_s"), 2)]


def _search_metric(rows: list[dict]) -> str:
    return next((r["rung_metric"] for r in rows if r.get("rung_metric")), "metric")


def _search_headers(rows: list[dict]) -> list[str]:
    return ["decision", "last rung", "steps", f"{_search_metric(rows)} at rung"]


def _search_cells(row: dict) -> list[str]:
    """decision, last rung, steps and the rung metric of a searched sweep's row (empty on the base row)."""
    value = row.get("rung_value")
    return [row.get("decision") or "", _fmt(row.get("last_rung")), _fmt(row.get("steps")),
            "" if value is None else f"{value:.4g}"]


def _headers(rows: list[dict], metrics: list[str]) -> list[str]:
    params = list(rows[0]["hyperparameters"]) if rows else []
    heads = ["model", "variant", *params]
    for m in metrics:
        heads += [f"{m} [95% CI]", f"Δ {m}"]
    heads += _search_headers(rows) if _searched(rows) else []
    return heads + ["examples", "train s", "queue wait s"]


def param_text(value) -> str:
    """A hyperparameter's value as the report shows it (floats in %g)."""
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def mean_with_interval(row: dict, metric: str) -> str:
    """A report row's mean of `metric` with its 95% interval: `0.879 [0.86, 0.90]` (empty without a mean)."""
    value = "" if row.get(metric) is None else f"{row[metric]:.3f}"
    if value and _has_interval(row, metric):
        value += f" [{row[f'{metric}_ci_low']:.2f}, {row[f'{metric}_ci_high']:.2f}]"
    return value


def human_size(size: int | None) -> str:
    """Bytes for people: `812 B`, `1.4 MB`."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def _default_view(rows: list[dict], metrics: list[str]) -> tuple[list[Col], list[list[str]], str]:
    """The headline columns: model, variant, the varied hyperparameters, each headline metric as mean [95% CI], Δ vs
    base of the first, examples. The model and the example count are said once in the title instead of a column
    when every row shares them."""
    shown = headline_metrics(metrics)
    params = list(rows[0]["hyperparameters"]) if rows else []
    models = {r["model"] for r in rows}
    # on shared examples (see example_set_note) these are all the same; a sweep point not evaluated has none
    examples = {r["examples"] for r in rows if r["examples"] is not None}
    searched = _searched(rows)
    cols = ([] if len(models) == 1 else [Col("model", name=True)]) + [Col("variant", name=True)]
    cols += [Col(p, drop=2, justify="right") for p in params]
    for k, m in enumerate(shown):
        cols.append(Col(m, drop=10 + k if k else 0, whole=True))
        if k == 0:
            cols.append(Col(f"Δ {m}", drop=4, justify="right"))
    if searched:  # how far each point of an ASHA or TPE search got
        cols += [Col(h, drop=d, justify=j) for h, d, j in zip(_search_headers(rows), (1, 5, 6, 7),
                                                               ("left", "right", "right", "right"))]
    cols += [] if len(examples) == 1 else [Col("examples", drop=3, justify="right")]
    cells = []
    for row in rows:
        line = ([] if len(models) == 1 else [row["model"]]) + [row["variant"] + (" ★" if row.get("best") else "")]
        line += [param_text(row["hyperparameters"].get(p)) for p in params]
        for k, m in enumerate(shown):
            line.append(mean_with_interval(row, m))
            if k == 0:
                line.append(_fmt(row.get(f"delta_{m}"), 3, sign=True))
        line += _search_cells(row) if searched else []
        cells.append(line + ([] if len(examples) == 1 else [_fmt(row["examples"])]))
    where = [rows[0]["split"] if rows else ""]
    if len(models) == 1:
        where.append(next(iter(models)))
    if len(examples) == 1:
        shared = rows[0].get("example_set") == "shared"
        where.append(f"{next(iter(examples))} {'shared ' if shared else ''}examples")
    title = f"{', '.join(shown)} on {' · '.join(where)}: mean [95% CI], Δ vs base, ★ best"
    return cols, cells, title


def search_note(rows: list[dict]) -> str | None:
    """A line under the report of a searched sweep whose report holds points that were not evaluated."""
    skipped = [r for r in rows if r.get("examples") is None and "decision" in r]
    if not skipped:
        return None
    return (f"{len(skipped)} point(s) without a mean were not evaluated (pruned, or not finished): their rows show "
            "where the search left them (eval.include_pruned: N in the sweep file evaluates the N best pruned ones)")


def example_set_note(rows: list[dict]) -> str | None:
    """One line when the rows were scored on different example sets, saying what the numbers are over."""
    rows = [r for r in rows if r.get("examples") is not None]  # a sweep point that was not evaluated has no set
    state = rows[0].get("example_set", "same") if rows else "same"
    if state == "same":
        return None
    counts = sorted({r.get("examples_scored", r["examples"]) for r in rows}, reverse=True)
    sets = f"different example sets ({' and '.join(map(str, counts))} examples)" if len(counts) > 1 else \
        f"different example sets ({counts[0]} examples each)"
    if state == "shared":
        kept = sorted({m for r in rows for m in r.get("kept_own_examples", [])})
        return (f"note: these runs were scored on {sets}; every mean and interval is over the {rows[0]['examples']} "
                "examples they all share" + (f" ({', '.join(kept)}: over each run's own examples, having no "
                                            "per-example scores)" if kept else "") + ".")
    return (f"note: these runs were scored on {sets} that cannot be matched example by example; each row is over its "
            "own examples, so compare them with care (--sweep reports one sweep's runs, scored together).")


def render_report(rows: list[dict], metrics: list[str], fmt: str, *, wide: bool = False,
                  width: int | None = None) -> str:
    """The report as a table (the headline columns fitted to the width, or every column with `wide`), CSV, JSON
    (every column) or Markdown (every column). The note on mixed example sets heads the table and the Markdown;
    for CSV and JSON the caller prints `example_set_note` apart (on stderr)."""
    if fmt == "json":
        return json.dumps([{c: _flat(r).get(c) for c in _columns(rows, metrics)} for r in rows], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_columns(rows, metrics), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(_flat(r) for r in rows)
        return out.getvalue()
    note = example_set_note(rows)
    if fmt == "markdown":
        heads = _headers(rows, metrics)
        lines = [note, ""] if note else []
        lines += ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(_cells(r, metrics)) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    if wide:
        cols = [Col(h, name=h in ("model", "variant")) for h in _headers(rows, metrics)]
        cells = [_cells(r, metrics) for r in rows]
        title = f"{', '.join(metrics)} on {rows[0]['split'] if rows else ''}: mean [95% CI], Δ vs base, ★ best"
    else:
        cols, cells, title = _default_view(rows, metrics)
    out = render_table(cols, cells, title=title, wide=wide, width=width, notes=[note] if note else [])
    searched = search_note(rows)
    return out + (_wrapped(searched, width or output_width()) if searched else "")


def comparison_sentence(summary: dict) -> str:
    """Which of two runs is better, in words: `A is better on 12 of 50 examples, B on 30 (rouge1 mean 0.410 vs
    0.440: B is better by 0.030)`."""
    a, b, metric, n = summary["a"], summary["b"], summary["metric"], summary["shared_examples"]
    if not n:
        return f"{a} and {b} share no scored examples on split {summary['split']!r}"
    ties = f", {summary['ties']} tied" if summary["ties"] else ""
    verdict = (f"{summary['better']} is better by {summary['by']:.3f}" if summary["better"] else "neither is better")
    return (f"{a} is better on {summary['a_better']} of {n} examples, {b} on {summary['b_better']}{ties} "
            f"({metric} mean {summary['mean_a']:.3f} vs {summary['mean_b']:.3f}: {verdict})")


def render_comparison(summary: dict, pairs: list[dict], fmt: str) -> str:
    """Two runs compared: JSON or CSV of the examples where they differ most (`difference` is A − B, `better`
    names the winner), or for people the verdict in words and blocks of source, reference and both predictions."""
    if fmt == "json":
        return json.dumps(pairs, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(pairs[0]) if pairs else ["example_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(pairs)
        return out.getvalue()
    a, b, metric = summary["a"], summary["b"], summary["metric"]
    if not pairs:
        return comparison_sentence(summary) + "\n"
    blocks = [comparison_sentence(summary) + "\n"
              f"Δ below is {a} − {b}: positive where {a} is better, negative where {b} is better. "
              + ("The example where they differ most:" if len(pairs) == 1 else
                 f"The {len(pairs)} examples where they differ most:")]
    for pair in pairs:
        winner = "tie" if pair["better"] == "tie" else f"{pair['better']} better"
        blocks.append("\n".join([
            f"── example {pair['example_id']}: {metric} {a}={pair[f'{metric}_{a}']:.3f} "
            f"{b}={pair[f'{metric}_{b}']:.3f}, Δ {pair['difference']:+.3f} ({winner})",
            pair["source"], f"reference: {pair['reference']}", f"{a}: {pair[f'prediction_{a}']}",
            f"{b}: {pair[f'prediction_{b}']}"]))
    return "\n\n".join(blocks) + "\n"


def render_agreement(pairs: list[dict], fmt: str) -> str:
    """Per pair of metrics, Spearman's rank correlation of their per-example scores: JSON, CSV or a table."""
    if fmt in ("json", "csv"):
        return render_records(pairs, fmt)
    cols = [Col("metric", name=True), Col("vs", name=True), Col("spearman", justify="right"),
            Col("examples", justify="right"), Col("runs", justify="right", drop=1)]
    cells = [[p["metric_a"], p["metric_b"], _fmt(p["spearman"], 3), str(p["examples"]), str(p["runs"])]
             for p in pairs]
    if fmt == "markdown":
        heads = [c.header for c in cols]
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
                         + ["| " + " | ".join(line) + " |" for line in cells]) + "\n"
    return render_table(cols, cells, title="rank agreement of per-example scores (Spearman; empty: too few "
                        "examples or a constant metric)")


# -------------------------------------------------------------------------------------------------------- plots
def box_plot(scores: dict[str, list[float]], metric: str, path, title: str = "") -> int:
    """One box of per-example scores per run (base and adapters); returns the number of boxes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(scores)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 4.5))
    drawn = ax.boxplot([scores[label] for label in labels], tick_labels=labels, showmeans=True)
    ax.set_ylabel(f"{metric} per example")
    if all(0 <= v <= 1 for values in scores.values() for v in values):  # a 0-1 metric: its whole scale
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"{metric} per example, {len(labels)} runs")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _save(fig, path)
    return len(drawn["boxes"])


def loss_plot(curves: dict[str, list[tuple]], path, title: str = "") -> None:
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


RUNG_END_MARKERS = {"pruned": "x", "complete": "o"}  # else (promoted and training on, failed, ...): a dot


def rungs_plot(figure: dict, path) -> int:
    """The successive-halving picture of a sweep (`api.report.rungs_figure`): x the training step, y the metric at
    each rung, one line per point through its rung values; a pruned point ends early in an ×, a completed one at
    max_steps in a dot; rung steps as dotted vertical lines. Returns the number of points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points = [p for p in figure["points"] if p["rungs"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for step in figure["rung_steps"]:
        ax.axvline(step, color="0.6", linestyle=":", linewidth=1)
    if figure.get("max_steps"):
        ax.axvline(figure["max_steps"], color="0.35", linestyle=":", linewidth=1)
    labelled = len(points) <= 16
    for index, point in enumerate(points):
        color = f"C{index % 10}"
        steps = [r["step"] for r in point["rungs"] if r["value"] is not None]
        values = [r["value"] for r in point["rungs"] if r["value"] is not None]
        if not steps:
            continue
        ax.plot(steps, values, color=color, marker=".", linewidth=1.4, alpha=0.9,
                label=f"{point['variant']} ({point['decision'] or point['status']})" if labelled else None)
        ax.plot(steps[-1], values[-1], color=color, linestyle="none", markersize=9, markeredgewidth=2,
                marker=RUNG_END_MARKERS.get(point["decision"], "."))
    ax.set_xlim(0, (figure.get("max_steps") or max(r["step"] for p in points for r in p["rungs"])) * 1.04)
    better = "lower" if figure["direction"] == "min" else "higher"
    ax.set_xlabel("training step (dotted: rungs)")
    ax.set_ylabel(f"{figure['metric']} at the rung ({better} is better)")
    eta = f", η = {figure['reduction_factor']}" if figure["strategy"] == "asha" else ""
    ax.set_title(f"sweep {figure['sweep']}: {figure['metric']} per rung ({figure['strategy'].upper()}{eta}, "
                 f"{len(points)} points)")
    keys = [Line2D([], [], color="0.3", marker="x", linestyle="none", markeredgewidth=2, label="pruned"),
            Line2D([], [], color="0.3", marker="o", linestyle="none", label="reached max_steps")]
    handles, _labels = ax.get_legend_handles_labels()
    ax.legend(handles=handles + keys, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save(fig, path)
    return len(points)


def _save(fig, path) -> None:
    """Write the figure to `path` whole or not at all: into a hidden file beside it, then renamed over it; the figure
    is closed either way. The format is the suffix's (none: PNG). `path` may also be a binary file object (the results
    page's PNGs): the figure is written into it as PNG."""
    import matplotlib.pyplot as plt

    if not isinstance(path, (str, os.PathLike)):
        try:
            fig.savefig(path, dpi=110, format="png")
        finally:
            plt.close(fig)
        return
    folder, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(folder, f".{name}.{os.getpid()}.partial")
    try:
        fig.savefig(partial, dpi=110, format=os.path.splitext(name)[1].lstrip(".").lower() or "png")
        os.replace(partial, path)
    finally:
        plt.close(fig)
        if os.path.exists(partial):
            os.unlink(partial)
