"""Scoring: `score_rows(spec, session, job_id)` turns a generate job's rows into metric rows, one metric family after
another (`--metric rouge --metric bertscore --metric judge`; worker/metrics/ has one module per family).

Each family is resumable on its own: one whose rows this job already wrote in full (an earlier attempt that crashed
later) is not computed again. A reference-based family (rouge, bleu, bertscore, classification, evaluate:...) scores
each variant's rows as one corpus and replaces its per-example and aggregate rows in one transaction. The LLM judge
writes its verdicts (`judgements`) in chunks as examples finish, so a new attempt continues where the last stopped;
its per-example scores and means are written once every verdict is in. Rows have natural unique keys, so a re-run
never duplicates them.
"""

from __future__ import annotations

import time
from typing import Optional

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from models.errors import JobFailed
from models.jobs import Job, Lease
from models.metrics import JUDGE_CRITERIA, METRIC_FAMILIES, REFERENCE_VARIANT, is_evaluate, metric_families
from models.results import Adapter, ExampleScore, Generation, Judgement, Metric
from models.specs import ScoreSpec, parse_spec
from worker.faults import Faults
from worker.jobs import ProgressFn
from worker.metrics import scorer_for
from worker.metrics.classification import classification_metrics  # noqa: F401 (imported from here by callers)
from worker.metrics.rouge import ROUGE_TYPES, rouge_scores  # noqa: F401 (imported from here by tests)
from worker.ml.kinds import resolve_model_kind

JUDGE_CHUNK_EXAMPLES = 16  # judge verdicts are committed every this many examples ...
JUDGE_CHUNK_SECONDS = 20.0  # ... or this many seconds, whichever comes first


class _Context:
    """What every family of one score job writes with: the job, its generate job's rows, the fence, progress."""

    def __init__(self, spec: ScoreSpec, session: Session, job_id: int, rows: list[Generation], base_model: str,
                 lease: Optional[Lease], on_progress: Optional[ProgressFn], faults: Optional[Faults]):
        self.spec, self.session, self.job_id, self.rows, self.base_model = spec, session, job_id, rows, base_model
        self.lease, self.on_progress, self.faults = lease, on_progress, faults
        self.variants = list(dict.fromkeys(r.variant for r in rows))

    def progress(self, family: str, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress({"step": done, "total_steps": total, "metric": family})

    def hold(self) -> None:
        if self.lease is not None:
            self.lease.hold(self.session)

    def metric_row(self, variant: str, name: str, value: float, n_examples: int, settings: Optional[dict],
                   first: Optional[Generation]) -> Metric:
        return Metric(job_id=self.job_id, generate_job_id=self.spec.generate_job_id, variant=variant,
                      adapter_id=first.adapter_id if first is not None and variant != REFERENCE_VARIANT else None,
                      base_model=self.base_model, split=self.rows[0].split, name=name, value=value,
                      n_examples=n_examples, settings=settings)


def score_rows(spec: ScoreSpec, session: Session, *, job_id: int, on_progress: Optional[ProgressFn] = None,
               faults: Optional[Faults] = None, lease: Optional[Lease] = None, cache=None, settings=None) -> dict:
    """Score the generate job's rows with every family the spec asks for (fenced by `lease`); `cache` is the worker's
    model cache and `settings` its Settings (the judge's local model and its endpoint)."""
    generate_job = session.get(Job, spec.generate_job_id)
    generate_spec = parse_spec(generate_job.spec)
    if generate_spec.model_kind is None:  # a job stored before the kind was resolved at enqueue
        generate_spec = resolve_model_kind(generate_spec)
    families = metric_families(spec.metrics, generate_spec.model_kind, spec.generate_job_id)
    rows = list(session.scalars(select(Generation).where(Generation.job_id == spec.generate_job_id)
                                .order_by(Generation.id)))
    referenced = [r for r in rows if r.reference is not None]
    needs_reference = [f for f in families if f != "judge"]
    if (needs_reference and not referenced) or not rows:
        raise JobFailed(f"generate job {spec.generate_job_id} has no rows with a reference to score"
                        + (" (the judge alone needs none)" if rows else ""))
    for family in families:
        context = _Context(spec, session, job_id, rows if family == "judge" else referenced, generate_spec.model,
                           lease, on_progress, faults)
        if _finished(session, context, family):
            continue
        if family == "judge":
            _score_judge(context, cache, settings)
        else:
            _score_family(context, family)
    return _summary(session, job_id, families, referenced or rows)


def _finished(session: Session, context: _Context, family: str) -> bool:
    """Whether this job already wrote `family`'s rows for every variant (by an earlier attempt)."""
    stored = session.execute(select(Metric.variant, Metric.name, Metric.settings)
                             .where(Metric.job_id == context.job_id)).tuples().all()
    variants = context.variants + ([REFERENCE_VARIANT] if family == "judge" and context.spec.judge_references else [])
    if is_evaluate(family):
        target = family.split(":", 1)[1]
        return set(variants) <= {v for v, _n, s in stored if (s or {}).get("evaluate") == target}
    have = {(v, n) for v, n, _s in stored}
    return all((v, n) in have for v in variants for n in METRIC_FAMILIES[family])


def _score_family(context: _Context, family: str) -> None:
    """A reference-based family: every variant scored as its own corpus, then written in one transaction."""
    scorer = scorer_for(family, context.spec)
    written: list = []
    done = 0
    for variant in context.variants:
        picked = [r for r in context.rows if r.variant == variant]
        labels = _label_order(context.session, picked) if family == "classification" else None
        scored = scorer.score([r.prediction for r in picked], [r.reference for r in picked], labels=labels)
        written += [ExampleScore(job_id=context.job_id, generation_id=row.id, name=name, value=value)
                    for row, values in zip(picked, scored.per_example) for name, value in values.items()]
        written += [context.metric_row(variant, name, value, len(picked), scorer.settings, picked[0])
                    for name, value in scored.aggregate.items()]
        done += len(picked)
        context.progress(family, done, len(context.rows))
    names = {m.name for m in written if isinstance(m, Metric)}
    if context.faults:
        context.faults.maybe_delay_scoring()
    context.hold()
    _replace(context, names, written)


def _replace(context: _Context, names: set[str], written: list) -> None:
    """This job's rows of metrics `names` replaced by `written`, and committed."""
    session = context.session
    session.execute(delete(ExampleScore).where(ExampleScore.job_id == context.job_id, ExampleScore.name.in_(names)))
    session.execute(delete(Metric).where(Metric.job_id == context.job_id, Metric.name.in_(names)))
    session.add_all(written)
    session.commit()


def _label_order(session: Session, picked: list[Generation]) -> list[str]:
    """The adapter's head order when known (so "positive" is the positive class), else the labels sorted."""
    found = sorted({r.reference for r in picked} | {r.prediction for r in picked})
    adapter = session.get(Adapter, picked[0].adapter_id) if picked[0].adapter_id else None
    labels = (adapter.hyperparameters or {}).get("labels") if adapter else None
    if labels and set(found) <= set(labels):
        return list(labels)
    return found


# ------------------------------------------------------------------------------------------------------- judge
def _score_judge(context: _Context, cache, settings) -> None:
    """Rate every generated summary (and with judge_references, each example's reference once) on the four
    criteria; verdicts are committed in chunks, those of an earlier attempt are kept and not asked again."""
    from models.settings import Settings
    from worker.metrics.judge import JudgeOptions, judge

    options = JudgeOptions.from_spec(context.spec, settings or Settings.from_env())
    items = [(r.variant, r) for r in context.rows]
    if context.spec.judge_references:
        first_of_example = {}
        for row in context.rows:
            if row.reference is not None:
                first_of_example.setdefault(row.example_id, row)
        items += [(REFERENCE_VARIANT, row) for row in first_of_example.values()]
    session = context.session
    complete = set(session.execute(
        select(Judgement.variant, Judgement.example_id).where(Judgement.job_id == context.job_id)
        .group_by(Judgement.variant, Judgement.example_id)
        .having(func.count() == len(JUDGE_CRITERIA))).tuples())
    skip = [i for i, (variant, row) in enumerate(items) if (variant, row.example_id) in complete]
    pending: list[tuple[int, dict]] = []
    state = {"done": len(skip), "flushed_at": time.monotonic()}

    def flush() -> None:
        if not pending:
            return
        context.hold()
        for index, verdicts in pending:
            variant, row = items[index]
            session.execute(delete(Judgement).where(Judgement.job_id == context.job_id, Judgement.variant == variant,
                                                    Judgement.example_id == row.example_id))
            session.add_all([Judgement(job_id=context.job_id, generation_id=row.id, variant=variant,
                                       example_id=row.example_id, criterion=v.criterion, score=v.score,
                                       reason=v.reason or "", raw=v.raw, parsed=v.parsed)
                             for v in verdicts.values()])
        session.commit()
        state["done"] += len(pending)
        pending.clear()
        state["flushed_at"] = time.monotonic()
        context.progress("judge", state["done"], len(items))

    def on_result(index: int, verdicts: dict) -> None:
        pending.append((index, verdicts))
        if len(pending) >= JUDGE_CHUNK_EXAMPLES or time.monotonic() - state["flushed_at"] > JUDGE_CHUNK_SECONDS:
            flush()

    sources = [row.source for _variant, row in items]
    summaries = [row.reference if variant == REFERENCE_VARIANT else row.prediction for variant, row in items]
    try:
        judge(sources, summaries, options, cache=cache, on_result=on_result, skip=skip)
    finally:
        flush()  # what was judged stays judged, also when the budget ran out
    _write_judge_scores(context, items, {"backend": options.backend, "model": options.model,
                                         "scoring": options.scoring})


def _write_judge_scores(context: _Context, items: list[tuple[str, Generation]], settings: dict) -> None:
    """Per-example judge_<criterion> scores of the generations (parsed verdicts only) and each variant's means."""
    session = context.session
    verdicts = session.scalars(select(Judgement).where(Judgement.job_id == context.job_id,
                                                       Judgement.parsed.is_(True))).all()
    first = {}
    for variant, row in items:
        first.setdefault(variant, row)
    written: list = [ExampleScore(job_id=context.job_id, generation_id=v.generation_id, name=f"judge_{v.criterion}",
                                  value=v.score)
                     for v in verdicts if v.variant != REFERENCE_VARIANT and v.generation_id is not None]
    for variant in first:
        for criterion in JUDGE_CRITERIA:
            scores = [v.score for v in verdicts if v.variant == variant and v.criterion == criterion]
            if scores:
                written.append(context.metric_row(variant, f"judge_{criterion}", sum(scores) / len(scores),
                                                  len(scores), settings, first[variant]))
    context.hold()
    _replace(context, set(METRIC_FAMILIES["judge"]), written)


# ----------------------------------------------------------------------------------------------------- summary
def _summary(session: Session, job_id: int, families: list[str], rows: list[Generation]) -> dict:
    """The job's result, read back from its rows (so a resumed job reports what a first run did): the first
    variant's value of every metric, each model-based family's settings, and the judge's unparsed replies."""
    first_variant = rows[0].variant
    stored = session.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.id)).all()
    result: dict = {"examples": len(rows), "metrics": families[0] if len(families) == 1 else families}
    result.update({m.name: round(m.value, 4) for m in stored if m.variant == first_variant})
    settings = {}
    for family in families:
        found = [m.settings for m in stored if m.settings and (
            m.name in METRIC_FAMILIES.get(family, ()) or m.settings.get("evaluate") == family.split(":", 1)[-1])]
        if found:
            settings[family] = found[0]
    if settings:
        result["settings"] = settings
    if "judge" in families:
        result["judge_unparsed"] = session.scalar(select(func.count()).select_from(Judgement).where(
            Judgement.job_id == job_id, Judgement.parsed.is_(False)))
    return result
