"""Declarative base, engine and session factory shared by every table module."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, sessionmaker

# How long the CLI and the workers wait for a database server to answer a connection attempt (psycopg's own default
# is 130 s), so a database that accepts connections but never answers fails in one line instead of hanging.
DATABASE_CONNECT_TIMEOUT_S = 5
# TCP keepalives on PostgreSQL connections: a server host that vanishes mid-query (a dead machine, a dropped NAT
# entry) breaks the connection after about idle + interval * count seconds instead of leaving a worker's heartbeat,
# reaper or job thread waiting forever. A server process that is alive but stuck is not caught here; statements get
# no `statement_timeout`, since migrations and lock waits may legitimately take long.
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
SQLITE_BUSY_TIMEOUT_S = 30  # a locked SQLite file: wait this long for the other writer


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # workers and the CLI write concurrently
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args = {}
    if make_url(url).get_backend_name() == "postgresql":
        # what the URL itself says (?connect_timeout=30) wins over these defaults
        query = make_url(url).query
        connect_args = {key: value for key, value in
                        {"connect_timeout": DATABASE_CONNECT_TIMEOUT_S, **PG_KEEPALIVES}.items() if key not in query}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def database_timeout(url: str) -> float | None:
    """Seconds one connection attempt to the database at `url` may take; None where there is no server to wait for
    (SQLite) or the URL turns the limit off (`connect_timeout=0`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    value = parsed.query.get("connect_timeout", DATABASE_CONNECT_TIMEOUT_S)
    if isinstance(value, tuple):
        value = value[-1]
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(seconds, 2) if seconds > 0 else None  # libpq waits at least 2 s


def make_session_factory(url_or_engine) -> sessionmaker:
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    return sessionmaker(engine, expire_on_commit=False)
