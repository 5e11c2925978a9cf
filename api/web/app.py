"""The FastAPI application: `create_app(ctx)` wires the JSON API and the results page over one AppContext, and
turns tunequeue's errors into HTTP answers (InputError 422, NotFound 404, Unavailable 503), one line each."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from api.context import AppContext
from api.web.auth import LoginRequired
from models.errors import InputError, NotFound, Unavailable


def create_app(ctx: AppContext | None = None) -> FastAPI:
    from api.web import pages, routes

    app = FastAPI(title="tunequeue", version="0.1.0",
                  description="Queue fine-tune, generate and score jobs and sweeps; read jobs, adapters and the "
                              "report. Every route but /health needs 'Authorization: Bearer TOKEN'.")
    app.state.ctx = ctx or AppContext()

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InputError)
    async def bad_input(_request: Request, exc: InputError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Unavailable)
    async def unavailable(_request: Request, exc: Unavailable):
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(LoginRequired)
    async def login_required(_request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='')}", status_code=303)

    app.include_router(routes.router)
    app.include_router(pages.router)
    return app
