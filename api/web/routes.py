"""The JSON API: /health here, jobs (routes_jobs.py), sweeps (routes_sweeps.py), adapters and the report
(routes_results.py). Every route calls the api/ functions the CLI calls; every route but /health needs a token."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.web import routes_jobs, routes_results, routes_sweeps
from api.web.auth import context

router = APIRouter()
router.include_router(routes_jobs.router)
router.include_router(routes_sweeps.router)
router.include_router(routes_results.router)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@router.get("/health", tags=["health"], summary="Database, broker and live workers (no token needed)")
def health(request: Request) -> JSONResponse:
    """`ok` is true when the database and the broker answer (200; 503 otherwise, for healthchecks); `workers`
    counts the live workers."""
    ctx = context(request)
    answer: dict = {}
    try:
        with ctx.session() as session:
            session.execute(text("SELECT 1"))
        answer["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 (health reports any failure as text)
        answer["database"] = _first_line(exc)
    try:
        answer["workers"] = len(ctx.broker.live_workers())
        answer["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        answer["broker"] = _first_line(exc)
    answer["ok"] = answer["database"] == "ok" and answer["broker"] == "ok"
    return JSONResponse(answer, status_code=200 if answer["ok"] else 503)
