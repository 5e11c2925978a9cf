"""The results page: server-rendered Jinja2 pages behind a token login (an HttpOnly cookie), over the same api/
functions as the CLI: `sweeps list` and `jobs list` (/), `report --sweep` with `--plot` / `--plot-loss` /
`--plot-rungs` and `sweeps retry` (/sweeps/NAME), `jobs show` / `jobs logs` and `report --compare` (/jobs/ID),
`adapters list` (/adapters). Every page re-checks the token, so a revoked token is logged out on its next click; reading needs no
JavaScript (the front page's live progress is a small poll of itself, or a refresh without scripts).

The JSON API shares some paths (/jobs/ID, /adapters, POST /sweeps/NAME/retry): a page answers only requests that
accept text/html, which browsers send and curl and scripts do not, so the same URL is a page in a browser and JSON
for a script. Images and the style sheet are plain routes, since a browser fetches them accepting image/* or text/css.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.routing import Match

from api.adapters import adapter_dict, list_adapters
from api.jobs import bar_fields, describe, get_job, latest_jobs, status_label, waiting_counts
from api.pipelines import RETRIED_STATUSES, retry_sweep, sweep_summaries
from api.render import (example_set_note, headline_metrics, human_size, loss_plot, mean_with_interval, param_text,
                        search_note)
from api.report import ReportQuery, draw_box_plot, draw_loss_plot, draw_rungs_plot, report_rows
from api.tokens import check_token
from api.web.auth import COOKIE, context, page_token, page_writer
from api.web.pages_jobs import job_view
from api.web.routes_results import download_adapter
from models.errors import InputError, NotFound
from models.jobs import JobKind
from models.metrics import METRIC_FAMILIES
from models.report import job_loss_curve, known_metric_names, loss_curves, search_points, sweep_by_name, sweep_jobs
from models.tokens import ApiToken

HERE = Path(__file__).parent
STATIC = HERE / "static"
COOKIE_DAYS = 7
FORM_LIMIT = 16_384  # bytes of a login form; a token is about 50
RECENT_JOBS = 30
PLOT_LOCK = threading.Lock()  # pyplot keeps global state: one figure at a time across the server's threads


def _signed(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:+.{digits}f}"


def _number(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


environment = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                          lstrip_blocks=True)
environment.filters.update(mean_ci=mean_with_interval, param=param_text, size=human_size, signed=_signed,
                           number=_number, path_part=lambda value: quote(str(value), safe=""))
templates = Jinja2Templates(env=environment)


class PageRoute(APIRoute):
    """A route that matches only requests accepting text/html (see the module's docstring)."""

    def matches(self, scope):
        match, child_scope = super().matches(scope)
        if match != Match.NONE and not _wants_html(scope):
            return Match.NONE, {}
        return match, child_scope


def _wants_html(scope) -> bool:
    accept = b",".join(value for key, value in scope.get("headers", []) if key == b"accept")
    return b"text/html" in accept.lower()


router = APIRouter(route_class=PageRoute)
files = APIRouter()  # the PNGs and the style sheet, included into `router` at the end


def render(request: Request, name: str, token: ApiToken | None, status_code: int = 200, **values) -> Response:
    return templates.TemplateResponse(request, name, {"token": token, **values}, status_code=status_code)


def error_page(request: Request, token: ApiToken | None, error: Exception, status_code: int) -> Response:
    return render(request, "error.html", token, status_code, message=str(error))


# ---------------------------------------------------------------------------------------------------- login
def local_path(target: str | None) -> str:
    """`target` when it is a path on this site ('/sweeps/a?sort=rouge1'), else '/': a login never redirects away."""
    target = target or "/"
    if (not target.startswith("/") or target.startswith("//") or "\\" in target
            or any(ord(c) < 32 or ord(c) == 127 for c in target) or target.startswith("/login")):
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc else target


async def form_fields(request: Request) -> dict[str, str]:
    """An url-encoded form's fields (the first value of each), read up to FORM_LIMIT bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise HTTPException(413, f"a form is at most {FORM_LIMIT} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items()}


@router.get("/login")
def login_form(request: Request, next: str = "/"):
    return render(request, "login.html", None, next=local_path(next), error=None)


@router.post("/login")
def login(request: Request, fields: dict = Depends(form_fields)):
    target, token = local_path(fields.get("next")), fields.get("token", "").strip()
    with context(request).session() as session:
        accepted = check_token(session, token) is not None
    if not accepted:
        return render(request, "login.html", None, 401, next=target,
                      error="That token is not valid: it is wrong or has been revoked.")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, max_age=COOKIE_DAYS * 86400, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# ------------------------------------------------------------------------------------------------ the front
@router.get("/")
def front(request: Request, token: ApiToken = Depends(page_token)):
    with context(request).session() as session:
        sweeps = sweep_summaries(session)
        jobs = latest_jobs(session, RECENT_JOBS)
        waiting = waiting_counts(session, jobs)
        rows = [{"id": job.id, "kind": job.kind.value, "status": job.status.value, "label": status_label(job, waiting),
                 "what": describe(job), "bar": bar_fields(job, waiting), "finished": job.status.finished}
                for job in jobs]
    return render(request, "front.html", token, sweeps=sweeps, jobs=rows, live=not all(r["finished"] for r in rows))


# --------------------------------------------------------------------------------------------------- sweeps
def sweep_report(session, name: str, metric: str | None, sort: str | None, split: str):
    """The sweep's report as `report --sweep NAME --metric METRIC --sort SORT` gives it: (query, rows, problem).
    Without a metric, the first family with scored rows (rouge, then classification). `problem` says why there are
    no rows (nothing scored yet, an unknown metric or sort)."""
    problem = None
    for family in [metric] if metric else list(METRIC_FAMILIES):
        query = ReportQuery([family], split, name, sort or None)
        try:
            return query, report_rows(session, query), None
        except (NotFound, InputError) as exc:
            problem = str(exc)
    return None, [], problem


def evaluation_split(jobs) -> str:
    """The split the sweep's evaluation generated on (the report's rows are on it)."""
    return next((job.spec.get("split") for job in jobs if job.kind == JobKind.generate), None) or "test"


@router.get("/sweeps/{name}")
def sweep_page(request: Request, name: str, metric: str | None = None, sort: str | None = None,
               retried: int | None = None, token: ApiToken = Depends(page_token)):
    with context(request).session() as session:
        try:
            sweep = sweep_by_name(session, name)
        except NotFound as exc:
            return error_page(request, token, exc, 404)
        jobs = sweep_jobs(session, sweep)
        waiting = waiting_counts(session, jobs)
        query, rows, problem = sweep_report(session, name, metric, sort, evaluation_split(jobs))
        known = known_metric_names(session)
        families = [family for family, names in METRIC_FAMILIES.items() if known & set(names)]
        adapters = [r["variant"] for r in rows if r["variant"] != "base"]
        has_loss = any(loss_curves(session, adapters).values()) if adapters else False
        points = search_points(session, sweep)
        job_rows = [{"id": job.id, "kind": job.kind.value, "status": job.status.value, "what": describe(job),
                     "label": status_label(job, waiting), "duration_s": job.duration_s, "attempts": job.attempts,
                     "error": (job.error or "").strip(), "point": job.spec.get("name")} for job in jobs]
    shown = headline_metrics(query.metric_names) if query else []
    if query and query.sort and query.sort not in shown:
        shown.append(query.sort)
    retried_statuses = {status.value for status in RETRIED_STATUSES}
    return render(request, "sweep.html", token, sweep=sweep, query=query, rows=rows, problem=problem, metrics=shown,
                  params=list(rows[0]["hyperparameters"]) if rows else [], families=families,
                  note=example_set_note(rows) if rows else None, many_models=len({r["model"] for r in rows}) > 1,
                  point_jobs={j["point"]: j["id"] for j in job_rows if j["kind"] == "finetune"},
                  jobs=job_rows, has_loss=has_loss, retried=retried,
                  searched=any("decision" in r for r in rows), search_note=search_note(rows),
                  has_rungs=any(p["rungs"] for p in points),
                  rung_metric=points[0]["rung_metric"] if points else "",
                  failed=[j for j in job_rows if j["kind"] == "finetune" and j["status"] in retried_statuses],
                  retryable=any(j["status"] in retried_statuses for j in job_rows))


@router.post("/sweeps/{name}/retry")
def sweep_retry(request: Request, name: str, token: ApiToken = Depends(page_writer)):
    """What `sweeps retry NAME` does: re-queue the failed, cancelled and skipped points and their evaluation."""
    ctx = context(request)
    try:
        with ctx.session() as session:
            count = len(retry_sweep(session, ctx.broker, name))
    except NotFound as exc:
        return error_page(request, token, exc, 404)
    except InputError as exc:
        return error_page(request, token, exc, 409)
    return RedirectResponse(f"/sweeps/{quote(name, safe='')}?retried={count}", status_code=303)


def png(draw) -> Response:
    """The PNG that `draw(file)` writes (the report's own plotting code), not kept by the browser's cache."""
    with PLOT_LOCK:
        buffer = io.BytesIO()
        draw(buffer)
    return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "no-store"})


def sweep_plot(request: Request, name: str, metric: str | None, sort: str | None, draw) -> Response:
    """`draw(session, query, rows, file)` over the sweep's report rows, as a PNG (404 when nothing is scored)."""
    with context(request).session() as session:
        query, rows, problem = sweep_report(session, name, metric, sort,
                                            evaluation_split(sweep_jobs(session, sweep_by_name(session, name))))
        if not rows:
            raise NotFound(problem)
        return png(lambda target: draw(session, query, rows, target))


@files.get("/sweeps/{name}/boxplot.png")
def sweep_box_plot(request: Request, name: str, metric: str | None = None, sort: str | None = None,
                   _token: ApiToken = Depends(page_token)):
    """`report --sweep NAME --plot FILE`, as an image."""
    return sweep_plot(request, name, metric, sort, draw_box_plot)


@files.get("/sweeps/{name}/rungs.png")
def sweep_rungs_plot(request: Request, name: str, _token: ApiToken = Depends(page_token)):
    """`report --sweep NAME --plot-rungs FILE`, as an image (404 for a sweep without rungs)."""
    with context(request).session() as session:
        sweep_by_name(session, name)
        try:
            return png(lambda target: draw_rungs_plot(session, name, target))
        except InputError as exc:
            raise NotFound(str(exc)) from None


@files.get("/sweeps/{name}/loss.png")
def sweep_loss_plot(request: Request, name: str, _token: ApiToken = Depends(page_token)):
    """`report --sweep NAME --plot-loss FILE`, as an image."""
    return sweep_plot(request, name, None, None, draw_loss_plot)


# ----------------------------------------------------------------------------------------------------- jobs
@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: int, a: str | None = None, b: str | None = None, metric: str | None = None,
             order: str = "abs", page: int = 1, token: ApiToken = Depends(page_token)):
    ctx = context(request)
    with ctx.session() as session:
        try:
            view = job_view(ctx, session, get_job(session, job_id), a=a, b=b, metric=metric, order=order, page=page)
        except NotFound as exc:
            return error_page(request, token, exc, 404)
    view["spec_json"] = json.dumps(view["job"]["spec"], indent=2, default=str)
    return render(request, "job.html", token, **view)


@files.get("/jobs/{job_id}/loss.png")
def job_loss_plot(request: Request, job_id: int, _token: ApiToken = Depends(page_token)):
    with context(request).session() as session:
        job = get_job(session, job_id)
        curve = job_loss_curve(session, job.id)
        if not curve:
            raise NotFound(f"job {job_id} has recorded no loss")
        label = job.spec.get("name") or f"job {job.id}"
    return png(lambda target: loss_plot({label: curve}, target, title=f"loss curve of job {job_id} ({label})"))


# ------------------------------------------------------------------------------------------------- adapters
@router.get("/adapters")
def adapters_page(request: Request, token: ApiToken = Depends(page_token)):
    ctx = context(request)
    with ctx.session() as session:
        found = [adapter_dict(adapter, ctx.settings.home) for adapter in list_adapters(session)]
    return render(request, "adapters.html", token, adapters=found)


@router.get("/adapters/{name}/download")
def adapter_download(request: Request, name: str, _token: ApiToken = Depends(page_token)):
    """The JSON API's download (the adapter's folder as NAME.zip) for a browser, which holds the page cookie rather
    than a bearer header. The page links to it without a `download` attribute: Chromium sends such a same-origin
    download without an Accept header, which would pass it to the JSON API."""
    return download_adapter(request, name)


# ------------------------------------------------------------------------------------------------- the rest
@files.get("/static/{name}")
def static_file(name: str):
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"no file {name!r}")
    return FileResponse(path, headers={"Cache-Control": "max-age=300"})


router.include_router(files)
