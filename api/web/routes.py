"""The JSON API: every route calls the api/ functions the CLI calls."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.web.auth import context

router = APIRouter()


@router.get("/health")
def health(request: Request) -> dict:
    """Database, broker and live workers; no token needed."""
    ctx = context(request)
    answer: dict = {}
    try:
        with ctx.session() as session:
            session.execute(__import__("sqlalchemy").text("SELECT 1"))
        answer["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 (health reports any failure as text)
        answer["database"] = str(exc).splitlines()[0]
    try:
        answer["workers"] = len(ctx.broker.live_workers())
        answer["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        answer["broker"] = str(exc).splitlines()[0]
    answer["ok"] = answer["database"] == "ok" and answer["broker"] == "ok"
    return answer
