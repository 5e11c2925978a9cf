"""SQLAlchemy tables of tunequeue and small query helpers; the database is the source of truth for job state."""

from models.base import Base, make_engine, make_session_factory
from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter, ExampleScore, Generation, Metric

__all__ = [
    "Adapter", "Base", "ExampleScore", "Generation", "Job", "JobKind", "JobStatus", "Metric", "make_engine",
    "make_session_factory",
]
