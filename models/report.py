"""Report queries: the comparison table read straight from the result rows (so a SQL client sees the same numbers).

For each (base model, variant) the newest score job's value of each metric on the split is used (`metrics.value`,
the mean over `example_scores`); the 95% interval is a percentile bootstrap over that job's `example_scores`; each
row's delta is taken against the base row of the same base model.
"""

from __future__ import annotations

import random

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.errors import InputError, NotFound
from models.jobs import Job, JobKind
from models.results import Adapter, ExampleScore, Generation, LossPoint, Metric
from models.sweeps import Sweep

BOOTSTRAP_SAMPLES = 1000


def known_metric_names(session: Session) -> set[str]:
    return set(session.scalars(select(Metric.name).distinct()))


def sweep_by_name(session: Session, name: str) -> Sweep:
    sweep = session.scalar(select(Sweep).where(Sweep.name == name))
    if sweep is None:
        raise NotFound(f"sweep {name!r} does not exist")
    return sweep


def bootstrap_interval(values: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (deterministic for a given seed)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def example_values(session: Session, score_job_id: int, variant: str, metric: str) -> list[float]:
    return list(session.scalars(
        select(ExampleScore.value).join(Generation, Generation.id == ExampleScore.generation_id)
        .where(ExampleScore.job_id == score_job_id, ExampleScore.name == metric, Generation.variant == variant)
        .order_by(Generation.example_id)))


def _newest_metrics(session: Session, metrics: list[str], split: str, sweep: Sweep | None):
    scope = select(Metric).where(Metric.split == split, Metric.name.in_(metrics))
    if sweep is not None:
        scope = scope.where(Metric.job_id.in_(select(Job.id).where(Job.sweep_id == sweep.id)))
    scope = scope.subquery()
    newest = (select(scope.c.base_model, scope.c.variant, scope.c.name, func.max(scope.c.job_id).label("job_id"))
              .group_by(scope.c.base_model, scope.c.variant, scope.c.name).subquery())
    return session.execute(
        select(Metric, Adapter)
        .join(newest, (Metric.base_model == newest.c.base_model) & (Metric.variant == newest.c.variant)
              & (Metric.name == newest.c.name) & (Metric.job_id == newest.c.job_id))
        .outerjoin(Adapter, Adapter.id == Metric.adapter_id)
        .where(Metric.split == split)
    ).all()


def comparison(session: Session, metrics: list[str], split: str = "test", variants: list[str] | None = None, *,
               sweep: str | None = None, sort: str | None = None, top: int | None = None,
               intervals: bool = True) -> list[dict]:
    """One dict per (base model, variant): metric means, 95% intervals, deltas vs base, examples, training time,
    mean queue wait of its jobs, the hyperparameters that vary between rows, and `best` on the row with the
    highest `sort` metric."""
    sweep_row = sweep_by_name(session, sweep) if sweep else None
    table: dict[tuple[str, str], dict] = {}
    order: dict[tuple[str, str], tuple] = {}
    hyper: dict[tuple[str, str], dict] = {}
    job_ids: dict[tuple[str, str], set[int]] = {}
    for metric, adapter in _newest_metrics(session, metrics, split, sweep_row):
        if variants is not None and metric.variant not in variants:
            continue
        key = (metric.base_model, metric.variant)
        row = table.setdefault(key, {
            "model": metric.base_model, "variant": metric.variant, "split": split, "examples": metric.n_examples,
            "train_time_s": round(adapter.duration_s, 1) if adapter and adapter.duration_s else None,
        })
        order[key] = (metric.variant != "base", adapter.created_at.isoformat() if adapter else "", metric.variant)
        hyper[key] = dict(adapter.hyperparameters) if adapter else {}
        job_ids.setdefault(key, set()).update({metric.job_id, adapter.job_id if adapter else None} - {None})
        row[metric.name] = metric.value
        if intervals:
            low, high = bootstrap_interval(example_values(session, metric.job_id, metric.variant, metric.name))
            row[f"{metric.name}_ci_low"], row[f"{metric.name}_ci_high"] = low, high
        row["examples"] = min(row["examples"], metric.n_examples)
    for key, wait in _mean_queue_waits(session, job_ids).items():
        table[key]["queue_wait_s"] = wait
    rows = [table[key] for key in sorted(table, key=lambda k: (k[0], order[k]))]
    varied = _varied_keys([hyper[(r["model"], r["variant"])] for r in rows if r["variant"] != "base"])
    for row in rows:
        params = hyper[(row["model"], row["variant"])]
        row["hyperparameters"] = {k: params.get(k) for k in varied}
        base = table.get((row["model"], "base"))
        for name in metrics:
            ok = base is not None and row.get(name) is not None and base.get(name) is not None
            row[f"delta_{name}"] = row[name] - base[name] if ok else None
    sort_metric = sort or (metrics[0] if metrics else None)
    if sort is not None:
        if sort not in metrics:
            raise InputError(f"--sort {sort!r} is not one of the reported metrics ({', '.join(metrics)})")
        rows.sort(key=lambda r: (r.get(sort) is None, -(r.get(sort) or 0)))
    if top is not None:
        kept = [r for r in rows if r["variant"] != "base"][:top]
        rows = [r for r in rows if r["variant"] == "base" or r in kept]
    candidates = [r for r in rows if r["variant"] != "base" and r.get(sort_metric) is not None]
    best = max(candidates, key=lambda r: r[sort_metric]) if candidates else None
    for row in rows:
        row["best"] = row is best
    return rows


def _mean_queue_waits(session: Session, job_ids: dict[tuple, set[int]]) -> dict[tuple, float | None]:
    """Per row, the mean queue wait (start - last publish) of its fine-tune, generate and score jobs."""
    wanted = {i for ids in job_ids.values() for i in ids}
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(wanted)))}
    generate_of = {j.id: j.spec.get("generate_job_id") for j in jobs.values() if j.kind == JobKind.score}
    more = set(generate_of.values()) - set(jobs) - {None}
    jobs.update({j.id: j for j in session.scalars(select(Job).where(Job.id.in_(more)))})
    means = {}
    for key, ids in job_ids.items():
        ids = ids | {generate_of[i] for i in ids if generate_of.get(i)}
        waits = [jobs[i].queue_wait_s for i in ids if i in jobs and jobs[i].queue_wait_s is not None]
        means[key] = round(sum(waits) / len(waits), 2) if waits else None
    return means


def _varied_keys(params: list[dict]) -> list[str]:
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]


def per_example_scores(session: Session, rows: list[dict], metric: str, split: str,
                       sweep: str | None = None) -> dict[str, list[float]]:
    """The per-example values behind each report row's metric (newest score job), for box plots."""
    found = {}
    sweep_row = sweep_by_name(session, sweep) if sweep else None
    for metric_row, _adapter in _newest_metrics(session, [metric], split, sweep_row):
        if any(r["variant"] == metric_row.variant and r["model"] == metric_row.base_model for r in rows):
            found[metric_row.variant] = example_values(session, metric_row.job_id, metric_row.variant, metric)
    return {r["variant"]: found.get(r["variant"], []) for r in rows}


def loss_curves(session: Session, variants: list[str]) -> dict[str, list[tuple[int, float | None, float | None]]]:
    """(step, train loss, eval loss) points of each adapter's fine-tune job."""
    curves = {}
    for adapter in session.scalars(select(Adapter).where(Adapter.name.in_(variants))):
        if adapter.job_id is None:
            continue
        points = session.scalars(select(LossPoint).where(LossPoint.job_id == adapter.job_id).order_by(LossPoint.step))
        curves[adapter.name] = [(p.step, p.train_loss, p.eval_loss) for p in points]
    return curves


def compare_variants(session: Session, a: str, b: str, metric: str, split: str, limit: int) -> list[dict]:
    """Examples where variants `a` and `b` differ most on `metric` (newest scored generations of each)."""
    scored = {}
    for variant in (a, b):
        job_id = session.scalar(select(func.max(Metric.job_id)).where(
            Metric.variant == variant, Metric.split == split, Metric.name == metric))
        if job_id is None:
            raise NotFound(f"no scored {metric} results for {variant!r} on split {split!r}")
        rows = session.execute(
            select(Generation, ExampleScore.value).join(ExampleScore, ExampleScore.generation_id == Generation.id)
            .where(ExampleScore.job_id == job_id, ExampleScore.name == metric, Generation.variant == variant)).all()
        scored[variant] = {g.example_id: (g, value) for g, value in rows}
    shared = scored[a].keys() & scored[b].keys()
    pairs = []
    for example_id in shared:
        (ga, va), (gb, vb) = scored[a][example_id], scored[b][example_id]
        pairs.append({"example_id": example_id, "source": ga.source, "reference": ga.reference,
                      f"prediction_{a}": ga.prediction, f"prediction_{b}": gb.prediction,
                      f"{metric}_{a}": va, f"{metric}_{b}": vb, "difference": va - vb})
    pairs.sort(key=lambda p: (-abs(p["difference"]), p["example_id"]))
    return pairs[:limit]


def sweep_jobs(session: Session, sweep: Sweep) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.id)))


def finetune_jobs(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if j.kind == JobKind.finetune]
