"""Flower tells the truth: a real Flower (basic auth on) and a real worker; after a night of one job that succeeds,
one whose data went bad (failed at once, tried once), one that crashes on every attempt (a retry, then a failure)
and one cancelled before it ran, Flower's API reports SUCCESS, FAILURE, RETRY and REVOKED with readable names."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from click.testing import CliRunner

from manage import cli as manage_cli
from models.jobs import Job
from tests.conftest import REPO, cli, free_port, ok_json, session_of, start_worker, wait_until

CREDENTIALS = "night:owl-7"


def flower_get(port: int, path: str, credentials: str | None = CREDENTIALS) -> tuple[int, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            return response.status, json.loads(body) if body.startswith(("{", "[")) else body
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def stop_flower(flower: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    flower.send_signal(signal.SIGTERM)
    try:
        flower.wait(timeout=30)
    except subprocess.TimeoutExpired:
        flower.kill()


def write_chats(path, rows: int) -> None:
    path.write_text("".join(json.dumps({"id": str(i), "dialogue": f"#Person1#: hello {i}\n#Person2#: hi",
                                        "summary": f"they greet {i}"}) + "\n" for i in range(rows)))


def test_flower_reports_each_job_as_the_database_does(make_env, tmp_path):
    env = {**make_env("sqlite"), "TUNEQUEUE_FAULTS": ""}
    port = free_port()
    flower_log = open(tmp_path / "flower.log", "w")
    flower = subprocess.Popen([sys.executable, str(REPO / "manage.py"), "flower", "--port", str(port)],
                              env={**env, "FLOWER_BASIC_AUTH": CREDENTIALS}, cwd=REPO, stdout=flower_log,
                              stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: flower_get(port, "/healthcheck", None)[0] == 200, 60, "Flower to answer")
        # its API is closed without credentials, and with wrong ones
        assert flower_get(port, "/api/tasks", None)[0] == 401
        assert flower_get(port, "/api/tasks", "night:wrong")[0] == 401
        time.sleep(2)  # Flower's event consumer connects after its web server starts

        data = tmp_path / "chats"
        data.mkdir()
        for split in ("train", "test"):
            write_chats(data / f"{split}.jsonl", 8)
        ok_job = ok_json(cli(env, "finetune", "--name", "fl-ok", "--max-steps", "30", "--eval-steps", "10",
                             "--json"))
        bad_data = ok_json(cli(env, "generate", "--dataset", str(data), "--limit", "4", "--json"))
        cancelled = ok_json(cli(env, "generate", "--limit", "2", "--json"))
        assert CliRunner().invoke(manage_cli, ["jobs", "cancel", str(cancelled["id"])], env=env).exit_code == 0
        (data / "test.jsonl").write_text("this line is not JSON\n")  # the data went bad after it was queued
        worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
        progress_seen = watch_progress(port, ok_job["id"], env, worker)
        assert worker.wait(timeout=400) == 0, (tmp_path / "worker.log").read_text()[-3000:]

        # a fine-tune that crashes at step 3 on every attempt (fault injection applies to the whole worker)
        crashing = ok_json(cli(env, "finetune", "--name", "fl-crash", "--max-steps", "5", "--max-attempts", "2",
                               "--lr", "2e-3", "--json"))
        worker = start_worker({**env, "TUNEQUEUE_FAULTS": "crash_at_step:3"}, "--burst",
                              log=tmp_path / "worker2.log")
        assert worker.wait(timeout=400) == 0, (tmp_path / "worker2.log").read_text()[-3000:]

        with session_of(env) as session:
            rows = {job.id: job for job in session.query(Job)}
        assert rows[ok_job["id"]].status.value == "succeeded"
        assert rows[bad_data["id"]].status.value == "failed" and rows[bad_data["id"]].attempts == 1  # tried once
        assert "not valid JSON" in rows[bad_data["id"]].error
        assert rows[crashing["id"]].status.value == "failed" and rows[crashing["id"]].attempts == 2
        assert rows[cancelled["id"]].status.value == "cancelled"

        def tasks_by_job():
            status, tasks = flower_get(port, "/api/tasks")
            assert status == 200
            found: dict[int, list[dict]] = {}
            ours = [t for t in tasks.values() if (t.get("routing_key") or "").startswith(env["TUNEQUEUE_QUEUE"])]
            for task in ours:  # the Redis is shared: Flower sees every deployment's tasks
                for job_id in rows:
                    if task.get("name") and task["name"].endswith((f"job {job_id}", f"job {job_id} · attempt 2")):
                        found.setdefault(job_id, []).append(task)
            return found

        def settled():
            found = tasks_by_job()
            final = {"SUCCESS", "FAILURE", "REVOKED", "RETRY"}
            done = (len(found.get(crashing["id"], [])) == 2 and len(found) == 4
                    and all(t["state"] in final for ts in found.values() for t in ts))
            return found if done else None

        try:
            found = wait_until(settled, 60, "Flower to see every task end")
        except AssertionError:
            raise AssertionError(f"Flower's tasks: {flower_get(port, '/api/tasks')[1]}") from None
        assert all(len(found[j["id"]]) == 1 for j in (ok_job, bad_data, cancelled)), found
        (success,), (failure,), (revoked,) = found[ok_job["id"]], found[bad_data["id"]], found[cancelled["id"]]
        assert success["state"] == "SUCCESS" and success["name"] == f"finetune fl-ok · job {ok_job['id']}"
        assert "adapter fl-ok" in success["result"]
        assert failure["state"] == "FAILURE" and "JobFailure" in failure["exception"]
        assert "not valid JSON" in failure["exception"]
        assert failure["name"] == f"generate base · job {bad_data['id']}"
        assert revoked["state"] == "REVOKED"
        attempts = sorted(found[crashing["id"]], key=lambda t: t["name"])
        assert [t["name"] for t in attempts] == [f"finetune fl-crash · job {crashing['id']}",
                                                 f"finetune fl-crash · job {crashing['id']} · attempt 2"]
        assert [t["state"] for t in attempts] == ["RETRY", "FAILURE"]
        assert "crash injected" in attempts[1]["exception"]
        # while the fine-tune ran, its task's result said how far it had got
        assert progress_seen and progress_seen.startswith("step "), progress_seen
    finally:
        stop_flower(flower)
        flower_log.close()
    # the persistent state was written under the home, so a restarted Flower keeps the night
    assert any((env_home(env) / "flower").glob("flower.db*")), (tmp_path / "flower.log").read_text()[-2000:]


def env_home(env: dict):
    from pathlib import Path

    return Path(env["TUNEQUEUE_HOME"])


def watch_progress(port: int, job_id: int, env: dict, worker) -> str | None:
    """The `result` Flower shows for the job's task while it runs (polled until the job ends)."""
    seen = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and worker.poll() is None:
        with session_of(env) as session:
            job = session.get(Job, job_id)
            task_id, status = job.celery_task_id, job.status.value
        if status not in ("queued", "running"):
            break
        if status == "running":
            code, info = flower_get(port, f"/api/task/info/{task_id}")
            if code == 200 and isinstance(info, dict) and str(info.get("result") or "").startswith("step"):
                seen = info["result"]
        time.sleep(0.2)
    return seen


def test_flower_refuses_to_start_without_credentials(sqlite_env):
    environment = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    result = CliRunner().invoke(manage_cli, ["flower", "--port", "1"], env={"FLOWER_BASIC_AUTH": None})
    assert result.exit_code == 2 and "needs credentials" in result.output, result.output
    result = CliRunner().invoke(manage_cli, ["flower", "--basic-auth", "no colon here"], env=environment)
    assert result.exit_code == 2 and "USER:PASSWORD" in result.output and "no colon" not in result.output
    result = CliRunner().invoke(manage_cli, ["flower", "--basic-auth", "a:b", "--no-auth"])
    assert result.exit_code == 2 and "not both" in result.output


class RecordingTask:
    """What `worker.outcomes.end_as` needs of a bound Celery task: its request, `send_event` (recorded as the Celery
    events a worker would publish) and its result backend (recorded)."""

    def __init__(self, task_id: str):
        from types import SimpleNamespace

        self.request = SimpleNamespace(id=task_id, hostname="tunequeue@test")
        self.events: list[dict] = []
        self.stored: list[tuple] = []
        self.backend = SimpleNamespace(store_result=lambda task_id, result, state, request=None:
                                       self.stored.append((task_id, result, state)))

    def send_event(self, type_: str, **fields) -> None:
        self.events.append(worker_event(type_, self.request.id, **fields))


CLOCK = iter(range(1, 10_000))


def worker_event(type_: str, task_id: str, **fields) -> dict:
    """A task event as Flower's receiver hands it on (Celery's Event, with the receiving time and a Lamport clock)."""
    from celery.events import Event

    return {**Event(type_, uuid=task_id, hostname="tunequeue@test", **fields), "local_received": time.time(),
            "clock": next(CLOCK)}


def test_flower_keeps_pruned_and_promoted_states_against_later_events():
    """The events `end_as` sends, fed to Flower's own event state (what its task pages and /api/tasks read): a pruned
    task shows PRUNED with its reason and a promoted one PROMOTED; events that may still come for the same task (a
    late progress report, a revoke, a redelivered message) leave that state as it is, and the promoted job's next
    attempt is a task of its own."""
    from types import SimpleNamespace

    import pytest
    from celery.exceptions import Ignore
    from flower.events import EventsState
    from flower.utils.tasks import iter_tasks

    from worker.outcomes import end_as

    state = EventsState()
    reason = "job 3 pruned at step 4: eval_loss 0.008, rung median 0.005, cutoff 0.002"
    outcomes = {}
    for task_id, word, message in (("t-pruned", "PRUNED", reason),
                                   ("t-promoted", "PROMOTED", "job 4 promoted at step 4: ...; it trains on")):
        state.event(worker_event("task-received", task_id, name=f"finetune p · job {task_id}", args="[3]"))
        state.event(worker_event("task-started", task_id))
        state.event(worker_event("task-started", task_id, result="step 4/36 · loss 1.2345"))  # progress
        task = RecordingTask(task_id)
        with pytest.raises(Ignore):  # Celery then records nothing more of its own for the task
            end_as(task, word, message)
        assert [e["type"] for e in task.events] == [f"task-{word.lower()}"] and task.stored == [(task_id, message,
                                                                                                  word)]
        for event in task.events:
            state.event(event)
        outcomes[task_id] = (word, message)
    for task_id, (word, message) in outcomes.items():
        assert state.tasks[task_id].state == word and state.tasks[task_id].result == message
    assert [task_id for task_id, _ in iter_tasks(SimpleNamespace(state=state), state="PRUNED")] == ["t-pruned"]

    # what may still come for the same task ids: none of it changes their states
    for task_id in outcomes:
        state.event(worker_event("task-revoked", task_id, terminated=False, reason="cancelled"))
        state.event(worker_event("task-received", task_id, name="finetune p (redelivered)"))
        assert state.tasks[task_id].result == outcomes[task_id][1]
        state.event(worker_event("task-started", task_id, result="step 4/36 · loss 1.2345"))
        assert state.tasks[task_id].state == outcomes[task_id][0], state.tasks[task_id].state
    # the promoted job trains on as a new task (a new id): that one succeeds, the promoted one stays PROMOTED
    for type_ in ("task-received", "task-started", "task-succeeded"):
        state.event(worker_event(type_, "t-attempt-2", result="adapter p written"))
    assert state.tasks["t-attempt-2"].state == "SUCCESS" and state.tasks["t-promoted"].state == "PROMOTED"
