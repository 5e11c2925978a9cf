"""Plain job functions run inside a worker: fine-tune (with its checkpoints), generate and score.

Each takes its spec, a database session and what it needs of the worker (model cache, home, faults), reports
progress through `on_progress` and returns a JSON-ready summary; worker/runner.py records the outcome.
"""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[dict], bool]  # called with {"step", "total_steps", ...}; returns True when a cancel is asked
