"""The sweeps table: a named set of fine-tune → generate → score pipelines expanded from one YAML file."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from models import tokens  # noqa: F401 (sweeps.token_id points at the api_tokens table)
from models.base import Base, utcnow


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the parsed file with overrides applied
    priority: Mapped[int] = mapped_column(Integer, default=0)
    points: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    notify_url: Mapped[Optional[str]] = mapped_column(String(2048))  # --notify URL, else TUNEQUEUE_NOTIFY_URL
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))  # its last job ended (set once)
    token_id: Mapped[Optional[int]] = mapped_column(ForeignKey("api_tokens.id", ondelete="SET NULL"))  # API submitter
    # a TPE sweep's trials asked so far: each new trial first takes its number here (an atomic UPDATE), so two workers
    # ending trials at once never propose more than `n` nor sample with the same seed
    trials_asked: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
