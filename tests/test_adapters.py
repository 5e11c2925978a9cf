"""`manage.py adapters list|show|export|merge|delete` and `finetune --replace`, on adapters trained for real.

The merged model folder loads with plain `AutoModelFor...from_pretrained` and predicts exactly what base + adapter
predicts; refused merges (full, prompt-tuning, qlora without --dtype), unknown names and in-use deletes fail with a
one-line error; delete removes the row and the folder together.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from manage import cli
from models import make_session_factory
from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter, Generation
from tests.conftest import REDIS_URL, add_job, check_rejected, job_count, queue_length, session_of, sqlite_home
from models.specs import FinetuneSpec
from worker.jobs.finetune import train_adapter

N_EXAMPLES = 8
# (adapter name, base, dataset): one LoRA adapter per model kind, a few dozen steps each
KINDS = {
    "seq2seq": ("t5-lora", "tiny-t5", "synthetic-dialogsum"),
    "causal": ("llama-lora", "tiny-llama", "synthetic-dialogsum"),
    "classification": ("bert-lora", "tiny-bert", "synthetic-sentiment"),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, builtin_home):
    """A home with one small LoRA adapter per model kind, trained with the plain function."""
    from worker.ml.model_cache import ModelCache

    home, url = sqlite_home(tmp_path_factory, builtin_home, "adapters-home")
    sessions = make_session_factory(url)
    cache = ModelCache(home, device="cpu")
    with sessions() as session:
        for name, model, dataset in KINDS.values():
            spec = FinetuneSpec(name=name, model=model, dataset=dataset, train_limit=320, max_steps=40,
                                eval_split=None, learning_rate=1e-2)
            train_adapter(spec, session, cache, home)
    yield {"home": home, "url": url, "sessions": sessions}


@pytest.fixture
def lab_env(lab, monkeypatch):
    """The lab's home and database as the environment of in-process CLI calls."""
    monkeypatch.setenv("TUNEQUEUE_HOME", str(lab["home"]))
    monkeypatch.setenv("DATABASE_URL", lab["url"])
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    return lab


def run(*args: str, ok: bool = True, input: str | None = None):
    result = CliRunner().invoke(cli, list(args), input=input)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and expected in errors[0], result.output


def add_row(lab, name: str, method: str, path: str = "adapters/t5-lora") -> None:
    with lab["sessions"]() as session:
        session.add(Adapter(name=name, base_model="tiny-t5", method=method, model_kind="seq2seq", hyperparameters={},
                            path=path, size_bytes=1, trainable_params=1, total_params=10))
        session.commit()


# ------------------------------------------------------------------------------------------- predictions
def examples(dataset: str) -> list[dict]:
    from models.builtins import BUILTIN_DATASETS
    from worker.data.examples import load_examples

    columns = BUILTIN_DATASETS[dataset].columns
    template = "{text}" if dataset == "synthetic-sentiment" else FinetuneSpec(name="x").prompt_template
    return load_examples(dataset, "test", columns["text_column"],
                         columns.get("summary_column") or columns["label_column"], template=template,
                         limit=N_EXAMPLES)


def predict(model, tokenizer, model_kind: str, sources: list[str]) -> list:
    """Greedy predictions one example at a time (no padding): text for generation, label id and logits else."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for source in sources:
            inputs = tokenizer(source, return_tensors="pt")
            if model_kind == "classification":
                logits = model(**inputs).logits[0]
                out.append((int(logits.argmax()), [round(float(x), 4) for x in logits]))
                continue
            ids = model.generate(**inputs, max_new_tokens=32, do_sample=False, num_beams=1,
                                 no_repeat_ngram_size=3, pad_token_id=tokenizer.pad_token_id)
            if model_kind == "causal":
                ids = ids[:, inputs["input_ids"].shape[1]:]
            out.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("model_kind", list(KINDS))
def test_merge_predicts_like_base_plus_adapter(lab_env, tmp_path, model_kind):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from worker.ml.kinds import load_model, model_class

    name, base_name, dataset = KINDS[model_kind]
    home = lab_env["home"]
    with lab_env["sessions"]() as session:
        row = session.scalar(select(Adapter).where(Adapter.name == name))
    labels = row.hyperparameters.get("labels")
    base_path = home / "builtin" / base_name
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    sources = [e["source"] for e in examples(dataset)]
    base = load_model(str(base_path), model_kind, labels=labels)
    base_predictions = predict(base, tokenizer, model_kind, sources)
    adapted = PeftModel.from_pretrained(base, str(home / row.path))
    adapted_predictions = predict(adapted, tokenizer, model_kind, sources)
    assert adapted_predictions != base_predictions, "the adapter must change the predictions for this test to mean much"

    out = tmp_path / "merged"
    assert "merged into a full model" in run("adapters", "merge", name, str(out)).output
    merged = model_class(model_kind).from_pretrained(out)  # plain Auto class, no PEFT
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in key for key in merged.state_dict())
    merged_predictions = predict(merged, merged_tokenizer, model_kind, sources)
    if model_kind == "classification":
        assert [p[0] for p in merged_predictions] == [p[0] for p in adapted_predictions]
        for (_, a), (_, b) in zip(merged_predictions, adapted_predictions):
            assert a == pytest.approx(b, abs=1e-3)
        assert [merged.config.id2label[i] for i in range(merged.config.num_labels)] == labels
    else:
        assert merged_predictions == adapted_predictions


def test_merge_refusals(lab_env, tmp_path):
    add_row(lab_env, "whole", "full")
    add_row(lab_env, "prompts", "prompt-tuning")
    add_row(lab_env, "quantized", "qlora")
    out = str(tmp_path / "out")
    assert_one_line_error(run("adapters", "merge", "whole", out, ok=False), "already a full model; use 'adapters export'")
    assert_one_line_error(run("adapters", "merge", "prompts", out, ok=False), "virtual tokens cannot be merged")
    assert not (tmp_path / "out").exists()
    # a qlora adapter merges into a float32 base by default (its 4-bit base is never the merge target)
    run("adapters", "merge", "quantized", out)
    assert (tmp_path / "out" / "config.json").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert_one_line_error(run("adapters", "merge", "t5-lora", str(tmp_path / "busy"), ok=False), "is not an empty folder")


def test_qlora_merges_with_dtype(lab_env, tmp_path):
    """A qlora adapter is LoRA weights over the base: with --dtype the base is loaded unquantized and merged."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    add_row(lab_env, "quantized-b", "qlora")
    run("adapters", "merge", "quantized-b", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bf16")
    assert merged.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- list / show / export
def test_list_and_show(lab_env, monkeypatch):
    rows = json.loads(run("adapters", "list", "--json").output)
    by_name = {r["name"]: r for r in rows}
    assert {"t5-lora", "llama-lora", "bert-lora"} <= set(by_name)
    t5 = by_name["t5-lora"]
    for field in ("base_model", "method", "model_kind", "hyperparameters", "path", "size_bytes", "trainable_params",
                  "total_params", "percent_trainable", "is_full_model", "train_loss", "eval_loss",
                  "best_eval_loss", "duration_s", "created_at", "job_id"):
        assert field in t5, field
    assert (t5["base_model"], t5["method"], t5["model_kind"], t5["is_full_model"]) == ("tiny-t5", "lora", "seq2seq", False)
    assert 0 < t5["percent_trainable"] < 50 and t5["size_bytes"] > 0 and t5["exists"]
    assert by_name["bert-lora"]["hyperparameters"]["labels"] == ["negative", "positive"]
    only = json.loads(run("adapters", "list", "--json", "--base", "tiny-llama").output)
    assert [r["name"] for r in only] == ["llama-lora"]
    shown = json.loads(run("adapters", "show", "t5-lora", "--json").output)
    assert shown["name"] == "t5-lora" and shown["trainable_params"] == t5["trainable_params"]
    monkeypatch.setenv("COLUMNS", "250")  # rich sizes the table to the terminal
    table = run("adapters", "list").output
    assert "t5-lora" in table and "% trainable" in table and "KB" in table
    assert "percent_trainable" in run("adapters", "show", "t5-lora").output


def test_unknown_name_is_one_line_error(lab_env):
    result = run("adapters", "show", "t5-lroa", ok=False)
    assert_one_line_error(result, "adapter 't5-lroa' does not exist; did you mean 't5-lora'?")
    for args in (["export", "zzz", "/tmp/x"], ["merge", "zzz", "/tmp/x"], ["delete", "zzz", "--yes"]):
        assert_one_line_error(run("adapters", *args, ok=False), "adapter 'zzz' does not exist")


def test_export_loads_with_peft(lab_env, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "exported"
    out.mkdir()  # an empty folder is fine
    run("adapters", "export", "t5-lora", str(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    base = AutoModelForSeq2SeqLM.from_pretrained(lab_env["home"] / "builtin" / "tiny-t5")
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_one_line_error(run("adapters", "export", "t5-lora", str(out), ok=False), "is not an empty folder")


# -------------------------------------------------------------------------------------------------- delete
def make_doomed(home, session, name: str) -> Adapter:
    folder = home / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    row = Adapter(name=name, base_model="tiny-t5", method="lora", model_kind="seq2seq", hyperparameters={},
                  path=f"adapters/{name}", size_bytes=2, trainable_params=1, total_params=10)
    session.add(row)
    session.commit()
    return row


def test_delete_removes_row_and_folder(env):
    from models.settings import Settings

    home = Settings.from_env(env).home
    with session_of(env) as session:
        row = make_doomed(home, session, "doomed")
        job = Job(kind=JobKind.generate, status=JobStatus.succeeded, spec={"kind": "generate", "adapter": "doomed"},
                  attempts=1, cancel_requested=False)
        session.add(job)
        session.flush()
        session.add(Generation(job_id=job.id, variant="doomed", adapter_id=row.id, split="test", example_id="1",
                               source="s", prediction="p", reference="r"))
        session.commit()
    result = run("adapters", "delete", "doomed", ok=False, input="n\n")  # declined at the prompt
    assert result.exit_code == 1 and (home / "adapters" / "doomed").is_dir()
    run("adapters", "delete", "doomed", input="y\n")
    assert not (home / "adapters" / "doomed").exists()
    assert not [p for p in (home / "adapters").iterdir()], "nothing left aside"
    with session_of(env) as session:
        assert session.scalar(select(Adapter).where(Adapter.name == "doomed")) is None
        assert session.scalar(select(Generation.adapter_id)) is None  # the results stay, unlinked


def test_delete_refused_while_a_job_uses_it(env):
    from models.settings import Settings

    home = Settings.from_env(env).home
    with session_of(env) as session:
        make_doomed(home, session, "busy")
    job_id = add_job(env, JobKind.generate, JobStatus.queued, {"kind": "generate", "adapters": ["x", "busy"]})
    assert_one_line_error(run("adapters", "delete", "busy", "--yes", ok=False), f"used by queued or running job(s) {job_id}")
    assert (home / "adapters" / "busy").is_dir()
    with session_of(env) as session:
        assert session.scalar(select(Adapter).where(Adapter.name == "busy")) is not None


def test_delete_restores_folder_when_the_row_cannot_go(make_env, monkeypatch):
    from api.adapters import delete_adapter
    from models.settings import Settings

    env = make_env("sqlite")
    home = Settings.from_env(env).home
    with session_of(env) as session:
        make_doomed(home, session, "kept")

        def broken_commit():
            raise RuntimeError("database went away")

        monkeypatch.setattr(session, "commit", broken_commit)
        with pytest.raises(RuntimeError, match="went away"):
            delete_adapter(session, home, "kept")
    assert (home / "adapters" / "kept" / "adapter_config.json").exists()
    with session_of(env) as session:
        assert session.scalar(select(Adapter).where(Adapter.name == "kept")) is not None


# ------------------------------------------------------------------------------------------ finetune --replace
def test_taken_name_needs_replace(make_env, monkeypatch):
    env = make_env("sqlite")
    for key in ("TUNEQUEUE_HOME", "DATABASE_URL", "REDIS_URL", "TUNEQUEUE_QUEUE"):
        monkeypatch.setenv(key, env[key])
    with session_of(env) as session:
        session.add(Adapter(name="taken", base_model="tiny-t5", method="lora", model_kind="seq2seq", hyperparameters={},
                            path="adapters/taken", size_bytes=1, trainable_params=1, total_params=10))
        session.commit()
    check_rejected(env, ["finetune", "--name", "taken"], "adapter name 'taken' is already taken")
    check_rejected(env, ["finetune", "--name", "taken"], "--replace")
    before = job_count(env)
    result = run("finetune", "--name", "taken", "--replace", "--json")
    job = json.loads(result.output)
    assert job["status"] == "queued" and job_count(env) == before + 1 and queue_length(env) == 1
    with session_of(env) as session:
        assert session.get(Job, job["id"]).spec["replace"] is True
    # a second replacement while the first is still queued is refused: two jobs would race for the name
    assert_one_line_error(run("finetune", "--name", "taken", "--replace", ok=False),
                   "already used by a queued or running fine-tune")
    assert job_count(env) == before + 1 and queue_length(env) == 1
    with session_of(env) as session:
        assert session.scalar(select(func.count(Adapter.id))) == 1
