"""Search strategies of a sweep as data, and the rungs table that records every successive-halving decision.

A sweep file's `strategy:` block is one of `GridStrategy` (`grid` / `random`: every point trained to its end, the
default), `AshaStrategy` (asynchronous successive halving: every point reports `metric` at each rung and goes on
only while it is in the top 1/η of the points that reached that rung) or `TpeStrategy` (Optuna's TPE sampler
proposes the points from the `random` block's distributions, `parallel` at a time, `n` in all). Each fine-tune of
such a sweep carries a `SearchSpec` (its Optuna study and trial, its rungs): the job's spec stays the whole truth
about what it runs. Optuna's own tables (its RDB storage) live in the same database (migration 0011); the `rungs`
table below is tunequeue's record of each decision with its reason, read by `jobs show`, the report and the
decision itself on a re-run (a decision is taken once and never from memory).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal, Optional, Union

from pydantic import Field, model_validator
from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow
from models.specs import MAX_SEED, MAX_STEPS, SearchSpec, _Spec  # noqa: F401 (SearchSpec: its home is specs)

# metrics a rung can be decided on; each has its natural direction (mode: the default of the strategy's `mode`)
RUNG_METRICS = {"eval_loss": "min", "rouge1": "max", "rouge2": "max", "rougeL": "max", "rougeLsum": "max",
                "accuracy": "max", "f1": "max"}
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
CLASSIFICATION_METRICS = ("accuracy", "f1")
from models.specs import MAX_TRIALS  # noqa: E402


class _Searched(_Spec):
    metric: Literal["eval_loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "accuracy", "f1"] = Field(
        "eval_loss", description="What decides: the eval split's loss, or its ROUGE / accuracy / F1 computed with "
                                 "the model as it is at that step.")
    mode: Optional[Literal["min", "max"]] = Field(None, description="min or max; the metric's own direction if unset")

    @property
    def direction(self) -> str:
        return self.mode or RUNG_METRICS[self.metric]


class GridStrategy(_Spec):
    kind: Literal["grid", "random"] = "grid"


class AshaStrategy(_Searched):
    kind: Literal["asha"]
    min_steps: int = Field(gt=0, le=MAX_STEPS, description="Steps of the first rung.")
    max_steps: int = Field(gt=0, le=MAX_STEPS, description="Steps of a point trained to the end (the LR schedule's).")
    reduction_factor: int = Field(3, ge=2, le=100, description="η: a rung keeps the top 1/η.")
    brackets: int = Field(1, ge=1, le=20, description="Successive-halving brackets (Hyperband): bracket s starts "
                                                     "its first rung at min_steps·η^s; points go round-robin.")
    # Asynchronous successive halving promotes a point that is among the best so far at its rung; points that
    # arrive sorted worst-first (a grid's learning rates written low to high) would all look best so far.
    order: Literal["shuffled", "as-written"] = Field(
        "shuffled", description="shuffled: points are queued in a seeded random order, as ASHA assumes; as-written: "
                                "in the file's order.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds the shuffled order.")
    # Optuna's SuccessiveHalvingPruner decides the moment a point arrives, against the points before it: early
    # arrivals face a lenient cutoff, so weak points are promoted early and reach the next rung first (bench/asha.py).
    promotion: Literal["lazy", "eager"] = Field(
        "lazy", description="lazy (ASHA as published): a point waits at its rung until it is in the top 1/η of the "
                            "results there (then it trains on) or no more can arrive (then it is pruned); eager: "
                            "Optuna's SuccessiveHalvingPruner decides the moment it arrives, never waiting.")

    @model_validator(mode="after")
    def _rungs_fit(self):
        if self.min_steps >= self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be below max_steps ({self.max_steps})")
        most = self.bracket_count_possible
        if self.brackets > most:
            raise ValueError(f"brackets: at most {most} with min_steps {self.min_steps}, max_steps {self.max_steps} "
                             f"and reduction_factor {self.reduction_factor} (bracket s starts at min_steps·η^s, "
                             "which must stay below max_steps)")
        return self

    @property
    def bracket_count_possible(self) -> int:
        count, first = 0, self.min_steps
        while first < self.max_steps:
            count, first = count + 1, first * self.reduction_factor
        return count

    def rungs(self, bracket: int = 0) -> list[int]:
        """The steps at which a point of `bracket` reports and is decided on; the last is max_steps (the end)."""
        steps, step = [], self.min_steps * self.reduction_factor ** bracket
        while step < self.max_steps:
            steps.append(step)
            step *= self.reduction_factor
        return steps + [self.max_steps]

    def worst_case_steps(self, points: int) -> int:
        return points * self.max_steps

    def halving_steps(self, points: int) -> int:
        """Training steps when every rung keeps exactly its top 1/η (the usual cost of the strategy)."""
        total = 0
        for bracket in range(self.brackets):
            alive = len(range(bracket, points, self.brackets))
            done = 0
            for step in self.rungs(bracket):
                total += alive * (step - done)
                done, alive = step, max(1, math.ceil(alive / self.reduction_factor))
        return total


class TpeStrategy(_Searched):
    kind: Literal["tpe"]
    n: int = Field(gt=0, le=MAX_TRIALS, description="Trials in all.")
    parallel: int = Field(2, gt=0, le=MAX_TRIALS, description="Trials queued or running at once.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds the sampler.")
    startup_trials: Optional[int] = Field(None, ge=0, le=MAX_TRIALS,
                                          description="Random trials before TPE models the results "
                                                      "(default: min(10, n // 2)).")

    @property
    def n_startup(self) -> int:
        return self.startup_trials if self.startup_trials is not None else min(10, self.n // 2)


Strategy = Union[GridStrategy, AshaStrategy, TpeStrategy]


def study_name(sweep_name: str) -> str:
    return f"tunequeue-{sweep_name}"


class Rung(Base):
    """One decision on one sweep point: at `step` its `metric` was `value`; `decision` is promote (it trains on),
    prune (it stops there, keeping its adapter) or complete (it reached max_steps)."""

    __tablename__ = "rungs"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_rung_job_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    rung: Mapped[int] = mapped_column(Integer)  # 0 for the first rung of the point's bracket
    step: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(32))
    value: Mapped[Optional[float]] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


_STORAGES: dict = {}


def optuna_storage(database_url: str):
    """Optuna's RDB storage on tunequeue's own database (one per URL and process). Its tables come from migration
    0011, never from Optuna at run time; the compatibility check is skipped because Optuna would read tunequeue's
    revision from the `alembic_version` table the two share."""
    storage = _STORAGES.get(database_url)
    if storage is None:
        import optuna
        from optuna.storages import RDBStorage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        engine_kwargs = {"connect_args": {"timeout": 30}} if database_url.startswith("sqlite") else \
            {"pool_pre_ping": True}
        storage = _STORAGES[database_url] = RDBStorage(database_url, engine_kwargs=engine_kwargs,
                                                       skip_compatibility_check=True, skip_table_creation=True)
    return storage
