"""Any Hugging Face `evaluate` metric: `--metric evaluate:NAME_OR_PATH` runs `evaluate.load(NAME_OR_PATH)` on a
variant's predictions and references. A local metric script folder works offline; a hub name needs the network or
the evaluate cache. Every number the metric returns becomes a metric row named `{module}_{key}` (models/metrics.py
`evaluate_metric_name`); a list of numbers with one per example is also stored per example, its mean being the row
unless the metric returned a number of that name itself. Nested values (dicts, n-gram lists) are left out.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

from models.errors import JobFailed
from models.metrics import EVALUATE_PREFIX, evaluate_metric_name
from worker.metrics.base import Scored


class EvaluateScorer:
    def __init__(self, target: str):
        self.target = target
        self.settings = {"evaluate": target}
        self._module = None

    def _load(self):
        if self._module is None:
            import evaluate

            try:
                self._module = evaluate.load(self.target)
            except Exception as exc:  # noqa: BLE001 - evaluate raises anything from FileNotFoundError to HTTP errors
                raise JobFailed(f"--metric {EVALUATE_PREFIX}{self.target}: evaluate.load failed: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None
        return self._module

    def score(self, predictions: list[str], references: list[str], *, labels: Optional[list[str]] = None) -> Scored:
        result = self._load().compute(predictions=list(predictions), references=list(references))
        per_example: list[dict[str, float]] = [{} for _ in predictions]
        aggregate: dict[str, float] = {}
        for key, value in (result or {}).items():
            name = evaluate_metric_name(self.target, str(key))
            if _number(value):
                aggregate[name] = float(value)
            elif isinstance(value, (list, tuple)) and len(value) == len(predictions) and all(map(_number, value)):
                for values, item in zip(per_example, value):
                    values[name] = float(item)
                aggregate.setdefault(name, sum(map(float, value)) / len(value))
        if not aggregate:
            raise JobFailed(f"--metric {EVALUATE_PREFIX}{self.target} returned no number "
                            f"(keys: {', '.join(map(str, (result or {}).keys()))[:200]})")
        return Scored(per_example, aggregate)


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
