"""Small pieces: settings, the synthetic dataset, specs, data loading, the schema's unique keys, report deltas."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.exc import IntegrityError

from models.jobs import Job, JobKind, JobStatus
from models.report import comparison
from models.results import Generation, Metric
from tests.conftest import session_of
from worker.data import synthetic
from worker.data.examples import load_examples
from models.settings import Settings, mask_url
from models.errors import InputError
from models.specs import FinetuneSpec, parse_spec
from worker.jobs.finetune import length_bucketed_batches


def test_settings_defaults_and_overrides(tmp_path):
    default = Settings.from_env({"TUNEQUEUE_HOME": str(tmp_path)})
    assert default.database_url == f"sqlite:///{tmp_path / 'tunequeue.db'}"
    assert default.redis_url == "redis://127.0.0.1:6379/0"
    custom = Settings.from_env({"DATABASE_URL": "postgresql://u:secret@db/x", "REDIS_URL": "redis://r:1/2"})
    assert custom.database_url == "postgresql+psycopg://u:secret@db/x"
    assert custom.home.name == ".tunequeue"
    assert mask_url(custom.database_url) == "postgresql+psycopg://u:***@db/x"
    with pytest.raises(Exception):
        custom.queue = "other"  # frozen


def test_synthetic_dataset_is_deterministic_and_varied():
    first = list(synthetic.generate_split("test"))
    assert first == list(synthetic.generate_split("test"))
    assert first != list(synthetic.generate_split("test", seed=7))
    assert len(first) == synthetic.SPLIT_SIZES["test"]
    assert len({e["summary"] for e in first}) == len(first)  # no two summaries alike
    train_summaries = {e["summary"] for e in synthetic.generate_split("train")}
    assert not train_summaries & {e["summary"] for e in first}
    for example in first[:50]:
        # every name in the summary is one of the two speakers: the summary can only be written by reading
        speakers = {line.split(":")[0] for line in example["dialogue"].splitlines()}
        named = {w.strip(".") for w in example["summary"].split() if w.strip(".") in synthetic.NAMES}
        assert named and named <= speakers


def test_spec_round_trip_and_unknown_fields():
    spec = FinetuneSpec(name="a", learning_rate=1e-3)
    assert parse_spec(spec.model_dump(mode="json")) == spec
    with pytest.raises(InputError, match="lora_rank: unknown field"):
        parse_spec({"kind": "finetune", "name": "a", "lora_rank": 8})
    with pytest.raises(InputError, match="unknown job kind"):
        parse_spec({"kind": "train"})


def test_local_files_split_deterministically(tmp_path):
    rows = [{"chat": f"A: hello {i}\nB: bye", "gist": f"greeting {i}"} for i in range(50)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("chat,gist\n" + "\n".join(f'"{r["chat"]}",{r["gist"]}' for r in rows))
    kwargs = dict(text_column="chat", summary_column="gist", template="S: {dialogue} =", seed=3)
    splits = {s: load_examples(str(jsonl), s, **kwargs) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [40, 5, 5]
    assert sorted(e["id"] for v in splits.values() for e in v) == sorted(str(i) for i in range(50))
    assert load_examples(str(csv_file), "test", **kwargs) == splits["test"]
    assert splits["test"][0]["source"].startswith("S: A: hello")


def test_length_buckets_cover_every_example_once():
    import random

    lengths = [random.Random(i).randint(5, 200) for i in range(1000)]
    batches = length_bucketed_batches(lengths, 16, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert sum(lengths) / padded > 0.9  # little padding inside each batch


def test_unique_keys_reject_duplicate_results(make_env, backend):
    env = make_env(backend)
    with session_of(env) as session:
        job = Job(kind=JobKind.generate, status=JobStatus.succeeded, spec={}, attempts=1, cancel_requested=False)
        session.add(job)
        session.commit()
        row = dict(job_id=job.id, variant="base", split="test", example_id="1", source="s", prediction="p")
        session.add(Generation(**row))
        session.commit()
        session.add(Generation(**row))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        metric = dict(job_id=job.id, generate_job_id=job.id, variant="base", base_model="m", split="test",
                      name="rouge1", value=0.1, n_examples=1)
        session.add(Metric(**metric))
        session.commit()
        session.add(Metric(**metric))
        with pytest.raises(IntegrityError):
            session.commit()


def test_report_uses_newest_score_and_base_delta(make_env):
    env = make_env("sqlite")
    with session_of(env) as session:
        jobs = [Job(kind=JobKind.score, status=JobStatus.succeeded, spec={}, attempts=1, cancel_requested=False)
                for _ in range(3)]
        session.add_all(jobs)
        session.commit()
        for job, variant, value in ((jobs[0], "base", 0.1), (jobs[1], "a", 0.5), (jobs[2], "a", 0.7)):
            session.add(Metric(job_id=job.id, generate_job_id=job.id, variant=variant, base_model="m",
                               split="test", name="rouge1", value=value, n_examples=10))
        session.commit()
        rows = comparison(session, ["rouge1"])
    assert [(r["variant"], r["rouge1"]) for r in rows] == [("base", 0.1), ("a", 0.7)]
    assert rows[1]["delta_rouge1"] == pytest.approx(0.6)


def test_fast_rouge_equals_rouge_score():
    import random

    from worker.jobs.score import rouge_scores

    rng = random.Random(0)
    summaries = [e["summary"] for e in synthetic.generate_split("validation")]
    references, predictions = [], []
    for summary in summaries:
        words = summary.split() + rng.choice(summaries).split()
        references.append(summary)
        predictions.append(" ".join(rng.sample(words, k=rng.randint(0, 14))))
    references += ["The cats are running quickly!", "", "a\nb c", "Ünïcode café, naïve résumé"]
    predictions += ["cat running quick", "x", "b c\na", "cafe unicode resume"]
    fast = rouge_scores(predictions, references, fast=True)
    reference = rouge_scores(predictions, references, fast=False)
    assert len(fast) == len(reference) == len(predictions)
    for a, b in zip(fast, reference):
        assert a.keys() == b.keys()
        for name in a:
            assert abs(a[name] - b[name]) <= 1e-9, (name, a[name], b[name])


def test_token_budget_batches():
    import random

    lengths = [random.Random(i).randint(5, 200) for i in range(1000)]
    batches = length_bucketed_batches(lengths, 64, random.Random(0), max_tokens=2000)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) * max(lengths[i] for i in b) <= 2000 or len(b) == 1 for b in batches)
    assert all(len(b) <= 64 for b in batches)
    unbounded = length_bucketed_batches(lengths, 64, random.Random(0))
    assert max(len(b) * max(lengths[i] for i in b) for b in unbounded) > 2000  # the budget did cut batches


def test_tokenization_cache_keys_on_tokenizer_text_and_lengths(tmp_path, builtin_home):
    from transformers import AutoTokenizer

    from worker.ml.features import cached_encode

    tokenizer = AutoTokenizer.from_pretrained(builtin_home / "builtin" / "tiny-t5")
    examples = [{"source": f"Summarize: Anna meets Tom at {i} pm.", "target": f"Anna and Tom meet at {i}."}
                for i in range(20)]
    options = {"max_source_length": 64, "max_target_length": 16, "label2id": None}
    first, hit = cached_encode(tmp_path, "seq2seq", tokenizer, examples, **options)
    assert not hit
    again, hit = cached_encode(tmp_path, "seq2seq", tokenizer, examples, **options)
    assert hit and again == first
    assert first[0]["input_ids"] == tokenizer(examples[0]["source"])["input_ids"]
    # any change of text, lengths or task is a different entry
    changed = [dict(examples[0], target="Someone else.")] + examples[1:]
    assert not cached_encode(tmp_path, "seq2seq", tokenizer, changed, **options)[1]
    assert not cached_encode(tmp_path, "seq2seq", tokenizer, examples, **{**options, "max_source_length": 8})[1]
    assert not cached_encode(tmp_path, "causal", tokenizer, examples, **options)[1]
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.pkl"))) == 4


def test_sweep_files_may_still_name_the_model_kind_task():
    from api.sweeps import expand

    plan = expand({"name": "old-keys", "base": {"model": "tiny-llama", "task": "causal", "max_steps": 2},
                   "grid": {"task": ["causal"]}})
    assert plan.points[0].finetune.model_kind == "causal"


def test_no_evaluation_survives_storage():
    """`--eval-split none` and `eval_split: null` mean no evaluation, in the stored row as much as in the spec."""
    from api.sweeps import expand

    spec = parse_spec({"kind": "finetune", "name": "x", "eval_split": "none"})
    assert spec.eval_split is None
    assert parse_spec(spec.model_dump(mode="json")).eval_split is None  # what the worker reads back
    point = expand({"name": "quiet", "base": {"eval_split": None, "checkpoint_every_steps": None}}).points[0]
    stored = parse_spec(point.finetune.model_dump(mode="json"))
    assert stored.eval_split is None and stored.checkpoint_every_steps is None
    assert parse_spec({"kind": "finetune", "name": "x", "target_modules": ["all-linear"]}).target_modules == "all-linear"
    with pytest.raises(InputError, match="target_modules: name at least one module"):
        parse_spec({"kind": "finetune", "name": "x", "target_modules": []})


def test_an_empty_adapter_list_means_the_base_and_qlora_enqueues_without_a_warning(sqlite_env):
    from click.testing import CliRunner

    from manage import cli

    result = CliRunner().invoke(cli, ["finetune", "--name", "bad name", "--method", "qlora"])
    assert result.exit_code == 2 and result.output.startswith("Error: name:")
    result = CliRunner().invoke(cli, ["finetune", "--name", "q", "--method", "qlora"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output  # CPU workers run it too
    result = CliRunner().invoke(cli, ["generate", "--adapters", "", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    with session_of(sqlite_env) as session:
        spec = session.get(Job, json.loads(result.output)["id"]).spec
    assert spec["adapters"] == [] and spec["adapter"] is None  # the base model alone, as before
