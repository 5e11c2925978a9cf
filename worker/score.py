"""Scoring: `score_rows(spec, session, job_id)` turns a generate job's rows into metric rows.

ROUGE-1/2/L/Lsum F-measures (with Porter stemming) are those of `rouge_score`, the package that
`evaluate.load("rouge")` wraps (`evaluate` itself fetches its metric script from the hub and fails offline). The
scores are computed by `rouge-score-rs`, a Rust implementation of the same algorithm that scores a batch on all
cores; the tests hold it equal to `rouge_score` within 1e-9, and `rouge_score` is used when it is not installed.
Per-example scores and aggregated means are replaced as a whole, so a re-run never duplicates them.
"""

from __future__ import annotations

import os
from typing import Optional

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from models.jobs import Job
from models.results import ExampleScore, Generation, Metric
from worker.faults import parse_faults
from worker.specs import GenerateSpec, ScoreSpec
from worker.train import ProgressFn

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


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


def score_rows(spec: ScoreSpec, session: Session, *, job_id: int,
               on_progress: Optional[ProgressFn] = None) -> dict:
    generate_job = session.get(Job, spec.generate_job_id)
    generate_spec = GenerateSpec.model_validate(generate_job.spec)
    rows = list(session.scalars(select(Generation).where(Generation.job_id == spec.generate_job_id)
                                .order_by(Generation.id)))
    rows = [r for r in rows if r.reference is not None]
    if not rows:
        raise ValueError(f"generate job {spec.generate_job_id} has no rows with a reference to score")
    per_example = rouge_scores([r.prediction for r in rows], [r.reference for r in rows], spec.use_stemmer)
    parse_faults(os.environ.get("TUNEQUEUE_FAULTS", "")).maybe_delay_scoring()
    session.execute(delete(ExampleScore).where(ExampleScore.job_id == job_id))
    session.execute(delete(Metric).where(Metric.job_id == job_id))
    session.add_all([ExampleScore(job_id=job_id, generation_id=row.id, name=name, value=value)
                     for row, scores in zip(rows, per_example) for name, value in scores.items()])
    means = {name: sum(s[name] for s in per_example) / len(per_example) for name in ROUGE_TYPES}
    by_variant = {r.variant: r for r in rows}
    for variant, row in by_variant.items():
        variant_scores = [s for r, s in zip(rows, per_example) if r.variant == variant]
        for name in ROUGE_TYPES:
            session.add(Metric(job_id=job_id, generate_job_id=spec.generate_job_id, variant=variant,
                               adapter_id=row.adapter_id, base_model=generate_spec.model, split=row.split,
                               name=name, value=sum(s[name] for s in variant_scores) / len(variant_scores),
                               n_examples=len(variant_scores)))
    session.commit()
    if on_progress:
        on_progress({"step": len(rows), "total_steps": len(rows)})
    return {"examples": len(rows), **{k: round(v, 4) for k, v in means.items()}}
