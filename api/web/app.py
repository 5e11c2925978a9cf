"""The FastAPI application: `create_app(ctx)` wires the JSON API and the results page over one AppContext, and
turns errors into HTTP answers, each `{"detail": "one line"}`: InputError and a malformed request 422, NotFound
404, Unavailable and a database that stopped answering 503, anything else 500."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.exc import OperationalError

from api.context import AppContext
from api.web.auth import LoginRequired
from models.errors import InputError, NotFound, Unavailable
from models.settings import mask_url
from models.specs import one_line


def create_app(ctx: AppContext | None = None) -> FastAPI:
    from api.web import pages, routes

    app = FastAPI(title="tunequeue", version="0.1.0",
                  description="Queue fine-tune, generate and score jobs and sweeps; read jobs, adapters and the "
                              "report. Every route but /health needs 'Authorization: Bearer TOKEN'.")
    app.state.ctx = ctx or AppContext()
    app.state.ctx.code_metrics = app.state.ctx.settings.api_evaluate_metrics

    for error, status_code in ((NotFound, 404), (InputError, 422), (Unavailable, 503)):
        app.add_exception_handler(error, _one_line(status_code))

    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": one_line(exc)}, status_code=422)

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, _exc: OperationalError):
        url = mask_url(request.app.state.ctx.settings.database_url)
        return JSONResponse({"detail": f"the database at {url} did not answer; try again"}, status_code=503)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception):
        text = str(exc).strip().splitlines()
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}" + (f": {text[0]}" if text else "")},
                            status_code=500)

    @app.exception_handler(LoginRequired)
    async def login_required(_request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='')}", status_code=303)

    # pages first: a page route matches only a request that accepts text/html (a browser), so the same path is a
    # page in a browser and JSON for curl and scripts; the pages stay out of the API's schema
    app.include_router(pages.router, include_in_schema=False)
    app.include_router(routes.router)
    return app


def _one_line(status_code: int):
    """A handler answering with the error's own one-line text and `status_code`."""
    async def answer(_request: Request, exc: Exception):
        return JSONResponse({"detail": str(exc)}, status_code=status_code)

    return answer
