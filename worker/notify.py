"""Webhook notifications: a JSON POST when a job fails for good and when a sweep's last job has ended.

The body carries a Slack-compatible `text` (a line or two for people) and the same facts as structured fields (for
scripts). The URL is the sweep's `--notify URL`, else `TUNEQUEUE_NOTIFY_URL`; with neither, nothing is sent. A POST
runs in a daemon thread with a timeout and a few retries (connection errors, 5xx, 429), so a dead or slow webhook
never blocks or fails a job; nothing here raises, and the URL is logged only through `mask_url`. At exit, a process
waits a few seconds for POSTs still under way (a burst worker that finishes a sweep exits right after).

`job_ended()` is called once a job has its final outcome (by the runner and the reaper, after `settle_children`):
a sweep is marked finished by one conditional UPDATE, so however many workers end its last jobs together, exactly
one sends "sweep finished".
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.jobs import Job, JobKind, JobStatus
from models.metrics import METRIC_FAMILIES, expand_metrics
from models.report import comparison
from models.results import Metric
from models.settings import Settings, mask_url
from models.sweeps import Sweep

log = logging.getLogger("tunequeue.notify")

TIMEOUT_S = 5.0  # per attempt: connect and answer
RETRIES = 3  # after the first attempt
BACKOFF_S = 1.0  # before the first retry, doubled each time
MAX_RETRY_AFTER_S = 30.0  # a 429's Retry-After is followed up to this
EXIT_WAIT_S = 10.0  # at exit, how long POSTs still under way are waited for, all together

_pending: set[threading.Thread] = set()
_pending_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------- sending
def post(url: str, payload: dict) -> threading.Thread | None:
    """Send `payload` as JSON to `url` from a daemon thread (returned, for tests); never raises, never waits."""
    try:
        body = json.dumps(payload, default=str).encode()
        thread = threading.Thread(target=_deliver, args=(url, body, payload.get("event", "notification")),
                                  daemon=True, name="tunequeue-notify")
        with _pending_lock:
            _pending.add(thread)
        thread.start()
        return thread
    except Exception as exc:  # a payload that cannot be encoded, no thread left: the job goes on regardless
        log.warning("notification to %s not sent: %s", mask_url(url), exc)
        return None


def _deliver(url: str, body: bytes, event: str) -> bool:
    try:
        for attempt in range(RETRIES + 1):
            wait, reason = _try_once(url, body)
            if wait is None:
                return reason == ""
            if attempt == RETRIES:
                break
            time.sleep(wait or BACKOFF_S * 2 ** attempt)
        log.warning("%s notification to %s not delivered after %d attempts: %s", event, mask_url(url), RETRIES + 1,
                    reason)
        return False
    finally:
        with _pending_lock:
            _pending.discard(threading.current_thread())


def _try_once(url: str, body: bytes) -> tuple[float | None, str]:
    """(None, "") when delivered; (None, why) when no retry can help; (seconds to wait or 0, why) to retry."""
    target, headers = _without_userinfo(url)
    request = urllib.request.Request(target, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "tunequeue-notify", **headers})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read(65536)
        return None, ""
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
        if exc.code == 429:
            return _retry_after(exc.headers.get("Retry-After")), reason
        if exc.code >= 500:
            return 0, reason
        log.warning("notification to %s refused: %s", mask_url(url), reason)
        return None, reason
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # refused, timed out, reset
        return 0, _why(exc)
    except Exception as exc:
        log.warning("notification to %s failed: %s", mask_url(url), _why(exc))
        return None, _why(exc)


def _without_userinfo(url: str) -> tuple[str, dict]:
    """urllib does not read `user:password@` in a URL: it becomes an Authorization: Basic header instead."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    host = parts.netloc.rpartition("@")[2]
    credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)),
            {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()})


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value else 0
    except ValueError:
        return 0


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error
    text = str(reason).strip()
    return f"{type(reason).__name__}: {text.splitlines()[0]}" if text else type(reason).__name__


def wait_pending(timeout: float) -> bool:
    """Wait up to `timeout` seconds in all for POSTs under way; whether none is left."""
    deadline = time.monotonic() + timeout
    while True:
        with _pending_lock:
            threads = list(_pending)
        if not threads:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        threads[0].join(min(left, 0.2))


atexit.register(wait_pending, EXIT_WAIT_S)


# --------------------------------------------------------------------------------------------------- the hooks
def job_ended(settings: Settings, session: Session, job_id: int) -> None:
    """After job `job_id` reached its final outcome (and its children were settled): tell the webhook when it
    failed for good, then mark its sweep finished when this was the sweep's last job, and tell the webhook that too
    (once). Never raises: the job's outcome is already recorded."""
    try:
        session.commit()  # ends the caller's transaction (its writes are done), so other workers' commits show
        job = session.scalar(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
        if job is None:
            return
        sweep = session.get(Sweep, job.sweep_id, populate_existing=True) if job.sweep_id else None
        url = (sweep.notify_url if sweep else None) or settings.notify_url
        if job.status == JobStatus.failed and url:
            post(url, job_failed_payload(settings, job, sweep))
        if sweep is not None and mark_sweep_finished(session, sweep.id):
            session.refresh(sweep)
            log.info("sweep %s finished", sweep.name)
            if url:
                post(url, sweep_finished_payload(settings, session, sweep))
    except Exception as exc:
        session.rollback()
        log.warning("job %s: notifications not sent: %s", job_id, exc)


def mark_sweep_finished(session: Session, sweep_id: int) -> bool:
    """Set the sweep's `finished_at` when none of its jobs is queued or running; True only for the one caller
    whose update changed the row."""
    unfinished = exists().where(Job.sweep_id == sweep_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
    changed = session.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.finished_at.is_(None), ~unfinished)
                              .values(finished_at=utcnow()))
    session.commit()
    return changed.rowcount == 1


def describe(job: Job) -> str:
    spec = job.spec or {}
    if job.kind == JobKind.finetune:
        return f"fine-tune {spec.get('name')} on {spec.get('model')}"
    if job.kind == JobKind.generate:
        variants = spec.get("adapters") or [spec.get("adapter") or "base"]
        return f"generate {', '.join(map(str, variants[:3]))}{'…' if len(variants) > 3 else ''} on {spec.get('model')}"
    return f"score of generate job {spec.get('generate_job_id')}"


def job_failed_payload(settings: Settings, job: Job, sweep: Sweep | None) -> dict:
    what = describe(job)
    error = (job.error or "no error recorded").strip()
    first_line = error.splitlines()[0] if error else ""
    where = f" (sweep {sweep.name})" if sweep else ""
    text = (f"tunequeue: job {job.id} failed for good{where}: {what}, after {job.attempts} attempt"
            f"{'s' if job.attempts != 1 else ''}\n{first_line[:300]}")
    return {"event": "job_failed", "text": text, "queue": settings.queue, "job_id": job.id, "kind": job.kind.value,
            "what": what, "error": error, "attempts": job.attempts, "max_attempts": job.max_attempts,
            "worker_host": job.worker_host, "sweep": sweep.name if sweep else None, "finished_at": job.finished_at}


def sweep_finished_payload(settings: Settings, session: Session, sweep: Sweep) -> dict:
    found = {JobStatus(status): n for status, n in session.execute(
        select(Job.status, func.count(Job.id)).where(Job.sweep_id == sweep.id).group_by(Job.status)).tuples()}
    counts = {status.value: found[status] for status in JobStatus if status in found}
    finished = _aware(sweep.finished_at or utcnow())
    wall = max(0.0, (finished - _aware(sweep.created_at)).total_seconds())
    metric = sweep_metric(session, sweep)
    best = best_row(session, sweep, metric) if metric else None
    shown_counts = ", ".join(f"{n} {status}" for status, n in counts.items()) or "no jobs"
    if best is None:
        outcome = "no scores" if metric is None else f"no adapter scored on {metric}"
    else:
        delta = f" ({best['delta']:+.4f} vs base)" if best.get("delta") is not None else ""
        outcome = f"best {best['variant']}: {metric} {best['value']:.4f}{delta}"
    text = f"tunequeue: sweep {sweep.name} finished in {_duration(wall)}: {shown_counts}\n{outcome}"
    return {"event": "sweep_finished", "text": text, "queue": settings.queue, "sweep": sweep.name,
            "points": sweep.points, "counts": counts, "jobs": sum(counts.values()), "wall_time_s": round(wall, 1),
            "created_at": sweep.created_at, "finished_at": sweep.finished_at, "metric": metric, "best": best}


def sweep_metric(session: Session, sweep: Sweep) -> str | None:
    """The sweep file's first metric (eval.metrics), else the first stored metric of its jobs in family order
    (rouge1 first); None when its jobs wrote no scores."""
    stored = set(session.scalars(select(Metric.name).distinct().where(
        Metric.job_id.in_(select(Job.id).where(Job.sweep_id == sweep.id)))))
    if not stored:
        return None
    asked = ((sweep.spec or {}).get("eval") or {}).get("metrics")
    if isinstance(asked, str):
        asked = [asked]
    preferred = expand_metrics(list(asked or [])) + [name for family in METRIC_FAMILIES.values() for name in family]
    return next((name for name in preferred if name in stored), sorted(stored)[0])


def best_row(session: Session, sweep: Sweep, metric: str) -> dict | None:
    """The report's best adapter row of the sweep on `metric` (models/report.py), in a few fields."""
    rows = comparison(session, [metric], sweep=sweep.name, intervals=False)
    best = next((row for row in rows if row.get("best")), None)
    if best is None:
        return None
    return {"variant": best["variant"], "model": best["model"], "metric": metric, "value": best[metric],
            "delta": best.get(f"delta_{metric}"), "examples": best.get("examples"),
            "hyperparameters": best.get("hyperparameters") or {}}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
