"""Scoring: `score_rows(spec, session, job_id)` turns a generate job's rows into metric rows.

ROUGE-1/2/L/Lsum F-measures (with Porter stemming) are those of `rouge_score`, the package that
`evaluate.load("rouge")` wraps (`evaluate` itself fetches its metric script from the hub and fails offline). The
scores are computed by `rouge-score-rs`, a Rust implementation of the same algorithm that scores a batch on all
cores; the tests hold it equal to `rouge_score` within 1e-9, and `rouge_score` is used when it is not installed.
Classification rows (predicted label vs reference label) get accuracy, precision, recall and F1: binary ones for
the positive class (the second label of the head, e.g. "positive" or "1") and macro averages over all labels.
Per-example scores and aggregated means are replaced as a whole, so a re-run never duplicates them.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from models.errors import JobFailed
from models.jobs import Job, Lease
from models.metrics import METRIC_FAMILIES, metric_family
from models.results import Adapter, ExampleScore, Generation, Metric
from models.specs import ScoreSpec, parse_spec
from worker.faults import Faults
from worker.jobs import ProgressFn
from worker.ml.kinds import resolve_model_kind

ROUGE_TYPES = METRIC_FAMILIES["rouge"]


def classification_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy; precision, recall and F1 of the positive label (`labels[-1]` when binary); macro averages."""
    def prf(label: str) -> tuple[float, float, float]:
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted = sum(p == label for p in predictions)
        actual = sum(r == label for r in references)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)

    per_label = [prf(label) for label in labels]
    positive = prf(labels[-1]) if len(labels) == 2 else tuple(sum(x) / len(labels) for x in zip(*per_label))
    macro = tuple(sum(x) / len(labels) for x in zip(*per_label))
    return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references),
            "precision": positive[0], "recall": positive[1], "f1": positive[2],
            "precision_macro": macro[0], "recall_macro": macro[1], "f1_macro": macro[2]}


def rouge_scores(predictions: list[str], references: list[str], use_stemmer: bool = True,
                 fast: bool = True) -> list[dict[str, float]]:
    """Per-pair ROUGE F-measures; `fast=False` forces the reference `rouge_score` implementation."""
    if fast:
        try:
            from rouge_score_rs import rouge_scorer as fast_scorer
        except ImportError:
            fast = False
    if fast:
        scorer = fast_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        batch = scorer.score_batch(list(references), list(predictions))
        return [{name: score.fmeasure for name, score in scores.items()} for scores in batch]
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    return [{name: score.fmeasure for name, score in scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references)]


def score_rows(spec: ScoreSpec, session: Session, *, job_id: int, on_progress: Optional[ProgressFn] = None,
               faults: Optional[Faults] = None, lease: Optional[Lease] = None) -> dict:
    """Score the generate job's rows and replace this job's metric rows in one transaction (fenced by `lease`)."""
    generate_job = session.get(Job, spec.generate_job_id)
    generate_spec = parse_spec(generate_job.spec)
    if generate_spec.model_kind is None:  # a job stored before the kind was resolved at enqueue
        generate_spec = resolve_model_kind(generate_spec)
    family = metric_family(spec.metrics, generate_spec.model_kind, spec.generate_job_id)
    rows = list(session.scalars(select(Generation).where(Generation.job_id == spec.generate_job_id)
                                .order_by(Generation.id)))
    rows = [r for r in rows if r.reference is not None]
    if not rows:
        raise JobFailed(f"generate job {spec.generate_job_id} has no rows with a reference to score")
    if family == "rouge":
        per_example = rouge_scores([r.prediction for r in rows], [r.reference for r in rows], spec.use_stemmer)
    else:
        per_example = [{"accuracy": float(r.prediction == r.reference)} for r in rows]
    if faults:
        faults.maybe_delay_scoring()
    if lease is not None:
        lease.hold(session)
    session.execute(delete(ExampleScore).where(ExampleScore.job_id == job_id))
    session.execute(delete(Metric).where(Metric.job_id == job_id))
    session.add_all([ExampleScore(job_id=job_id, generation_id=row.id, name=name, value=value)
                     for row, scores in zip(rows, per_example) for name, value in scores.items()])
    summary: dict[str, float] = {}
    for variant in dict.fromkeys(r.variant for r in rows):
        picked = [i for i, r in enumerate(rows) if r.variant == variant]
        if family == "rouge":
            values = {name: sum(per_example[i][name] for i in picked) / len(picked) for name in ROUGE_TYPES}
        else:
            labels = sorted({rows[i].reference for i in picked} | {rows[i].prediction for i in picked})
            labels = _label_order(session, rows[picked[0]], labels)
            values = classification_metrics([rows[i].prediction for i in picked], [rows[i].reference for i in picked],
                                            labels)
        for name, value in values.items():
            session.add(Metric(job_id=job_id, generate_job_id=spec.generate_job_id, variant=variant,
                               adapter_id=rows[picked[0]].adapter_id, base_model=generate_spec.model,
                               split=rows[picked[0]].split, name=name, value=value, n_examples=len(picked)))
        summary = summary or values
    session.commit()
    if on_progress:
        on_progress({"step": len(rows), "total_steps": len(rows)})
    return {"examples": len(rows), "metrics": family, **{k: round(v, 4) for k, v in summary.items()}}


def _label_order(session: Session, row: Generation, found: list[str]) -> list[str]:
    """The adapter's head order when known (so "positive" is the positive class), else the labels sorted."""
    adapter = session.get(Adapter, row.adapter_id) if row.adapter_id else None
    labels = (adapter.hyperparameters or {}).get("labels") if adapter else None
    if labels and set(found) <= set(labels):
        return list(labels)
    return found
