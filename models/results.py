"""Result tables: trained adapters, generated summaries, aggregated metrics, per-example scores and the LLM judge's
verdicts. The metric names each score job writes, and which fit each model kind, are in models/metrics.py beside
this module.

Every result row has a natural unique key (job, variant, example) or (job, variant, split, metric), where the
variant is "base" or the adapter's name, so that a job that runs twice replaces its rows instead of duplicating them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models import jobs  # noqa: F401 (every result row points at the jobs table, which must be loaded)
from models.base import Base, utcnow

BASE_VARIANT = "base"

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
    # how a model-based metric was computed (BERTScore's model, layer, idf, rescaling; the judge's backend and
    # model; an evaluate metric's source): values computed with different settings are not comparable
    settings: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExampleScore(Base):
    __tablename__ = "example_scores"
    __table_args__ = (UniqueConstraint("job_id", "generation_id", "name", name="uq_example_score"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class Judgement(Base):
    """The LLM judge's verdict on one summary and criterion: a 1-5 score (None when the reply could not be parsed),
    its reason and the raw reply. `variant` is the generation's, or "reference" for the dataset's own summary (then
    `generation_id` points at one generation row of that example, for its source)."""

    __tablename__ = "judgements"
    __table_args__ = (UniqueConstraint("job_id", "variant", "example_id", "criterion", name="uq_judgement"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    generation_id: Mapped[Optional[int]] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    variant: Mapped[str] = mapped_column(String(64))
    example_id: Mapped[str] = mapped_column(String(128))
    criterion: Mapped[str] = mapped_column(String(32))
    score: Mapped[Optional[float]] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text, default="")
    raw: Mapped[Optional[str]] = mapped_column(Text)
    parsed: Mapped[bool] = mapped_column(Boolean)


class LossPoint(Base):
    """One point of a training run's loss curve (train loss at logging steps, eval loss at evaluation steps)."""

    __tablename__ = "loss_points"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_loss_point"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[Optional[float]] = mapped_column(Float)
    eval_loss: Mapped[Optional[float]] = mapped_column(Float)
