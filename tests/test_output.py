"""Readable output: tables fitted to COLUMNS (names and ids whole, less important columns left out first, --wide
and --format csv|json for everything), the report's headline rouge columns, runs scored on different example sets
compared on the examples they share, `--compare` in words, `waiting (N jobs)`, and `jobs watch` with eval loss.

Rows are written straight into a fresh database (no worker), so the module runs in seconds."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import uuid

import pytest
from click.testing import CliRunner

from manage import cli as manage_cli
from models.base import utcnow
from models.jobs import Job, JobKind, JobStatus, JobWait
from models.results import Adapter, ExampleScore, Generation, Metric
from models.sweeps import Sweep
from tests.conftest import RUN_ID, _drop_pg_database, _pg_database, cli, session_of

LONG_NAME = "lr-sweep-learning-rate-0.003-rank-16-dropout-0.1"  # 49 characters: cut to `lr-…` before
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@pytest.fixture(params=["sqlite"])
def out_env(request, tmp_path, monkeypatch) -> dict:
    """A migrated database of the parametrized backend and a home, applied to this process; no built-in models
    (nothing here runs a model) and no COLUMNS from the terminal that runs the tests."""
    from models.migrate import upgrade

    created = None
    if request.param == "postgresql":
        created = f"tq_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
        url = _pg_database(created)
    else:
        url = f"sqlite:///{tmp_path / 'tunequeue.db'}"
    upgrade(url)
    env = {**os.environ, "TUNEQUEUE_HOME": str(tmp_path / "home"), "DATABASE_URL": url}
    env.pop("COLUMNS", None)
    for key in ("TUNEQUEUE_HOME", "DATABASE_URL"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("COLUMNS", raising=False)
    yield env
    if created:
        _drop_pg_database(created)


def run(*args: str, columns: int | None = None, ok: bool = True):
    result = CliRunner().invoke(manage_cli, list(args), env={"COLUMNS": str(columns)} if columns else None)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def widest_line(text: str) -> int:
    return max(len(line) for line in text.splitlines())


# ------------------------------------------------------------------------------------------------- writing rows
def scored_run(env: dict, variant: str, scores: dict[str, list[float]], example_ids: list[str], *,
               model: str = "tiny-t5", hyper: dict | None = None) -> None:
    """One variant's generate and score jobs as score_rows leaves them: generations, per-example scores, and
    metric rows holding their means; an adapter row (with `hyper`) for any variant but base."""
    with session_of(env) as session:
        adapter = None
        if variant != "base":
            adapter = Adapter(name=variant, base_model=model, method="lora", hyperparameters=hyper or {},
                              path=f"adapters/{variant}", size_bytes=4096, trainable_params=1000,
                              total_params=100_000, train_loss=0.5, eval_loss=0.6, best_eval_loss=0.55,
                              duration_s=12.5)
            session.add(adapter)
            session.flush()
        generate = Job(kind=JobKind.generate, status=JobStatus.succeeded, attempts=1, cancel_requested=False,
                       spec={"model": model, "split": "test", "adapter": None if variant == "base" else variant})
        session.add(generate)
        session.flush()
        score = Job(kind=JobKind.score, status=JobStatus.succeeded, attempts=1, cancel_requested=False,
                    spec={"generate_job_id": generate.id})
        session.add(score)
        session.flush()
        for index, example_id in enumerate(example_ids):
            row = Generation(job_id=generate.id, variant=variant, adapter_id=adapter and adapter.id, split="test",
                             example_id=example_id, source=f"dialogue {example_id}",
                             prediction=f"{variant} says {example_id}", reference=f"summary {example_id}")
            session.add(row)
            session.flush()
            session.add_all([ExampleScore(job_id=score.id, generation_id=row.id, name=name, value=values[index])
                             for name, values in scores.items()])
        session.add_all([Metric(job_id=score.id, generate_job_id=generate.id, variant=variant,
                                adapter_id=adapter and adapter.id, base_model=model, split="test", name=name,
                                value=sum(values) / len(values), n_examples=len(values))
                         for name, values in scores.items()])
        session.commit()


def rouge(level: float, n: int, step: float = 0.0) -> dict[str, list[float]]:
    """Per-example rouge scores around `level` (a fixed pattern, so the means are known)."""
    return {name: [min(1.0, max(0.0, level - 0.05 * k + (i % 5 - 2) * 0.02 + step * i)) for i in range(n)]
            for k, name in enumerate(ROUGE)}


IDS = [f"{i:03d}" for i in range(40)]


def sweep_results(env: dict) -> None:
    scored_run(env, "base", rouge(0.1, 40), IDS)
    for k, (rate, rank) in enumerate([(1e-3, 8), (1e-3, 16), (3e-3, 8), (3e-3, 16)]):
        scored_run(env, f"grid-{k + 1:02d}", rouge(0.5 + 0.1 * k, 40), IDS,
                   hyper={"learning_rate": rate, "lora_r": rank, "num_train_epochs": 3})


# ------------------------------------------------------------------------------------------------------- width
def test_table_width_follows_columns(out_env):
    sweep_results(out_env)
    scored_run(out_env, LONG_NAME, rouge(0.4, 40), IDS, hyper={"learning_rate": 3e-4, "lora_r": 4})
    for args in (["adapters", "list"], ["report", "--metric", "rouge"], ["jobs", "list"]):
        narrow, wide = run(*args, columns=80).stdout, run(*args, columns=160).stdout
        assert widest_line(narrow) <= 80 and widest_line(wide) <= 160, args
        assert widest_line(wide) > 80, args  # the room is used
        if args[0] != "jobs":
            assert any(LONG_NAME in line for line in narrow.splitlines()), narrow  # whole, on one line
        assert "…" not in narrow + wide
    narrow, wide = run("adapters", "list", columns=80).stdout, run("adapters", "list", columns=160).stdout
    assert "train loss" in wide and "train loss" not in narrow.split("\n(")[0]
    assert re.search(r"\((.*, )?train loss(, .*)? left out to fit 80 columns; --wide", narrow.replace("\n", " "))
    report = run("report", columns=80).stdout
    assert "rouge1" in report and "left out to fit 80 columns" in " ".join(report.split())


def test_piped_output_keeps_whole_names(out_env):
    """`adapters list | grep NAME` finds the full name, at COLUMNS=80 and piped with no COLUMNS (120 wide)."""
    scored_run(out_env, LONG_NAME, rouge(0.4, 5), IDS[:5])
    scored_run(out_env, "short", rouge(0.5, 5), IDS[:5])
    narrow = cli({**out_env, "COLUMNS": "80"}, "adapters", "list")
    piped = cli(out_env, "adapters", "list")
    assert narrow.returncode == 0 and piped.returncode == 0, narrow.stderr + piped.stderr
    assert [line for line in narrow.stdout.splitlines() if LONG_NAME in line]
    assert widest_line(narrow.stdout) <= 80
    assert widest_line(piped.stdout) <= 120 and [line for line in piped.stdout.splitlines() if LONG_NAME in line]
    assert "tiny-t5" in piped.stdout  # the base column too at 120


def test_name_wider_than_the_terminal_is_never_folded():
    from api.render import Col, render_table

    name = "x" * 70
    text = render_table([Col("id", name=True), Col("name", name=True), Col("note", drop=1)],
                        [["1", name, "a note"]], width=40)
    assert name in text and "note" not in text.split("\n(")[0]


def test_wide_shows_every_column(out_env):
    sweep_results(out_env)
    listed = run("adapters", "list", "--wide", columns=80).stdout
    for header in ("name", "base", "kind", "method", "trainable", "total", "% trainable", "size", "train loss",
                   "eval loss", "best eval", "duration"):
        assert header in listed, header
    assert "left out" not in listed and "…" not in listed
    report = run("report", "--wide", columns=80).stdout
    for header in ("rougeLsum [95% CI]", "Δ rouge2", "train s", "queue wait s", "learning_rate", "lora_r"):
        assert header in report, header
    jobs = run("jobs", "list", "--wide", columns=60).stdout
    assert "queue wait" in jobs and "attempts" in jobs and "left out" not in jobs


def test_csv_and_json_formats(out_env):
    sweep_results(out_env)
    with session_of(out_env) as session:
        session.add(Sweep(name="grid", spec={"grid": {"lora_r": [8, 16]}}, priority=3, points=4))
        session.commit()
    as_json = json.loads(run("jobs", "list", "--format", "json").stdout)
    assert as_json == json.loads(run("jobs", "list", "--json").stdout) and len(as_json) == 10
    rows = list(csv.DictReader(io.StringIO(run("jobs", "list", "--format", "csv").stdout)))
    assert [int(r["id"]) for r in rows] == [j["id"] for j in as_json]
    assert {"kind", "status", "queued_at", "progress", "waits_for"} <= set(rows[0])
    adapters = list(csv.DictReader(io.StringIO(run("adapters", "list", "--format", "csv").stdout)))
    assert [a["name"] for a in adapters] == ["grid-01", "grid-02", "grid-03", "grid-04"]
    assert json.loads(adapters[3]["hyperparameters"]) == {"learning_rate": 3e-3, "lora_r": 16, "num_train_epochs": 3}
    assert json.loads(run("adapters", "list", "--format", "json").stdout) == json.loads(
        run("adapters", "list", "--json").stdout)
    sweeps = json.loads(run("sweeps", "list", "--format", "json").stdout)
    assert [(s["name"], s["points"], s["priority"]) for s in sweeps] == [("grid", 4, 3)]
    assert list(csv.DictReader(io.StringIO(run("sweeps", "list", "--format", "csv").stdout)))[0]["name"] == "grid"
    report = json.loads(run("report", "--format", "json").stdout)
    assert {"rougeLsum", "rougeLsum_ci_low", "train_time_s", "examples_scored", "example_set"} <= set(report[0])


# ------------------------------------------------------------------------------------------------------ report
def test_report_shows_rouge_1_2_L_with_intervals_by_default(out_env):
    sweep_results(out_env)
    rows = {r["variant"]: r for r in json.loads(run("report", "--format", "json").stdout)}
    table = run("report", "--metric", "rouge", columns=160).stdout
    header = next(line for line in table.splitlines() if "variant" in line)
    assert [h.strip() for h in header.strip("┃ ").split("┃")] == [
        "variant", "learning_rate", "lora_r", "rouge1", "Δ rouge1", "rouge2", "rougeL"]
    assert "rougeLsum" not in table and "left out" not in table
    assert "on test · tiny-t5 · 40 examples: mean [95% CI], Δ vs base, ★ best" in " ".join(table.split())
    best = rows["grid-04"]
    line = next(line for line in table.splitlines() if "grid-04 ★" in line)
    for metric in ("rouge1", "rouge2", "rougeL"):
        cell = f"{best[metric]:.3f} [{best[metric + '_ci_low']:.2f}, {best[metric + '_ci_high']:.2f}]"
        assert cell in line, (cell, line)
    assert f"{best['delta_rouge1']:+.3f}" in line and "0.003" in line and "16" in line


@pytest.mark.parametrize("out_env", ["sqlite", "postgresql"], indirect=True)
def test_runs_on_different_example_sets_are_compared_on_the_shared_ones(out_env):
    base = rouge(0.1, 20)
    scored_run(out_env, "base", base, IDS[:20])  # 20 examples, beside adapters scored on 40
    adapter = rouge(0.3, 40, step=0.01)
    scored_run(out_env, "wider", adapter, IDS, hyper={"learning_rate": 1e-3})
    scored_run(out_env, "other", rouge(0.2, 40), IDS, hyper={"learning_rate": 3e-3})

    rows = {r["variant"]: r for r in json.loads(run("report", "--format", "json").stdout)}
    shared_mean = sum(adapter["rouge1"][:20]) / 20
    assert rows["wider"]["rouge1"] == pytest.approx(shared_mean) != pytest.approx(sum(adapter["rouge1"]) / 40)
    assert rows["wider"]["rouge1_ci_low"] <= shared_mean <= rows["wider"]["rouge1_ci_high"]
    assert rows["wider"]["delta_rouge1"] == pytest.approx(shared_mean - sum(base["rouge1"]) / 20)
    assert [(r["examples"], r["examples_scored"], r["example_set"]) for r in rows.values()] == [
        (20, 20, "shared"), (20, 40, "shared"), (20, 40, "shared")]

    note = ("note: these runs were scored on different example sets (40 and 20 examples); every mean and interval "
            "is over the 20 examples they all share.")
    table = run("report", columns=200).stdout
    assert table.startswith(note + "\n") and "20 shared examples" in table
    assert f"{shared_mean:.3f} [" in next(line for line in table.splitlines() if "wider" in line)
    as_csv = run("report", "--format", "csv")
    parsed = {r["variant"]: r for r in csv.DictReader(io.StringIO(as_csv.stdout))}
    assert float(parsed["wider"]["rouge1"]) == pytest.approx(shared_mean) and parsed["wider"]["examples"] == "20"
    assert as_csv.stderr.strip() == note  # the note beside machine output, not in it
    assert note in run("report", "--format", "markdown").stdout


def test_runs_on_one_example_set_get_no_note(out_env):
    sweep_results(out_env)
    rows = json.loads(run("report", "--format", "json").stdout)
    assert {r["example_set"] for r in rows} == {"same"} and {r["examples"] for r in rows} == {40}
    assert rows[1]["rouge1"] == pytest.approx(sum(rouge(0.5, 40)["rouge1"]) / 40)
    assert "note:" not in run("report").stdout


def test_runs_that_share_no_example_keep_their_own(out_env):
    scored_run(out_env, "base", rouge(0.1, 10), IDS[:10])
    scored_run(out_env, "later", rouge(0.5, 10), IDS[10:20])
    rows = json.loads(run("report", "--format", "json").stdout)
    assert [(r["examples"], r["example_set"]) for r in rows] == [(10, "own"), (10, "own")]
    assert "cannot be matched example by example" in run("report").stdout


def test_compare_says_which_run_is_better(out_env):
    scored_run(out_env, "base", {"rouge1": [0.2, 0.5, 0.5, 0.1, 0.3]}, IDS[:5])
    scored_run(out_env, "tuned", {"rouge1": [0.6, 0.4, 0.5, 0.9, 0.7]}, IDS[:5])
    shown = run("report", "--metric", "rouge1", "--compare", "base", "tuned", "--limit", "2").stdout
    lines = shown.splitlines()
    assert lines[0] == ("base is better on 1 of 5 examples, tuned on 3, 1 tied (rouge1 mean 0.320 vs 0.620: tuned "
                        "is better by 0.300)")
    assert lines[1].startswith("Δ below is base − tuned: positive where base is better, negative where tuned is "
                               "better.")
    assert "── example 003: rouge1 base=0.100 tuned=0.900, Δ -0.800 (tuned better)" in shown
    assert shown.count("reference: ") == 2
    reverse = run("report", "--metric", "rouge1", "--compare", "tuned", "base").stdout
    assert reverse.startswith("tuned is better on 3 of 5 examples, base on 1, 1 tied (rouge1 mean 0.620 vs 0.320: "
                              "tuned is better by 0.300)")
    as_csv = run("report", "--metric", "rouge1", "--compare", "base", "tuned", "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(p["example_id"], p["better"]) for p in parsed[:2]] == [("003", "tuned"), ("000", "tuned")]
    assert as_csv.stderr.startswith("base is better on 1 of 5 examples")


# -------------------------------------------------------------------------------------------------------- jobs
def add(env: dict, kind: JobKind, status: JobStatus, spec: dict, *, published: bool = True, **fields) -> int:
    with session_of(env) as session:
        job = Job(kind=kind, status=status, spec=spec, attempts=0, cancel_requested=False,
                  queued_at=utcnow() if published else None, **fields)
        session.add(job)
        session.commit()
        return job.id


def test_a_join_not_yet_published_is_waiting(out_env):
    tunes = [add(out_env, JobKind.finetune, JobStatus.running if k == 0 else JobStatus.queued,
                 {"name": f"grid-{k}", "model": "tiny-t5", "learning_rate": 1e-3}) for k in range(3)]
    join = add(out_env, JobKind.generate, JobStatus.queued,
               {"adapters": ["base", "grid-0", "grid-1", "grid-2"], "model": "tiny-t5", "split": "test"},
               published=False)
    with session_of(out_env) as session:
        session.add_all([JobWait(job_id=join, waits_for_id=t) for t in tunes])
        session.commit()
    score = add(out_env, JobKind.score, JobStatus.queued, {"generate_job_id": join}, published=False,
                parent_id=join)

    def status_cells() -> dict[int, str]:
        table = run("jobs", "list", columns=200).stdout
        return {int(m[1]): m[2].strip() for m in re.finditer(r"┃?│\s+(\d+) │[^│]*│ ([^│]+)│", table)}

    shown = status_cells()
    assert shown[join] == "waiting (3 jobs)" and shown[score] == "waiting (1 job)"
    assert shown[tunes[0]] == "running" and shown[tunes[1]] == "queued"  # published: in the broker's queue
    assert "4 variants (base, grid-0, +2 more) on tiny-t5 / test" in run("jobs", "list", columns=200).stdout
    by_id = {j["id"]: j["status"] for j in json.loads(run("jobs", "list", "--json").stdout)}
    assert by_id[join] == by_id[score] == "queued"  # machine output keeps the raw status
    with session_of(out_env) as session:
        for job_id in tunes[:2]:
            session.get(Job, job_id).status = JobStatus.succeeded
        session.commit()
    assert status_cells()[join] == "waiting (1 job)"


def test_watch_shows_adapter_step_loss_and_eval_loss(out_env):
    from api.jobs import bar_fields

    progress = {"step": 40, "total_steps": 120, "loss": 0.4123, "eval_loss": 0.5012}
    tune = add(out_env, JobKind.finetune, JobStatus.succeeded,
               {"name": LONG_NAME, "model": "tiny-t5", "learning_rate": 1e-3}, progress=progress)
    with session_of(out_env) as session:
        fields = bar_fields(session.get(Job, tune), {})
    assert fields["description"] == f"job {tune} finetune {LONG_NAME}"
    assert fields["info"] == "step 40/120 · loss 0.4123 · eval loss 0.5012 · succeeded"
    assert (fields["completed"], fields["total"]) == (40, 120)
    watched = run("jobs", "watch", str(tune), columns=200).stdout  # finished: one pass of the real bars
    assert f"job {tune} finetune {LONG_NAME}" in watched and "eval loss 0.5012" in watched
    assert watched.rstrip().endswith("1 succeeded")
