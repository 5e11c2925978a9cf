"""What the job page shows: the job as `jobs show ID --json` gives it (a sweep point's search and rungs too), its log
tail (`jobs logs ID`), and for a
generate or score job a page of its examples: source, reference and every variant's output side by side with its
per-example scores, optionally ordered by how much two variants differ on a metric (`report --compare A B`)."""

from __future__ import annotations

from urllib.parse import urlencode

from sqlalchemy.orm import Session

from api.context import AppContext
from api.jobs import describe, get_job, job_full, variants_of
from api.logs import read_job_log
from api.render import comparison_sentence
from api.report import ReportQuery, compare_runs
from models.errors import InputError, NotFound
from models.jobs import Job, JobKind
from models.metrics import METRIC_FAMILIES
from models.report import examples_side_by_side, generated_example_ids, job_loss_curve, score_job_of

LOG_TAIL = 200  # lines
PAGE_SIZE = 10  # examples
# how two compared variants order the examples: the CLI's order first
ORDERS = {"abs": "largest difference first (as report --compare)", "a": "A better first", "b": "B better first"}
METRIC_ORDER = [name for names in METRIC_FAMILIES.values() for name in names]


def job_view(ctx: AppContext, session: Session, job: Job, *, a: str | None, b: str | None, metric: str | None,
             order: str, page: int) -> dict:
    return {"job": job_full(session, job), "what": describe(job), "log": read_job_log(ctx, job.id, LOG_TAIL),
            "log_tail": LOG_TAIL, "has_loss": job.kind == JobKind.finetune and bool(job_loss_curve(session, job.id)),
            "examples": None if job.kind == JobKind.finetune else examples_view(
                session, job, a=a, b=b, metric=metric, order=order if order in ORDERS else "abs", page=page)}


def examples_view(session: Session, job: Job, **asked) -> dict:
    """The examples part of the job page; for a score job whose generate job is gone, only why there are none."""
    try:
        return _examples(session, job, **asked)
    except NotFound as exc:
        return {"count": 0, "problem": str(exc), "rows": []}


def _examples(session: Session, job: Job, *, a: str | None, b: str | None, metric: str | None, order: str,
              page: int) -> dict:
    """One page of the generate job's examples (for a score job: the examples it scored), with the comparison of
    `a` and `b` on `metric` when both are given."""
    generate_job = job if job.kind == JobKind.generate else get_job(session, job.spec["generate_job_id"])
    score_id = job.id if job.kind == JobKind.score else score_job_of(session, generate_job.id)
    split = generate_job.spec.get("split") or "test"
    ordered = generated_example_ids(session, generate_job.id)
    view = {"generate_job_id": generate_job.id, "score_job_id": score_id, "split": split, "count": len(ordered),
            "a": a, "b": b, "metric": metric, "order": order, "orders": ORDERS, "sentence": None, "problem": None}
    first_page = examples_side_by_side(session, generate_job.id, score_id, ordered[:PAGE_SIZE])
    variants = _variants(variants_of(generate_job), first_page)
    metrics = sorted({m for row in first_page for out in row["outputs"].values() for m in out["scores"]},
                     key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m))
    view.update(variants=variants, metrics=metrics)
    differences: dict[str, float] = {}
    if a and b:
        try:
            if score_id is None or not metrics:
                raise NotFound(f"generate job {generate_job.id} is not scored yet: nothing to compare")
            chosen = metric or metrics[0]
            summary, pairs = compare_runs(session, ReportQuery([chosen], split), a, b, None, score_job_id=score_id)
        except (NotFound, InputError) as exc:
            view["problem"] = str(exc)
        else:
            if order != "abs":  # the CLI's order is the largest |A − B| first, as compare_runs returns them
                pairs = sorted(pairs, key=lambda p: (-p["difference"] if order == "a" else p["difference"],
                                                     p["example_id"]))
            ordered = [p["example_id"] for p in pairs]
            differences = {p["example_id"]: p["difference"] for p in pairs}
            view.update(metric=chosen, sentence=comparison_sentence(summary), count=len(ordered))
    pages = max(1, -(-len(ordered) // PAGE_SIZE))
    page = min(max(page, 1), pages)
    rows = examples_side_by_side(session, generate_job.id, score_id,
                                 ordered[(page - 1) * PAGE_SIZE:page * PAGE_SIZE])
    for row in rows:
        row["difference"] = differences.get(row["example_id"])
    kept = {"a": a, "b": b, "metric": view["metric"], "order": order if a and b else None}
    link = (lambda n: f"/jobs/{job.id}?" + urlencode({**{k: v for k, v in kept.items() if v}, "page": n})
            + "#examples")
    view.update(rows=rows, page=page, pages=pages, first=(page - 1) * PAGE_SIZE + 1,
                previous=link(page - 1) if page > 1 else None, next=link(page + 1) if page < pages else None)
    return view


def _variants(planned: list[str], rows: list[dict]) -> list[str]:
    """The variants that have outputs, in the generate job's own order."""
    present = {variant for row in rows for variant in row["outputs"]}
    return [v for v in planned if v in present] + sorted(present - set(planned))
