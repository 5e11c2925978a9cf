"""Bad input gets a one-line error and a non-zero exit before anything is enqueued or written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from manage import cli
from models.jobs import JobKind, JobStatus
from tests.conftest import add_job, check_rejected, job_count, queue_length


@pytest.mark.parametrize("args, expected", [
    (["finetune", "--name", "a", "--model", "not-a-model"], "unknown model 'not-a-model'"),
    (["finetune", "--name", "a", "--model", "./no/such/folder"], "does not exist or is not a folder"),
    (["finetune", "--name", "a", "--dataset", "./missing.jsonl"], "dataset path './missing.jsonl' does not exist"),
    (["finetune", "--name", "a", "--dataset", "no such dataset!"], "unknown dataset"),
    (["finetune", "--name", "a", "--learning-rate", "-0.1"], "learning_rate: Input should be greater than 0"),
    (["finetune", "--name", "a", "--learning-rate", "0"], "learning_rate: Input should be greater than 0"),
    (["finetune", "--name", "a", "--epochs", "0"], "num_train_epochs: Input should be greater than 0"),
    (["finetune", "--name", "a", "--batch-size", "0"], "per_device_train_batch_size: Input should be greater than 0"),
    (["finetune", "--name", "a", "--batch-size", "1000000000"], "per_device_train_batch_size: Input should be less"),
    (["finetune", "--name", "a", "--max-tokens-per-batch", "0"], "max_tokens_per_batch: Input should be greater"),
    (["finetune", "--name", "a", "--lora-r", "100000"], "lora_r: Input should be less than or equal to 1024"),
    (["finetune", "--name", "a", "--lora-dropout", "1.5"], "lora_dropout: Input should be less than 1"),
    (["finetune", "--name", "a", "--epochs", "lots"], "'lots' is not a valid float"),
    (["generate", "--max-new-tokens", "99999999"], "max_new_tokens: Input should be less than or equal to 4096"),
    (["generate", "--priority", "10"], "priority: Input should be less than or equal to 9"),
    (["finetune", "--name", "a", "--text-column", "text"], "has columns dialogue, summary; no column 'text'"),
    (["finetune", "--name", "../escape"], "name: must be 1-64 letters"),
    (["finetune", "--name", "base"], "name: must be 1-64 letters"),
    (["finetune", "--name", "a", "--prompt-template", "no slot"], "prompt_template: must contain {dialogue}"),
    (["generate", "--batch-size", "-1"], "batch_size: Input should be greater than 0"),
    (["generate", "--split", "dev"], "has splits train, validation, test, not 'dev'"),
    (["generate", "--adapter", "nope"], "adapter 'nope' does not exist"),
    (["score", "999"], "job 999 does not exist"),
    (["jobs", "show", "999"], "job 999 does not exist"),
    (["jobs", "cancel", "999"], "job 999 does not exist"),
])
def test_rejected_before_enqueue(sqlite_env, args, expected):
    check_rejected(sqlite_env, args, expected)


def test_missing_column_in_local_file(sqlite_env, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"chat": f"A: hi {i}", "summary": "A greets."}) for i in range(20)))
    check_rejected(sqlite_env, ["finetune", "--name", "a", "--dataset", str(data)],
                 "has no column 'dialogue' (columns: chat, summary)")


def test_empty_dataset_file(sqlite_env, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    check_rejected(sqlite_env, ["generate", "--dataset", str(tmp_path / "empty.jsonl")], "is empty")


def test_model_folder_without_config(sqlite_env, tmp_path):
    (tmp_path / "empty-model").mkdir()
    check_rejected(sqlite_env, ["generate", "--model", str(tmp_path / "empty-model")], "has no config.json")


def test_scoring_a_finetune_job(sqlite_env):
    job_id = add_job(sqlite_env, JobKind.finetune, JobStatus.succeeded, {"kind": "finetune", "name": "x"})
    check_rejected(sqlite_env, ["score", str(job_id)], f"job {job_id} is a finetune job; score takes a generate job")


def test_scoring_an_unfinished_generate_job(sqlite_env):
    job_id = add_job(sqlite_env, JobKind.generate, JobStatus.running, {"kind": "generate"})
    check_rejected(sqlite_env, ["score", str(job_id)], f"generate job {job_id} is running; only a succeeded")


def test_adapter_name_already_queued(sqlite_env):
    add_job(sqlite_env, JobKind.finetune, JobStatus.queued, {"kind": "finetune", "name": "taken", "model": "tiny-t5"})
    check_rejected(sqlite_env, ["finetune", "--name", "taken"], "already used by a queued or running fine-tune job")


def test_adapter_still_training(sqlite_env):
    add_job(sqlite_env, JobKind.finetune, JobStatus.queued, {"kind": "finetune", "name": "pending", "model": "tiny-t5"})
    # an adapter still being trained is not one that exists: generate refuses it outright
    check_rejected(sqlite_env, ["generate", "--adapter", "pending"], "adapter 'pending' does not exist")


def test_report_before_any_score(sqlite_env):
    result = CliRunner().invoke(cli, ["report", "--metric", "rouge"])
    assert result.exit_code != 0 and "no scored results" in result.output


def test_missing_database_tables(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEQUEUE_HOME", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    result = CliRunner().invoke(cli, ["jobs", "list"])
    assert result.exit_code != 0 and "run 'python manage.py db upgrade' first" in result.output


def test_broker_down_writes_nothing(sqlite_env, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    before = job_count(sqlite_env)
    result = CliRunner().invoke(cli, ["generate", "--limit", "2"])
    assert result.exit_code != 0 and "cannot reach the broker at redis://127.0.0.1:1/0" in result.output
    assert job_count(sqlite_env) == before


@pytest.mark.parametrize("args, expected", [
    (["finetune", "--name", "a", "--dataset", "knkarthick/dialogsum"], "hub to check dataset 'knkarthick/dialogsum'"),
    (["generate", "--model", "google/flan-t5-base"], "hub to check model 'google/flan-t5-base'"),
])
def test_hub_unreachable(sqlite_env, args, expected):
    from tests.conftest import cli

    before = job_count(sqlite_env)
    result = cli({**sqlite_env, "HF_HUB_OFFLINE": "1"}, *args, timeout=60)
    assert result.returncode != 0
    assert expected in result.stderr and "download it first" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert job_count(sqlite_env) == before and queue_length(sqlite_env) == 0
