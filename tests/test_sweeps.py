"""Sweeps: expansion and validation of YAML files, dry runs, chained pipelines through a real worker, priorities,
and the morning report (table, CSV, JSON, Markdown, plots, compare)."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from sqlalchemy import func, select

from models.jobs import Job, JobStatus
from models.results import LossPoint
from models.sweeps import Sweep
from tests.conftest import broker_of, cli, queue_length, session_of, settings_of, start_worker
from models.errors import InputError
from api.sweeps import apply_overrides, expand, load_sweep_file

SMALL = {"max_steps": 60, "eval_limit": 40, "eval_steps": 30}
GRID_2X2 = {"name": "grid", "base": {"model": "tiny-t5", **SMALL},
            "grid": {"learning_rate": [1e-3, 3e-3], "lora_r": [8, 16]}, "eval": {"split": "test", "limit": 30}}


def write(tmp_path, data, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


# ------------------------------------------------------------------------------------------ expansion, no services
def test_grid_and_random_expansion():
    plan = expand(GRID_2X2)
    assert [p.varied for p in plan.points] == [
        {"learning_rate": 1e-3, "lora_r": 8}, {"learning_rate": 1e-3, "lora_r": 16},
        {"learning_rate": 3e-3, "lora_r": 8}, {"learning_rate": 3e-3, "lora_r": 16}]
    assert [p.finetune.name for p in plan.points] == ["grid-01", "grid-02", "grid-03", "grid-04"]
    assert all(p.generate.adapter == p.finetune.name and p.generate.limit == 30 for p in plan.points)
    [evaluation] = plan.evaluations  # one generate job for the whole sweep, the base riding along
    assert evaluation.generate.adapters == ["base", "grid-01", "grid-02", "grid-03", "grid-04"]
    assert evaluation.generate.adapter is None and evaluation.generate.limit == 30 and plan.job_count == 6
    sampled = expand({"name": "r", "random": {"n": 5, "seed": 1, "learning_rate": {"low": 1e-4, "high": 1e-2,
                                                                                 "log": True},
                                              "lora_r": {"choices": [4, 8]}}})
    rates = [p.finetune.learning_rate for p in sampled.points]
    assert len(rates) == 5 and all(1e-4 <= r <= 1e-2 for r in rates) and len(set(rates)) == 5
    assert [p.varied for p in sampled.points] == [p.varied for p in expand(sampled.spec).points]  # seeded


def test_points_with_different_generate_settings_get_their_own_evaluation():
    plan = expand({**GRID_2X2, "grid": {"lora_r": [8, 16], "prompt_template": ["Sum up: {dialogue}", "{dialogue}"]}})
    first, second = plan.evaluations
    assert first.generate.adapters == ["base", "grid-01", "grid-03"] and second.generate.adapters == ["grid-02",
                                                                                                      "grid-04"]
    assert first.generate.prompt_template == "Sum up: {dialogue}" and second.generate.prompt_template == "{dialogue}"
    assert plan.job_count == 4 + 2 * 2


def test_overrides():
    data = apply_overrides(GRID_2X2, ["learning_rate=5e-3", "eval.limit=10", "grid.lora_alpha=[8, 16]"])
    plan = expand(data)
    assert {p.finetune.learning_rate for p in plan.points} == {5e-3}  # base override replaces the grid list
    assert {p.varied["lora_alpha"] for p in plan.points} == {8, 16} and len(plan.points) == 4
    assert plan.points[0].generate.limit == 10


@pytest.mark.parametrize("data, message", [
    ({**GRID_2X2, "grid": {"lerning_rate": [1e-3]}}, "grid.lerning_rate: unknown key, did you mean 'learning_rate'?"),
    ({**GRID_2X2, "bse": {}}, "sweep.bse: unknown key, did you mean 'base'?"),
    ({**GRID_2X2, "grid": {"learning_rate": [1e-3, -1], "lora_r": [8, 16]}},
     "point 3 (learning_rate=-1, lora_r=8): learning_rate: Input should be greater than 0 (got -1)"),
    ({**GRID_2X2, "grid": {"lora_r": [8, "big"]}}, "point 2 (lora_r=big): lora_r: Input should be a valid integer"),
    ({**GRID_2X2, "grid": {"learning_rate": 1e-3}}, "grid.learning_rate: must be a non-empty list"),
    ({**GRID_2X2, "eval": {"limit": 0}}, "point 1 (learning_rate=0.001, lora_r=8): limit: Input should be greater"),
    ({**GRID_2X2, "eval": {"splt": "test"}}, "eval.splt: unknown key, did you mean 'split'?"),
    ({k: v for k, v in GRID_2X2.items() if k != "name"}, "the sweep needs a name"),
    ({**GRID_2X2, "name": "../up"}, "sweep name '../up': must be 1-64 letters"),
    ({**GRID_2X2, "grid": {"seed": list(range(1001))}}, "expands to 1001 points"),
    ({**GRID_2X2, "random": {"n": 2, "learning_rate": {"low": 1, "high": 0.1}}}, "random.learning_rate: low 1.0 is above"),
])
def test_validation_names_point_and_field(data, message):
    with pytest.raises(InputError) as err:
        expand(data)
    assert message in str(err.value)


def test_malformed_yaml_is_one_clear_line(tmp_path):
    with pytest.raises(InputError, match=r"is not valid YAML at line 4, column 9: expected"):
        load_sweep_file(write(tmp_path, "name: x\ngrid:\n  learning_rate: [1e-3\n  lora_r: 8\n"))
    with pytest.raises(InputError, match="does not exist"):
        load_sweep_file(str(tmp_path / "nope.yaml"))
    with pytest.raises(InputError, match="must be a mapping"):
        load_sweep_file(write(tmp_path, "- 1\n- 2\n"))


# ------------------------------------------------------------------------------------------ through the CLI
def counts(env) -> tuple[int, int, int]:
    with session_of(env) as session:
        return (session.scalar(select(func.count(Job.id))), session.scalar(select(func.count(Sweep.id))),
                queue_length(env))


def test_dry_run_and_bad_files_enqueue_nothing(make_env, tmp_path):
    env = make_env("sqlite")
    result = cli(env, "sweep", write(tmp_path, GRID_2X2), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "grid-04" in result.stdout and "4 points, 6 jobs" in result.stdout
    dry = json.loads(cli(env, "sweep", write(tmp_path, GRID_2X2), "--dry-run", "--json").stdout)
    assert [p["adapter"] for p in dry["points"]] == ["grid-01", "grid-02", "grid-03", "grid-04"] and dry["jobs"] == 6
    for args, message in [
        ([write(tmp_path, {**GRID_2X2, "grid": {"learning_rate": [1e-3, 0]}}, "a.yaml")], "point 2 (learning_rate=0)"),
        ([write(tmp_path, {**GRID_2X2, "base": {"model": "no-such-model"}}, "b.yaml")],
         "point 1: unknown model 'no-such-model'"),
        ([write(tmp_path, GRID_2X2, "c.yaml"), "lora_rank=4"], "base.lora_rank: unknown key, did you mean 'lora_r'?"),
        ([write(tmp_path, "name: [unclosed\n", "d.yaml")], "is not valid YAML"),
        ([str(tmp_path / "missing.yaml")], "does not exist"),
    ]:
        bad = cli(env, "sweep", *args)
        assert bad.returncode != 0 and message in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1
    assert counts(env) == (0, 0, 0)


def test_sweep_to_morning_report(make_env, tmp_path):
    env = make_env("postgresql")
    queued = cli(env, "sweep", write(tmp_path, GRID_2X2))
    assert queued.returncode == 0 and "4 points, 6 jobs" in queued.stdout, queued.stderr
    again = cli(env, "sweep", write(tmp_path, GRID_2X2))
    assert again.returncode != 0 and "sweep 'grid' already exists" in again.stderr
    worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
    assert worker.wait(timeout=400) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    with session_of(env) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert [j.status for j in jobs] == [JobStatus.succeeded] * 6
        assert [j.kind.value for j in jobs] == ["finetune"] * 4 + ["generate", "score"]
        evaluation = jobs[4].result  # every adapter and the base in one pass of mixed batches
        assert evaluation["passes"] == 1 and evaluation["rows"] == 5 * 30 and jobs[4].started_at > max(
            j.finished_at for j in jobs[:4])
        assert session.scalar(select(func.count(LossPoint.id))) >= 4 * 6  # train points every 10 steps, evals

    rows = json.loads(cli(env, "report", "--sweep", "grid", "--format", "json").stdout)
    assert len(rows) == 5 and rows[0]["variant"] == "base"
    assert {(r["learning_rate"], r["lora_r"]) for r in rows[1:]} == {(1e-3, 8), (1e-3, 16), (3e-3, 8), (3e-3, 16)}
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["rouge1"] == max(r["rouge1"] for r in rows) > rows[0]["rouge1"]
    for row in rows:
        assert row["rouge1_ci_low"] <= row["rouge1"] <= row["rouge1_ci_high"]
        assert row["examples"] == 30
    assert all(r["train_time_s"] > 0 for r in rows[1:])

    parsed = list(csv.DictReader(io.StringIO(cli(env, "report", "--sweep", "grid", "--format", "csv").stdout)))
    assert [(r["variant"], float(r["rouge1"])) for r in parsed] == [(r["variant"], r["rouge1"]) for r in rows]
    table = cli(env, "report", "--sweep", "grid").stdout
    for row in rows:
        assert f"{row['rouge1']:.3f} [{row['rouge1_ci_low']:.2f}, {row['rouge1_ci_high']:.2f}]" in table
    assert f"{best[0]['variant']} ★" in table
    markdown = cli(env, "report", "--sweep", "grid", "--format", "markdown").stdout
    assert markdown.count("\n") == 7 and markdown.startswith("| model | variant | learning_rate | lora_r |")
    top = json.loads(cli(env, "report", "--sweep", "grid", "--sort", "rougeL", "--top", "2", "--format", "json").stdout)
    assert [r["variant"] for r in top][0] == max(rows[1:], key=lambda r: r["rougeL"])["variant"] and len(top) == 3

    box, loss = tmp_path / "box.png", tmp_path / "loss.png"
    plotted = cli(env, "report", "--sweep", "grid", "--plot", str(box), "--plot-loss", str(loss))
    assert plotted.returncode == 0 and "(5 boxes)" in plotted.stderr, plotted.stderr
    from matplotlib.image import imread

    for png in (box, loss):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 15_000
        height, width = imread(png).shape[:2]
        assert height > 300 and width > 500

    compared = cli(env, "report", "--compare", "base", best[0]["variant"], "--limit", "2")
    assert compared.returncode == 0 and compared.stdout.count("reference: ") == 2
    as_csv = list(csv.DictReader(io.StringIO(cli(env, "report", "--compare", "base", best[0]["variant"], "--limit",
                                                 "2", "--format", "csv").stdout)))
    assert len(as_csv) == 2 and {"reference", "difference"} <= set(as_csv[0])
    watched = cli(env, "jobs", "watch", "--sweep", "grid")
    assert watched.returncode == 0 and "6 succeeded" in watched.stdout
    shown = json.loads(cli(env, "sweeps", "show", "grid", "--json").stdout)
    assert shown["spec"]["grid"] == GRID_2X2["grid"] and len(shown["jobs"]) == 6
    assert shown["jobs"][4]["waits_for"] == [j["id"] for j in shown["jobs"][:4]] and shown["jobs"][4]["parent_id"] is None
    assert "5 variants (base," in cli(env, "sweeps", "show", "grid").stdout  # the evaluation job


def test_failing_point_is_left_out_of_the_evaluation(make_env, tmp_path):
    env = make_env("sqlite")
    data = {"name": "mixed", "base": {**SMALL, "max_steps": 20},
            "grid": {"target_modules": [["q", "v"], ["no_such_module"]]}, "eval": {"limit": 10}}
    assert cli(env, "sweep", write(tmp_path, data)).returncode == 0
    worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0
    with session_of(env) as session:
        jobs = {j.id: j for j in session.scalars(select(Job))}
    by_status = {s: sorted(i for i, j in jobs.items() if j.status == s) for s in JobStatus}
    assert len(by_status[JobStatus.succeeded]) == 3  # point 1's fine-tune, the evaluation and its score
    assert len(by_status[JobStatus.failed]) == 1 and not by_status[JobStatus.skipped]
    failed = jobs[by_status[JobStatus.failed][0]]
    assert "no_such_module" in failed.error
    evaluation = next(j for j in jobs.values() if j.kind.value == "generate")
    assert evaluation.result["left_out_adapters"] == ["mixed-02"] and evaluation.result["variants"] == [
        "base", "mixed-01"]
    rows = json.loads(cli(env, "report", "--sweep", "mixed", "--format", "json").stdout)
    assert [r["variant"] for r in rows] == ["base", "mixed-01"]


def test_evaluation_waits_for_every_fine_tune_and_is_skipped_when_none_succeeded(make_env, tmp_path):
    from api.pipelines import enqueue_sweep
    from models.jobs import claim, finish, readiness
    from worker.lifecycle import settle_children

    env = make_env("sqlite")
    broker, plan = broker_of(env), expand({**GRID_2X2, "grid": {"lora_r": [4, 8, 16]}})
    with session_of(env) as session:
        _, jobs = enqueue_sweep(session, broker, settings_of(env).home, plan)
        finetunes, generate, score = jobs[:3], jobs[3], jobs[4]
        assert queue_length(env) == 3  # the fine-tunes only; the evaluation waits in the database

        def end(job, status):
            lease = claim(session, job.id, None, "test-worker")  # as a worker would take it
            finish(session, lease, status, error=status.value)
            settle_children(session, broker, job.id)

        end(finetunes[0], JobStatus.failed)
        end(finetunes[1], JobStatus.cancelled)
        assert readiness(session, generate) == ("wait", "") and queue_length(env) == 3
        end(finetunes[2], JobStatus.failed)
        session.refresh(generate), session.refresh(score)
        assert generate.status == JobStatus.skipped and score.status == JobStatus.skipped
        assert f"none of the jobs it waits for ({', '.join(str(j.id) for j in finetunes)}) succeeded" == \
            generate.error and score.error == f"parent job {generate.id} was skipped"

        plan = expand({**GRID_2X2, "name": "half", "grid": {"lora_r": [4, 8]}})
        _, jobs = enqueue_sweep(session, broker, settings_of(env).home, plan)
        waiting = queue_length(env)
        end(jobs[0], JobStatus.succeeded)
        end(jobs[1], JobStatus.failed)
        settle_children(session, broker, jobs[1].id)  # a second settling (two workers racing) publishes nothing more
        session.refresh(jobs[2])
        assert jobs[2].status == JobStatus.queued and jobs[2].queued_at is not None
        assert queue_length(env) == waiting + 1


def test_priority_passes_queued_jobs(make_env, tmp_path):
    env = make_env("sqlite")
    normal = [int(cli(env, "generate", "--limit", "2").stdout.split()[1]) for _ in range(3)]
    urgent = int(cli(env, "generate", "--limit", "2", "--priority", "9").stdout.split()[1])
    worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
    assert worker.wait(timeout=180) == 0
    with session_of(env) as session:
        started = {j.id: j.started_at for j in session.scalars(select(Job))}
    assert min(started, key=started.get) == urgent, started
    assert sorted(normal, key=started.get) == normal  # same priority keeps FIFO order


def test_cancel_queued_sweep(make_env, tmp_path):
    env = make_env("sqlite")
    assert cli(env, "sweep", write(tmp_path, GRID_2X2)).returncode == 0
    cancelled = cli(env, "sweeps", "cancel", "grid")
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    with session_of(env) as session:
        assert set(session.scalars(select(Job.status))) <= {JobStatus.cancelled, JobStatus.skipped}
    listed = json.loads(cli(env, "sweeps", "list", "--json").stdout)
    assert listed[0]["name"] == "grid" and "queued" not in listed[0]["jobs"]


def test_early_stopping_keeps_best(tmp_path, builtin_home):
    import shutil

    from models import make_session_factory
    from models.migrate import upgrade
    from worker.ml.model_cache import ModelCache
    from models.specs import FinetuneSpec
    from worker.jobs.finetune import train_adapter

    shutil.copytree(builtin_home / "builtin", tmp_path / "builtin")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    session = make_session_factory(url)()
    # a learning rate far too high: eval loss soon stops improving and training stops early
    spec = FinetuneSpec(name="unstable", learning_rate=0.5, max_steps=200, eval_steps=5, eval_limit=20,
                        early_stopping_patience=2, warmup_steps=0)
    result = train_adapter(spec, session, ModelCache(tmp_path), tmp_path)
    assert result["stopped_early"] and result["steps"] < 200
    assert result["best_eval_loss"] < result["eval_loss"]
