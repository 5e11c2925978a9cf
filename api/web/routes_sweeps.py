"""The JSON API's sweeps: submit a sweep file (YAML or JSON, dry run or for real), list them, show one, retry its
failed points, cancel it. Each route calls the api/ function the CLI's command calls; a YAML body goes through the
sweep file's own safe loader and checks (api/sweeps.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from api.pipelines import cancel_sweep, retry_sweep, submit_sweep, sweep_details, sweep_summaries
from api.sweeps import MAX_FILE_BYTES, load_sweep_text
from api.web.auth import api_token, api_writer, context
from api.web.routes_common import json_body, submission_fields
from models.errors import InputError
from models.specs import Submission, build
from models.tokens import ApiToken

router = APIRouter(tags=["sweeps"], dependencies=[Depends(api_token)])

SWEEP_BODY = {"requestBody": {"required": True, "content": {
    "application/yaml": {"schema": {"type": "string"}, "example": "name: lr-rank\nbase: {model: tiny-t5, "
                         "num_train_epochs: 2}\ngrid: {learning_rate: [1.0e-3, 3.0e-3]}\neval: {limit: 100}\n"},
    "application/json": {"schema": {"type": "object", "description": "The sweep file as JSON, or {\"sweep\": the "
                                    "file, and any of the options: name, dry_run, overrides, notify, priority, "
                                    "max_attempts}"}}}}}


class SweepOptions(BaseModel):
    """The options of `manage.py sweep`, from the query string or a JSON body's envelope."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    dry_run: bool = False
    overrides: list[str] = []
    notify: str | None = None
    priority: int | None = None
    max_attempts: int | None = None


def _sweep_and_options(raw: bytes, content_type: str, query: dict) -> tuple[dict, SweepOptions]:
    """The sweep file's data and the options: a JSON body is the file itself or {"sweep": file, options...}; any
    other body is the YAML file. An option given both in the query and the body is refused."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        return load_sweep_text(raw, "the sweep"), build(SweepOptions, query)
    data = json_body(raw, "the sweep")
    if not isinstance(data, dict):
        raise InputError("the sweep must be a mapping with base/grid/random/eval blocks")
    if "sweep" not in data:
        return data, build(SweepOptions, query)
    options = {key: value for key, value in data.items() if key != "sweep"}
    both = sorted(set(options) & set(query))
    if both:
        raise InputError(f"{both[0]}: given in the query and in the body; give it once")
    if not isinstance(data["sweep"], dict):
        raise InputError("sweep: must be a mapping with base/grid/random/eval blocks")
    return data["sweep"], build(SweepOptions, {**query, **options})


@router.post("/sweeps", status_code=201, summary="Submit a sweep file (YAML or JSON)", openapi_extra=SWEEP_BODY,
             max_body_size=MAX_FILE_BYTES)
async def submit_sweep_file(request: Request, name: str | None = Query(None, description="Instead of the file's."),
                            dry_run: bool = Query(False, description="Expand and check; enqueue nothing."),
                            overrides: list[str] = Query([], description="key=value or block.key=value, repeatable."),
                            notify: str | None = Query(None, description="POST a JSON summary here at the end."),
                            priority: int | None = Query(None), max_attempts: int | None = Query(None),
                            token: ApiToken = Depends(api_writer)) -> JSONResponse:
    """What `manage.py sweep FILE [OVERRIDES] [--name --dry-run --notify --priority --max-attempts] --json` does and
    prints. Send the file as YAML (`Content-Type: application/yaml`; any type but JSON is read as YAML) or as JSON.
    The whole sweep is checked before anything is enqueued (422 naming the point and the field otherwise); a dry
    run answers 200 with the expanded points, a queued sweep 201 with its job ids."""
    given = {"name": name, "dry_run": dry_run or None, "overrides": overrides or None, "notify": notify,
             "priority": priority, "max_attempts": max_attempts}
    data, options = _sweep_and_options(await request.body(), request.headers.get("content-type", ""),
                                       {key: value for key, value in given.items() if value is not None})
    submission = build(Submission, submission_fields(options.model_dump()))
    done = await run_in_threadpool(submit_sweep, context(request), data, name=options.name,
                                   overrides=options.overrides, dry_run=options.dry_run, notify_url=options.notify,
                                   submission=submission, token_id=token.id)
    return JSONResponse(done.as_dict(), status_code=200 if options.dry_run else 201)


@router.get("/sweeps", summary="Every sweep with its job counts by status")
def list_sweeps(request: Request) -> list[dict]:
    with context(request).session() as session:
        return sweep_summaries(session)


@router.get("/sweeps/{name}", summary="One sweep: its file (as parsed) and its jobs")
def show_sweep(request: Request, name: str) -> dict:
    with context(request).session() as session:
        return sweep_details(session, name)


@router.post("/sweeps/{name}/retry", summary="Re-queue a sweep's failed, cancelled and skipped points")
def retry_failed_points(request: Request, name: str, max_attempts: int | None = Query(None),
                        _token: ApiToken = Depends(api_writer)) -> dict:
    """What `sweeps retry NAME --json` does and prints: the re-queued fine-tunes and evaluation jobs (both empty
    when every job succeeded). Refused (422) while a job of the sweep is queued or running."""
    ctx = context(request)
    limits = submission_fields({"max_attempts": max_attempts})
    build(Submission, limits)
    with ctx.session() as session:
        again = retry_sweep(session, ctx.broker, name, **limits)
        return {"sweep": name, "finetunes": [job.id for job in again if job.kind.value == "finetune"],
                "evaluation": [job.id for job in again if job.kind.value != "finetune"]}


@router.post("/sweeps/{name}/cancel", summary="Cancel every unfinished job of a sweep")
def cancel_whole_sweep(request: Request, name: str, _token: ApiToken = Depends(api_writer)) -> dict:
    """Queued jobs are cancelled at once, running ones asked to stop; `outcomes` counts each."""
    ctx = context(request)
    with ctx.session() as session:
        return {"sweep": name, "outcomes": cancel_sweep(session, ctx.broker, name)}
