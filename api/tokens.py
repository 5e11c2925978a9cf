"""API tokens: create (the token is returned once, only its SHA-256 is stored), list, revoke, and check a presented
token. Tokens are 256 random bits, so a plain SHA-256 is enough to store them (nothing to brute-force)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.base import utcnow
from models.errors import InputError, NotFound
from models.specs import validate_name
from models.tokens import ApiToken

TOKEN_PREFIX = "tq_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(session: Session, name: str, read_only: bool = False) -> tuple[ApiToken, str]:
    """A new token named `name`: (its row, the token itself, which is not stored anywhere)."""
    try:
        validate_name(name)
    except ValueError as exc:
        raise InputError(f"token name {name[:64]!r}: {exc}") from None
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise InputError(f"a token named {name!r} already exists (revoked tokens keep their name); choose another")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, token_hash=token_hash(token), prefix=token[:8], read_only=read_only)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise InputError(f"a token named {name!r} already exists; choose another") from None
    return row, token


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def token_dict(row: ApiToken) -> dict:
    return {"id": row.id, "name": row.name, "prefix": row.prefix, "read_only": row.read_only,
            "created_at": row.created_at, "last_used_at": row.last_used_at, "revoked_at": row.revoked_at,
            "active": row.active}


def revoke_token(session: Session, name: str) -> ApiToken:
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise NotFound(f"no token named {name!r} ('tokens list' shows them)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def check_token(session: Session, token: str | None) -> ApiToken | None:
    """The active token row matching `token`, with its last use recorded; None for a missing, unknown or revoked
    token."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
    if row is None or not row.active:
        return None
    row.last_used_at = utcnow()
    session.commit()
    return row
