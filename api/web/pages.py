"""The results page: server-rendered Jinja2 pages behind a token login (cookie)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
