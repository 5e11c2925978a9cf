"""What an ASHA sweep shows once it has run: the `pruned` state in `jobs list`, the HTTP API and Flower, each point's
search in `jobs show`, its last rung / steps / decision in `report --sweep` (pruned points that were not evaluated
included), the rungs plot, and the sweep's confirmation lines.

One real sweep per module: nine points on tiny-t5 (the rung metric forced to each point's learning rate by the
`rung_metric_is_lr` fault, so the decisions are known: with η = 3 the points of lr 5e-3, 2e-3 and 1e-3 go on at steps
4 and 12 and complete at 36, the other six are pruned at step 4), run by one burst worker while a real Flower
watches the events."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import select

from manage import cli as manage_cli
from models.jobs import Job, JobKind
from models.search import Rung
from tests.test_flower import flower_get as flower_get_as, stop_flower
from tests.conftest import (REDIS_URL, REPO, RUN_ID, create_token, free_port, session_of, start_api, start_worker,
                            wait_until)

RATES = [5e-3, 2e-3, 8e-3, 1e-3, 9e-3, 3e-3, 7e-3, 4e-3, 6e-3]
PROMOTED = {"asha-rep-01", "asha-rep-02", "asha-rep-04"}  # lr 5e-3, 2e-3, 1e-3: the best third at each rung
FLOWER_AUTH = "night:owl-7"
SWEEP_FILE = f"""
name: asha-rep
base: {{model: tiny-t5, train_limit: 200, eval_limit: 20, per_device_train_batch_size: 8, target_modules: [q, v]}}
grid: {{learning_rate: [{", ".join(f"{r:g}" for r in RATES)}]}}
strategy: {{kind: asha, metric: eval_loss, mode: min, min_steps: 4, max_steps: 36, reduction_factor: 3,
           order: as-written, promotion: eager}}
eval: {{split: test, limit: 20}}
"""


@dataclass
class Searched:
    env: dict
    home: Path
    flower_port: int
    queued_line: str
    jobs: dict  # adapter name -> job id


def run(env: dict, *args: str):
    """The CLI in this process (a subprocess costs seconds on a busy machine), in the sweep's environment."""
    keys = ("TUNEQUEUE_HOME", "DATABASE_URL", "REDIS_URL", "TUNEQUEUE_QUEUE")
    return CliRunner().invoke(manage_cli, list(args), env={key: env[key] for key in keys})


def run_json(env: dict, *args: str):
    result = run(env, *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def flower_get(port: int, path: str):
    return flower_get_as(port, path, FLOWER_AUTH)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, builtin_home):
    from models.migrate import upgrade

    home = tmp_path_factory.mktemp("search-report")
    shutil.copytree(builtin_home / "builtin", home / "builtin")
    queue = f"tq-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'tunequeue.db'}",
           "REDIS_URL": REDIS_URL, "TUNEQUEUE_QUEUE": queue, "PYTHONUNBUFFERED": "1", "TUNEQUEUE_FAULTS": ""}
    upgrade(env["DATABASE_URL"])
    port = free_port()
    flower = subprocess.Popen([sys.executable, str(REPO / "manage.py"), "flower", "--port", str(port),
                               "--no-persistent"], env={**env, "FLOWER_BASIC_AUTH": FLOWER_AUTH}, cwd=REPO,
                              stdout=open(home / "flower.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: flower_get(port, "/healthcheck")[0] == 200, 60, "Flower to answer")
        time.sleep(2)  # Flower's event consumer connects after its web server starts
        (home / "asha.yaml").write_text(SWEEP_FILE)
        queued = run(env, "sweep", str(home / "asha.yaml"))
        assert queued.exit_code == 0, queued.output
        worker = start_worker({**env, "TUNEQUEUE_FAULTS": "rung_metric_is_lr:1"}, "--burst",
                              log=home / "worker.log")
        assert worker.wait(timeout=300) == 0, (home / "worker.log").read_text()[-3000:]
        with session_of(env) as session:
            jobs = {job.spec["name"]: job.id for job in session.scalars(select(Job)) if job.kind.value == "finetune"}
        yield Searched(env, home, port, queued.stdout.strip(), jobs)
    finally:
        stop_flower(flower)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"*{queue}*"):
            client.delete(key)


def rung_rows(env: dict) -> dict[int, list[Rung]]:
    with session_of(env) as session:
        found: dict[int, list[Rung]] = {}
        for rung in session.scalars(select(Rung).order_by(Rung.job_id, Rung.step)):
            found.setdefault(rung.job_id, []).append(rung)
        return found


@pytest.mark.slow
def test_pruned_points_are_listed_and_show_why(searched):
    env, jobs = searched.env, searched.jobs
    assert searched.queued_line.startswith("sweep 'asha-rep' queued: 9 points, 11 jobs")
    assert "ASHA decides at steps 4, 12 (max 36)" in searched.queued_line
    pruned = run_json(env, "jobs", "list", "--status", "pruned", "--json")
    assert sorted(j["id"] for j in pruned) == sorted(jobs[n] for n in jobs if n not in PROMOTED)
    assert all(j["status"] == "pruned" for j in pruned)
    table = run(env, "jobs", "list", "--status", "pruned", "--wide")
    assert table.exit_code == 0 and table.stdout.count("│ pruned ") == 6 and "4/36" in table.stdout, table.stdout
    swept = run_json(env, "sweeps", "list", "--json")
    assert swept[0]["jobs"] == {"pruned": 6, "succeeded": 5}

    loser = jobs["asha-rep-03"]  # lr 8e-3: the third point, the first one pruned
    shown = run_json(env, "jobs", "show", str(loser), "--json")
    search = shown["search"]
    reason = shown["result"]["pruned"]["reason"]
    assert reason.startswith("pruned at step 4: eval_loss 0.008, rung median ")
    assert search["state"] == reason and search["strategy"] == "asha" and search["metric"] == "eval_loss"
    assert search["rung_steps"] == [4, 12, 36] and search["study"].startswith("tunequeue-asha-rep-")
    assert [(r["step"], r["decision"], r["value"], r["reason"]) for r in search["rungs"]] == \
        [(4, "prune", 0.008, reason)]
    text = run(env, "jobs", "show", str(loser)).stdout
    assert "status: pruned" in text and f"  {reason}\n" in text, text  # the reason on a line of its own
    assert f"ASHA trial {search['trial']} of study {search['study']}" in text and "rungs of job" in text

    winner = run_json(env, "jobs", "show", str(jobs["asha-rep-01"]), "--json")["search"]
    assert [(r["step"], r["decision"]) for r in winner["rungs"]] == [(4, "promote"), (12, "promote"),
                                                                    (36, "complete")]
    assert winner["state"].startswith("completed at step 36: eval_loss 0.005")
    with session_of(env) as session:  # a job that is no sweep point has none
        evaluation = session.scalar(select(Job.id).where(Job.kind == JobKind.generate))
    assert run_json(env, "jobs", "show", str(evaluation), "--json")["search"] is None


@pytest.mark.slow
def test_report_gives_each_point_its_last_rung_steps_and_decision(searched, tmp_path):
    env, jobs = searched.env, searched.jobs
    rows = run_json(env, "report", "--sweep", "asha-rep", "--format", "json")
    by_variant = {row["variant"]: row for row in rows}
    assert set(by_variant) == {"base", *jobs}  # the pruned points too, though they were not evaluated
    rungs = rung_rows(env)
    words = {"prune": "pruned", "promote": "promoted", "complete": "complete"}
    for name, job_id in jobs.items():
        last = rungs[job_id][-1]
        row = by_variant[name]
        assert (row["last_rung"], row["steps"], row["decision"], row["rung_metric"], row["rung_value"]) == \
            (last.step, last.step, words[last.decision], "eval_loss", last.value), row
        assert (row["rouge1"] is None) == (name not in PROMOTED), row
        assert row["decision"] == ("complete" if name in PROMOTED else "pruned")
    assert by_variant["base"]["decision"] is None and by_variant["base"]["examples"] == 20
    assert sum(by_variant[n]["steps"] for n in jobs) == 3 * 36 + 6 * 4  # what the search spent
    assert not [r for r in rows if r["best"] and r["variant"] not in PROMOTED]

    csv_text = run(env, "report", "--sweep", "asha-rep", "--format", "csv").stdout
    header = csv_text.splitlines()[0].split(",")
    assert {"last_rung", "steps", "decision", "rung_value"} <= set(header)
    table = run(env, "report", "--sweep", "asha-rep", "--wide")
    assert table.exit_code == 0 and table.stdout.count("│ pruned ") == 6 and "6 point(s) without a mean" in \
        table.stdout.replace("\n", " ")

    plot = tmp_path / "rungs.png"
    drawn = run(env, "report", "--sweep", "asha-rep", "--plot-rungs", str(plot))
    assert drawn.exit_code == 0 and "rungs plot written" in drawn.stderr and "(9 points)" in drawn.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    svg = tmp_path / "rungs.svg"
    assert run(env, "report", "--sweep", "asha-rep", "--plot-rungs", str(svg)).exit_code == 0
    assert "<svg" in svg.read_text()[:1000]


@pytest.mark.slow
def test_http_api_filters_pruned_and_answers_as_the_cli(searched):
    env, jobs = searched.env, searched.jobs
    server, base = start_api(env)
    try:
        headers = {"Authorization": f"Bearer {create_token(env, 'reader', read_only=True)}"}
        page = httpx.get(base + "/jobs", params={"status": "pruned"}, headers=headers, timeout=30).json()
        assert page["total"] == 6 and {j["status"] for j in page["jobs"]} == {"pruned"}
        loser = jobs["asha-rep-05"]
        shown = httpx.get(f"{base}/jobs/{loser}", headers=headers, timeout=30).json()
        assert shown["search"]["state"] == shown["result"]["pruned"]["reason"]
        assert shown["search"]["state"].startswith("pruned at step 4: eval_loss 0.009")
        answer = httpx.get(base + "/report", params={"sweep": "asha-rep"}, headers=headers, timeout=60)
        assert answer.json() == run_json(env, "report", "--sweep", "asha-rep", "--format", "json")
        token = headers["Authorization"].removeprefix("Bearer ")
        with httpx.Client(base_url=base, cookies={"tunequeue_token": token}, headers={"Accept": "text/html"},
                          timeout=60) as browser:
            job_page = browser.get(f"/jobs/{loser}").text
            assert '<span class="status pruned">pruned</span>' in job_page and 'id="rungs"' in job_page
            assert "pruned at step 4: eval_loss 0.009" in job_page
            sweep_page = browser.get("/sweeps/asha-rep").text
            assert 'id="rungsplot"' in sweep_page and sweep_page.count('class="decision pruned"') == 6
            plot = browser.get("/sweeps/asha-rep/rungs.png")
            assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_flower_shows_pruned_and_promoted_tasks(searched):
    env, jobs, port = searched.env, searched.jobs, searched.flower_port
    names = {job_id: name for name, job_id in jobs.items()}

    def ours():
        status, tasks = flower_get(port, "/api/tasks")
        assert status == 200
        found: dict[int, list[dict]] = {}
        for task in tasks.values():
            if not (task.get("routing_key") or "").startswith(env["TUNEQUEUE_QUEUE"]) or not task.get("name"):
                continue
            for job_id in names:
                if task["name"] == f"finetune {names[job_id]} · sweep asha-rep · job {job_id}" or \
                        task["name"].startswith(f"finetune {names[job_id]} · sweep asha-rep · job {job_id} · "):
                    found.setdefault(job_id, []).append(task)
        return found if all(t["state"] in ("PRUNED", "PROMOTED", "SUCCESS") for ts in found.values() for t in ts) \
            and sum(map(len, found.values())) == 6 + 3 * 3 else None

    try:
        found = wait_until(ours, 30, "Flower to see every point's tasks end")
    except AssertionError:
        raise AssertionError(f"Flower's tasks: {flower_get(port, '/api/tasks')[1]}") from None
    for job_id, name in names.items():
        states = [t["state"] for t in sorted(found[job_id], key=lambda t: t["name"])]
        if name in PROMOTED:  # promoted at step 4 and 12 (each a task of its own), then trained to the end
            assert states == ["PROMOTED", "PROMOTED", "SUCCESS"], (name, found[job_id])
        else:
            (task,) = found[job_id]
            assert states == ["PRUNED"] and "pruned at step 4" in task["result"], task


TPE_FILE = """
name: tpe-rep
base: {model: tiny-t5, train_limit: 50, eval_limit: 10, max_steps: 4, target_modules: [q, v]}
random: {learning_rate: {low: 1e-4, high: 1e-2, log: true}, lora_r: [4, 8]}
strategy: {kind: tpe, n: 6, parallel: 2}
"""
GRID_FILE = """
name: grid-rep
base: {model: tiny-t5, train_limit: 50, max_steps: 2}
grid: {learning_rate: [1e-3, 2e-3]}
"""


def test_queued_lines_and_the_rungs_plot_refused_without_rungs(sqlite_env, tmp_path):
    """No worker: the sweep command's confirmation of a TPE sweep, and --plot-rungs refused in one line for a sweep
    with no rungs (a grid one) and without --sweep; `jobs list --status` offers every state of models.jobs."""
    (tmp_path / "tpe.yaml").write_text(TPE_FILE)
    (tmp_path / "grid.yaml").write_text(GRID_FILE)
    tpe = run(sqlite_env, "sweep", str(tmp_path / "tpe.yaml"))
    assert tpe.exit_code == 0, tpe.output
    assert tpe.stdout.startswith("sweep 'tpe-rep' queued: 6 trials (2 queued now; TPE proposes the rest as trials "
                                 "end), 4 jobs so far"), tpe.stdout
    assert run(sqlite_env, "sweep", str(tmp_path / "grid.yaml")).exit_code == 0
    plot = tmp_path / "rungs.png"
    for args, expected in ((["--sweep", "grid-rep"], "sweep 'grid-rep' has no rungs to plot: a grid sweep trains "
                                                     "every point to its end"),
                           (["--sweep", "tpe-rep"], "no point has reached its first rung yet"),
                           ([], "--plot-rungs draws one sweep's search: give --sweep NAME too")):
        refused = run(sqlite_env, "report", *args, "--plot-rungs", str(plot))
        assert refused.exit_code == 2 and expected in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1 and not plot.exists()
    from models.jobs import JobStatus

    listed = run(sqlite_env, "jobs", "list", "--help").output
    assert all(status.value in listed for status in JobStatus) and "pruned" in listed
    assert run_json(sqlite_env, "jobs", "list", "--status", "pruned", "--json") == []


def test_a_promoted_point_waiting_to_train_on_says_so(sqlite_env):
    """A point promoted at a rung and queued again (as the runner leaves it): `jobs show` says where it stands and
    `jobs list` labels it, in text and JSON alike."""
    from models.jobs import JobStatus
    from tests.conftest import add_job

    search = {"study": "tunequeue-s-0123abcd", "trial": 4, "strategy": "asha", "metric": "eval_loss",
              "direction": "min", "rungs": [4, 12, 36], "bracket": 0, "reduction_factor": 3, "min_steps": 4}
    job_id = add_job(sqlite_env, JobKind.finetune, JobStatus.queued,
                     {"name": "s-05", "model": "tiny-t5", "learning_rate": 1e-3, "search": search})
    reason = "promoted at step 12: eval_loss 0.001, rung median 0.002, cutoff 0.001 (the best 1/3 of 3 points ...)"
    with session_of(sqlite_env) as session:
        session.get(Job, job_id).progress = {"step": 12, "total_steps": 36, "promoted_at_step": 12}
        session.add_all([Rung(job_id=job_id, rung=0, step=4, metric="eval_loss", value=0.001, decision="promote",
                              reason="promoted at step 4: ..."),
                         Rung(job_id=job_id, rung=1, step=12, metric="eval_loss", value=0.001, decision="promote",
                              reason=reason)])
        session.commit()
    shown = run_json(sqlite_env, "jobs", "show", str(job_id), "--json")["search"]
    assert shown["state"] == "promoted at step 12; queued to train on"
    assert [(r["step"], r["decision"], r["reason"]) for r in shown["rungs"]] == [
        (4, "promote", "promoted at step 4: ..."), (12, "promote", reason)]
    text = run(sqlite_env, "jobs", "show", str(job_id)).stdout
    assert "  promoted at step 12; queued to train on\n" in text
    assert "ASHA trial 4 of study tunequeue-s-0123abcd" in text
    assert "queued (promoted at step 12)" in run(sqlite_env, "jobs", "list").stdout
    assert run_json(sqlite_env, "jobs", "list", "--json")[0]["status"] == "queued"  # machines keep the raw state
