"""Who is calling: a bearer token (`Authorization: Bearer tq_…`) for the JSON API, the same token kept in an
HttpOnly cookie after logging in for the results page. Every check reads the token table, so a revoked token is
refused on its next request. Writes need a token that is not read-only (403 otherwise)."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.tokens import check_token
from models.tokens import ApiToken

COOKIE = "tunequeue_token"
# the API's security scheme, as /openapi.json and /docs show it (missing or not a bearer header: None, then 401)
bearer = HTTPBearer(auto_error=False, scheme_name="token", bearerFormat="tq_...",
                    description="A token made by 'python manage.py tokens create NAME' (--read-only: GET only).")


class LoginRequired(Exception):
    """A page asked for without a valid session cookie: the app answers with a redirect to /login."""

    def __init__(self, next_path: str):
        self.next_path = next_path


def context(request: Request):
    return request.app.state.ctx


def _checked(request: Request, token: str | None) -> ApiToken | None:
    with context(request).session() as session:
        row = check_token(session, token)
        if row is not None:
            session.expunge(row)
        return row


def api_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiToken:
    """The caller's active token (401 for a missing, wrong or revoked one)."""
    row = _checked(request, credentials.credentials.strip() if credentials else None)
    if row is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid API token is needed: "
                            "'Authorization: Bearer TOKEN' (python manage.py tokens create NAME)",
                            headers={"WWW-Authenticate": "Bearer"})
    return row


def api_writer(token: ApiToken = Depends(api_token)) -> ApiToken:
    """The caller's token, if it may write (403 for a read-only token)."""
    if token.read_only:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"token {token.name!r} is read-only")
    return token


def page_token(request: Request) -> ApiToken:
    """The logged-in token of a page request (a redirect to /login otherwise)."""
    row = _checked(request, request.cookies.get(COOKIE))
    if row is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return row


def page_writer(token: ApiToken = Depends(page_token)) -> ApiToken:
    if token.read_only:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"token {token.name!r} is read-only")
    return token
