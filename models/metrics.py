"""The metric names tunequeue writes into the `metrics` and `example_scores` tables (models/results.py), grouped in
families a score job computes, and the family that fits each model kind. Kept free of SQLAlchemy: the CLI builds
its `--metric` choices from here at start-up."""

from __future__ import annotations

from models.errors import InputError

# Metric families a score job computes, with the metric names each writes; the family that fits each model kind.
METRIC_FAMILIES = {
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "classification": ("accuracy", "f1", "precision", "recall", "f1_macro", "precision_macro", "recall_macro"),
}
FAMILY_FOR_MODEL_KIND = {"seq2seq": "rouge", "causal": "rouge", "classification": "classification"}


def metric_family(asked: list[str] | None, model_kind: str, generate_job_id: int) -> str:
    """The family to score a generate job of `model_kind` with (`asked`, or the kind's own); InputError if it does
    not fit."""
    fitting = FAMILY_FOR_MODEL_KIND[model_kind]
    for family in asked or []:
        if family != fitting:
            raise InputError(f"generate job {generate_job_id} is a {model_kind} job: score it with --metric "
                             f"{fitting}, not {family}")
    return fitting


def expand_metrics(names: list[str]) -> list[str]:
    """Family names ('rouge') replaced by their metric names, order kept, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for metric in METRIC_FAMILIES.get(name, (name,)):
            if metric not in out:
                out.append(metric)
    return out
