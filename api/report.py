"""The report as every door asks for it: metric names checked against the database, the comparison rows, the
examples where two runs differ most, and the plots (box plots, loss curves, an ASHA or TPE sweep's rungs); rendering
lives in api/render.py."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from sqlalchemy.orm import Session

from api.render import box_plot, loss_plot, rungs_plot
from models.errors import InputError, NotFound
from models.metrics import EVALUATE_PREFIX, evaluate_module, expand_metrics, is_evaluate
from models.report import (agreement, compare_variants, comparison, known_metric_names, loss_curves,
                           per_example_scores, search_points, sweep_by_name, sweep_jobs)


# what matplotlib's savefig writes, by file suffix (no suffix: PNG)
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "tif", "tiff", "webp", "eps", "ps", "pgf", "raw", "rgba")


def check_plot_path(path: str, option: str = "--plot") -> Path:
    """The plot destination as an absolute path, if a file can be written there: a suffix matplotlib knows, in a
    folder that exists, not a folder itself, and writable. Checked before anything is queried or drawn; nothing is
    left behind."""
    try:
        target = Path(path).expanduser().absolute()
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"{option} {str(path)[:60]!r}: {exc}") from None
    suffix = target.suffix.lower().lstrip(".")
    if suffix and suffix not in PLOT_FORMATS:
        raise InputError(f"{option} {target}: cannot write a .{suffix} image (use one of "
                         f"{', '.join('.' + f for f in PLOT_FORMATS[:4])} ...)")
    if target.is_dir():
        raise InputError(f"{option} {target} is a folder; give a file name such as {target / 'plot.png'}")
    if not target.parent.is_dir():
        what = "is not a folder" if target.parent.exists() else "does not exist"
        raise InputError(f"{option} {target}: the folder {target.parent} {what}")
    existed = target.exists()
    try:  # the one sure test of "can be written here" (os.access says yes to root on a read-only mount)
        with open(target, "ab"):
            pass
    except OSError as exc:
        raise InputError(f"{option} {target}: cannot write there: {exc.strerror or exc}") from None
    if not existed:
        target.unlink(missing_ok=True)
    return target


def _saved(path: str, option: str, draw):
    """`draw()` (which writes the image to `path`); a write the system refuses is one InputError line."""
    try:
        return draw()
    except OSError as exc:
        raise InputError(f"{option} {path}: could not write the image: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ReportQuery:
    metrics: list[str] = field(default_factory=lambda: ["rouge"])  # families ("rouge") or stored metric names
    split: str = "test"
    sweep: Optional[str] = None
    sort: Optional[str] = None
    top: Optional[int] = None

    @property
    def metric_names(self) -> list[str]:
        return expand_metrics(list(self.metrics))


def check_metrics(session: Session, query: ReportQuery) -> list[str]:
    """The query's metric names, each one stored in the database (once anything is)."""
    if query.top is not None and query.top <= 0:
        raise InputError("--top must be a positive number")
    metrics = query.metric_names
    known = known_metric_names(session)
    unknown = [m for m in metrics if known and m not in known]
    if unknown:
        raise NotFound(f"no metric named {unknown[0]!r} in the database (known: {', '.join(sorted(known))})")
    return metrics


def resolve_metrics(session: Session, query: ReportQuery) -> ReportQuery:
    """The query with each `evaluate:NAME_OR_PATH` replaced by the stored metric names that metric wrote."""
    if not any(is_evaluate(m) for m in query.metrics):
        return query
    known = sorted(known_metric_names(session))
    names: list[str] = []
    for metric in query.metrics:
        if not is_evaluate(metric):
            names.append(metric)
            continue
        module = evaluate_module(metric[len(EVALUATE_PREFIX):])
        found = [n for n in known if n.removeprefix("evaluate_") == module
                 or n.removeprefix("evaluate_").startswith(module + "_")]
        if not found:
            raise NotFound(f"no metric rows of {metric} in the database (known: {', '.join(known)})")
        names += found
    return replace(query, metrics=names)


def metric_agreement(session: Session, query: ReportQuery) -> list[dict]:
    """Per pair of the query's metrics, Spearman's rank correlation of their per-example scores over the examples
    both scored (every run of the report pooled); InputError for fewer than two metrics."""
    metrics = check_metrics(session, query)
    if len(metrics) < 2:
        raise InputError("--agreement compares metrics: name at least two (e.g. --metric rouge --metric judge)")
    pairs = agreement(session, metrics, query.split, sweep=query.sweep)
    if not any(p["examples"] for p in pairs):
        raise NotFound(f"no examples scored on two of these metrics on split {query.split!r}")
    return pairs


def report_rows(session: Session, query: ReportQuery) -> list[dict]:
    """One row per run (base and adapters), as models.report.comparison returns them; NotFound when none is
    scored yet."""
    metrics = check_metrics(session, query)
    rows = comparison(session, metrics, query.split, sweep=query.sweep, sort=query.sort, top=query.top)
    if not rows:
        raise NotFound(f"no scored results on split {query.split!r}"
                       f"{f' in sweep {query.sweep!r}' if query.sweep else ''} yet; run generate and score jobs first")
    return rows


def compare_runs(session: Session, query: ReportQuery, a: str, b: str, limit: int | None,
                 score_job_id: int | None = None) -> tuple[dict, list[dict]]:
    """Runs `a` and `b` on the query's first metric, over the examples both were scored on: a summary (how many
    examples each wins, both means, which is better and by how much) and the `limit` examples where they differ
    most (None: all of them). Each run's newest scores, or those of score job `score_job_id`."""
    metric = check_metrics(session, query)[0]
    pairs = compare_variants(session, a, b, metric, query.split, score_job_id=score_job_id)
    wins = {name: sum(p["better"] == name for p in pairs) for name in (a, b, "tie")}
    mean_a, mean_b = (sum(p[f"{metric}_{v}"] for p in pairs) / len(pairs) if pairs else None for v in (a, b))
    summary = {"a": a, "b": b, "metric": metric, "split": query.split, "shared_examples": len(pairs),
               "a_better": wins[a], "b_better": wins[b], "ties": wins["tie"], "mean_a": mean_a, "mean_b": mean_b,
               "better": None if not pairs or mean_a == mean_b else a if mean_a > mean_b else b,
               "by": abs(mean_a - mean_b) if pairs else None}
    return summary, pairs[:limit]


def draw_box_plot(session: Session, query: ReportQuery, rows: list[dict], target) -> int:
    """Box plots of per-example scores, one box per row, into `target` (a file path, or a binary file object that
    gets a PNG); returns the number of boxes."""
    metric = query.sort or query.metric_names[0]
    scores = per_example_scores(session, rows, metric, query.split, query.sweep)
    title = f"{metric} per example" + (f", sweep {query.sweep}" if query.sweep else "")
    return box_plot(scores, metric, target, title=title)


def draw_loss_plot(session: Session, query: ReportQuery, rows: list[dict], target) -> None:
    """The rows' training and eval loss curves into `target` (as for draw_box_plot); NotFound when none has any."""
    curves = loss_curves(session, [r["variant"] for r in rows if r["variant"] != "base"])
    if not any(curves.values()):
        raise NotFound("no loss curves recorded for these runs")
    loss_plot(curves, target, title="loss curves" + (f", sweep {query.sweep}" if query.sweep else ""))


def write_box_plot(session: Session, query: ReportQuery, rows: list[dict], path: str) -> int:
    """Box plots of per-example scores, one box per row, written to the file `path`; returns the number of boxes."""
    target = str(check_plot_path(path, "--plot"))
    return _saved(target, "--plot", lambda: draw_box_plot(session, query, rows, target))


def write_loss_plot(session: Session, query: ReportQuery, rows: list[dict], path: str) -> None:
    target = str(check_plot_path(path, "--plot-loss"))
    _saved(target, "--plot-loss", lambda: draw_loss_plot(session, query, rows, target))


def rungs_figure(session: Session, name: str) -> dict:
    """What the rungs plot of sweep `name` draws: per point its (step, value) at each rung and how it ended, the
    rung steps, max_steps, metric, direction and η. InputError when the sweep has no rungs (a grid or random sweep,
    whose points all train to their end)."""
    sweep = sweep_by_name(session, name)
    points = search_points(session, sweep)
    if not any(point["rungs"] for point in points):
        kind = (sweep.spec.get("strategy") or {}).get("kind") or "grid"
        raise InputError(f"sweep {name!r} has no rungs to plot: "
                         + ("no point has reached its first rung yet" if points else
                            f"a {kind} sweep trains every point to its end (rungs come with strategy: asha or tpe)"))
    searches = [job.spec["search"] for job in sweep_jobs(session, sweep) if job.spec.get("search")]
    rung_steps = sorted({step for search in searches for step in search.get("rungs", [])[:-1]})
    ends = [search["rungs"][-1] for search in searches if search.get("rungs")]
    first = searches[0]
    return {"sweep": name, "strategy": first["strategy"], "metric": first["metric"], "direction": first["direction"],
            "reduction_factor": first.get("reduction_factor"), "rung_steps": rung_steps,
            "max_steps": max(ends) if ends else None, "points": points}


def draw_rungs_plot(session: Session, name: str, target) -> int:
    """The rungs plot of sweep `name` into `target` (a file path, or a binary file object that gets a PNG); returns
    the number of points drawn."""
    return rungs_plot(rungs_figure(session, name), target)


def write_rungs_plot(session: Session, name: str | None, path: str) -> int:
    """`report --sweep NAME --plot-rungs FILE`: the sweep's successive-halving picture (PNG, SVG, ... by suffix)."""
    if not name:
        raise InputError("--plot-rungs draws one sweep's search: give --sweep NAME too")
    target = str(check_plot_path(path, "--plot-rungs"))
    figure = rungs_figure(session, name)
    return _saved(target, "--plot-rungs", lambda: rungs_plot(figure, target))


def sweep_job_ids(session: Session, name: str) -> list[int]:
    return [job.id for job in sweep_jobs(session, sweep_by_name(session, name))]
