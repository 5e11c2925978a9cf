"""The plain functions, called directly: LoRA really learns, the base stays untouched, results are idempotent,
and the saved adapter reproduces the stored predictions with plain PEFT in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from models import make_session_factory
from models.jobs import JobKind
from models.results import Adapter, ExampleScore, Generation, Metric
from worker.jobs.generate import generate_summaries
from worker.ml.model_cache import ModelCache
from worker.jobs.score import rouge_scores, score_rows
from models.specs import FinetuneSpec, GenerateSpec, ScoreSpec
from worker.jobs.finetune import train_adapter
from tests.conftest import new_job, sqlite_home

TEST_LIMIT = 100


@pytest.fixture(scope="module")
def trained(tmp_path_factory, builtin_home):
    """One adapter trained on tiny-t5 (3 epochs), base and adapter generations and ROUGE on the test split."""
    home, url = sqlite_home(tmp_path_factory, builtin_home, "learning-home")
    session = make_session_factory(url)()
    cache = ModelCache(home)
    losses = []
    spec = FinetuneSpec(name="learner", learning_rate=3e-3, num_train_epochs=3)
    train_job = new_job(session, JobKind.finetune, spec)
    train_result = train_adapter(spec, session, cache, home, job_id=train_job.id,
                                 on_progress=lambda p: losses.append(p["loss"]) and False)
    scores = {}
    generate_jobs = {}
    for variant, adapter in (("base", None), ("learner", "learner")):
        gspec = GenerateSpec(adapter=adapter, limit=TEST_LIMIT)
        gjob = new_job(session, JobKind.generate, gspec)
        generate_summaries(gspec, session, cache, home, job_id=gjob.id)
        sjob = new_job(session, JobKind.score, ScoreSpec(generate_job_id=gjob.id))
        scores[variant] = score_rows(ScoreSpec(generate_job_id=gjob.id), session, job_id=sjob.id)
        generate_jobs[variant] = gjob
    yield {"home": home, "session": session, "cache": cache, "losses": losses, "scores": scores,
           "train": train_result, "generate_jobs": generate_jobs, "url": url}
    session.close()


def test_lora_learns_the_task(trained):
    base, tuned = trained["scores"]["base"]["rouge1"], trained["scores"]["learner"]["rouge1"]
    assert base < 0.2, base
    assert tuned >= 0.8, tuned
    losses = trained["losses"]
    assert losses[-1] < losses[0] / 5, losses


def test_adapter_row_and_files(trained):
    session, home = trained["session"], trained["home"]
    adapter = session.scalar(select(Adapter).where(Adapter.name == "learner"))
    folder = home / adapter.path
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert adapter.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert 0 < adapter.trainable_params < adapter.total_params
    assert adapter.hyperparameters["learning_rate"] == 3e-3
    assert adapter.train_loss == pytest.approx(trained["losses"][-1], rel=0.5)


def test_base_weights_untouched_and_loaded_once(trained, builtin_home):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    cache = trained["cache"]
    assert cache.loads == 1  # training and both generations shared one resident base
    resident = cache.get("tiny-t5").model
    assert not any(name for name, _ in resident.named_modules() if "lora" in name)
    pristine = AutoModelForSeq2SeqLM.from_pretrained(builtin_home / "builtin" / "tiny-t5")
    for (name, a), (_, b) in zip(resident.state_dict().items(), pristine.state_dict().items()):
        assert torch.equal(a, b), name


def test_rerun_replaces_instead_of_duplicating(trained):
    session, cache, home = trained["session"], trained["cache"], trained["home"]
    gjob = trained["generate_jobs"]["learner"]
    gspec = GenerateSpec.model_validate(gjob.spec)
    count = lambda model, *where: session.scalar(select(func.count(model.id)).where(*where))  # noqa: E731
    rows_before = count(Generation, Generation.job_id == gjob.id)
    again = generate_summaries(gspec, session, cache, home, job_id=gjob.id)
    assert again["resumed_from"] == rows_before == TEST_LIMIT
    assert count(Generation, Generation.job_id == gjob.id) == rows_before
    sjob = new_job(session, JobKind.score, ScoreSpec(generate_job_id=gjob.id))
    first = score_rows(ScoreSpec(generate_job_id=gjob.id), session, job_id=sjob.id)
    second = score_rows(ScoreSpec(generate_job_id=gjob.id), session, job_id=sjob.id)
    assert first == second
    assert count(Metric, Metric.job_id == sjob.id) == 4
    assert count(ExampleScore, ExampleScore.job_id == sjob.id) == 4 * TEST_LIMIT


def test_stored_aggregate_matches_rouge_score(trained):
    session = trained["session"]
    gjob = trained["generate_jobs"]["learner"]
    rows = list(session.scalars(select(Generation).where(Generation.job_id == gjob.id)))
    direct = rouge_scores([r.prediction for r in rows], [r.reference for r in rows], fast=False)  # the reference
    stored = session.scalar(select(Metric.value).where(Metric.generate_job_id == gjob.id, Metric.name == "rougeL")
                            .order_by(Metric.job_id).limit(1))
    assert stored == pytest.approx(sum(d["rougeL"] for d in direct) / len(direct), abs=1e-12)


FRESH_PROCESS = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
base_path, adapter_path, sources = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(base_path)
model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_path), adapter_path).eval()
out = []
with torch.no_grad():
    for source in sources:
        ids = tokenizer(source, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=64, do_sample=False, no_repeat_ngram_size=3)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True).strip())
print(json.dumps(out))
"""


def test_adapter_reproduces_predictions_in_fresh_process(trained):
    session, home = trained["session"], trained["home"]
    gjob = trained["generate_jobs"]["learner"]
    spec = GenerateSpec.model_validate(gjob.spec)
    rows = list(session.scalars(select(Generation).where(Generation.job_id == gjob.id).order_by(Generation.id)
                                .limit(5)))
    sources = [spec.prompt_template.replace("{dialogue}", r.source) for r in rows]
    adapter = session.scalar(select(Adapter).where(Adapter.name == "learner"))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(home / "builtin" / "tiny-t5"),
                             str(home / adapter.path), json.dumps(sources)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [r.prediction for r in rows]
