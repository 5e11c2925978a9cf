"""ROUGE-1/2/L/Lsum F-measures (with Porter stemming), those of `rouge_score`, the package `evaluate.load("rouge")`
wraps. The scores are computed by `rouge-score-rs`, a Rust implementation of the same algorithm that scores a batch
on all cores; the tests hold it equal to `rouge_score` within 1e-9, and `rouge_score` is used when it is not
installed. A variant's rows are the mean F-measures."""

from __future__ import annotations

from typing import Optional

from models.metrics import METRIC_FAMILIES
from worker.metrics.base import Scored, means

ROUGE_TYPES = METRIC_FAMILIES["rouge"]


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


class RougeScorer:
    def __init__(self, use_stemmer: bool = True):
        self.use_stemmer = use_stemmer

    @property
    def settings(self) -> Optional[dict]:
        """None for the default (stemming on; rows from before settings existed are alike); unstemmed ROUGE says so,
        and is never put in one column with stemmed ROUGE."""
        return None if self.use_stemmer else {"use_stemmer": False}

    def score(self, predictions: list[str], references: list[str], *, labels: Optional[list[str]] = None) -> Scored:
        per_example = rouge_scores(predictions, references, self.use_stemmer)
        return Scored(per_example, means(per_example))
