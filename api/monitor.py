"""Flower, the Celery web monitor, as tunequeue starts it: credentials required unless the operator opts out, task
history kept under TUNEQUEUE_HOME, the API reachable with the same credentials."""

from __future__ import annotations

import re
from typing import Mapping

from models.errors import InputError
from models.settings import Settings

# one USER:PASSWORD pair; several are separated by commas (Flower's own format)
_PAIR = re.compile(r"[^:,\s]+:[^,\s]+")


def check_basic_auth(value: str) -> str:
    """'user:pass' or 'a:x,b:y', without spaces; an InputError otherwise (the value itself is never echoed)."""
    pairs = value.split(",")
    if not value or not all(_PAIR.fullmatch(pair) for pair in pairs):
        raise InputError("--basic-auth / FLOWER_BASIC_AUTH: write USER:PASSWORD (several separated by commas, no "
                         "spaces)")
    return value


def flower_arguments(settings: Settings, *, port: int, address: str, basic_auth: str | None, no_auth: bool,
                     persistent: bool, env: Mapping[str, str]) -> tuple[list[str], dict[str, str | None]]:
    """Flower's command-line arguments and the environment changes to give it (None: unset). Credentials travel in
    FLOWER_BASIC_AUTH (read by Flower itself), never on a command line that `ps` shows; `--basic-auth` wins over
    the variable, and `--no-auth` drops the variable."""
    if basic_auth and no_auth:
        raise InputError("give --basic-auth or --no-auth, not both")
    basic_auth = basic_auth or (None if no_auth else env.get("FLOWER_BASIC_AUTH") or None)
    if not basic_auth and not no_auth:
        raise InputError("Flower needs credentials: --basic-auth USER:PASSWORD or FLOWER_BASIC_AUTH=USER:PASSWORD "
                         "(or --no-auth to open it to anyone who reaches the port)")
    arguments = [f"--port={port}", f"--address={address}"]
    environment: dict[str, str | None] = {}
    if basic_auth:
        environment.update(FLOWER_BASIC_AUTH=check_basic_auth(basic_auth), FLOWER_UNAUTHENTICATED_API=None)
    else:  # the operator chose an open Flower: its API too
        environment.update(FLOWER_BASIC_AUTH=None, FLOWER_UNAUTHENTICATED_API="true")
    if persistent:
        folder = settings.home / "flower"
        folder.mkdir(parents=True, exist_ok=True)
        arguments += ["--persistent=True", f"--db={folder / 'flower.db'}", "--state_save_interval=60000"]
    return arguments, environment
