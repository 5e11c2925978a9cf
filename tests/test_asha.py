"""ASHA sweeps through real workers: decisions forced by a known metric (the point's learning rate) are exactly
Optuna's successive-halving rule; a promoted point resumes from its rung checkpoint as if it had never stopped; a
worker killed mid-rung, a broker restart, `sweeps cancel` and `sweeps retry` change no decision; a bad strategy block
is refused in one line with nothing written."""

from __future__ import annotations

import copy
import json
import shutil
import signal
from collections import defaultdict
from pathlib import Path
from typing import Callable

import pytest
import yaml
from sqlalchemy import func, select

from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter, Generation, LossPoint
from models.search import Rung
from models.sweeps import Sweep
from tests.conftest import (check_rejected, cli, free_port, job_count, ok_json, queue_length, session_of,
                            settings_of, start_redis, start_worker, wait_until)

FORCED = {"TUNEQUEUE_FAULTS": "rung_metric_is_lr:1"}
FAST_REAPER = {"TUNEQUEUE_HEARTBEAT_SECONDS": "0.5", "TUNEQUEUE_STALE_SECONDS": "4", "TUNEQUEUE_REAP_SECONDS": "1"}
BASE = {"model": "tiny-t5", "train_limit": 64, "eval_limit": 8, "per_device_train_batch_size": 8,
        "target_modules": ["q", "v"]}
EVAL_EXAMPLES = 4
# the sweep of the forced test: with the learning rate as the metric (lower is better) and η 3, a point goes
# on while it is in the best third of the points that reached its rung before it (the first one always goes on)
NINE = [5e-3, 2e-3, 8e-3, 1e-3, 9e-3, 3e-3, 7e-3, 4e-3, 6e-3]
NINE_DECISIONS = [(1, 4, "promote"), (1, 12, "promote"), (1, 36, "complete"),
                  (2, 4, "promote"), (2, 12, "promote"), (2, 36, "complete"),
                  (3, 4, "prune"),
                  (4, 4, "promote"), (4, 12, "promote"), (4, 36, "complete"),
                  (5, 4, "prune"), (6, 4, "prune"), (7, 4, "prune"), (8, 4, "prune"), (9, 4, "prune")]
# a smaller sweep for the crash, broker and cancel tests: rungs at 4 and the end (12)
# the same 9 points under lazy promotion (ASHA as published): a point waits at its rung until it is in the best
# ⌊n/3⌋ of the n results there; when no more can arrive, the rest are pruned. At step 4: point 2 goes on when the
# third result arrives, 4 at the fourth, 6 at the ninth (the rung's best three, as synchronous halving keeps); the six
# others are pruned then, each resuming once to keep its adapter at step 4. At step 12 (2, 4, 6 arrive in their
# promotion order, rung closed at once): 4 goes on, 2 and 6 are pruned.
LAZY_DECISIONS = [(1, 4, "prune"), (2, 4, "promote"), (2, 12, "prune"), (3, 4, "prune"),
                  (4, 4, "promote"), (4, 12, "promote"), (4, 36, "complete"),
                  (5, 4, "prune"), (6, 4, "promote"), (6, 12, "prune"), (7, 4, "prune"), (8, 4, "prune"),
                  (9, 4, "prune")]
FOUR = [5e-3, 2e-3, 8e-3, 1e-3]
FOUR_DECISIONS = [(1, 4, "promote"), (1, 12, "complete"), (2, 4, "promote"), (2, 12, "complete"), (3, 4, "prune"),
                  (4, 4, "promote"), (4, 12, "complete")]


def sweep_file(tmp_path: Path, name: str, rates: list[float], max_steps: int, include_pruned: int = 0,
               **strategy) -> str:
    """An ASHA sweep over `rates` whose points are queued in the order written (the decisions depend on it); eager
    promotion (Optuna's rule) unless `promotion` says otherwise."""
    data = {"name": name, "base": BASE, "grid": {"learning_rate": rates},
            "strategy": {"kind": "asha", "metric": "eval_loss", "min_steps": 4, "max_steps": max_steps,
                         "reduction_factor": 3, "order": "as-written", "promotion": "eager", **strategy},
            "eval": {"split": "test", "limit": EVAL_EXAMPLES, "max_new_tokens": 8,
                     **({"include_pruned": include_pruned} if include_pruned else {})}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def halving_decisions(arrivals: list[tuple[int, int, float]], reduction_factor: int, mode: str = "min") -> list:
    """Optuna's SuccessiveHalvingPruner rule for one bracket, from the reports in the order they arrived
    ((point, rung, value)): a point goes on iff its value is within the best max(1, n // η) of the n values reported
    at that rung so far, its own included. Returns (point, rung, promote | prune) in the same order."""
    seen: dict[int, list[float]] = defaultdict(list)
    out = []
    for point, rung, value in arrivals:
        seen[rung].append(value)
        ranked = sorted(seen[rung], reverse=mode == "max")
        cutoff = ranked[max(1, len(ranked) // reduction_factor) - 1]
        goes_on = value <= cutoff if mode == "min" else value >= cutoff
        out.append((point, rung, "promote" if goes_on else "prune"))
    return out


def test_halving_rule_itself():
    """The rule the worker tests compare with: the first point always goes on, then the best third."""
    arrivals = [(i + 1, 0, lr) for i, lr in enumerate(NINE)]
    assert [d for _, _, d in halving_decisions(arrivals, 3)] == [
        "promote", "promote", "prune", "promote", "prune", "prune", "prune", "prune", "prune"]
    assert [d for _, _, d in halving_decisions(arrivals, 3, "max")] == [
        "promote", "prune", "promote", "prune", "promote", "prune", "prune", "prune", "prune"]
    assert [d for _, _, d in halving_decisions([(1, 0, 2.0), (2, 0, 1.0), (3, 0, 3.0), (4, 0, 0.5)], 2)] == [
        "promote", "promote", "prune", "promote"]


# ----------------------------------------------------------------------------------------------------- helpers
def point_of(job: Job) -> int:
    return int(job.spec["name"].rsplit("-", 1)[1])


def sweep_jobs(env: dict, name: str) -> list[Job]:
    with session_of(env) as session:
        sweep_id = session.scalar(select(Sweep.id).where(Sweep.name == name))
        return list(session.scalars(select(Job).where(Job.sweep_id == sweep_id).order_by(Job.id)))


def finetunes(env: dict, name: str) -> dict[int, Job]:
    return {point_of(job): job for job in sweep_jobs(env, name) if job.kind == JobKind.finetune}


def rung_rows(env: dict, name: str) -> list[Rung]:
    """The sweep's rung rows in the order they were recorded."""
    ids = [job.id for job in finetunes(env, name).values()]
    with session_of(env) as session:
        return list(session.scalars(select(Rung).where(Rung.job_id.in_(ids)).order_by(Rung.id)))


def decisions(env: dict, name: str) -> list[tuple[int, int, str]]:
    """(point, step, decision) of every rung row, sorted by point and step."""
    points = {job.id: point for point, job in finetunes(env, name).items()}
    return sorted((points[row.job_id], row.step, row.decision) for row in rung_rows(env, name))


def check_rule(env: dict, name: str, reduction_factor: int = 3) -> None:
    """Every promote / prune row is what Optuna's rule gives for the order the reports arrived in, and no job has
    two rows for one step."""
    points = {job.id: point for point, job in finetunes(env, name).items()}
    rows = [row for row in rung_rows(env, name) if row.decision != "complete"]
    arrivals = [(points[row.job_id], row.rung, row.value) for row in rows]
    assert [(p, r, row.decision) for (p, r, _), row in zip(arrivals, rows)] == \
        halving_decisions(arrivals, reduction_factor)
    keys = [(row.job_id, row.step) for row in rung_rows(env, name)]
    assert len(keys) == len(set(keys))


def study_trials(env: dict, name: str) -> dict[int, object]:
    """Optuna's trials of the sweep's study, read with Optuna itself on the same DATABASE_URL, by point."""
    import optuna

    from models.search import optuna_storage

    with session_of(env) as session:
        study_name = session.scalar(select(Sweep).where(Sweep.name == name)).spec["strategy"]["study"]
    # an RDBStorage on DATABASE_URL as tunequeue opens it: Optuna's own check would read tunequeue's alembic revision
    study = optuna.load_study(study_name=study_name, storage=optuna_storage(settings_of(env).database_url))
    return {int(trial.user_attrs["adapter"].rsplit("-", 1)[1]): trial
            for trial in study.get_trials()}


def evaluated_variants(env: dict, name: str) -> dict[str, int]:
    generate = next(job for job in sweep_jobs(env, name) if job.kind == JobKind.generate)
    with session_of(env) as session:
        return dict(session.execute(select(Generation.variant, func.count(Generation.id))
                                    .where(Generation.job_id == generate.id).group_by(Generation.variant)).all())


def all_ended(env: dict, name: str) -> bool:
    jobs = sweep_jobs(env, name)
    return bool(jobs) and all(job.status.finished for job in jobs)


def stop(process) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def kill(process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def log_tail(path: Path) -> str:
    return path.read_text()[-4000:] if path.exists() else ""


# ------------------------------------------------------------------------------------ forced decisions (worker)
def fresh_env(tmp_path: Path, builtin_home: Path, backend: str) -> tuple[dict, Callable[[], None]]:
    """conftest's make_env for a module-scoped fixture: (environment, cleanup)."""
    import os
    import uuid

    import redis

    from models.migrate import upgrade
    from tests.conftest import REDIS_URL, RUN_ID, _drop_pg_database, _pg_database

    home = tmp_path / f"home-{backend}"
    shutil.copytree(builtin_home / "builtin", home / "builtin")
    database = f"tq_test_{RUN_ID}_{uuid.uuid4().hex[:6]}" if backend == "postgresql" else None
    url = _pg_database(database) if database else f"sqlite:///{home / 'tunequeue.db'}"
    queue = f"tq-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": url, "REDIS_URL": REDIS_URL,
           "TUNEQUEUE_QUEUE": queue, "PYTHONUNBUFFERED": "1"}
    upgrade(settings_of(env).database_url)

    def cleanup() -> None:
        if database:
            _drop_pg_database(database)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"*{queue}*"):
            client.delete(key)

    return env, cleanup


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def forced_run(request, tmp_path_factory, builtin_home):
    """One burst worker with the metric forced to the learning rate runs three sweeps: `forced` (the 9 points above;
    on PostgreSQL its evaluation also covers the 2 best pruned points), `promoted` (one point, always promoted,
    rungs 4 / 12 / 27) and `lazy` (the 9 points under lazy promotion). Yields (environment, backend, worker log)."""
    backend = request.param
    tmp_path = tmp_path_factory.mktemp(f"forced-{backend}")
    env, cleanup = fresh_env(tmp_path, builtin_home, backend)
    try:
        include = 2 if backend == "postgresql" else 0
        for path in (sweep_file(tmp_path, "forced", NINE, 36, include_pruned=include),
                     sweep_file(tmp_path, "promoted", [3e-3], 27),
                     sweep_file(tmp_path, "lazy", NINE, 36, promotion="lazy")):
            queued = cli(env, "sweep", path)
            assert queued.returncode == 0, queued.stderr
        log = tmp_path / "worker.log"
        worker = start_worker({**env, **FORCED}, "--burst", log=log)
        assert worker.wait(timeout=400) == 0, log_tail(log)
        yield env, backend, log
    finally:
        cleanup()


@pytest.mark.slow
def test_forced_decisions_through_a_worker(forced_run):
    """9 points, rungs 4 / 12 / 36, the metric forced to each point's learning rate: exactly points 3, 5-9 are
    pruned at step 4 and 1, 2, 4 go through both rungs to the end; jobs, rungs rows, Optuna's trials, the pruned
    points' adapters and the evaluation all say so."""
    env, backend, log = forced_run
    include = 2 if backend == "postgresql" else 0

    # the decisions: Optuna's rule for the order the reports arrived in, and the literal list
    check_rule(env, "forced")
    assert decisions(env, "forced") == NINE_DECISIONS, log_tail(log)
    jobs = finetunes(env, "forced")
    completed, pruned = [1, 2, 4], [3, 5, 6, 7, 8, 9]
    rows = {(point, row.step): row for point in jobs for row in rung_rows(env, "forced")
            if row.job_id == jobs[point].id}
    assert rows[(3, 4)].reason == ("pruned at step 4: eval_loss 0.008, rung median 0.005, cutoff 0.002 "
                                   "(the best 1/3 of 3 points at this rung go on)")
    assert rows[(1, 36)].value == pytest.approx(5e-3) and rows[(1, 36)].rung == 2
    assert all(rows[(p, 4)].value == pytest.approx(NINE[p - 1]) and rows[(p, 4)].rung == 0 for p in jobs)

    # the jobs: pruned ones ended at step 4 with their adapter saved there; the others trained on in 3 attempts
    for point in completed:
        job = jobs[point]
        assert job.status == JobStatus.succeeded, (point, job.error)
        assert (job.attempts, job.result["steps"], job.result["resumed_from_step"]) == (3, 36, 12)
        assert job.result["search_value"] == pytest.approx(NINE[point - 1]) and "pruned" not in job.result
    home = Path(env["TUNEQUEUE_HOME"])
    with session_of(env) as session:
        adapters = {a.name: a for a in session.scalars(select(Adapter))}
    for point in pruned:
        job = jobs[point]
        assert job.status == JobStatus.pruned and job.attempts == 1, (point, job.status, job.error)
        assert job.result["steps"] == 4 and job.result["pruned"]["step"] == 4
        assert job.result["pruned"]["value"] == pytest.approx(NINE[point - 1])
        adapter = adapters[f"forced-{point:02d}"]
        assert adapter.job_id == job.id and (home / adapter.path / "adapter_model.safetensors").exists()
    assert {f"forced-{p:02d}" for p in range(1, 10)} <= set(adapters)
    assert not list((home / "checkpoints").glob("*/checkpoint.pt"))  # every point ended: no checkpoint is left
    shown = cli(env, "jobs", "show", str(jobs[3].id))
    assert "pruned at step 4: eval_loss 0.008, rung median 0.005" in shown.stdout, shown.stdout + shown.stderr

    # Optuna's record, read through Optuna on the same database
    from optuna.trial import TrialState

    trials = study_trials(env, "forced")
    assert sorted(trials) == list(range(1, 10))
    for point, trial in trials.items():
        assert trial.params["learning_rate"] == pytest.approx(NINE[point - 1])
        if point in completed:
            assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(NINE[point - 1])
            assert trial.intermediate_values == pytest.approx({4: NINE[point - 1], 12: NINE[point - 1]})
        else:
            assert trial.state == TrialState.PRUNED
            assert trial.intermediate_values == pytest.approx({4: NINE[point - 1]})

    # the evaluation: the base and the completed points, plus (PostgreSQL run) the two best pruned (3e-3, 4e-3)
    extra = [6, 8] if include else []
    expected = {"base"} | {f"forced-{p:02d}" for p in completed + extra}
    assert evaluated_variants(env, "forced") == {variant: EVAL_EXAMPLES for variant in expected}
    evaluation = [job for job in sweep_jobs(env, "forced") if job.kind != JobKind.finetune]
    assert [job.status for job in evaluation] == [JobStatus.succeeded] * 2
    assert sorted(evaluation[0].result["left_out_adapters"]) == [f"forced-{p:02d}" for p in pruned if p not in extra]


@pytest.mark.slow
def test_lazy_promotion_through_a_worker(forced_run):
    """The 9 points under lazy promotion: exactly the rung's best third goes on (2, 4, 6 at step 4; 4 at step 12),
    each decision taken when the result that settles it arrives, with its reason; a point that waited and was
    pruned resumed once to keep its adapter at its rung; Optuna's trials and the evaluation agree."""
    from optuna.trial import TrialState

    env, _, log = forced_run
    assert decisions(env, "lazy") == LAZY_DECISIONS, log_tail(log)
    jobs = finetunes(env, "lazy")
    rows = {(point, row.step): row for point in jobs for row in rung_rows(env, "lazy") if row.job_id == jobs[point].id}
    assert rows[(6, 4)].reason == ("promoted at step 4: eval_loss 0.003, 3rd of 9 at this rung (rung median 0.005; "
                                   "the best 3 go on)")
    assert rows[(1, 4)].reason == ("pruned at step 4: eval_loss 0.005, 5th of 9 at this rung (rung median 0.005, "
                                   "cutoff 0.003; the best 3 went on)")
    assert rows[(2, 12)].reason.startswith("pruned at step 12: eval_loss 0.002, 2nd of 3 at this rung")
    # a decision is taken when the result that settles it arrives: 2's when 3 arrived, 4's at once, 6's (and the
    # prunings) when 9 arrived, which closed the rung
    by_time = sorted((row.decided_at, point) for (point, step), row in rows.items() if step == 4)
    assert [point for _, point in by_time][:2] == [2, 4], by_time
    assert {point for _, point in by_time[2:]} == {1, 3, 5, 6, 7, 8, 9}

    # jobs: pruned points kept their adapter at their rung; 4 trained to the end resuming from its checkpoints
    assert jobs[4].status == JobStatus.succeeded and jobs[4].result["steps"] == 36, jobs[4].error
    assert jobs[4].result["resumed_from_step"] == 12
    for point in (1, 3, 5, 7, 8, 9):
        job = jobs[point]
        assert job.status == JobStatus.pruned and job.result["steps"] == 4, (point, job.status, job.error)
        assert job.result["pruned"]["reason"] == rows[(point, 4)].reason
        # waited (attempt 1), then resumed from its rung checkpoint to save the adapter (the last point, 9, was
        # pruned as it arrived: one attempt)
        assert job.attempts == (1 if point == 9 else 2), (point, job.attempts)
    for point in (2, 6):
        assert jobs[point].status == JobStatus.pruned and jobs[point].result["steps"] == 12
    steps = sum(job.result["steps"] for job in jobs.values())
    assert steps == 9 * 4 + 3 * 8 + 24  # synchronous halving's budget: 9 → 3 → 1
    with session_of(env) as session:
        adapters = {a.name for a in session.scalars(select(Adapter))}
    assert {f"lazy-{p:02d}" for p in range(1, 10)} <= adapters
    assert not list((Path(env["TUNEQUEUE_HOME"]) / "checkpoints").glob("*/checkpoint.pt"))

    trials = study_trials(env, "lazy")
    assert trials[4].state == TrialState.COMPLETE and trials[4].value == pytest.approx(1e-3)
    assert all(trials[p].state == TrialState.PRUNED for p in jobs if p != 4)
    assert trials[2].intermediate_values == pytest.approx({4: 2e-3, 12: 2e-3})
    assert evaluated_variants(env, "lazy") == {"base": EVAL_EXAMPLES, "lazy-04": EVAL_EXAMPLES}
    shown = cli(env, "jobs", "show", str(jobs[1].id))
    assert "pruned at step 4: eval_loss 0.005, 5th of 9" in shown.stdout, shown.stdout + shown.stderr


# ------------------------------------------------------------------------------ promotion resumes exactly (worker)
def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def curve(env: dict, job_id: int) -> dict[int, tuple]:
    with session_of(env) as session:
        return {p.step: (p.train_loss, p.eval_loss)
                for p in session.scalars(select(LossPoint).where(LossPoint.job_id == job_id))}


@pytest.mark.slow
def test_promotion_resumes_from_the_checkpoint_exactly(forced_run, monkeypatch):
    """The `promoted` point went through rungs 4 and 12 (a new attempt each, resuming from the rung checkpoint) to
    step 27; trained straight through here, the same spec gives the same loss curve at every logged step and the
    same adapter, to 1e-5. A checkpoint written at a rung holds the optimizer (Adam's moments and step count), the
    scheduler and the data position exactly as the straight run has them at that step."""
    import torch

    import worker.jobs.finetune as finetune
    from models.errors import TrialPromoted
    from models.specs import FinetuneSpec
    from tests.conftest import new_job
    from worker.ml.model_cache import ModelCache
    from worker.search import Decision

    env, _, log = forced_run
    home = Path(env["TUNEQUEUE_HOME"])
    point = finetunes(env, "promoted")[1]
    assert point.status == JobStatus.succeeded, (point.error, log_tail(log))
    assert decisions(env, "promoted") == [(1, 4, "promote"), (1, 12, "promote"), (1, 27, "complete")]
    assert point.attempts == 3 and point.result["steps"] == 27
    assert point.result["resumed_from_step"] == 12  # the last attempt started at the last rung, not from scratch
    searched = FinetuneSpec.model_validate(point.spec)
    assert searched.lora_dropout == 0 and searched.max_steps == 27 and searched.search.rungs == [4, 12, 27]

    at_step: dict[int, dict] = {}
    evaluate = finetune.evaluate

    def watched(run):  # after each optimizer step of the straight run: what it holds at the first rung's step
        if run.state.step == 4:
            at_step[4] = copy.deepcopy({"optimizer": run.optimizer.state_dict(), "position": run.state.position,
                                        "last_epoch": run.scheduler.last_epoch,
                                        "weights": finetune.trainable_state(run.model)})
        evaluate(run)

    cache = ModelCache(home)
    straight = FinetuneSpec.model_validate({**point.spec, "search": None, "name": "promoted-straight"})
    with session_of(env) as session:
        job = new_job(session, JobKind.finetune, straight)
        monkeypatch.setattr(finetune, "evaluate", watched)
        result = finetune.train_adapter(straight, session, cache, home, job_id=job.id)
        monkeypatch.setattr(finetune, "evaluate", evaluate)
        straight_id = job.id
    assert result["steps"] == 27 and result["resumed_from_step"] == 0

    # the loss curve: every logged train loss (10, 20, 27) and eval loss (8, 16, 24, 27), to 1e-5
    promoted_curve, straight_curve = curve(env, point.id), curve(env, straight_id)
    assert sorted(promoted_curve) == sorted(straight_curve) == [8, 10, 16, 20, 24, 27]
    for step, (train_loss, eval_loss) in straight_curve.items():
        assert promoted_curve[step][0] == pytest.approx(train_loss, abs=1e-5, nan_ok=True), step
        assert promoted_curve[step][1] == pytest.approx(eval_loss, abs=1e-5, nan_ok=True), step
    assert [promoted_curve[s][0] for s in (10, 20, 27)] == pytest.approx([straight_curve[s][0] for s in (10, 20, 27)],
                                                                         abs=1e-5)
    # the adapter: the same weights
    promoted_weights = adapter_weights(home / "adapters" / "promoted-01")
    straight_weights = adapter_weights(home / "adapters" / "promoted-straight")
    assert sorted(promoted_weights) == sorted(straight_weights) and promoted_weights
    for name, tensor in straight_weights.items():
        assert torch.allclose(promoted_weights[name], tensor, atol=1e-5), name
    assert any(float(t.abs().max()) > 1e-3 for n, t in straight_weights.items() if "lora_B" in n)  # it trained

    # a rung checkpoint (written here by the same code, promoted by hand) against the straight run at step 4
    with session_of(env) as session:
        job = new_job(session, JobKind.finetune, searched.model_copy(update={"name": "promoted-by-hand"}))
        with pytest.raises(TrialPromoted):
            finetune.train_adapter(searched.model_copy(update={"name": "promoted-by-hand"}), session, cache, home,
                                   job_id=job.id, on_rung=lambda step, value_of: Decision("promote", "by hand", 0.0))
        uid = job.uid
    saved = torch.load(home / "checkpoints" / uid / "checkpoint.pt", weights_only=False)
    expected = at_step[4]
    assert saved["state"]["step"] == 4 and saved["scheduler"]["last_epoch"] == expected["last_epoch"] == 4
    assert saved["state"]["position"] == expected["position"] and len(saved["state"]["recent"]) == 4
    moments = expected["optimizer"]["state"]
    assert sorted(saved["optimizer"]["state"]) == sorted(moments) and moments
    for index, state in moments.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(saved["optimizer"]["state"][index][key], state[key], atol=1e-7), (index, key)
    for name, tensor in expected["weights"].items():
        assert torch.allclose(saved["adapter"][name], tensor, atol=1e-7), name


# ------------------------------------------------------------------------------ crashes, broker, cancel (workers)
CRASH = [2e-3, 8e-3, 5e-3]  # point 1 goes on at step 4, points 2 and 3 are pruned there
CRASH_DECISIONS = [(1, 4, "promote"), (1, 12, "complete"), (2, 4, "prune"), (3, 4, "prune")]


def job_has_row(env: dict, name: str, point: int) -> bool:
    job = finetunes(env, name)[point]
    return any(row.job_id == job.id for row in rung_rows(env, name))


def finish_sweep(env: dict, name: str, log: Path) -> str:
    """A worker with the forced metric runs until every job of the sweep has ended; returns its log's tail."""
    worker = start_worker({**env, **FORCED}, log=log)
    try:
        wait_until(lambda: all_ended(env, name), 300, "the sweep to finish")
    finally:
        stop(worker)
    return log_tail(log)


def row_record(env: dict, name: str) -> dict:
    """Each recorded decision as it is stored, by (job, step): a decision taken again would change its row."""
    return {(row.job_id, row.step): (row.id, row.decision, row.value, row.reason, row.decided_at)
            for row in rung_rows(env, name)}


@pytest.mark.slow
def test_workers_killed_mid_rung_change_no_decision(pg_env, tmp_path):
    """Worker A is killed (SIGKILL) after point 1's promotion is recorded but before the point is re-queued, worker
    B after point 2's prune is recorded but before its adapter is saved; worker C (whose reaper re-queues both)
    finishes the sweep: the decisions are those of an uninterrupted run, each recorded once, and the resumed points
    go on from their rung checkpoint."""
    env = {**pg_env, **FAST_REAPER}
    queued = cli(env, "sweep", sweep_file(tmp_path, "crash", CRASH, 12))
    assert queued.returncode == 0, queued.stderr
    home = Path(env["TUNEQUEUE_HOME"])
    paused = {**env, "TUNEQUEUE_FAULTS": "rung_metric_is_lr:1,rung_pause_s:300"}
    for point, name in ((1, "a"), (2, "b")):
        worker = start_worker(paused, log=tmp_path / f"{name}.log")
        try:
            wait_until(lambda: job_has_row(env, "crash", point), 240, f"point {point}'s decision")
        finally:
            kill(worker)
        job = finetunes(env, "crash")[point]
        assert job.status == JobStatus.running, (job.status, log_tail(tmp_path / f"{name}.log"))  # killed mid-rung
        assert (home / "checkpoints" / job.uid / "checkpoint.pt").exists()
    before = row_record(env, "crash")
    assert [decision for _, decision, *_ in before.values()] == ["promote", "prune"]

    log = finish_sweep(env, "crash", tmp_path / "c.log")
    assert decisions(env, "crash") == CRASH_DECISIONS, log
    check_rule(env, "crash")
    after = row_record(env, "crash")
    assert {key: after[key] for key in before} == before  # read back, never taken again
    jobs = finetunes(env, "crash")
    first, second, third = jobs[1], jobs[2], jobs[3]
    assert first.status == JobStatus.succeeded and first.attempts == 2, (first.error, log)
    assert first.result["resumed_from_step"] == 4 and first.result["steps"] == 12
    assert second.status == JobStatus.pruned and second.attempts == 2, (second.error, log)
    assert second.result["resumed_from_step"] == 4 and second.result["steps"] == 4
    assert second.result["pruned"]["step"] == 4 and second.result["pruned"]["reason"] == before[(second.id, 4)][3]
    for job in (first, second):
        assert [e["error"].split(":")[0] for e in job.attempt_errors] == ["worker lost"]
    assert third.status == JobStatus.pruned and third.attempts == 1
    with session_of(env) as session:
        assert set(session.scalars(select(Adapter.name))) == {"crash-01", "crash-02", "crash-03"}
    from optuna.trial import TrialState

    trials = study_trials(env, "crash")
    assert [trials[p].state for p in (1, 2, 3)] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert [trials[p].intermediate_values for p in (1, 2, 3)] == [{4: 2e-3}, {4: 8e-3}, {4: 5e-3}]
    assert evaluated_variants(env, "crash") == {"base": EVAL_EXAMPLES, "crash-01": EVAL_EXAMPLES}


# lazy promotion over FOUR: 1 and 2 wait; 3's result promotes 2 (the best of three); 4 is the best of four and
# closes the rung, which prunes 1 and 3
LAZY_FOUR_DECISIONS = [(1, 4, "prune"), (2, 4, "promote"), (2, 12, "complete"), (3, 4, "prune"),
                       (4, 4, "promote"), (4, 12, "complete")]


@pytest.mark.slow
def test_lazy_waiting_points_survive_reconcile_and_a_killed_worker(pg_env, tmp_path):
    """Lazy promotion: point 1 waits at its rung back in the queue without a message, which `jobs reconcile`
    leaves alone and `jobs list` shows; worker A is then killed (SIGKILL) right after point 2's result is recorded
    as waiting, before the point is put back. Worker B's reaper re-queues point 2, the later results settle every
    point as in an uninterrupted run, and each waiting point resumes from its rung checkpoint: 2 to train on, 1 to
    keep its adapter at step 4."""
    env = {**pg_env, **FAST_REAPER}
    queued = cli(env, "sweep", sweep_file(tmp_path, "lazykill", FOUR, 12, promotion="lazy"))
    assert queued.returncode == 0, queued.stderr
    # a 12 s pause after each rung: the reads below fall inside it even on a loaded machine
    paused = {**env, "TUNEQUEUE_FAULTS": "rung_metric_is_lr:1,rung_pause_s:12"}
    worker = start_worker(paused, log=tmp_path / "a.log")
    try:
        wait_until(lambda: job_has_row(env, "lazykill", 1), 240, "point 1's result", poll=0.05)
        first = finetunes(env, "lazykill")[1]
        (row,) = [r for r in rung_rows(env, "lazykill") if r.job_id == first.id]
        assert (row.step, row.decision, row.value) == (4, "wait", pytest.approx(5e-3))
        # read in point 1's pause: point 2's result, once it comes, rewrites this reason ("2nd of 2")
        assert row.reason.startswith("waiting at step 4: eval_loss 0.005, 1st of 1 at this rung"), row.reason

        def held() -> bool:
            job = finetunes(env, "lazykill")[1]
            return job.status == JobStatus.queued and (job.progress or {}).get("held_at_step") == 4
        wait_until(held, 240, "point 1 back in the queue, waiting at its rung")
        reconciled = cli(env, "jobs", "reconcile")
        assert reconciled.returncode == 0 and "0 queued jobs re-published" in reconciled.stdout, reconciled.stdout
        listed = cli(env, "jobs", "list")
        assert "waiting at its rung (step 4)" in listed.stdout, listed.stdout
        wait_until(lambda: job_has_row(env, "lazykill", 2), 240, "point 2's result", poll=0.05)
    finally:
        kill(worker)
    second = finetunes(env, "lazykill")[2]
    assert second.status == JobStatus.running, (second.status, log_tail(tmp_path / "a.log"))  # killed mid-rung
    assert [r.decision for r in rung_rows(env, "lazykill") if r.job_id == second.id] == ["wait"]

    log = finish_sweep(env, "lazykill", tmp_path / "b.log")
    assert decisions(env, "lazykill") == LAZY_FOUR_DECISIONS, log
    jobs = finetunes(env, "lazykill")
    first, second = jobs[1], jobs[2]
    assert first.status == JobStatus.pruned and first.attempts == 2 and not first.attempt_errors, log
    assert first.result["steps"] == 4 and first.result["resumed_from_step"] == 4
    assert second.status == JobStatus.succeeded and second.attempts == 2, (second.error, log)
    assert [e["error"].split(":")[0] for e in second.attempt_errors] == ["worker lost"]
    assert second.result["resumed_from_step"] == 4 and second.result["steps"] == 12
    rows = {(r.job_id, r.step): r for r in rung_rows(env, "lazykill")}
    assert rows[(first.id, 4)].reason.startswith("pruned at step 4: eval_loss 0.005, 3rd of 4")
    assert rows[(second.id, 4)].reason.startswith("promoted at step 4: eval_loss 0.002, 1st of 3")
    assert [jobs[p].status for p in (3, 4)] == [JobStatus.pruned, JobStatus.succeeded]
    assert evaluated_variants(env, "lazykill") == {v: EVAL_EXAMPLES for v in ("base", "lazykill-02",
                                                                              "lazykill-04")}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start a private broker")
def test_broker_restart_mid_sweep_changes_no_decision(make_env, tmp_path):
    """The broker dies (no persistence) while the first point is held after its promotion: the other points'
    messages are gone, `jobs reconcile` publishes them again, and the same worker finishes the sweep with the
    decisions of an uninterrupted run."""
    port = free_port()
    broker = start_redis(port)
    env = {**make_env("sqlite"), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    held = {**env, "TUNEQUEUE_FAULTS": "rung_metric_is_lr:1,rung_pause_s:3",
            "TUNEQUEUE_REAP_SECONDS": "600"}  # its own reaper would republish too; here `jobs reconcile` does
    worker = None
    try:
        queued = cli(env, "sweep", sweep_file(tmp_path, "broker", FOUR, 12))
        assert queued.returncode == 0, queued.stderr
        assert queue_length(env) == 4
        worker = start_worker(held, log=tmp_path / "worker.log")
        wait_until(lambda: job_has_row(env, "broker", 1), 240, "point 1's decision", poll=0.05)
        broker.send_signal(signal.SIGKILL)
        broker.wait(timeout=10)
        broker = start_redis(port)  # back, empty, while point 1 is held before its re-queue
        assert queue_length(env) == 0
        jobs = finetunes(env, "broker")
        wait_until(lambda: finetunes(env, "broker")[1].attempts == 2, 120, "point 1 re-queued on the new broker")
        reconciled = cli(env, "jobs", "reconcile")
        lost = ", ".join(str(jobs[p].id) for p in (2, 3, 4))  # never started: their messages died with the broker
        assert f"3 queued jobs re-published ({lost})" in reconciled.stdout, reconciled.stdout + reconciled.stderr
        assert "0 queued jobs re-published" in cli(env, "jobs", "reconcile").stdout  # nothing is sent twice
        wait_until(lambda: all_ended(env, "broker"), 300, "the sweep to finish")
        assert worker.poll() is None  # the same worker reconnected and went on
    finally:
        if worker is not None:
            stop(worker)
        broker.kill()
        broker.wait(timeout=10)
    log = log_tail(tmp_path / "worker.log")
    assert decisions(env, "broker") == FOUR_DECISIONS, log
    check_rule(env, "broker")
    jobs = finetunes(env, "broker")
    assert [jobs[p].status for p in (1, 2, 3, 4)] == [JobStatus.succeeded, JobStatus.succeeded, JobStatus.pruned,
                                                      JobStatus.succeeded], log
    assert all(jobs[p].result["resumed_from_step"] == 4 for p in (1, 2, 4))
    assert evaluated_variants(env, "broker") == {v: EVAL_EXAMPLES for v in ("base", "broker-01", "broker-02",
                                                                            "broker-04")}


def in_process(*args: str):
    """`manage.py ARGS` in this process (the test's environment is applied to it): no start-up time."""
    from click.testing import CliRunner

    from manage import cli as manage_cli

    return CliRunner().invoke(manage_cli, list(args))


def cancel_at_result(env: dict, tmp_path: Path, name: str, point: int, **strategy):
    """FOUR as sweep `name`, a worker with the forced metric pausing 3 s after each rung, and `sweeps cancel` the
    moment point `point` has its rung row (the point is still held in its pause). Returns (worker, its log)."""
    queued = cli(env, "sweep", sweep_file(tmp_path, name, FOUR, 12, **strategy))
    assert queued.returncode == 0, queued.stderr
    assert in_process("sweeps", "list").exit_code == 0  # imports done before the moment that counts
    log = tmp_path / "worker.log"
    worker = start_worker({**env, "TUNEQUEUE_FAULTS": "rung_metric_is_lr:1,rung_pause_s:3"}, log=log)
    try:
        wait_until(lambda: job_has_row(env, name, point), 240, f"point {point}'s rung row", poll=0.05)
        cancelled_now = in_process("sweeps", "cancel", name)
        assert cancelled_now.exit_code == 0, cancelled_now.output
    except BaseException:
        stop(worker)
        raise
    return worker, log


@pytest.mark.slow
def test_cancel_and_retry_an_asha_sweep(pg_env, tmp_path):
    """`sweeps cancel` while point 3 is held after its prune: the queued points (two of them promoted at step 4) and
    the evaluation are cancelled, the pruned point stays pruned. `sweeps retry` re-queues the cancelled ones: a
    retried point reads the decision recorded at step 4 instead of taking it again, and the sweep ends as an
    uninterrupted run does."""
    from optuna.trial import TrialState

    env = pg_env
    worker, log = cancel_at_result(env, tmp_path, "stopped", 3)
    try:
        jobs = finetunes(env, "stopped")
        assert [jobs[p].status for p in (1, 2, 4)] == [JobStatus.cancelled] * 3, log_tail(log)
        assert jobs[3].status == JobStatus.running and jobs[3].cancel_requested  # held after its decision
        wait_until(lambda: all_ended(env, "stopped"), 120, "point 3 to end")
        assert finetunes(env, "stopped")[3].status == JobStatus.pruned  # a decided prune stays a prune
        assert [j.status for j in sweep_jobs(env, "stopped") if j.kind != JobKind.finetune] == \
            [JobStatus.cancelled] * 2
        cancelled = row_record(env, "stopped")
        assert sorted((key[0], decision) for key, (_, decision, *_) in cancelled.items()) == [
            (jobs[1].id, "promote"), (jobs[2].id, "promote"), (jobs[3].id, "prune")]
        # Optuna is told just after the point's row ends: wait for it, then the cancelled trials are still open
        wait_until(lambda: study_trials(env, "stopped")[3].state != TrialState.RUNNING, 60, "point 3's trial told")
        assert [t.state for _, t in sorted(study_trials(env, "stopped").items())] == [
            TrialState.RUNNING, TrialState.RUNNING, TrialState.PRUNED, TrialState.RUNNING]  # open: a retry runs them

        retried = json.loads(in_process("sweeps", "retry", "stopped", "--json").output)
        assert retried["finetunes"] == [jobs[1].id, jobs[2].id, jobs[4].id]
        wait_until(lambda: all_ended(env, "stopped"), 240, "the retried sweep to finish")
    finally:
        stop(worker)
    assert decisions(env, "stopped") == FOUR_DECISIONS, log_tail(log)
    check_rule(env, "stopped")
    after = row_record(env, "stopped")
    assert {key: after[key] for key in cancelled} == cancelled  # not decided again at step 4
    lines = log.read_text().splitlines()
    for point in (1, 2, 4):  # the worker logs a decision when it takes one, and a promotion when it re-queues
        said = [line for line in lines if f"job {jobs[point].id}: promoted at step 4" in line]
        assert len([line for line in said if not line.endswith("queued again")]) == 1, said
        assert len([line for line in said if line.endswith("queued again")]) == 1, said
    jobs = finetunes(env, "stopped")
    assert [jobs[p].status for p in (1, 2, 3, 4)] == [JobStatus.succeeded, JobStatus.succeeded, JobStatus.pruned,
                                                      JobStatus.succeeded]
    # cancelled while queued, points 1 and 2 kept their rung checkpoint: the retry resumed there (one more attempt);
    # point 4 had not started, so it took its first decision after the retry and then resumed like the others
    assert [jobs[p].attempts for p in (1, 2, 4)] == [2, 2, 2]
    assert all(jobs[p].result["resumed_from_step"] == 4 and jobs[p].result["steps"] == 12 for p in (1, 2, 4))
    assert not list((Path(env["TUNEQUEUE_HOME"]) / "checkpoints").glob("*/checkpoint.pt"))
    trials = study_trials(env, "stopped")
    assert [trials[p].state for p in (1, 2, 3, 4)] == [TrialState.COMPLETE, TrialState.COMPLETE,
                                                       TrialState.PRUNED, TrialState.COMPLETE]
    assert evaluated_variants(env, "stopped") == {v: EVAL_EXAMPLES for v in ("base", "stopped-01", "stopped-02",
                                                                             "stopped-04")}

@pytest.mark.slow
def test_cancel_and_retry_a_lazy_asha_sweep(pg_env, tmp_path):
    """Lazy promotion: `sweeps cancel` while point 1 waits at its rung (queued, no message) and point 2 is held just
    after its result: both end cancelled with their `wait` rows, the rest of the sweep is cancelled. `sweeps retry`
    re-queues them; each retried point reads that it waits, and the later results settle all four as an
    uninterrupted run does."""
    env = pg_env
    worker, log = cancel_at_result(env, tmp_path, "lazystop", 2, promotion="lazy")
    try:
        wait_until(lambda: all_ended(env, "lazystop"), 120, "the cancelled sweep to end")
        jobs = finetunes(env, "lazystop")
        assert [jobs[p].status for p in (1, 2, 3, 4)] == [JobStatus.cancelled] * 4, log_tail(log)
        assert decisions(env, "lazystop") == [(1, 4, "wait"), (2, 4, "wait")]
        retried = json.loads(in_process("sweeps", "retry", "lazystop", "--json").output)
        assert retried["finetunes"] == [jobs[p].id for p in (1, 2, 3, 4)]
        wait_until(lambda: all_ended(env, "lazystop"), 240, "the retried sweep to finish")
    finally:
        stop(worker)
    assert decisions(env, "lazystop") == LAZY_FOUR_DECISIONS, log_tail(log)
    jobs = finetunes(env, "lazystop")
    assert [jobs[p].status for p in (1, 2, 3, 4)] == [JobStatus.pruned, JobStatus.succeeded, JobStatus.pruned,
                                                      JobStatus.succeeded], log_tail(log)
    assert jobs[2].result["steps"] == 12 and jobs[1].result["steps"] == 4
    assert evaluated_variants(env, "lazystop") == {v: EVAL_EXAMPLES for v in ("base", "lazystop-02",
                                                                              "lazystop-04")}


# ------------------------------------------------------------------------------------------- strategy validation
ASHA = {"kind": "asha", "metric": "eval_loss", "min_steps": 4, "max_steps": 36, "reduction_factor": 3}


def sweep_data(name: str = "bad", base: dict | None = None, strategy: dict | None = None, eval: dict | None = None,
               grid: dict | None = None) -> dict:
    return {"name": name, "base": {"model": "tiny-t5", **(base or {})},
            "grid": grid or {"learning_rate": [1e-3, 3e-3, 1e-2]}, "strategy": {**ASHA, **(strategy or {})},
            "eval": {"split": "test", **(eval or {})}}


BAD_STRATEGIES = [
    (sweep_data(strategy={"min_step": 4}), "strategy.min_step: unknown key, did you mean 'min_steps'?"),
    (sweep_data(strategy={"kind": "ashaa"}),
     "strategy.kind: must be grid, random, asha or tpe (got 'ashaa'), did you mean 'asha'?"),
    (sweep_data(strategy={"min_steps": 36}), "min_steps (36) must be below max_steps (36)"),
    (sweep_data(strategy={"min_steps": 40}), "min_steps (40) must be below max_steps (36)"),
    (sweep_data(strategy={"brackets": 3}), "brackets: at most 2 with min_steps 4, max_steps 36"),
    (sweep_data(strategy={"reduction_factor": 1}),
     "strategy: reduction_factor: Input should be greater than or equal to 2 (got 1)"),
    (sweep_data(strategy={"mode": "lowest"}), "strategy: mode: Input should be 'min' or 'max' (got 'lowest')"),
    (sweep_data(base={"max_steps": 50}), "base.max_steps: strategy asha sets each point's max_steps"),
    (sweep_data(grid={"learning_rate": [1e-3], "max_steps": [10, 20]}),
     "grid.max_steps: strategy asha sets each point's max_steps"),
    (sweep_data(base={"model": "tiny-bert", "dataset": "synthetic-sentiment"}, strategy={"metric": "rouge1"}),
     "strategy.metric rouge1: a classifier generates no text"),
    (sweep_data(strategy={"metric": "accuracy"}), "strategy.metric accuracy: only for classification"),
    (sweep_data(base={"eval_split": None}), "strategy.metric eval_loss: the points need an eval split to compute it on "
                                               "(base.eval_split is none)"),
    (sweep_data(eval={"include_pruned": -1}), "eval.include_pruned: must be a whole number of points"),
    (sweep_data(eval={"include_pruned": "two"}), "eval.include_pruned: must be a whole number of points"),
    (sweep_data(strategy={"order": "random"}), "strategy: order: Input should be 'shuffled' or 'as-written'"),
    (sweep_data(strategy={"metric": "bleu"}), "strategy: metric: Input should be 'eval_loss', 'rouge1'"),
]


@pytest.mark.parametrize("data, expected", BAD_STRATEGIES, ids=[e[:40] for _, e in BAD_STRATEGIES])
def test_a_bad_strategy_is_one_line_and_writes_nothing(sqlite_env, tmp_path, data, expected):
    from models.search import optuna_storage

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    check_rejected(sqlite_env, ["sweep", str(path)], expected)
    check_rejected(sqlite_env, ["sweep", str(path), "--dry-run"], expected)
    with session_of(sqlite_env) as session:
        assert session.scalar(select(func.count(Sweep.id))) == 0
    assert optuna_storage(settings_of(sqlite_env).database_url).get_all_studies() == []  # no study either


def test_dry_run_prints_rungs_and_step_counts(sqlite_env, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(sweep_data("plan", grid={"learning_rate": NINE})))
    one = ok_json(cli(sqlite_env, "sweep", str(path), "--dry-run", "--json"))["strategy"]
    assert one == {"kind": "asha", "metric": "eval_loss", "mode": "min", "reduction_factor": 3, "order": "shuffled",
                   "seed": 0, "promotion": "lazy", "rungs": {"0": [4, 12, 36]}, "worst_case_steps": 9 * 36,
                   "halving_steps": 9 * 4 + 3 * (12 - 4) + 1 * (36 - 12), "points_per_bracket": {"0": 9}}
    two = ok_json(cli(sqlite_env, "sweep", str(path), "strategy.brackets=2", "--dry-run", "--json"))
    assert two["strategy"]["rungs"] == {"0": [4, 12, 36], "1": [12, 36]}
    assert two["strategy"]["points_per_bracket"] == {"0": 5, "1": 4}
    # bracket 0: 5 points to 4, 2 to 12, 1 to 36; bracket 1: 4 points to 12, 2 to 36
    assert two["strategy"]["halving_steps"] == (5 * 4 + 2 * 8 + 1 * 24) + (4 * 12 + 2 * 24)
    assert two["strategy"]["worst_case_steps"] == 9 * 36
    assert [p["adapter"] for p in two["points"]] == [f"plan-{i:02d}" for i in range(1, 10)]
    text = cli(sqlite_env, "sweep", str(path), "--dry-run")
    assert text.returncode == 0 and "4, 12, 36" in text.stdout, text.stdout + text.stderr
    assert "waits at the rung until it is" in text.stdout
    eager = cli(sqlite_env, "sweep", str(path), "strategy.promotion=eager", "--dry-run")
    assert "decided the moment it arrives" in eager.stdout, eager.stdout + eager.stderr
    bad = cli(sqlite_env, "sweep", str(path), "strategy.promotion=sometimes", "--dry-run")
    assert bad.returncode != 0 and "promotion" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert job_count(sqlite_env) == 0 and queue_length(sqlite_env) == 0


def test_a_finetune_job_with_a_search_is_refused(sqlite_env):
    from api.context import AppContext
    from api.jobs import submit
    from models.errors import InputError

    search = {"study": "tunequeue-x", "trial": 0, "strategy": "asha", "metric": "eval_loss", "direction": "min",
              "rungs": [4, 12]}
    with pytest.raises(InputError, match="search: set by ASHA and TPE sweeps"):
        submit(AppContext(settings_of(sqlite_env)), {"kind": "finetune", "name": "sneaky", "search": search})
    assert job_count(sqlite_env) == 0 and queue_length(sqlite_env) == 0
