"""Result tables: trained adapters, generated summaries, aggregated metrics and per-example scores.

Every result row has a natural unique key (job, variant, example) or (job, variant, split, metric), where the
variant is "base" or the adapter's name, so that a job that runs twice replaces its rows instead of duplicating them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow
from models.errors import InputError

BASE_VARIANT = "base"

# Metric families a score job computes, with the metric names each writes; the family that fits each model kind.
METRIC_FAMILIES = {
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "classification": ("accuracy", "f1", "precision", "recall", "f1_macro", "precision_macro", "recall_macro"),
}
FAMILY_FOR_MODEL_KIND = {"seq2seq": "rouge", "causal": "rouge", "classification": "classification"}


def metric_family(asked: list[str] | None, model_kind: str, generate_job_id: int) -> str:
    """The family to score a generate job of `model_kind` with (`asked`, or the kind's own); InputError if it does
    not fit."""
    fitting = FAMILY_FOR_MODEL_KIND[model_kind]
    for family in asked or []:
        if family != fitting:
            raise InputError(f"generate job {generate_job_id} is a {model_kind} job: score it with --metric "
                             f"{fitting}, not {family}")
    return fitting


def expand_metrics(names: list[str]) -> list[str]:
    """Family names ('rouge') replaced by their metric names, order kept, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for metric in METRIC_FAMILIES.get(name, (name,)):
            if metric not in out:
                out.append(metric)
    return out


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    base_model: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(32))  # lora, qlora, prompt-tuning, or full (a whole model folder)
    model_kind: Mapped[str] = mapped_column(String(16), default="seq2seq", server_default="seq2seq")
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String(1024))  # relative to TUNEQUEUE_HOME
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    trainable_params: Mapped[int] = mapped_column(BigInteger)
    total_params: Mapped[int] = mapped_column(BigInteger)
    train_loss: Mapped[Optional[float]] = mapped_column(Float)
    eval_loss: Mapped[Optional[float]] = mapped_column(Float)
    best_eval_loss: Mapped[Optional[float]] = mapped_column(Float)
    duration_s: Mapped[Optional[float]] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def is_full_model(self) -> bool:
        return self.method == "full"


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (UniqueConstraint("job_id", "variant", "example_id", name="uq_generation_example"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    variant: Mapped[str] = mapped_column(String(64))
    adapter_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))
    split: Mapped[str] = mapped_column(String(64))
    example_id: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(Text)
    prediction: Mapped[str] = mapped_column(Text)
    reference: Mapped[Optional[str]] = mapped_column(Text)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "variant", "split", "name", name="uq_metric"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    generate_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    variant: Mapped[str] = mapped_column(String(64))
    adapter_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))
    base_model: Mapped[str] = mapped_column(String(512))
    split: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    n_examples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExampleScore(Base):
    __tablename__ = "example_scores"
    __table_args__ = (UniqueConstraint("job_id", "generation_id", "name", name="uq_example_score"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class LossPoint(Base):
    """One point of a training run's loss curve (train loss at logging steps, eval loss at evaluation steps)."""

    __tablename__ = "loss_points"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_loss_point"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[Optional[float]] = mapped_column(Float)
    eval_loss: Mapped[Optional[float]] = mapped_column(Float)
