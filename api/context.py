"""What one invocation of a door (a CLI command, or the HTTP app for its whole life) holds: settings, database
sessions and the broker handle, each opened on first use, so `--help` and commands that need neither start fast.
The database's migration revision is checked on the first `session()` only: the HTTP app checks it at start-up
instead of once per request."""

from __future__ import annotations

from functools import cached_property

from models.errors import InputError, Unavailable
from models.settings import Settings, mask_url


class AppContext:
    schema_checked = False  # set once a session() found the tunequeue tables
    # whether submissions may name `evaluate:` metrics (their scripts run as code on the workers): the CLI's user
    # runs code anyway; the HTTP app allows them only with TUNEQUEUE_API_EVALUATE=1
    code_metrics = True

    def __init__(self, settings: Settings | None = None):
        if settings is not None:
            self.settings = settings

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()

    @cached_property
    def sessions(self):
        from models import make_session_factory

        return make_session_factory(self.settings.database_url)

    @cached_property
    def broker(self):
        from worker.broker import Broker

        return Broker(self.settings)

    def session(self):
        """A new session on a database that has the tunequeue tables (one-line errors otherwise)."""
        if self.schema_checked:
            return self.sessions()
        from sqlalchemy.exc import OperationalError, ProgrammingError

        from models.base import database_timeout
        from models.migrate import current_revision

        url = mask_url(self.settings.database_url)
        try:
            revision = current_revision(self.settings.database_url)
        except (OperationalError, ProgrammingError) as exc:
            if _is_timeout(exc.orig):
                seconds = database_timeout(self.settings.database_url)
                within = f" within {seconds:g}s" if seconds else ""
                raise Unavailable(f"the database at {url} did not answer{within}") from None
            raise Unavailable(f"cannot open database {url}: {str(exc.orig).strip().splitlines()[0]}") from None
        if revision is None:
            raise InputError(f"database {url} has no tunequeue tables; run 'python manage.py db upgrade' first")
        self.schema_checked = True
        return self.sessions()


def _is_timeout(error: BaseException | None) -> bool:
    """Whether a driver error says the server did not answer in time (psycopg's ConnectionTimeout: it accepted the
    connection, or the packets vanished, and no answer came within connect_timeout)."""
    return error is not None and (type(error).__name__ == "ConnectionTimeout" or isinstance(error, TimeoutError)
                                  or "timeout expired" in str(error))
