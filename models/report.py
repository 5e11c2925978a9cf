"""Report queries: the comparison table read straight from the result rows (so a SQL client sees the same numbers).

For each (base model, variant) the newest score job's value of each metric on the split is used (`metrics.value`,
the mean over `example_scores`); the 95% interval is a percentile bootstrap over that job's `example_scores`; each
row's delta is taken against the base row of the same base model.

Rows scored on different example sets (a base run on 100 examples beside adapters run on 50) are compared on the
examples they all share: their means and intervals are recomputed over that intersection, `examples` counts it,
`examples_scored` keeps each row's own count and `example_set` says which case holds ("same", "shared", or "own"
when they share none or lack per-example scores, so each row stays on its own examples).

A metric whose rows were computed with different settings (BERTScore with two models) is refused rather than put
in one column. `agreement` gives, per pair of metrics, the rank correlation of their per-example scores.

A sweep searched by ASHA or TPE adds to each row how far its point got (`search_points`: its last rung, the steps it
trained, the decision there) and a row for every point that was not evaluated (a pruned one), with the metric it was
decided on, so the report shows the whole search.
"""

from __future__ import annotations

import json
import random

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.errors import InputError, NotFound
from models.jobs import Job, JobKind
from models.metrics import REFERENCE_VARIANT
from models.results import Adapter, ExampleScore, Generation, Judgement, LossPoint, Metric
from models.search import Rung
from models.specs import FinetuneSpec
from models.sweeps import Sweep

BOOTSTRAP_SAMPLES = 1000


def known_metric_names(session: Session) -> set[str]:
    return set(session.scalars(select(Metric.name).distinct()))


def sweep_by_name(session: Session, name: str) -> Sweep:
    sweep = session.scalar(select(Sweep).where(Sweep.name == name))
    if sweep is None:
        raise NotFound(f"sweep {name!r} does not exist")
    return sweep


def bootstrap_interval(values: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (deterministic for a given seed)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def example_values(session: Session, score_job_id: int, variant: str, metric: str) -> list[float]:
    return list(example_scores_by_id(session, score_job_id, variant, metric).values())


def example_scores_by_id(session: Session, score_job_id: int, variant: str, metric: str) -> dict[str, float]:
    """The score job's per-example values of `metric` for `variant`, by example id, in example id order (empty for
    a corpus-level metric such as f1, which has none). The judged references' come from the judge's verdicts."""
    if variant == REFERENCE_VARIANT:
        return {} if not metric.startswith("judge_") else dict(session.execute(
            select(Judgement.example_id, Judgement.score)
            .where(Judgement.job_id == score_job_id, Judgement.variant == variant, Judgement.parsed.is_(True),
                   Judgement.criterion == metric.removeprefix("judge_"))
            .order_by(Judgement.example_id)).tuples().all())
    return dict(session.execute(
        select(Generation.example_id, ExampleScore.value).join(Generation, Generation.id == ExampleScore.generation_id)
        .where(ExampleScore.job_id == score_job_id, ExampleScore.name == metric, Generation.variant == variant)
        .order_by(Generation.example_id)).tuples().all())


def _newest_metrics(session: Session, metrics: list[str], split: str, sweep: Sweep | None):
    scope = select(Metric).where(Metric.split == split, Metric.name.in_(metrics))
    if sweep is not None:
        scope = scope.where(Metric.job_id.in_(select(Job.id).where(Job.sweep_id == sweep.id)))
    scope = scope.subquery()
    newest = (select(scope.c.base_model, scope.c.variant, scope.c.name, func.max(scope.c.job_id).label("job_id"))
              .group_by(scope.c.base_model, scope.c.variant, scope.c.name).subquery())
    return session.execute(
        select(Metric, Adapter)
        .join(newest, (Metric.base_model == newest.c.base_model) & (Metric.variant == newest.c.variant)
              & (Metric.name == newest.c.name) & (Metric.job_id == newest.c.job_id))
        .outerjoin(Adapter, Adapter.id == Metric.adapter_id)
        .where(Metric.split == split)
    ).all()


def comparison(session: Session, metrics: list[str], split: str = "test", variants: list[str] | None = None, *,
               sweep: str | None = None, sort: str | None = None, top: int | None = None,
               intervals: bool = True) -> list[dict]:
    """One dict per (base model, variant): metric means, 95% intervals, deltas vs base, examples (and how they
    relate across rows: see the module's docstring), training time, mean queue wait of its jobs, the
    hyperparameters that vary between rows, and `best` on the row with the highest `sort` metric."""
    sweep_row = sweep_by_name(session, sweep) if sweep else None
    table: dict[tuple[str, str], dict] = {}
    order: dict[tuple[str, str], tuple] = {}
    hyper: dict[tuple[str, str], dict] = {}
    job_ids: dict[tuple[str, str], set[int]] = {}
    scores: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    found = [(m, a) for m, a in _newest_metrics(session, metrics, split, sweep_row)
             if variants is None or m.variant in variants]
    check_comparable([m for m, _a in found])
    for metric, adapter in found:
        key = (metric.base_model, metric.variant)
        row = table.setdefault(key, {
            "model": metric.base_model, "variant": metric.variant, "split": split, "examples": metric.n_examples,
            "train_time_s": round(adapter.duration_s, 1) if adapter and adapter.duration_s else None,
        })
        order[key] = (metric.variant != "base", 0, adapter.created_at.isoformat() if adapter else "", metric.variant)
        hyper[key] = dict(adapter.hyperparameters) if adapter else {}
        job_ids.setdefault(key, set()).update({metric.job_id, adapter.job_id if adapter else None} - {None})
        row[metric.name] = metric.value
        scores.setdefault(key, {})[metric.name] = example_scores_by_id(session, metric.job_id, metric.variant,
                                                                       metric.name)
        row["examples"] = min(row["examples"], metric.n_examples)
    _align_example_sets(table, scores, intervals)
    if sweep_row is not None and table:
        _add_search(session, sweep_row, table, order, hyper, job_ids)
    for key, wait in _mean_queue_waits(session, job_ids).items():
        table[key]["queue_wait_s"] = wait
    rows = [table[key] for key in sorted(table, key=lambda k: (k[0], order[k]))]
    fixed = ("base", REFERENCE_VARIANT)  # rows that are no run of their own: no hyperparameters, kept by --top,
    varied = _varied_keys([hyper[(r["model"], r["variant"])] for r in rows if r["variant"] not in fixed])
    for row in rows:
        params = hyper[(row["model"], row["variant"])]
        row["hyperparameters"] = {k: params.get(k) for k in varied}
        base = table.get((row["model"], "base"))
        for name in metrics:
            ok = base is not None and row.get(name) is not None and base.get(name) is not None
            row[f"delta_{name}"] = row[name] - base[name] if ok else None
    sort_metric = sort or (metrics[0] if metrics else None)
    if sort is not None:
        if sort not in metrics:
            raise InputError(f"--sort {sort!r} is not one of the reported metrics ({', '.join(metrics)})")
        rows.sort(key=lambda r: (r.get(sort) is None, -(r.get(sort) or 0)))
    # ... never "best"
    if top is not None:
        kept = [r for r in rows if r["variant"] not in fixed][:top]
        rows = [r for r in rows if r["variant"] in fixed or r in kept]
    candidates = [r for r in rows if r["variant"] not in fixed and r.get(sort_metric) is not None]
    best = max(candidates, key=lambda r: r[sort_metric]) if candidates else None
    for row in rows:
        row["best"] = row is best
    return rows


SEARCH_FIELDS = ("last_rung", "steps", "decision", "rung_metric", "rung_value")
DECISION_WORDS = {"prune": "pruned", "promote": "promoted", "complete": "complete", "wait": "waiting"}


def search_points(session: Session, sweep: Sweep) -> list[dict]:
    """Each fine-tune point of an ASHA or TPE sweep (none for a grid sweep), in job order: its job, adapter name and
    status, its `rungs` rows ((step, value, decision) in step order), and how far it got: `last_rung` (the step of its
    last rung row), `steps` (the steps it trained: a promoted point resumes where it stopped, so the steps of its
    attempts add up to its last step), `decision` there (promoted, pruned or complete; a point that failed or was
    cancelled after a promotion says so) and `rung_value`, its `rung_metric` at that rung."""
    jobs = [job for job in sweep_jobs(session, sweep) if job.kind == JobKind.finetune and job.spec.get("search")]
    if not jobs:
        return []
    rungs: dict[int, list[Rung]] = {}
    for rung in session.scalars(select(Rung).where(Rung.job_id.in_([job.id for job in jobs]))
                                .order_by(Rung.job_id, Rung.step)):
        rungs.setdefault(rung.job_id, []).append(rung)
    points = []
    for job in jobs:
        rows = rungs.get(job.id, [])
        last = rows[-1] if rows else None
        decision = DECISION_WORDS.get(last.decision, last.decision) if last else None
        if decision == "promoted" and job.status.finished:
            decision = job.status.value
        elif decision is None and job.status.finished and job.status.value != "succeeded":
            decision = job.status.value
        trained = [last.step if last else 0, (job.result or {}).get("steps") or 0,
                   (job.progress or {}).get("step") or 0]
        points.append({"job_id": job.id, "variant": job.spec["name"], "model": job.spec["model"],
                       "status": job.status.value, "last_rung": last.step if last else None, "steps": max(trained),
                       "decision": decision, "rung_metric": job.spec["search"]["metric"],
                       "rung_value": last.value if last else None,
                       "rungs": [{"step": r.step, "value": r.value, "decision": r.decision} for r in rows]})
    return points


def _add_search(session: Session, sweep: Sweep, table: dict, order: dict, hyper: dict, job_ids: dict) -> None:
    """The search's fields on every row of a searched sweep (None on the base row), and a row for each point that
    was not evaluated (no metric values, `examples` None), after the evaluated ones in job order."""
    points = search_points(session, sweep)
    if not points:
        return
    state = next(iter(table.values()))["example_set"]
    for row in table.values():
        row.update({name: None for name in SEARCH_FIELDS})
    adapters = {a.name: a for a in session.scalars(select(Adapter).where(
        Adapter.name.in_([p["variant"] for p in points])))}
    for point in points:
        key = (point["model"], point["variant"])
        row = table.get(key)
        if row is None:
            adapter = adapters.get(point["variant"])
            job = session.get(Job, point["job_id"])
            row = table[key] = {
                "model": point["model"], "variant": point["variant"], "split": next(iter(table.values()))["split"],
                "examples": None, "examples_scored": None, "example_set": state, "kept_own_examples": [],
                "train_time_s": round(adapter.duration_s, 1) if adapter and adapter.duration_s else None}
            order[key] = (True, 1, f"{point['job_id']:020d}", point["variant"])
            hyper[key] = dict(adapter.hyperparameters) if adapter else \
                FinetuneSpec.model_validate(job.spec).hyperparameters
            job_ids[key] = {point["job_id"]}
        row.update({name: point[name] for name in SEARCH_FIELDS})


def check_comparable(metric_rows: list[Metric]) -> None:
    """InputError when one metric's rows were computed with different settings (BERTScore with two models, the
    judge with two judges): such values are not comparable, so they never share a column."""
    seen: dict[str, dict[str, dict | None]] = {}
    for row in metric_rows:
        seen.setdefault(row.name, {})[json.dumps(row.settings, sort_keys=True)] = row.settings
    for name, settings in seen.items():
        if len(settings) > 1:
            first, second = list(settings.values())[:2]
            raise InputError(f"{name} was scored with different settings ({settings_text(first)} vs "
                             f"{settings_text(second)}): not comparable; rescore the runs alike, or report them "
                             "apart (--sweep)")


def settings_text(settings: dict | None) -> str:
    """`model=roberta-large num_layers=17 idf=off`: a metric's settings in one line."""
    if not settings:
        return "no recorded settings"
    return " ".join(f"{k}={('on' if v else 'off') if isinstance(v, bool) else v}" for k, v in settings.items())


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the ranks, tied values sharing their mean rank; None
    for fewer than 3 pairs or when either side is constant."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mean = (len(xs) + 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    var_x, var_y = sum((a - mean) ** 2 for a in rx), sum((b - mean) ** 2 for b in ry)
    return cov / (var_x * var_y) ** 0.5 if var_x and var_y else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def agreement(session: Session, metrics: list[str], split: str = "test", variants: list[str] | None = None, *,
              sweep: str | None = None) -> list[dict]:
    """Per pair of metrics, how far they agree: Spearman's rank correlation of their per-example scores over the
    (run, example) pairs both scored (newest score job of each run and metric, as in the report)."""
    sweep_row = sweep_by_name(session, sweep) if sweep else None
    found = [m for m, _a in _newest_metrics(session, metrics, split, sweep_row)
             if variants is None or m.variant in variants]
    check_comparable(found)
    values: dict[str, dict[tuple, float]] = {name: {} for name in metrics}
    for row in found:
        for example_id, value in example_scores_by_id(session, row.job_id, row.variant, row.name).items():
            values[row.name][(row.base_model, row.variant, example_id)] = value
    pairs = []
    for i, a in enumerate(metrics):
        for b in metrics[i + 1:]:
            shared = sorted(values[a].keys() & values[b].keys())
            rho = spearman([values[a][k] for k in shared], [values[b][k] for k in shared])
            pairs.append({"metric_a": a, "metric_b": b, "examples": len(shared),
                          "runs": len({k[:2] for k in shared}), "spearman": rho})
    return pairs


def _align_example_sets(table: dict[tuple, dict], scores: dict[tuple, dict[str, dict[str, float]]],
                        intervals: bool) -> None:
    """Put the rows on one example set (see the module's docstring) and add the intervals. A metric without
    per-example scores (f1) keeps its stored value; its name goes into the row's `kept_own_examples`."""
    own = {key: _scored_ids(scores.get(key, {})) for key in table}
    for row in table.values():
        row["examples_scored"] = row["examples"]
    if own and all(ids is not None for ids in own.values()):
        shared = set.intersection(*own.values())
        state = "same" if all(ids == shared for ids in own.values()) else "shared" if shared else "own"
    else:  # some row has no per-example scores: only the counts can tell
        shared = set()
        state = "same" if len({row["examples"] for row in table.values()}) <= 1 else "own"
    for key, row in table.items():
        row["example_set"], row["kept_own_examples"] = state, []
        for name, by_example in scores.get(key, {}).items():
            values = list(by_example.values())
            if state == "shared":
                if values:
                    values = [v for example_id, v in by_example.items() if example_id in shared]
                    row[name] = sum(values) / len(values)
                else:
                    row["kept_own_examples"].append(name)
            if intervals:
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap_interval(values)
        if state == "shared":
            row["examples"] = len(shared)


def _scored_ids(by_metric: dict[str, dict[str, float]]) -> set[str] | None:
    """The example ids a row's per-example scores cover (those all its metrics with such scores share); None when
    it has none."""
    sets = [set(by_example) for by_example in by_metric.values() if by_example]
    return set.intersection(*sets) if sets else None


def _mean_queue_waits(session: Session, job_ids: dict[tuple, set[int]]) -> dict[tuple, float | None]:
    """Per row, the mean queue wait (start - last publish) of its fine-tune, generate and score jobs."""
    wanted = {i for ids in job_ids.values() for i in ids}
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(wanted)))}
    generate_of = {j.id: j.spec.get("generate_job_id") for j in jobs.values() if j.kind == JobKind.score}
    more = set(generate_of.values()) - set(jobs) - {None}
    jobs.update({j.id: j for j in session.scalars(select(Job).where(Job.id.in_(more)))})
    means = {}
    for key, ids in job_ids.items():
        ids = ids | {generate_of[i] for i in ids if generate_of.get(i)}
        waits = [jobs[i].queue_wait_s for i in ids if i in jobs and jobs[i].queue_wait_s is not None]
        means[key] = round(sum(waits) / len(waits), 2) if waits else None
    return means


def _varied_keys(params: list[dict]) -> list[str]:
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]


def per_example_scores(session: Session, rows: list[dict], metric: str, split: str,
                       sweep: str | None = None) -> dict[str, list[float]]:
    """The per-example values behind each report row's metric (newest score job), for box plots; rows without a
    value of `metric` (a point that was not evaluated) are left out."""
    rows = [r for r in rows if r.get(metric) is not None]
    found = {}
    sweep_row = sweep_by_name(session, sweep) if sweep else None
    for metric_row, _adapter in _newest_metrics(session, [metric], split, sweep_row):
        if any(r["variant"] == metric_row.variant and r["model"] == metric_row.base_model for r in rows):
            found[metric_row.variant] = example_values(session, metric_row.job_id, metric_row.variant, metric)
    return {r["variant"]: found.get(r["variant"], []) for r in rows}


def loss_curves(session: Session, variants: list[str]) -> dict[str, list[tuple[int, float | None, float | None]]]:
    """(step, train loss, eval loss) points of each adapter's fine-tune job."""
    curves = {}
    for adapter in session.scalars(select(Adapter).where(Adapter.name.in_(variants))):
        if adapter.job_id is not None:
            curves[adapter.name] = job_loss_curve(session, adapter.job_id)
    return curves


def job_loss_curve(session: Session, job_id: int) -> list[tuple[int, float | None, float | None]]:
    """(step, train loss, eval loss) points of one fine-tune job, also of one that failed or still runs."""
    points = session.scalars(select(LossPoint).where(LossPoint.job_id == job_id).order_by(LossPoint.step))
    return [(p.step, p.train_loss, p.eval_loss) for p in points]


def compare_variants(session: Session, a: str, b: str, metric: str, split: str,
                     limit: int | None = None, *, score_job_id: int | None = None) -> list[dict]:
    """The examples both variants were scored on, where `a` and `b` differ most on `metric` first (newest scored
    generations of each, or those score job `score_job_id` scored); `difference` is a − b and `better` names the
    variant with the higher score (or "tie")."""
    scored = {}
    for variant in (a, b):
        scope = select(func.max(Metric.job_id)).where(Metric.variant == variant, Metric.split == split,
                                                      Metric.name == metric)
        if score_job_id is not None:
            scope = scope.where(Metric.job_id == score_job_id)
        job_id = session.scalar(scope)
        if job_id is None:
            raise NotFound(f"no scored {metric} results for {variant!r} on split {split!r}"
                           + (f" in score job {score_job_id}" if score_job_id is not None else ""))
        rows = session.execute(
            select(Generation, ExampleScore.value).join(ExampleScore, ExampleScore.generation_id == Generation.id)
            .where(ExampleScore.job_id == job_id, ExampleScore.name == metric, Generation.variant == variant)).all()
        scored[variant] = {g.example_id: (g, value) for g, value in rows}
    shared = scored[a].keys() & scored[b].keys()
    pairs = []
    for example_id in shared:
        (ga, va), (gb, vb) = scored[a][example_id], scored[b][example_id]
        pairs.append({"example_id": example_id, "source": ga.source, "reference": ga.reference,
                      f"prediction_{a}": ga.prediction, f"prediction_{b}": gb.prediction,
                      f"{metric}_{a}": va, f"{metric}_{b}": vb, "difference": va - vb,
                      "better": a if va > vb else b if vb > va else "tie"})
    pairs.sort(key=lambda p: (-abs(p["difference"]), p["example_id"]))
    return pairs if limit is None else pairs[:limit]


def score_job_of(session: Session, generate_job_id: int) -> int | None:
    """The newest score job that wrote metrics for generate job `generate_job_id` (None: not scored yet)."""
    return session.scalar(select(func.max(Metric.job_id)).where(Metric.generate_job_id == generate_job_id))


def generated_example_ids(session: Session, generate_job_id: int) -> list[str]:
    """The example ids a generate job wrote rows for, in example id order."""
    return list(session.scalars(select(Generation.example_id).where(Generation.job_id == generate_job_id)
                                .distinct().order_by(Generation.example_id)))


def examples_side_by_side(session: Session, generate_job_id: int, score_job_id: int | None,
                          example_ids: list[str]) -> list[dict]:
    """The given examples of a generate job, in the given order: example_id, source, reference, and `outputs`, per
    variant (in the job's order of variants) its prediction and per-example `scores` {metric: value} from score job
    `score_job_id`."""
    generations = session.scalars(select(Generation).where(Generation.job_id == generate_job_id,
                                                           Generation.example_id.in_(example_ids))
                                  .order_by(Generation.id)).all()
    scores: dict[int, dict[str, float]] = {}
    if score_job_id is not None and generations:
        for generation_id, name, value in session.execute(
                select(ExampleScore.generation_id, ExampleScore.name, ExampleScore.value)
                .where(ExampleScore.job_id == score_job_id,
                       ExampleScore.generation_id.in_([g.id for g in generations]))).tuples():
            scores.setdefault(generation_id, {})[name] = value
    rows = {example_id: {"example_id": example_id, "outputs": {}} for example_id in example_ids}
    for g in generations:
        row = rows[g.example_id]
        row.setdefault("source", g.source)
        row.setdefault("reference", g.reference)
        row["outputs"][g.variant] = {"prediction": g.prediction, "scores": scores.get(g.id, {})}
    return [row for row in rows.values() if row["outputs"]]


def sweep_jobs(session: Session, sweep: Sweep) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.id)))


def finetune_jobs(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if j.kind == JobKind.finetune]
