"""Alembic environment: the database URL comes from tunequeue's settings (or the caller), the schema from models."""

from __future__ import annotations

import logging

from alembic import context

from models import jobs, results, search, sweeps, tokens  # noqa: F401 (every table registers itself on Base.metadata)
from models.base import Base, make_engine

config = context.config
target_metadata = Base.metadata
# Optuna's RDB storage keeps its study record in the same database (migration 0011 creates its tables from Optuna's
# own schema); autogenerate must neither drop them nor take them for ours.
OPTUNA_TABLES = {"studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
                 "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
                 "trial_intermediate_values", "trial_heartbeats", "version_info"}


def include_object(obj, name, type_, reflected, _compare_to) -> bool:
    return not (type_ == "table" and reflected and name in OPTUNA_TABLES)


def _database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return url
    from models.settings import Settings

    return Settings.from_env().database_url


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            # render_as_batch: SQLite cannot ALTER most things, batch mode rebuilds the table instead.
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                              include_object=include_object)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


logging.getLogger("alembic").setLevel(logging.WARNING)
if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
