"""What one invocation of a door (a CLI command, later an HTTP app) holds: settings, database sessions and the
broker handle, each opened on first use, so `--help` and commands that need neither start fast."""

from __future__ import annotations

from functools import cached_property

from models.errors import InputError, Unavailable
from models.settings import Settings, mask_url


class AppContext:
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
        from sqlalchemy.exc import OperationalError, ProgrammingError

        from models.migrate import current_revision

        url = mask_url(self.settings.database_url)
        try:
            revision = current_revision(self.settings.database_url)
        except (OperationalError, ProgrammingError) as exc:
            raise Unavailable(f"cannot open database {url}: {str(exc.orig).strip().splitlines()[0]}") from None
        if revision is None:
            raise InputError(f"database {url} has no tunequeue tables; run 'python manage.py db upgrade' first")
        return self.sessions()
