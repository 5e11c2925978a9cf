"""The JSON API's jobs: submit any job spec the CLI accepts, list them with filters, show one, read its log, cancel
it, and follow it as server-sent events. Each route calls the api/ function the CLI's command calls."""

from __future__ import annotations

import itertools

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.jobs import cancel, find_jobs, get_job, job_details, job_dict, job_dicts, submit
from api.logs import show_job_log
from api.web.auth import api_token, api_writer, context
from api.web.routes_common import JOB_BODY, MAX_JOB_BODY, json_body, submission_fields
from models.errors import InputError
from models.jobs import Job, JobKind, JobStatus
from models.specs import MAX_ID, Submission, build
from models.tokens import ApiToken

router = APIRouter(tags=["jobs"], dependencies=[Depends(api_token)])
POLL_SECONDS = 0.5  # how often a followed job's row is read
MAX_PAGE = 500


@router.post("/jobs", status_code=201, summary="Submit a fine-tune, generate or score job",
             openapi_extra=JOB_BODY, max_body_size=MAX_JOB_BODY)
async def submit_job(request: Request, token: ApiToken = Depends(api_writer)) -> dict:
    """The body is a job spec as JSON: `kind` (finetune, generate or score), the spec's fields (the CLI's options,
    with underscores: `learning_rate`, `num_train_epochs`, ...; leave a field out for its default, null is a value:
    `"eval_split": null` means no evaluation) and optionally `priority` and `max_attempts`. Checked like the CLI's
    (model, dataset, columns, adapters) before anything is written: 422 with the CLI's one-line error otherwise.
    The job records the token that submitted it."""
    data = json_body(await request.body(), "the job")
    if not isinstance(data, dict):
        raise InputError("the job must be a JSON object with 'kind': finetune, generate or score")
    submission = build(Submission, submission_fields(data))
    ctx = context(request)
    job = await run_in_threadpool(submit, ctx, data, submission, model_given=data.get("model") is not None,
                                  token_id=token.id)
    return (await run_in_threadpool(job_dicts, ctx.broker, [job]))[0]


@router.get("/jobs", summary="List jobs, newest first")
def list_jobs(request: Request, status: JobStatus | None = None, kind: JobKind | None = None,
              sweep: str | None = Query(None, description="Only this sweep's jobs."),
              limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=MAX_ID)) -> dict:
    """One page of the jobs matching the filters, `total` of them in all; `next_offset` is the next page's offset
    (null on the last page)."""
    ctx = context(request)
    with ctx.session() as session:
        page, total = find_jobs(session, status=status, kind=kind, sweep=sweep, limit=limit, offset=offset)
        jobs = job_dicts(ctx.broker, page)
    following = offset + len(jobs)
    return {"total": total, "limit": limit, "offset": offset, "next_offset": following if following < total else None,
            "jobs": jobs}


@router.get("/jobs/{job_id}", summary="One job: spec, progress, attempts, errors")
def show_job(request: Request, job_id: int) -> dict:
    """Everything `jobs show --json` prints, and `submitted_by`: the name of the token that submitted it (null: the
    CLI). Poll it to follow a job, or use /jobs/{job_id}/events. `waiting_reason` says why a queued job that needs
    something of its worker (`requires`, `min_gpu_mem`) finds no live worker that has it."""
    ctx = context(request)
    with ctx.session() as session:
        return job_details(session, get_job(session, job_id), ctx.broker)


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, summary="A job's log as text")
def job_logs(request: Request, job_id: int, tail: int | None = Query(None, ge=1, le=MAX_ID,
                                                                       description="Only the last N lines.")) -> str:
    """What `jobs logs ID [--tail N]` prints: every attempt's lines from its worker, tracebacks included."""
    lines: list[str] = []
    show_job_log(context(request), job_id, lines.append, tail)
    return "".join(line + "\n" for line in lines)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job")
def cancel_job(request: Request, job_id: int, _token: ApiToken = Depends(api_writer)) -> dict:
    """A queued job is cancelled at once; a running one is asked to stop at its next step (`outcome` says which)."""
    ctx = context(request)
    with ctx.session() as session:
        outcome = cancel(session, ctx.broker, get_job(session, job_id))
        session.expire_all()
        return {"outcome": outcome, "job": job_dict(get_job(session, job_id))}


def _existing_job(request: Request, job_id: int) -> int:
    """404 before the event stream starts, not inside it."""
    with context(request).session() as session:
        return get_job(session, job_id).id


def _job_now(request: Request, job_id: int) -> dict | None:
    with context(request).sessions() as session:
        job = session.get(Job, job_id)
        return job_dict(job) if job is not None else None


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse, summary="Follow a job (server-sent events)")
async def job_events(request: Request, job_id: int = Depends(_existing_job)):
    """A `progress` event (the job as JSON) now and whenever its status, attempt or progress changes, then an `end`
    event once it has finished (or was deleted), and the stream closes. The row is read every half second while
    the client listens."""
    numbers = itertools.count(1)
    last = None
    while True:
        job = await run_in_threadpool(_job_now, request, job_id)
        if job is None:
            yield ServerSentEvent(event="end", id=str(next(numbers)),
                                  data={"id": job_id, "status": None, "error": "the job was deleted"})
            return
        state = (job["status"], job["attempts"], job["progress"])
        if state != last:
            yield ServerSentEvent(event="progress", id=str(next(numbers)), data=job)
            last = state
        if JobStatus(job["status"]).finished:
            yield ServerSentEvent(event="end", id=str(next(numbers)), data=job)
            return
        await anyio.sleep(POLL_SECONDS)
