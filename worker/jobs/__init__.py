"""Plain job functions run inside a worker: fine-tune (with its checkpoints), generate and score.

Each takes its spec, a database session and what it needs of the worker (model cache, home, faults), reports
progress through `on_progress` and returns a JSON-ready summary; worker/runner.py records the outcome.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

ProgressFn = Callable[[dict], bool]  # called with {"step", "total_steps", ...}; returns True when a cancel is asked


@contextlib.contextmanager
def timed(timings: dict, key: str) -> Iterator[None]:
    """Adds the block's wall seconds to `timings[key]`: where a job's time went, kept in its result."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.monotonic() - started


def rounded_timings(timings: dict) -> dict:
    return {key: round(seconds, 3) for key, seconds in timings.items()}
