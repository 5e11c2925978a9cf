"""The JSON HTTP API over real HTTP: `manage.py api` (uvicorn) on 127.0.0.1 with the real database and Redis, a
real burst worker for the sweep. Tokens (missing, wrong, revoked: 401; read-only on writes: 403; nothing written),
every route's answer, every validation error as the CLI's one line with nothing written, cancel, server-sent
events, a sweep submitted as YAML finishing and its report equal to the CLI's, an adapter downloaded as a zip that
PEFT loads. One server and environment per backend is shared by the module's cases."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import uuid
import zipfile

import httpx
import pytest
import redis
import yaml
from sqlalchemy import func, select

from models.sweeps import Sweep
from tests.conftest import (REDIS_URL, RUN_ID, _drop_pg_database, _pg_database, cli, create_token, job_count,
                            queue_length, session_of, start_api, start_worker)

WRONG_TOKEN = "tq_" + "x" * 43
FAST_SWEEP = {"base": {"model": "tiny-t5", "max_steps": 20, "eval_limit": 10, "eval_steps": 10},
              "grid": {"learning_rate": [1e-3, 3e-3]}, "eval": {"split": "test", "limit": 10}}


@contextlib.contextmanager
def shared_environment(tmp_path_factory, builtin_home, backend: str):
    """A fresh home (with the built-in models), database and queue for a whole module, removed afterwards."""
    from models.migrate import upgrade

    home = tmp_path_factory.mktemp(f"api-{backend}")
    shutil.copytree(builtin_home / "builtin", home / "builtin")
    database = f"tq_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    url = _pg_database(database) if backend == "postgresql" else f"sqlite:///{home / 'tunequeue.db'}"
    queue = f"tq-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": url, "REDIS_URL": REDIS_URL,
           "TUNEQUEUE_QUEUE": queue, "PYTHONUNBUFFERED": "1"}
    try:
        upgrade(url)
        yield env
    finally:
        if backend == "postgresql":
            _drop_pg_database(database)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"*{queue}*"):
            client.delete(key)


class Api:
    """The running server, its environment and tokens by role: writer, reader (read-only), revoked, wrong."""

    def __init__(self, env: dict, base: str):
        self.env, self.base = env, base
        self.tokens = {"writer": create_token(env, "writer"), "reader": create_token(env, "reader", read_only=True),
                       "revoked": create_token(env, "gone"), "wrong": WRONG_TOKEN}
        assert cli(env, "tokens", "revoke", "gone").returncode == 0

    def headers(self, token: str | None) -> dict:
        return {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}

    def call(self, method: str, path: str, token: str | None = "writer", **kwargs) -> httpx.Response:
        headers = {**self.headers(token), **kwargs.pop("headers", {})}
        return httpx.request(method, self.base + path, headers=headers, timeout=120, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs):
        answer = self.call(method, path, **kwargs)
        assert answer.status_code == status, (answer.status_code, answer.text)
        return answer.json() if answer.headers["content-type"].startswith("application/json") else answer

    def sweeps(self) -> int:
        with session_of(self.env) as session:
            return session.scalar(select(func.count(Sweep.id)))


@contextlib.contextmanager
def running_api(tmp_path_factory, builtin_home, backend: str):
    with shared_environment(tmp_path_factory, builtin_home, backend) as env:
        log = tmp_path_factory.mktemp(f"api-log-{backend}") / "server.log"
        server, base = start_api(env, log=log)
        try:
            yield Api(env, base)
        finally:
            server.terminate()
            server.wait(timeout=60)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory, builtin_home):
    with running_api(tmp_path_factory, builtin_home, request.param) as running:
        yield running


def refused(answer: httpx.Response, status: int, expected: str = "") -> str:
    """The one-line JSON error of a refused request."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and expected in detail, detail
    return detail


def yaml_body(data: dict) -> dict:
    return {"content": yaml.safe_dump(data), "headers": {"Content-Type": "application/yaml"}}


def a_job(name: str, **fields) -> dict:
    return {"kind": "finetune", "name": name, "max_steps": 5, **fields}


# ------------------------------------------------------------------------------------------------------ tokens
WRITES = [("POST", "/jobs", {"json": a_job("refused")}), ("POST", "/jobs/1/cancel", {}),
          ("POST", "/sweeps", yaml_body({"name": "refused", **FAST_SWEEP})), ("POST", "/sweeps/any/retry", {}),
          ("POST", "/sweeps/any/cancel", {})]
READS = [("GET", path, {}) for path in ("/jobs", "/jobs/1", "/jobs/1/logs", "/jobs/1/events", "/sweeps",
                                        "/sweeps/any", "/adapters", "/adapters/any", "/adapters/any/download",
                                        "/report")]


def test_health_and_the_schema_need_no_token(api):
    health = api.ok("GET", "/health", token=None)
    assert health["ok"] is True and health["database"] == health["broker"] == "ok" and health["workers"] == 0
    schema = api.ok("GET", "/openapi.json", token=None)
    scheme = schema["components"]["securitySchemes"]["token"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "tokens create" in scheme["description"]
    operations = {(method.upper(), path): op for path, item in schema["paths"].items() for method, op in item.items()}
    for method, path, _ in WRITES + READS:
        operation = operations[(method, path.replace("/1", "/{job_id}").replace("/any", "/{name}"))]
        assert operation["summary"] and operation["security"] == [{"token": []}], (method, path)
    assert "security" not in operations[("GET", "/health")]
    assert "kind" in json.dumps(operations[("POST", "/jobs")]["requestBody"])
    docs = api.call("GET", "/docs", token=None)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_missing_wrong_and_revoked_tokens_are_refused_and_write_nothing(api):
    written = (job_count(api.env), api.sweeps(), queue_length(api.env))
    for method, path, body in WRITES + READS:
        for token in (None, "wrong", "revoked"):
            answer = api.call(method, path, token=token, **body)
            refused(answer, 401, "a valid API token is needed")
            assert answer.headers["www-authenticate"] == "Bearer"
        refused(api.call(method, path, token=None, headers={"Authorization": f"Basic {api.tokens['writer']}"}), 401)
    for method, path, body in WRITES:
        refused(api.call(method, path, token="reader", **body), 403, "token 'reader' is read-only")
    assert (job_count(api.env), api.sweeps(), queue_length(api.env)) == written
    assert api.ok("GET", "/jobs", token="reader")["total"] == written[0]  # a read-only token reads


# -------------------------------------------------------------------------------------------------------- jobs
def test_submit_list_show_logs_and_cancel_a_job(api):
    before = job_count(api.env)
    job = api.ok("POST", "/jobs", 201, json=a_job("http-a", learning_rate=1e-3, priority=5, max_attempts=2))
    assert job["kind"] == "finetune" and job["status"] == "queued" and job["created_at"].startswith("20")
    shown = api.ok("GET", f"/jobs/{job['id']}", token="reader")
    assert shown["spec"]["learning_rate"] == 1e-3 and shown["spec"]["name"] == "http-a"
    assert shown["max_attempts"] == 2 and shown["submitted_by"] == "writer" and shown["attempt_errors"] is None
    assert {"progress", "attempts", "error", "traceback", "celery_task_id"} <= set(shown)
    cli_view = json.loads(cli(api.env, "jobs", "show", str(job["id"]), "--json").stdout)
    assert {k: v for k, v in shown.items() if k not in ("submitted_by",) and not k.endswith("_at")} == \
        {k: v for k, v in cli_view.items() if not k.endswith("_at")}

    generate = api.ok("POST", "/jobs", 201, json={"kind": "generate", "limit": 5})
    assert generate["kind"] == "generate" and job_count(api.env) == before + 2

    page = api.ok("GET", "/jobs?limit=1")
    assert page["total"] == before + 2 and [j["id"] for j in page["jobs"]] == [generate["id"]]
    assert page["next_offset"] == 1
    second = api.ok("GET", "/jobs?limit=1&offset=1")
    assert [j["id"] for j in second["jobs"]] == [job["id"]]
    finetunes = api.ok("GET", "/jobs?kind=finetune&status=queued&limit=500")
    listed = [j["id"] for j in finetunes["jobs"]]
    assert job["id"] in listed and generate["id"] not in listed
    assert finetunes["total"] == len(finetunes["jobs"]) and finetunes["next_offset"] is None

    logs = api.call("GET", f"/jobs/{job['id']}/logs?tail=5")
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain")
    assert logs.text == cli(api.env, "jobs", "logs", str(job["id"]), "--tail", "5").stdout
    assert "has not started yet" in logs.text

    for queued in (job, generate):
        cancelled = api.ok("POST", f"/jobs/{queued['id']}/cancel")
        assert cancelled["outcome"] == "cancelled" and cancelled["job"]["status"] == "cancelled"
    assert api.ok("POST", f"/jobs/{job['id']}/cancel")["outcome"] == "already cancelled"
    assert api.ok("GET", f"/jobs?status=cancelled&limit=500")["total"] >= 2


BAD_JOBS = [  # body, status, the error, the CLI flags that say the same (None: no flag can)
    (a_job("x", model="/no/such/model"), 422, "model path '/no/such/model' does not exist",
     ["--model", "/no/such/model"]),
    (a_job("x", text_column="nope"), 422, "no column 'nope'", ["--text-column", "nope"]),
    (a_job("x", learning_rate=-1e-3), 422, "learning_rate: Input should be greater than 0", ["--lr", "-1e-3"]),
    (a_job("x", lora_r=0), 422, "lora_r: Input should be greater than 0", ["--lora-r", "0"]),
    (a_job("x", max_steps="many"), 422, "max_steps: Input should be a valid integer", None),
    (a_job("x", learning_rte=1e-3), 422, "learning_rte: unknown field", None),
    (a_job("x", priority=10), 422, "priority: Input should be less than or equal to 9", None),
    ({"kind": "train"}, 422, "unknown job kind 'train'", None),
    ({"kind": "score", "generate_job_id": 987654}, 404, "job 987654 does not exist", None),
    ([1, 2], 422, "must be a JSON object", None),
]


@pytest.mark.parametrize("body, status, expected, flags", BAD_JOBS, ids=lambda v: None)
def test_a_bad_job_is_the_clis_one_line_and_writes_nothing(api, body, status, expected, flags):
    written = (job_count(api.env), queue_length(api.env))  # messages of cancelled jobs may wait in the queue
    detail = refused(api.call("POST", "/jobs", json=body), status, expected)
    assert (job_count(api.env), queue_length(api.env)) == written
    if flags and api.env["DATABASE_URL"].startswith("sqlite"):  # the CLI refuses the same input, same line
        result = cli(api.env, "finetune", "--name", "x", "--max-steps", "5", *flags)
        assert result.returncode == 2 and f"Error: {detail}" in result.stderr, result.stderr


def test_malformed_requests_are_one_line_422s(api):
    cases = [(api.call("POST", "/jobs", content=b'{"kind": "finetune",', headers={"Content-Type": "application/json"}),
              "the job is not valid JSON at line 1"),
             (api.call("GET", "/jobs?limit=0"), "query.limit: Input should be greater than or equal to 1"),
             (api.call("GET", "/jobs?status=lost"), "query.status: Input should be 'queued'"),
             (api.call("GET", "/jobs/abc"), "path.job_id: Input should be a valid integer"),
             (api.call("GET", "/jobs/1/logs?tail=-2"), "query.tail"),
             (api.call("GET", "/report?top=0"), "query.top")]
    details = [refused(answer, 422, expected) for answer, expected in cases]
    assert all(expected in detail for detail, (_a, expected) in zip(details, cases)), details


def test_unknown_names_and_ids_are_404(api):
    for method, path in [("GET", "/jobs/987654"), ("GET", "/jobs/987654/logs"), ("POST", "/jobs/987654/cancel"),
                         ("GET", "/jobs/987654/events"), ("GET", "/jobs/99999999999999999999"),
                         ("GET", "/sweeps/nope"), ("POST", "/sweeps/nope/retry"), ("POST", "/sweeps/nope/cancel"),
                         ("GET", "/jobs?sweep=nope"), ("GET", "/adapters/nope"), ("GET", "/adapters/nope/download")]:
        assert "does not exist" in refused(api.call(method, path), 404), (method, path)
    assert "no scored results" in refused(api.call("GET", "/report?metric=rouge"), 404)


def read_events(api: Api, job_id: int, on_event=lambda: None, timeout: float = 600) -> list[tuple[str, dict]]:
    """The job's server-sent events until the server closes the stream: (event, data) pairs. `on_event()` runs
    after each one."""
    events: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", f"{api.base}/jobs/{job_id}/events", headers=api.headers("reader"),
                      timeout=60) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():  # a ': ping' comment comes every 15 s while nothing changes
            assert time.monotonic() < deadline, f"the event stream did not end: {events}"
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                on_event()
    return events


def test_events_end_when_the_job_is_cancelled(api):
    job = api.ok("POST", "/jobs", 201, json=a_job("followed"))

    def cancel_once():  # the first event is the job as it is now; then it is cancelled from elsewhere
        if not cancelled:
            cancelled.append(api.ok("POST", f"/jobs/{job['id']}/cancel"))

    cancelled: list = []
    events = read_events(api, job["id"], cancel_once, timeout=120)
    assert [name for name, _ in events] == ["progress", "progress", "end"]  # the stream closed by itself
    assert [data["status"] for _, data in events] == ["queued", "cancelled", "cancelled"]
    assert all(data["id"] == job["id"] for _, data in events)


# ------------------------------------------------------------------------------------------------------ sweeps
def test_sweeps_dry_run_submit_show_retry_cancel(api, tmp_path):
    data = {"name": "http-sweep", **FAST_SWEEP}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    jobs, sweeps = job_count(api.env), api.sweeps()
    dry = api.ok("POST", "/sweeps?dry_run=true&overrides=grid.lora_r=[4,8]", **yaml_body(data))
    expected = json.loads(cli(api.env, "sweep", str(path), "grid.lora_r=[4,8]", "--dry-run", "--json").stdout)
    assert dry == expected and len(dry["points"]) == 4 and dry["jobs"] == 6
    as_json = api.ok("POST", "/sweeps", json={"sweep": data, "dry_run": True, "name": "renamed"})
    assert as_json["sweep"] == "renamed" and [p["adapter"] for p in as_json["points"]] == ["renamed-01", "renamed-02"]
    plain_json = api.ok("POST", "/sweeps?dry_run=1", json=data)
    assert [p["adapter"] for p in plain_json["points"]] == ["http-sweep-01", "http-sweep-02"]
    assert (job_count(api.env), api.sweeps()) == (jobs, sweeps)

    queued = api.ok("POST", "/sweeps?priority=4", 201, **yaml_body(data))
    assert queued["sweep"] == "http-sweep" and queued["points"] == 2 and len(queued["jobs"]) == 4
    with session_of(api.env) as session:
        row = session.scalar(select(Sweep).where(Sweep.name == "http-sweep"))
        assert row.token_id is not None and row.priority == 4
    summaries = {s["name"]: s for s in api.ok("GET", "/sweeps", token="reader")}
    assert summaries["http-sweep"]["jobs"] == {"queued": 4}
    shown = api.ok("GET", "/sweeps/http-sweep")
    assert shown["spec"]["grid"] == data["grid"] and [j["id"] for j in shown["jobs"]] == queued["jobs"]
    assert api.ok("GET", "/jobs?sweep=http-sweep")["total"] == 4
    assert api.ok("GET", f"/jobs/{queued['jobs'][0]}")["submitted_by"] == "writer"

    refused(api.call("POST", "/sweeps/http-sweep/retry"), 422, "has 4 queued or running job(s)")
    refused(api.call("POST", "/sweeps", **yaml_body(data)), 422, "sweep 'http-sweep' already exists")
    assert api.ok("POST", "/sweeps/http-sweep/cancel") == {"sweep": "http-sweep", "outcomes": {"cancelled": 4}}
    again = api.ok("POST", "/sweeps/http-sweep/retry?max_attempts=2")
    assert again == {"sweep": "http-sweep", "finetunes": queued["jobs"][:2], "evaluation": queued["jobs"][2:]}
    assert api.ok("POST", "/sweeps/http-sweep/cancel")["outcomes"] == {"cancelled": 4}


BAD_SWEEPS = [
    ({"content": b"name: [unclosed\n", "headers": {"Content-Type": "application/yaml"}},
     "the sweep is not valid YAML at line 2"),
    ({"content": b"- just\n- a list\n", "headers": {"Content-Type": "text/yaml"}}, "must be a mapping"),
    ({"content": b"a: &a [*a]\n", "headers": {"Content-Type": "application/yaml"}}, "refers to the block"),
    (yaml_body({"name": "bad", **FAST_SWEEP, "grid": {"learning_rate": [1e-3, 0]}}),
     "point 2 (learning_rate=0): learning_rate: Input should be greater than 0"),
    (yaml_body({"name": "bad", **FAST_SWEEP, "base": {"model": "/no/such/model"}}),
     "point 1: model path '/no/such/model' does not exist"),
    (yaml_body({"name": "bad", **FAST_SWEEP, "base": {"dataset": "synthetic-dialogsum", "text_column": "nope"}}),
     "no column 'nope'"),
    (yaml_body({"name": "bad", **FAST_SWEEP, "base": {"lora_rank": 4}}), "base.lora_rank: unknown key"),
    ({"json": {"sweep": {"name": "bad", **FAST_SWEEP}, "dry_run": "maybe"}}, "dry_run: Input should be a valid"),
    ({"json": {"sweep": {"name": "bad", **FAST_SWEEP}, "notify": "ftp://hooks"}}, "notify='ftp://hooks'"),
    ({"content": b"{\"name\": ", "headers": {"Content-Type": "application/json"}}, "the sweep is not valid JSON"),
]


@pytest.mark.parametrize("body, expected", BAD_SWEEPS, ids=lambda v: None)
def test_a_bad_sweep_is_one_line_and_writes_nothing(api, body, expected):
    written = (job_count(api.env), api.sweeps(), queue_length(api.env))
    refused(api.call("POST", "/sweeps", **body), 422, expected)
    assert (job_count(api.env), api.sweeps(), queue_length(api.env)) == written


# -------------------------------------------------------------------------------------- through a real worker
@pytest.fixture(scope="module")
def pg_api(tmp_path_factory, builtin_home):
    with running_api(tmp_path_factory, builtin_home, "postgresql") as running:
        yield running


@pytest.mark.slow
def test_a_sweep_over_http_finishes_and_reads_back_like_the_cli(pg_api, tmp_path):
    api = pg_api
    queued = api.ok("POST", "/sweeps", 201, **yaml_body({"name": "wire", **FAST_SWEEP}))
    first = queued["jobs"][0]
    worker = start_worker(api.env, "--burst", log=tmp_path / "worker.log")
    try:
        events = read_events(api, first)
        assert worker.wait(timeout=600) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    assert [name for name, _ in events][-2:] == ["progress", "end"] and events[-1][1]["status"] == "succeeded"
    statuses = [data["status"] for _, data in events]
    assert statuses[0] in ("queued", "running") and "running" in statuses
    assert any((data["progress"] or {}).get("step") for _, data in events)

    sweep = api.ok("GET", "/sweeps/wire")
    assert [j["status"] for j in sweep["jobs"]] == ["succeeded"] * 4
    assert api.ok("GET", "/jobs?sweep=wire&status=succeeded")["total"] == 4
    shown = api.ok("GET", f"/jobs/{first}")
    assert shown["attempts"] == 1 and shown["progress"]["step"] == 20 and shown["submitted_by"] == "writer"

    for query, flags in [("sweep=wire", []), ("sweep=wire&metric=rouge&sort=rouge1&top=1",
                                              ["--metric", "rouge", "--sort", "rouge1", "--top", "1"])]:
        answer = api.call("GET", f"/report?{query}", token="reader")
        expected = cli(api.env, "report", "--sweep", "wire", *flags, "--format", "json")
        assert answer.status_code == 200 and answer.text == expected.stdout
        variants = [row["variant"] for row in answer.json()]
        assert "base" in variants and len(variants) == (2 if flags else 3)
    assert api.ok("POST", "/sweeps/wire/retry") == {"sweep": "wire", "finetunes": [], "evaluation": []}

    logs = api.call("GET", f"/jobs/{first}/logs?tail=4")
    assert logs.text == cli(api.env, "jobs", "logs", str(first), "--tail", "4").stdout and logs.text.count("\n") == 4

    adapters = {a["name"]: a for a in api.ok("GET", "/adapters")}
    assert set(adapters) == {"wire-01", "wire-02"} and adapters["wire-01"]["job_id"] == first
    assert api.ok("GET", "/adapters/wire-01") == adapters["wire-01"]
    download = api.call("GET", "/adapters/wire-01/download", token="reader")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    assert download.headers["content-disposition"] == 'attachment; filename="wire-01.zip"'
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert {"wire-01/adapter_config.json", "wire-01/adapter_model.safetensors"} <= set(archive.namelist())
        archive.extractall(tmp_path / "unzipped")

    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(api.env["TUNEQUEUE_HOME"] + "/builtin/tiny-t5")
    model = PeftModel.from_pretrained(base, str(tmp_path / "unzipped" / "wire-01"))
    assert any("lora_A" in name for name, _ in model.named_parameters())
