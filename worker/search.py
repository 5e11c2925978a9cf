"""The worker's side of ASHA and TPE sweeps: decide at a rung, close a trial, propose the next TPE trials.

Optuna keeps the study (trials, their params, intermediate and final values, states) in tunequeue's database
(models/search.py `optuna_storage`) and takes the pruning decision (`SuccessiveHalvingPruner`, for `promotion:
eager`) and the sampling (`TPESampler`); tunequeue records each decision with its reason in the `rungs` table, in
the attempt's fenced transaction, and reads it back on a re-run, so a crash or a broker restart never takes a
decision twice or differently.

ASHA's default `promotion: lazy` is the published algorithm (Li et al., "A System for Massively Parallel
Hyperparameter Tuning"): a point arriving at a rung waits there (`wait`: its job goes back to queued, unpublished,
its checkpoint kept) unless it is in the top ⌊n/η⌋ of the n results at that rung; each new result there promotes the
waiting points that have entered that top set, and once no more points can arrive (every point of the bracket
reached the rung or stopped below it) the rest are pruned (`settle_rungs`). Optuna's pruner decides the moment a
point arrives instead, against a cutoff that only tightens as results come in, so weak early arrivals pass it.
Every settling runs under a lock on the sweep row and is derived from the `rungs` table alone.

A SQLite file has one writer at a time: every read of tunequeue's session is committed before Optuna (another
connection) writes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.jobs import Job, JobKind, JobStatus, JobWait, Lease
from models.search import Rung, TpeStrategy, optuna_storage
from models.settings import Settings
from models.specs import FinetuneSpec, SearchSpec
from models.sweeps import Sweep

log = logging.getLogger("tunequeue.search")


WAIT = "wait"  # a lazy ASHA point waiting at its rung for the results that decide it


@dataclass(frozen=True)
class Decision:
    action: str  # promote | prune | wait
    reason: str
    value: Optional[float]
    released: tuple = ()  # other points this result promoted or pruned (lazy promotion): to be published


def rung_decision(settings: Settings, session: Session, lease: Lease, search: SearchSpec, step: int,
                  value_of: Callable[[], float]) -> Decision:
    """The decision at rung `step` of the job `lease` holds: the one recorded if there is one (a re-run after a
    crash), else taken now from `value_of()` by Optuna's pruner and recorded with its reason."""
    recorded = session.scalar(select(Rung).where(Rung.job_id == lease.job_id, Rung.step == step))
    session.commit()
    if recorded is not None:
        return Decision(recorded.decision, recorded.reason, recorded.value)
    value = float(value_of())
    if search.promotion == "lazy":
        return _arrive(settings, session, lease, search, step, value)
    prune, reason = _decide(settings, search, step, value)
    action = "prune" if prune else "promote"
    with lease.held(session):
        session.add(Rung(job_id=lease.job_id, rung=search.rungs.index(step), step=step, metric=search.metric,
                         value=value, decision=action, reason=reason))
    log.info("job %s: %s", lease.job_id, reason)
    return Decision(action, reason, value)


def _arrive(settings: Settings, session: Session, lease: Lease, search: SearchSpec, step: int,
            value: float) -> Decision:
    """Lazy promotion: record the point's result as `wait`, then settle the sweep's rungs in the same fenced
    transaction (which may promote or prune this point at once, and release points waiting before it). The
    released points are in `Decision.released` for the caller to publish."""
    _record_intermediate(settings, search, step, value)
    with lease.held(session):
        sweep_id = session.scalar(select(Job.sweep_id).where(Job.id == lease.job_id))
        lock_sweep(session, sweep_id)
        row = Rung(job_id=lease.job_id, rung=search.rungs.index(step), step=step, metric=search.metric, value=value,
                   decision=WAIT, reason="")
        session.add(row)
        session.flush()
        released = settle_rungs(session, sweep_id)
        own = session.scalar(select(Rung).where(Rung.job_id == lease.job_id, Rung.step == step))
        decision = Decision(own.decision, own.reason, value,
                            tuple(job_id for job_id in released if job_id != lease.job_id))
    log.info("job %s: %s", lease.job_id, decision.reason)
    return decision


def _record_intermediate(settings: Settings, search: SearchSpec, step: int, value: float) -> None:
    """The value in Optuna's study record (its dashboards and `study.trials` show it); the decision is ours."""
    import optuna

    storage = optuna_storage(settings.database_url)
    study = optuna.load_study(study_name=search.study, storage=storage)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, search.trial)
    storage.set_trial_intermediate_value(trial_id, step, value)


def lock_sweep(session: Session, sweep_id: int) -> None:
    """Serialize the settling of one sweep's rungs: a no-op write to its row, which locks the row on PostgreSQL
    and the database file on SQLite until the transaction ends."""
    session.execute(update(Sweep).where(Sweep.id == sweep_id).values(trials_asked=Sweep.trials_asked))


def settle_sweep(session: Session, sweep_id: int) -> list[int]:
    """`settle_rungs` in a transaction of its own under the sweep's lock (a point ended, or the reaper's round);
    the ids of the points it decided, to publish."""
    lock_sweep(session, sweep_id)
    try:
        released = settle_rungs(session, sweep_id)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return released


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def settle_rungs(session: Session, sweep_id: int) -> list[int]:
    """Lazy promotion over the whole sweep, in the caller's transaction (hold `lock_sweep` first): at each rung of
    each bracket, the waiting points among the top ⌊n/η⌋ of the n results there are promoted; once the rung is
    closed (every point of the bracket has a result there or has finished below it), the top max(1, ⌊n/η⌋) are
    promoted and the other waiting points pruned. Lower rungs first: a point pruned there no longer counts as one
    that may arrive higher up. Returns the ids of the jobs whose decision changed."""
    from models.jobs import JobStatus as S

    jobs = {job_id: (status, (spec or {}).get("search") or {}) for job_id, status, spec in session.execute(
        select(Job.id, Job.status, Job.spec).where(Job.sweep_id == sweep_id, Job.kind == JobKind.finetune))}
    lazy = {job_id: search for job_id, (_, search) in jobs.items()
            if search.get("strategy") == "asha" and search.get("promotion") == "lazy"}
    if not lazy:
        return []
    rows = list(session.scalars(select(Rung).where(Rung.job_id.in_(lazy))))
    at: dict[tuple[int, int], list[Rung]] = {}
    for row in rows:
        at.setdefault((lazy[row.job_id].get("bracket", 0), row.step), []).append(row)
    pruned_at = {row.job_id: row.step for row in rows if row.decision == "prune"}
    released = []
    for (bracket, step), results in sorted(at.items()):
        if not any(row.decision == WAIT for row in results):
            continue
        members = [job_id for job_id, search in lazy.items() if search.get("bracket", 0) == bracket]
        arrived = {row.job_id for row in results}
        # closed: no point can still arrive (each has, or has finished, or was pruned at an earlier rung)
        closed = all(job_id in arrived or S(jobs[job_id][0]).finished or pruned_at.get(job_id, step) < step
                     for job_id in members)
        sample = lazy[results[0].job_id]
        eta, better_high = sample.get("reduction_factor", 3), sample.get("direction") == "max"
        ranked = sorted(results, key=lambda row: (math.isnan(row.value), -row.value if better_high else row.value))
        keep = max(1, len(ranked) // eta) if closed else len(ranked) // eta
        values = [row.value for row in ranked]
        for place, row in enumerate(ranked, 1):
            if row.decision != WAIT or S(jobs[row.job_id][0]).finished:
                continue
            where = (f"{row.metric} {row.value:.4g}, {_ordinal(place)} of {len(ranked)} at this rung "
                     f"(rung median {statistics.median(values):.4g}")
            if place <= keep:
                row.decision = "promote"
                row.reason = f"promoted at step {step}: {where}; the best {keep} go on)"
            elif closed:
                row.decision, pruned_at[row.job_id] = "prune", step
                row.reason = (f"pruned at step {step}: {where}, cutoff {values[keep - 1]:.4g}; the best {keep} "
                              "went on)")
            else:
                row.reason = (f"waiting at step {step}: {where}; the best {keep} go on for now, the best 1/{eta} "
                              f"once every point has reached the rung)")
                continue
            row.decided_at = utcnow()
            released.append(row.job_id)
    session.flush()
    return released


class _BracketView:
    """The study as one bracket's pruner sees it: the trials of that bracket except the one being decided (its own
    value is added by the pruner; a re-run after a crash must not count it twice)."""

    def __init__(self, study, bracket: int, trial_number: int):
        self._study, self._storage, self.direction = study, study._storage, study.direction
        self._bracket, self._number = bracket, trial_number

    def get_trials(self, deepcopy: bool = True, states=None):
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.number != self._number and t.user_attrs.get("bracket", 0) == self._bracket]


def _decide(settings: Settings, search: SearchSpec, step: int, value: float) -> tuple[bool, str]:
    """(prune?, reason) for `value` at rung `step`, by Optuna's SuccessiveHalvingPruner over the point's bracket."""
    import optuna
    from optuna.pruners import SuccessiveHalvingPruner

    storage = optuna_storage(settings.database_url)
    study = optuna.load_study(study_name=search.study, storage=storage)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, search.trial)
    storage.set_trial_intermediate_value(trial_id, step, value)
    trial = copy.deepcopy(storage.get_trial(trial_id))
    rung = search.rungs.index(step)
    for key in [k for k in trial.system_attrs if k.startswith("completed_rung_") and int(k.rsplit("_", 1)[1]) >= rung]:
        del trial.system_attrs[key]  # left by an attempt that crashed before recording its decision
    view = _BracketView(study, search.bracket, search.trial)
    pruner = SuccessiveHalvingPruner(min_resource=search.min_steps, reduction_factor=search.reduction_factor,
                                     min_early_stopping_rate=search.bracket)
    prune = pruner.prune(view, trial)
    key = f"completed_rung_{rung}"
    competing = sorted([t.system_attrs[key] for t in view.get_trials(deepcopy=False) if key in t.system_attrs]
                       + [value], reverse=search.direction == "max")
    keep = max(1, len(competing) // search.reduction_factor)
    verb = "pruned" if prune else "promoted"
    reason = (f"{verb} at step {step}: {search.metric} {value:.4g}, rung median {statistics.median(competing):.4g}, "
              f"cutoff {competing[keep - 1]:.4g} (the best 1/{search.reduction_factor} of {len(competing)} "
              f"point{'s' if len(competing) != 1 else ''} at this rung go on)")
    return prune, reason


def trial_ended(settings: Settings, session: Session, job: Job) -> None:
    """Tell Optuna how the point of `job` (a fine-tune with a search) ended: its final metric when it trained to the
    end (and a `complete` rung row), pruned, or failed for good. A cancelled point stays open: a retry runs it."""
    import optuna
    from optuna.trial import TrialState

    search = FinetuneSpec.model_validate(job.spec).search
    result = job.result or {}
    final = result.get("search_value")
    if job.status == JobStatus.succeeded and final is not None:
        step = result.get("steps") or 0
        if session.scalar(select(Rung.id).where(Rung.job_id == job.id, Rung.step == step)) is None:
            session.add(Rung(job_id=job.id, rung=max(0, len(search.rungs) - 1), step=step, metric=search.metric,
                             value=final, decision="complete",
                             reason=f"completed at step {step}: {search.metric} {final:.4g}"))
        session.commit()
    else:
        session.commit()
    states = {JobStatus.succeeded: TrialState.COMPLETE, JobStatus.pruned: TrialState.PRUNED,
              JobStatus.failed: TrialState.FAIL}
    state = states.get(job.status)
    if state is None:
        return
    study = optuna.load_study(study_name=search.study, storage=optuna_storage(settings.database_url))
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == search.trial), None)
    if trial is None or trial.state.is_finished():
        return
    if state == TrialState.COMPLETE and final is None:
        state = TrialState.FAIL  # nothing to tell: the metric could not be computed
    study.tell(search.trial, final if state == TrialState.COMPLETE else None, state=state)


def next_trials(settings: Settings, session: Session, sweep_id: int) -> list[Job]:
    """Called once for each trial of a TPE sweep that ended: its place goes to a new trial, so `parallel` stay in
    flight until `n` have been asked. The trial's number is taken first from `sweeps.trials_asked` with one atomic
    UPDATE (two workers ending trials at once never overshoot `n` nor sample with the same seed); then Optuna's
    TPE sampler, which has seen every finished trial, proposes it, and it is stored as a fine-tune of the sweep that
    the sweep's evaluation also waits for (a new `job_waits` row; the evaluation adds the adapters of every
    fine-tune it waits for when it runs). Returns the new jobs, for the caller to publish."""
    sweep = session.get(Sweep, sweep_id)
    strategy = (sweep.spec or {}).get("strategy") or {}
    if strategy.get("kind") != "tpe":
        session.commit()
        return []
    tpe = TpeStrategy.model_validate({k: v for k, v in strategy.items() if k in TpeStrategy.model_fields})
    first = session.scalar(select(Job).where(Job.sweep_id == sweep_id, Job.kind == JobKind.finetune)
                           .order_by(Job.id).limit(1))
    evaluations = list(session.scalars(select(Job.id).where(Job.sweep_id == sweep_id, Job.kind == JobKind.generate,
                                                            Job.status == JobStatus.queued)))
    template = dict(first.spec)
    common = {"priority": first.priority, "max_attempts": first.max_attempts, "token_id": first.token_id}
    session.commit()
    if not evaluations:  # the evaluation has started (or the sweep was cancelled): no point in more trials
        return []
    asked = session.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.trials_asked < tpe.n)
                            .values(trials_asked=Sweep.trials_asked + 1).returning(Sweep.trials_asked)).scalar()
    session.commit()
    if asked is None:
        return []
    number, params = ask_trial(settings.database_url, tpe, strategy["study"], strategy["distributions"], asked - 1)
    spec = point_spec(template, params, sweep.name, number, tpe, strategy["study"])
    job = Job(kind=JobKind.finetune, status=JobStatus.queued, spec=spec.model_dump(mode="json"), sweep_id=sweep_id,
              output_name=spec.name, attempts=0, cancel_requested=False, **common)
    session.add(job)
    session.flush()
    session.add_all([JobWait(job_id=evaluation, waits_for_id=job.id) for evaluation in evaluations])
    session.commit()
    log.info("sweep %s: trial %s proposed by TPE: %s", sweep.name, number, params)
    return [job]


def waited_adapters(session: Session, evaluation: Job, adapters: list[str]) -> list[str]:
    """`adapters` and, after them, those of the fine-tunes the evaluation waits for that it does not list yet (a
    TPE sweep's later trials), in job order."""
    from models.jobs import parent_ids

    names = session.scalars(select(Job.output_name).where(Job.id.in_(parent_ids(session, evaluation)),
                                                         Job.kind == JobKind.finetune).order_by(Job.id))
    return list(adapters) + [name for name in names if name and name not in adapters]


MAX_REPEATS = 20  # proposals of an already tried point in a row before one is trained again anyway


def ask_trial(database_url: str, tpe: TpeStrategy, study_name: str, distributions: dict, asked: int
              ) -> tuple[int, dict]:
    """(trial number, params) of a new trial sampled by TPE from `distributions` (Optuna's JSON form). The sampler's
    seed moves on with every trial asked, so that two processes never replay the same random start.

    TPE over choices can propose a point the study has already tried; training it again would spend a trial on
    nothing new. Such a proposal is told at once (the earlier trial's value when it has one, else failed), so the
    sampler learns from it, and the sampler is asked again."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState

    space = {key: json_to_distribution(json.dumps(value)) for key, value in distributions.items()}
    for repeat in range(MAX_REPEATS + 1):
        sampler = optuna.samplers.TPESampler(seed=tpe.seed + asked + 100_003 * repeat, n_startup_trials=tpe.n_startup,
                                             constant_liar=True)
        study = optuna.load_study(study_name=study_name, storage=optuna_storage(database_url), sampler=sampler)
        trial = study.ask(space)
        trial.set_user_attr("bracket", 0)
        params = dict(trial.params)
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number and t.params == params
                   and not t.user_attrs.get("repeat_of")]
        if not earlier or repeat == MAX_REPEATS:
            return trial.number, params
        done = next((t for t in earlier if t.state == TrialState.COMPLETE), None)
        trial.set_user_attr("repeat_of", earlier[0].number)
        study.tell(trial.number, done.value if done else None,
                   state=TrialState.COMPLETE if done else TrialState.FAIL)
        log.info("study %s: TPE proposed trial %s's point again; told it that trial's result", study_name,
                 earlier[0].number)
    raise AssertionError("unreachable")


def point_spec(template: dict, params: dict, sweep_name: str, number: int, strategy, study: str,
               rungs: Optional[list[int]] = None, bracket: int = 0) -> FinetuneSpec:
    """The fine-tune spec of trial `number`: the sweep's checked point spec `template` with the trial's params."""
    search = SearchSpec(study=study, trial=number, strategy=strategy.kind, metric=strategy.metric,
                        direction=strategy.direction, rungs=rungs or [], bracket=bracket,
                        reduction_factor=getattr(strategy, "reduction_factor", 3),
                        min_steps=getattr(strategy, "min_steps", 1),
                        promotion=getattr(strategy, "promotion", "eager"))
    return FinetuneSpec.model_validate({**template, **params, "name": f"{sweep_name}-{number + 1:02d}",
                                        "search": search.model_dump()})


def evaluated_pruned(session: Session, evaluation: Job, left_out: list[str]) -> list[str]:
    """`left_out` (adapters of points that did not succeed) less the sweep's `eval.include_pruned` best pruned
    points, ranked by the metric at their last rung: those are evaluated too."""
    from models.jobs import parent_ids

    sweep = session.get(Sweep, evaluation.sweep_id) if evaluation.sweep_id else None
    wanted = ((sweep.spec or {}).get("eval") or {}).get("include_pruned") or 0 if sweep else 0
    if not wanted:
        return left_out
    pruned = list(session.scalars(select(Job).where(Job.id.in_(parent_ids(session, evaluation)),
                                                    Job.status == JobStatus.pruned)))
    ranked = []
    for job in pruned:
        last = session.scalar(select(Rung).where(Rung.job_id == job.id).order_by(Rung.step.desc()).limit(1))
        if last is not None and last.value is not None:
            direction = (job.spec.get("search") or {}).get("direction", "min")
            # later rungs first (they trained longer), then the better value
            ranked.append(((-last.step, last.value if direction == "min" else -last.value), job.spec["name"]))
    kept = {name for _, name in sorted(ranked)[:wanted]}
    return [name for name in left_out if name not in kept]
