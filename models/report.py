"""Report queries: the comparison table read straight from the metrics rows (so a SQL client sees the same numbers).

For each (base model, variant) the newest score job's value of each metric on the split is used; each row's delta
is taken against the base row of the same base model.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.results import Adapter, Metric

METRIC_GROUPS = {"rouge": ["rouge1", "rouge2", "rougeL", "rougeLsum"]}


def expand_metrics(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for metric in METRIC_GROUPS.get(name, [name]):
            if metric not in out:
                out.append(metric)
    return out


def known_metric_names(session: Session) -> set[str]:
    return set(session.scalars(select(Metric.name).distinct()))


def comparison(session: Session, metrics: list[str], split: str = "test", variants: list[str] | None = None) -> list[dict]:
    """One dict per (base model, variant): metric values, examples, delta vs that base model's base row."""
    newest = (select(Metric.base_model, Metric.variant, Metric.name, func.max(Metric.job_id).label("job_id"))
              .where(Metric.split == split, Metric.name.in_(metrics))
              .group_by(Metric.base_model, Metric.variant, Metric.name).subquery())
    rows = session.execute(
        select(Metric, Adapter.created_at)
        .join(newest, (Metric.base_model == newest.c.base_model) & (Metric.variant == newest.c.variant)
              & (Metric.name == newest.c.name) & (Metric.job_id == newest.c.job_id))
        .outerjoin(Adapter, Adapter.id == Metric.adapter_id)
        .where(Metric.split == split)
    ).all()
    table: dict[tuple[str, str], dict] = {}
    order: dict[tuple[str, str], tuple] = {}
    for metric, created_at in rows:
        if variants is not None and metric.variant not in variants:
            continue
        row = table.setdefault((metric.base_model, metric.variant), {
            "model": metric.base_model, "variant": metric.variant, "split": split, "examples": metric.n_examples,
        })
        order[(metric.base_model, metric.variant)] = (metric.variant != "base", created_at.isoformat() if created_at
                                                      else "", metric.variant)
        row[metric.name] = metric.value
        row["examples"] = min(row["examples"], metric.n_examples)
    result = [table[key] for key in sorted(table, key=lambda k: (k[0], order[k]))]
    for row in result:
        base = table.get((row["model"], "base"))
        for name in metrics:
            if base is not None and name in row and name in base:
                row[f"delta_{name}"] = row[name] - base[name]
            else:
                row[f"delta_{name}"] = None
    return result
