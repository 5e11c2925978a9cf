"""Sentiment classification and causal-LM summarization through the queue, as a user drives them: CLI → Redis →
real worker → SQL → report; plus a short QLoRA run on this CPU worker (no CUDA needed, no warning at enqueue)."""

from __future__ import annotations

import json
import signal

from sqlalchemy import select

from models.jobs import Job, JobStatus
from tests.conftest import cli, ok_json, session_of, start_worker

SENTIMENT = ("--model", "tiny-bert", "--dataset", "synthetic-sentiment")


def test_classification_and_causal_through_the_queue(make_env, tmp_path):
    env = make_env("postgresql")
    worker = start_worker(env, log=tmp_path / "worker.log")
    try:
        tuned = ok_json(cli(env, "finetune", "--name", "sentiment", *SENTIMENT, "--train-limit", "600",
                            "--epochs", "2", "--wait", "--json"))
        base = ok_json(cli(env, "generate", *SENTIMENT, "--limit", "80", "--wait", "--json"))
        adapted = ok_json(cli(env, "generate", "--adapter", "sentiment", "--dataset", "synthetic-sentiment",
                              "--limit", "80", "--wait", "--json"))
        wrong = cli(env, "score", str(adapted["id"]), "--metric", "rouge")
        for job in (base, adapted):
            ok_json(cli(env, "score", str(job["id"]), "--wait", "--json"))

        causal = ok_json(cli(env, "finetune", "--name", "causal", "--model", "tiny-llama", "--train-limit", "600",
                             "--epochs", "2", "--wait", "--json"))
        llama_base = ok_json(cli(env, "generate", "--model", "tiny-llama", "--limit", "40", "--wait", "--json"))
        llama = ok_json(cli(env, "generate", "--adapter", "causal", "--limit", "40", "--wait", "--json"))
        for job in (llama_base, llama):
            ok_json(cli(env, "score", str(job["id"]), "--wait", "--json"))

        qlora = cli(env, "finetune", "--name", "q", "--model", "tiny-llama", "--method", "qlora", "--max-steps", "10",
                    "--train-limit", "160", "--eval-limit", "20", "--wait", "--json")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    log = (tmp_path / "worker.log").read_text()
    assert tuned["result"]["model_kind"] == "classification" and tuned["result"]["method"] == "lora", log[-3000:]
    assert causal["result"]["model_kind"] == "causal"
    assert wrong.returncode == 2 and "score it with --metric classification" in wrong.stderr

    report = json.loads(cli(env, "report", "--metric", "classification", "--format", "json").stdout)
    f1 = {row["variant"]: row["f1"] for row in report if row["model"] == "tiny-bert"}
    assert f1["sentiment"] > f1["base"] + 0.1, report
    report = json.loads(cli(env, "report", "--metric", "rouge", "--format", "json").stdout)
    rouge = {row["variant"]: row["rouge1"] for row in report if row["model"] == "tiny-llama"}
    assert rouge["causal"] > rouge["base"] + 0.05, report

    # QLoRA: no warning at enqueue, trained on this CPU worker's 4-bit base at the first attempt
    assert "warning" not in qlora.stderr
    result = ok_json(qlora)["result"]
    assert result["quantization"] == "4bit" and result["method"] == "qlora" and result["steps"] == 10
    with session_of(env) as session:
        job = session.scalars(select(Job).where(Job.kind == "finetune").order_by(Job.id.desc())).first()
        assert job.status == JobStatus.succeeded and job.attempts == 1
