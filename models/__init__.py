"""Tables and queries, job specs, settings, the built-ins registry and the error tree; imports nothing else of the
project. The names below load their modules (SQLAlchemy and the tables) on first use, so importing one light
module of the package (errors, specs) stays light."""

from __future__ import annotations

import importlib

_HOMES = {
    "Base": "models.base", "make_engine": "models.base", "make_session_factory": "models.base",
    "Job": "models.jobs", "JobKind": "models.jobs", "JobStatus": "models.jobs", "JobWait": "models.jobs",
    "Adapter": "models.results", "ExampleScore": "models.results", "Generation": "models.results",
    "LossPoint": "models.results", "Metric": "models.results", "Sweep": "models.sweeps",
    "ApiToken": "models.tokens", "Rung": "models.search",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
