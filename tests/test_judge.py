"""The LLM judge (worker/metrics/judge.py): reply parsing, the OpenAI-compatible backend against a small HTTP server
started here on 127.0.0.1 (fixed, malformed, 429, 500 and hanging replies; retries, concurrency, budgets, the key
kept out of logs, errors and verdicts), and the local backend on the built-in tiny-llama in both scoring modes."""

from __future__ import annotations

import http.server
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from models.errors import JobFailed
from tests.conftest import cli, ok_json, session_of, start_worker
from worker.metrics.judge import CRITERIA, JudgeEndpointError, JudgeOptions, Verdict, judge, parse_reply

KEY = f"sk-test-{uuid.uuid4().hex}"
SOURCE = "#Person1#: Can we meet on Friday at 3 pm at the library?\n#Person2#: Sure, see you there."
GOOD_SCORES = {"relevance": 5, "coherence": 4, "consistency": 3, "fluency": 2}


# ---------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("reply, score, reason", [
    ("Score: 4\nReason: covers the key facts.", 4, "covers the key facts"),
    ("**Score:** 4\n**Reason:** fine", 4, "fine"),
    ("Score: **3**", 3, ""),
    ("4/5 - concise and accurate", 4, "concise and accurate"),
    ("Rating: 4 out of 5. It reads well.", 4, "It reads well"),
    ("Sure! Here is my evaluation.\n\nScore: 5\nReason: all there", 5, "all there"),
    ('```json\n{"score": 2, "reason": "misses the time"}\n```', 2, "misses the time"),
    ('{"rating": "3/5", "explanation": "ok"}', 3, "ok"),
    ("Coherence: 2 - jumps around", 2, "jumps around"),
    ("4\nThe summary is fine", 4, "The summary is fine"),
    ("Score: 4.5 (out of 5)\nReason: x", 4.5, "x"),
    ("Score: 4\nReason: mentions 3 out of 5 facts", 4, "mentions 3 out of 5 facts"),
    ("Score: 4. I'd give it 4/5 again.", 4, "I'd give it 4/5 again"),
])
def test_well_formed_and_variant_replies_are_parsed(reply, score, reason):
    verdict = parse_reply("coherence", reply)
    assert verdict == Verdict("coherence", score, reason, reply, True)


@pytest.mark.parametrize("reply", [
    "I think it is decent.",  # no score
    "",
    "Score: 7",  # off the scale
    "Score: 0\nReason: empty",
    "Score: 8/10",  # another scale
    "Score: 3\nScore: 4",  # two different scores
    "Rating: 2. On second thought, Score: 5",
    '{"score": 9, "reason": "great"}',
    '{"score": true}',
    "The summary has 3 people",  # a number that is no score
])
def test_malformed_replies_are_unparsed_with_the_raw_text_kept(reply):
    verdict = parse_reply("fluency", reply)
    assert (verdict.parsed, verdict.score, verdict.raw) == (False, None, reply)


# -------------------------------------------------------------------------------------- OpenAI-compatible server
class FakeJudgeServer:
    """Answers POST /v1/chat/completions by the [[mode]] written into the summary of the prompt it receives."""

    def __init__(self):
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}  # requests being answered, by mode (a hung one outlives its test)
        self.max_active: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.script: dict[str, str] = {}  # criterion → mode, for prompts without a [[mode]] (generated summaries)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                outer.handle(self)

            def do_GET(self):  # where a followed redirect would land (urllib turns a 302'd POST into a GET)
                with outer.lock:
                    outer.log.append({"path": self.path, "auth": self.headers.get("Authorization"), "mode": "GET"})
                outer.send(self, 200, {"choices": []})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self):
        with self.lock:
            self.log.clear()
            self.seen.clear()
            self.max_active.clear()

    def handle(self, request):
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        criterion = next(c for c in CRITERIA if f"{c.capitalize()}:" in prompt)
        marked = re.search(r"\[\[(\w+)\]\]", prompt)
        mode = marked[1] if marked else self.script.get(criterion, "good")
        with self.lock:
            self.active[mode] = self.active.get(mode, 0) + 1
            self.max_active[mode] = max(self.max_active.get(mode, 0), self.active[mode])
            attempt = self.seen[prompt] = self.seen.get(prompt, 0) + 1
            self.log.append({"at": time.monotonic(), "path": request.path, "mode": mode, "criterion": criterion,
                             "attempt": attempt, "auth": request.headers.get("Authorization"), "body": body})
        try:
            self.answer(request, mode, criterion, attempt)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout)
        finally:
            with self.lock:
                self.active[mode] -= 1

    def answer(self, request, mode, criterion, attempt):
        good = f"Score: {GOOD_SCORES[criterion]}\nReason: {criterion} checked."
        if mode == "ratelimit" and attempt == 1:
            return self.send(request, 429, {"error": "slow down"}, {"Retry-After": "1"})
        if mode == "error" and attempt == 1:
            return self.send(request, 500, {"error": "boom"})
        if mode == "refuse":  # echoes the key back, as a careless server might
            return self.send(request, 401, {"error": f"bad key {request.headers.get('Authorization')}"})
        if mode == "redirect":  # to a path of this server that would log the Authorization header it got
            return self.send(request, 302, {"error": "moved"}, {"Location": f"{self.base_url}/elsewhere"})
        if mode == "hang":
            time.sleep(3)
        if mode in ("slow", "paced"):  # two names: a test's slow requests may outlive it on the server
            time.sleep(0.3)
        if mode == "badbody":
            return self.send(request, 200, "<html>proxy error</html>")
        content = {"malformed": "I would rather not say.", "json": '{"score": 1, "reason": "json reply"}'}.get(
            mode, good)
        self.send(request, 200, {"id": "x", "object": "chat.completion", "model": request.headers.get("X-Model"),
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    @staticmethod
    def send(request, status, payload, headers=None):
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        request.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                            **(headers or {})}.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def judge_server():
    server = FakeJudgeServer()
    yield server
    server.close()


@pytest.fixture
def server(judge_server, caplog):
    judge_server.reset()
    caplog.set_level(logging.DEBUG)  # every logger, every level: the key must be in none of it
    yield judge_server
    for record in caplog.get_records("call"):  # (caplog.records would be the teardown's)
        assert KEY not in record.getMessage() and KEY not in str(record.args), record.getMessage()


def openai_options(server, **overrides) -> JudgeOptions:
    values = dict(backend="openai", model="judge-model-x", base_url=server.base_url, api_key=KEY, concurrency=4,
                  timeout_s=5, retries=2, backoff_s=0.05, max_seconds=60)
    return JudgeOptions(**{**values, **overrides})


def summaries(*modes: str) -> list[str]:
    return [f"They meet on Friday. [[{mode}]]" for mode in modes]


def no_key_in(*things) -> None:
    for thing in things:
        assert KEY not in repr(thing) and KEY not in str(thing)


def test_openai_replies_are_parsed_and_the_request_is_a_chat_completion(server, caplog):
    modes = ("good", "malformed", "json", "badbody")
    finished = []
    results = judge([SOURCE] * 4, summaries(*modes), openai_options(server),
                    on_result=lambda i, verdicts: finished.append((i, dict(verdicts))))
    assert [set(r) for r in results] == [set(CRITERIA)] * 4
    assert {c: v.score for c, v in results[0].items()} == GOOD_SCORES
    assert results[0]["coherence"].reason == "coherence checked"
    assert all(not v.parsed and v.score is None and v.raw == "I would rather not say." for v in results[1].values())
    assert {v.score for v in results[2].values()} == {1} and results[2]["fluency"].reason == "json reply"
    assert all(not v.parsed and v.raw == "<html>proxy error</html>" for v in results[3].values())
    assert sorted(i for i, _ in finished) == [0, 1, 2, 3] and dict(finished)[0] == results[0]
    assert len(server.log) == 16
    request = server.log[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "judge-model-x" and request["body"]["temperature"] == 0
    assert SOURCE in request["body"]["messages"][0]["content"]
    no_key_in(results, openai_options(server))
    assert any(r.name == "tunequeue.judge" for r in caplog.records)  # the capture the key is looked for in works


def test_429_and_500_are_retried_with_backoff_and_retry_after(server):
    results = judge([SOURCE] * 2, summaries("ratelimit", "error"), openai_options(server))
    assert all(v.parsed for r in results for v in r.values())
    for mode in ("ratelimit", "error"):
        for criterion in CRITERIA:
            tries = [e for e in server.log if e["mode"] == mode and e["criterion"] == criterion]
            assert [e["attempt"] for e in tries] == [1, 2]
            if mode == "ratelimit":  # Retry-After: 1 was honoured
                assert tries[1]["at"] - tries[0]["at"] >= 0.9


def test_a_hanging_endpoint_times_out_is_retried_then_fails_keeping_finished_examples(server):
    finished = []
    started = time.monotonic()
    with pytest.raises(JudgeEndpointError) as caught:
        judge([SOURCE] * 2, summaries("good", "hang"), openai_options(server, timeout_s=0.3, retries=1, concurrency=1),
              on_result=lambda i, verdicts: finished.append(i))
    assert time.monotonic() - started < 10
    assert "failed 2 times" in str(caught.value) and "timed out" in str(caught.value).lower()
    assert "1 of 2 examples judged" in str(caught.value)
    assert finished == [0]
    assert [e["attempt"] for e in server.log if e["mode"] == "hang"] == [1, 2]
    no_key_in(caught.value)


def test_a_redirect_is_refused_and_never_followed_with_the_key(server):
    with pytest.raises(JobFailed) as caught:
        judge([SOURCE], summaries("redirect"), openai_options(server, concurrency=1))
    assert "HTTP 302" in str(caught.value)
    assert [e["path"] for e in server.log] == ["/v1/chat/completions"]  # /elsewhere never asked, never given the key
    no_key_in(caught.value)


def test_a_refused_request_fails_at_once_without_the_key_in_the_error(server):
    with pytest.raises(JobFailed) as caught:
        judge([SOURCE], summaries("refuse"), openai_options(server, concurrency=1))
    assert "HTTP 401" in str(caught.value) and "Bearer ***" in str(caught.value)
    assert len(server.log) == 1  # no retry
    no_key_in(caught.value)


def test_the_request_budget_stops_the_job_after_keeping_what_finished(server):
    finished = []
    with pytest.raises(JobFailed) as caught:
        judge([SOURCE] * 3, summaries("good", "good", "good"), openai_options(server, concurrency=1, max_requests=5),
              on_result=lambda i, verdicts: finished.append(i))
    assert str(caught.value).startswith("judge budget spent: 5 requests / ")
    assert "; 1 of 3 examples judged" in str(caught.value)
    assert finished == [0] and len(server.log) == 5


def test_the_seconds_budget_stops_issuing_requests(server):
    finished = []
    started = time.monotonic()
    with pytest.raises(JobFailed) as caught:
        judge([SOURCE] * 6, summaries(*["slow"] * 6), openai_options(server, concurrency=2, max_seconds=1.0),
              on_result=lambda i, verdicts: finished.append(i))
    took = time.monotonic() - started
    assert 1.0 <= took < 4
    judged = int(re.search(r"; (\d+) of 6 examples judged", str(caught.value))[1])
    assert "judge budget spent" in str(caught.value) and judged == len(finished) and 0 < judged < 6
    last_request = max(e["at"] for e in server.log)
    assert last_request - started < 1.2  # nothing was issued after the budget ran out


def test_concurrency_is_bounded_and_used(server):
    judge([SOURCE] * 3, summaries("paced", "paced", "paced"), openai_options(server, concurrency=3))
    assert server.max_active["paced"] == 3


def test_skip_resumes_without_asking_again(server):
    results = judge([SOURCE] * 2, summaries("good", "good"), openai_options(server), skip={0})
    assert results[0] == {} and set(results[1]) == set(CRITERIA)
    assert len(server.log) == 4


def test_options_hide_the_key_and_refuse_what_cannot_work():
    from models.errors import InputError
    from models.settings import Settings

    settings = Settings.from_env({"JUDGE_BASE_URL": "http://127.0.0.1:9/v1", "JUDGE_API_KEY": KEY,
                                  "TUNEQUEUE_HOME": "/tmp/tq-judge-options"})
    assert settings.judge_api_key == KEY and KEY not in repr(settings)

    class Spec:
        judge_backend, judge_model, judge_concurrency = "openai", "m", 2

    options = JudgeOptions.from_spec(Spec(), settings)
    assert (options.backend, options.model, options.concurrency, options.api_key) == ("openai", "m", 2, KEY)
    no_key_in(options)
    with pytest.raises(InputError, match="probabilities"):
        JudgeOptions(backend="openai", scoring="probabilities", base_url="http://h/v1").check()
    with pytest.raises(InputError, match="JUDGE_BASE_URL"):
        JudgeOptions(backend="openai", model="m").check()
    with pytest.raises(InputError) as caught:
        Settings.from_env({"JUDGE_API_KEY": f"{KEY} x", "TUNEQUEUE_HOME": "/tmp/tq-judge-options"})
    assert "JUDGE_API_KEY" in str(caught.value) and KEY not in str(caught.value)


# ---------------------------------------------------------------------------------------------- local backend
@pytest.fixture(scope="module")
def model_cache(builtin_home):
    from worker.ml.model_cache import ModelCache

    return ModelCache(builtin_home, device="cpu", budget_bytes=1 << 30)


LOCAL_SUMMARIES = ["Person1 and Person2 meet at the library on Friday at 3 pm.", "They meet.", "Bob lost his keys."]


def test_local_sample_mode_returns_four_verdicts_per_example(model_cache):
    finished = []
    results = judge([SOURCE] * 3, LOCAL_SUMMARIES, JudgeOptions(model="tiny-llama", batch_size=5, max_new_tokens=16),
                    cache=model_cache, on_result=lambda i, verdicts: finished.append(i))
    assert finished == [0, 1, 2]
    for verdicts in results:
        assert set(verdicts) == set(CRITERIA)
        for verdict in verdicts.values():
            assert verdict.raw.startswith("Score:")  # tiny-llama's reply is noise: kept, unparsed or parsed
            assert verdict.parsed == (verdict.score is not None)
            assert verdict.score is None or 1 <= verdict.score <= 5


def test_local_probabilities_mode_gives_expected_scores_the_same_batched_or_not(model_cache):
    batched = judge([SOURCE] * 3, LOCAL_SUMMARIES, JudgeOptions(scoring="probabilities", batch_size=12),
                    cache=model_cache)
    single = judge([SOURCE] * 3, LOCAL_SUMMARIES, JudgeOptions(scoring="probabilities", batch_size=1),
                   cache=model_cache)
    for row_batched, row_single in zip(batched, single):
        assert set(row_batched) == set(CRITERIA)
        for criterion, verdict in row_batched.items():
            assert verdict.parsed and 1 <= verdict.score <= 5
            assert verdict.reason == "from token probabilities" and verdict.raw.startswith("p(score) 1:")
            assert verdict.score == pytest.approx(row_single[criterion].score, abs=1e-3)
    assert model_cache.loads == 1  # the resident judge model is reused


# ----------------------------------------------------------------------------------------------- real worker
@pytest.mark.slow
def test_judge_jobs_through_a_real_worker_local_and_openai_without_the_key_anywhere(pg_env, judge_server, tmp_path):
    from models.base import Base
    from models.jobs import Job, JobStatus
    from models.results import ExampleScore, Judgement, Metric

    judge_server.reset()
    judge_server.script = {"coherence": "malformed", "consistency": "ratelimit", "fluency": "error"}
    env = {**pg_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    worker_env = {**env, "JUDGE_BASE_URL": judge_server.base_url, "JUDGE_API_KEY": KEY}  # the worker's alone
    generate = ok_json(cli(env, "generate", "--limit", "3", "--max-new-tokens", "12", "--json"))
    burst = start_worker(env, "--burst", log=tmp_path / "generate.log")
    assert burst.wait(timeout=600) == 0, (tmp_path / "generate.log").read_text()[-3000:]
    score = {name: ok_json(cli(env, "score", str(generate["id"]), "--metric", "judge", *args, "--json"))["id"]
             for name, args in {"probabilities": ["--judge-model", "tiny-llama"],
                                "sample": ["--judge-model", "tiny-llama", "--judge-scoring", "sample"],
                                "openai": ["--judge-backend", "openai", "--judge-model", "judge-model-x",
                                           "--judge-references", "--judge-concurrency", "2"]}.items()}
    burst = start_worker(worker_env, "--burst", "--loglevel", "DEBUG", log=tmp_path / "worker.log")
    assert burst.wait(timeout=900) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    with session_of(env) as session:
        jobs = {name: session.get(Job, job_id) for name, job_id in score.items()}
        assert all(job.status == JobStatus.succeeded for job in jobs.values()), {n: j.error for n, j in jobs.items()}
        verdicts = {name: session.scalars(select(Judgement).where(Judgement.job_id == job_id)).all()
                    for name, job_id in score.items()}
        assert len(verdicts["probabilities"]) == len(verdicts["sample"]) == 3 * 4
        assert all(v.parsed and 1 <= v.score <= 5 for v in verdicts["probabilities"])
        assert all(v.raw.startswith("Score:") and v.parsed == (v.score is not None) for v in verdicts["sample"])
        assert jobs["sample"].result["judge_unparsed"] == sum(not v.parsed for v in verdicts["sample"])
        by_variant = {(v.variant, v.criterion): v for v in verdicts["openai"] if v.example_id == verdicts["openai"][0]
                      .example_id}
        assert len(verdicts["openai"]) == 2 * 3 * 4  # the base model's summaries and the references
        for variant in ("base", "reference"):
            assert by_variant[(variant, "coherence")].parsed is False
            assert by_variant[(variant, "coherence")].raw == "I would rather not say."
            assert by_variant[(variant, "relevance")].score == GOOD_SCORES["relevance"]
        assert jobs["openai"].result["judge_unparsed"] == 2 * 3  # every coherence reply, stored as unparsed
        stored = {m.name for m in session.scalars(select(Metric).where(Metric.job_id == score["openai"]))}
        assert stored == {"judge_relevance", "judge_consistency", "judge_fluency"}  # coherence has no score
        assert session.scalars(select(ExampleScore).where(ExampleScore.job_id == score["openai"])).first()
        for table in Base.metadata.sorted_tables:  # every column of every row, JSON specs and results included
            for row in session.execute(select(table)).all():
                assert KEY not in repr(tuple(row)), f"the API key is stored in {table.name}"
    retried = [e for e in judge_server.log if e["criterion"] in ("consistency", "fluency") and e["attempt"] == 2]
    assert len(retried) == 2 * 2 * 3
    assert {e["auth"] for e in judge_server.log} == {f"Bearer {KEY}"}
    logs = [tmp_path / "worker.log", *(Path(env["TUNEQUEUE_HOME"]) / "logs").rglob("*.log")]
    assert any("jobs" in path.parts for path in logs)
    for path in logs:
        assert KEY not in path.read_text(errors="replace"), path
    for job_id in score.values():
        shown = cli(env, "jobs", "logs", str(job_id))
        assert shown.returncode == 0 and KEY not in shown.stdout + shown.stderr
