"""Finishing and removing sweeps: `sweeps retry` re-queues a sweep's failed, cancelled and skipped points in place
(a real worker then finishes it with no duplicate rows), `sweeps delete` removes a sweep with its rows and adapter
folders so that its file runs again, and `sweep --notify URL` is checked and stored."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import func, select, update

from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter, Generation, LossPoint, Metric
from models.sweeps import Sweep
from tests.conftest import free_port, queue_length, session_of, start_worker, wait_until

TINY = {"model": "tiny-t5", "max_steps": 2, "eval_limit": 4}
EXAMPLES = 4


def sweep_file(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": TINY, "grid": {"learning_rate": [1e-3, 3e-3]},
                                    "eval": {"split": "test", "limit": EXAMPLES, "max_new_tokens": 8}}))
    return str(path)


def run(*args: str, input: str | None = None):
    """`manage.py ARGS` in this process (the environment is the test's, set by the fixtures)."""
    from manage import cli as manage_cli

    return CliRunner().invoke(manage_cli, list(args), input=input)


def refused(result, text: str, exit_code: int = 2) -> None:
    assert result.exit_code == exit_code, result.output
    assert text in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1, result.output


def jobs_of(env, name: str) -> list[Job]:
    with session_of(env) as session:
        sweep_id = session.scalar(select(Sweep.id).where(Sweep.name == name))
        return list(session.scalars(select(Job).where(Job.sweep_id == sweep_id).order_by(Job.id)))


def states(env, name: str) -> list[tuple]:
    return [(j.id, j.status.value, j.attempts, j.max_attempts, j.error) for j in jobs_of(env, name)]


def set_job(env, job_id: int, **values) -> None:
    with session_of(env) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def table_counts(env) -> dict[str, int]:
    with session_of(env) as session:
        return {table.__name__: session.scalar(select(func.count()).select_from(table))
                for table in (Sweep, Job, Adapter, Generation, Metric, LossPoint)}


def all_finished(env, *names: str) -> bool:
    return all(job.status.finished for name in names for job in jobs_of(env, name))


# ----------------------------------------------------------------------------------- through a real worker
@pytest.mark.slow
def test_retry_finishes_failed_and_cancelled_points_without_duplicate_rows(pg_env, tmp_path):
    env, home = pg_env, Path(pg_env["TUNEQUEUE_HOME"])
    assert run("sweep", sweep_file(tmp_path, "alpha")).exit_code == 0
    assert run("sweep", sweep_file(tmp_path, "beta")).exit_code == 0
    assert run("sweeps", "cancel", "beta").exit_code == 0  # before any worker ran: every job cancelled
    assert {s for _, s, *_ in states(env, "beta")} == {"cancelled"}
    alpha_first, alpha_second, alpha_generate, alpha_score = [j.id for j in jobs_of(env, "alpha")]
    set_job(env, alpha_second, status=JobStatus.failed, attempts=1, max_attempts=1, error="RuntimeError: boom",
            traceback="Traceback ...")  # its one attempt crashed

    log = tmp_path / "worker.log"
    worker = start_worker(env, log=log)  # one worker throughout: the model stays loaded between the two rounds
    try:
        wait_until(lambda: all_finished(env, "alpha"), 300, "the first round of sweep alpha")
        with session_of(env) as session:
            kept = session.scalar(select(Adapter).where(Adapter.name == "alpha-01"))
            assert session.get(Job, alpha_generate).result["left_out_adapters"] == ["alpha-02"], log.read_text()
        assert [s for _, s, *_ in states(env, "alpha")] == ["succeeded", "failed", "succeeded", "succeeded"]

        again = json.loads(run("sweeps", "retry", "alpha", "--json").output)
        assert again == {"sweep": "alpha", "finetunes": [alpha_second], "evaluation": [alpha_generate, alpha_score]}
        assert run("sweeps", "retry", "beta").exit_code == 0
        wait_until(lambda: all_finished(env, "alpha", "beta"), 300, "both sweeps")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    for name in ("alpha", "beta"):
        found = jobs_of(env, name)
        assert [j.status for j in found] == [JobStatus.succeeded] * 4, states(env, name)
        generate, score = found[2].id, found[3].id
        with session_of(env) as session:
            rows = session.execute(select(Generation.variant, func.count(), func.count(Generation.example_id.distinct()))
                                   .where(Generation.job_id == generate).group_by(Generation.variant)).all()
            assert {variant: (n, distinct) for variant, n, distinct in rows} == {  # one row per variant and example
                variant: (EXAMPLES, EXAMPLES) for variant in ("base", f"{name}-01", f"{name}-02")}
            metrics = session.execute(select(Metric.variant, Metric.name, func.count()).where(Metric.job_id == score)
                                      .group_by(Metric.variant, Metric.name)).all()
            assert {variant for variant, _, _ in metrics} == {"base", f"{name}-01", f"{name}-02"}
            assert {n for _, _, n in metrics} == {1}
        report = json.loads(run("report", "--sweep", name, "--format", "json").output)
        assert sorted(r["variant"] for r in report) == sorted(["base", f"{name}-01", f"{name}-02"])
    with session_of(env) as session:
        assert session.scalar(select(Adapter.id).where(Adapter.name == "alpha-01")) == kept.id  # not trained again
        assert session.get(Job, alpha_generate).result["resumed_from"] == 2 * EXAMPLES  # base, alpha-01 kept
        assert (session.get(Job, alpha_second).attempts, session.get(Job, alpha_second).max_attempts) == (2, 4)

    # deleting a finished sweep removes its rows and folders and nothing of the other sweep
    before = table_counts(env)
    deleted = run("sweeps", "delete", "alpha", "--yes", "--json")
    assert deleted.exit_code == 0, deleted.output
    removed = json.loads(deleted.output)
    assert removed["jobs"] == {"succeeded": 4} and removed["adapters"] == ["alpha-01", "alpha-02"]
    assert removed["rows"]["generations"] == 3 * EXAMPLES and removed["rows"]["loss_points"] > 0
    after = table_counts(env)
    assert after["Sweep"] == 1 and after["Job"] == 4 and after["Adapter"] == 2
    assert after["Generation"] == before["Generation"] - 3 * EXAMPLES
    assert not (home / "adapters" / "alpha-01").exists() and not (home / "adapters" / "alpha-02").exists()
    assert (home / "adapters" / "beta-01").is_dir()
    assert run("sweep", sweep_file(tmp_path, "alpha")).exit_code == 0  # the same file runs again


# ----------------------------------------------------------------------------------- no worker needed
def test_retry_requeues_in_place_after_checking_names_and_broker(sqlite_env, tmp_path, monkeypatch):
    env = sqlite_env
    assert run("sweep", sweep_file(tmp_path, "pair")).exit_code == 0
    first, second, generate, score = [j.id for j in jobs_of(env, "pair")]
    set_job(env, first, status=JobStatus.failed, attempts=2, max_attempts=2, error="RuntimeError: boom",
            traceback="Traceback ...")
    set_job(env, second, status=JobStatus.cancelled, error="cancelled by user")
    for job_id in (generate, score):
        set_job(env, job_id, status=JobStatus.skipped, error="none of the jobs it waits for succeeded")
    with session_of(env) as session:
        session.execute(update(Sweep).values(finished_at=func.now()))
        other = Job(kind=JobKind.finetune, status=JobStatus.queued, spec={}, output_name="pair-01")
        session.add(other)
        session.commit()
        other_id = other.id
    before, messages = states(env, "pair"), queue_length(env)

    refused(run("sweeps", "retry", "pair"), f"adapter name 'pair-01' (job {first} of sweep 'pair') is reserved by "
                                           f"queued or running job {other_id}")
    set_job(env, other_id, status=JobStatus.cancelled)
    with session_of(env) as session:
        session.add(Adapter(name="pair-02", base_model="tiny-t5", method="lora", hyperparameters={}, path="x",
                            size_bytes=0, trainable_params=0, total_params=0))
        session.commit()
    refused(run("sweeps", "retry", "pair"), "an adapter named 'pair-02' exists now")
    with session_of(env) as session:
        session.execute(Adapter.__table__.delete())
        session.commit()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    refused(run("sweeps", "retry", "pair"), "cannot reach the broker", exit_code=1)  # one line, nothing changed
    monkeypatch.setenv("REDIS_URL", env["REDIS_URL"])
    assert states(env, "pair") == before and queue_length(env) == messages

    again = json.loads(run("sweeps", "retry", "pair", "--max-attempts", "2", "--json").output)
    assert again == {"sweep": "pair", "finetunes": [first, second], "evaluation": [generate, score]}
    assert states(env, "pair") == [(first, "queued", 2, 4, None), (second, "queued", 0, 2, None),
                                   (generate, "queued", 0, 2, None), (score, "queued", 0, 2, None)]
    found = {j.id: j for j in jobs_of(env, "pair")}
    assert found[first].traceback is None and found[first].finished_at is None and found[first].started_at is None
    assert found[first].queued_at and found[second].queued_at  # published
    assert found[generate].queued_at is None and found[score].queued_at is None  # wait for their join, as at first
    assert queue_length(env) == messages + 2
    with session_of(env) as session:
        assert session.scalar(select(Sweep.finished_at)) is None  # running again: its end is announced again
    refused(run("sweeps", "retry", "pair"), "has 4 queued or running job(s)")


def test_nothing_to_retry_running_jobs_and_unknown_names(sqlite_env, tmp_path):
    env = sqlite_env
    assert run("sweep", sweep_file(tmp_path, "pair")).exit_code == 0
    first, *rest = [j.id for j in jobs_of(env, "pair")]
    set_job(env, first, status=JobStatus.running, attempts=1)
    before = table_counts(env)
    refused(run("sweeps", "delete", "pair", "--yes"), f"sweep 'pair' has running job(s) {first}: cancel it first")
    refused(run("sweeps", "retry", "pair"), "cancel it first ('sweeps cancel pair') or wait")
    assert table_counts(env) == before
    for job_id in [first, *rest]:
        set_job(env, job_id, status=JobStatus.succeeded)
    done = run("sweeps", "retry", "pair")
    assert done.exit_code == 0 and "nothing to retry" in done.output
    for command in (["retry", "nope"], ["delete", "nope", "--yes"]):
        refused(run("sweeps", *command), "sweep 'nope' does not exist")


def test_delete_asks_first_and_frees_the_name(sqlite_env, tmp_path):
    env, home = sqlite_env, Path(sqlite_env["TUNEQUEUE_HOME"])
    path = sweep_file(tmp_path, "pair")
    assert run("sweep", path).exit_code == 0
    refused(run("sweep", path), "sweep 'pair' already exists: 'sweeps retry pair' re-queues its failed and cancelled "
                                "points, 'sweeps delete pair' removes it (or give --name)")
    first = jobs_of(env, "pair")[0].id
    set_job(env, first, status=JobStatus.succeeded)
    with session_of(env) as session:
        for name, job_id in (("pair-01", first), ("keep", None)):  # an adapter of the sweep, and one of no sweep
            (home / "adapters" / name).mkdir(parents=True)
            session.add(Adapter(name=name, job_id=job_id, base_model="tiny-t5", method="lora", hyperparameters={},
                                path=f"adapters/{name}", size_bytes=0, trainable_params=0, total_params=0))
        session.add(LossPoint(job_id=first, step=1, train_loss=1.0))
        session.commit()
    before = table_counts(env)

    answered = run("sweeps", "delete", "pair", input="n\n")
    assert answered.exit_code == 1 and "nothing deleted" in answered.output, answered.output
    assert "4 job(s) (3 queued, 1 succeeded), 1 adapter(s) (pair-01) with their folders, 1 result row(s)" in \
        answered.output
    assert table_counts(env) == before and (home / "adapters" / "pair-01").is_dir()

    confirmed = run("sweeps", "delete", "pair", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert table_counts(env) == {"Sweep": 0, "Job": 0, "Adapter": 1, "Generation": 0, "Metric": 0, "LossPoint": 0}
    assert not (home / "adapters" / "pair-01").exists() and (home / "adapters" / "keep").is_dir()
    assert run("sweep", path).exit_code == 0  # the same file enqueues again


def test_notify_url_is_checked_and_stored(sqlite_env, tmp_path):
    env = sqlite_env
    refused(run("sweep", sweep_file(tmp_path, "pair"), "--notify", "ftp://hooks.example/x"), "--notify=")
    assert table_counts(env)["Job"] == 0
    assert run("sweep", sweep_file(tmp_path, "pair"), "--notify", "https://hooks.example/x").exit_code == 0
    assert run("sweep", sweep_file(tmp_path, "other")).exit_code == 0
    with session_of(env) as session:
        assert dict(session.execute(select(Sweep.name, Sweep.notify_url)).tuples().all()) == {
            "pair": "https://hooks.example/x", "other": None}
