"""Metrics a score job computes, one module per family, found here by name (the names themselves live in
models/metrics.py).

A reference-based family is a `Scorer`: `score(predictions, references)` over one variant's rows gives a `Scored`
(each example's values and the variant's aggregate), and its `settings` say how it was computed (None where there
is no choice to record): rows computed with different settings are never compared. The LLM judge (judge.py) needs
no reference and is resumed example by example, so worker/jobs/score.py drives it itself. Each module imports its
library (torch, bert-score, evaluate) only when it scores, so importing this package stays cheap.
"""

from __future__ import annotations

from models.metrics import EVALUATE_PREFIX, is_evaluate
from worker.metrics.base import Scorer


def scorer_for(family: str, spec) -> Scorer:
    """The scorer of a reference-based family (or `evaluate:` metric), configured from the score job's spec."""
    if is_evaluate(family):
        from worker.metrics.evaluate_metric import EvaluateScorer

        return EvaluateScorer(family[len(EVALUATE_PREFIX):])
    if family == "rouge":
        from worker.metrics.rouge import RougeScorer

        return RougeScorer(spec.use_stemmer)
    if family == "bleu":
        from worker.metrics.bleu import BleuScorer

        return BleuScorer()
    if family == "bertscore":
        from worker.metrics.bertscore import BertScorer

        return BertScorer.from_spec(spec)
    if family == "classification":
        from worker.metrics.classification import ClassificationScorer

        return ClassificationScorer()
    raise ValueError(f"{family!r} has no scorer (the judge is driven by worker/jobs/score.py)")
