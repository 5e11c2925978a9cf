"""SQLAlchemy tables of tunequeue and small query helpers; the database is the source of truth for job state."""

from models.base import Base, make_engine, make_session_factory
from models.jobs import Job, JobKind, JobStatus, JobWait
from models.results import Adapter, ExampleScore, Generation, LossPoint, Metric
from models.sweeps import Sweep

__all__ = [
    "Adapter", "Base", "ExampleScore", "Generation", "Job", "JobKind", "JobStatus", "JobWait", "LossPoint", "Metric", "Sweep",
    "make_engine", "make_session_factory",
]
