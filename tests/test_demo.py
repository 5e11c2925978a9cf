"""`manage.py demo` as the README runs it: the real queue, a burst worker, and adapters that beat the base."""

from __future__ import annotations

import json

from tests.conftest import cli, queue_length


def test_demo_runs_the_whole_loop(make_env):
    env = make_env("sqlite")
    result = cli(env, "demo", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "base model loads in the worker: 1" in result.stdout
    rows = json.loads(cli(env, "report", "--format", "json").stdout)
    assert [r["variant"] for r in rows][0] == "base" and len(rows) == 3
    assert rows[0]["rouge1"] < 0.2
    assert all(r["rouge1"] >= 0.8 and r["examples"] == 200 for r in rows[1:]), rows
    jobs = json.loads(cli(env, "jobs", "list", "--json").stdout)
    assert len(jobs) == 8 and {j["status"] for j in jobs} == {"succeeded"}
    assert queue_length(env) == 0
