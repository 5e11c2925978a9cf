"""Classification rows (predicted label vs reference label): accuracy, precision, recall and F1, binary ones for
the positive class (the second label of the head, e.g. "positive" or "1") and macro averages over all labels;
accuracy is also kept per example."""

from __future__ import annotations

from typing import Optional

from worker.metrics.base import Scored


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


class ClassificationScorer:
    settings = None

    def score(self, predictions: list[str], references: list[str], *, labels: Optional[list[str]] = None) -> Scored:
        labels = labels or sorted(set(predictions) | set(references))
        per_example = [{"accuracy": float(p == r)} for p, r in zip(predictions, references)]
        return Scored(per_example, classification_metrics(predictions, references, labels))
