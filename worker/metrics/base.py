"""What every reference-based metric module gives back (`Scored`) and is (`Scorer`), apart from the registry in
worker/metrics/__init__.py so that the modules need not import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass
class Scored:
    per_example: list[dict[str, float]]  # one {metric name: value} per row, in row order ({} where none)
    aggregate: dict[str, float]  # the variant's metric rows


class Scorer(Protocol):
    settings: Optional[dict]

    def score(self, predictions: list[str], references: list[str], *, labels: Optional[list[str]] = None) -> Scored:
        ...


def means(per_example: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the rows that have it."""
    names = list(dict.fromkeys(name for values in per_example for name in values))
    out = {}
    for name in names:
        values = [v[name] for v in per_example if name in v]
        out[name] = sum(values) / len(values)
    return out
