"""TPE sweeps and rung metrics: Optuna's sampler proposes every point inside the random block's distributions, keeps
`parallel` in flight, records each trial (with the point's final metric) in tunequeue's own database on SQLite and
PostgreSQL; the rung metric (ROUGE, accuracy, F1) equals what the scorers compute; an ASHA sweep decided on ROUGE-1
prunes the lower values; a bad TPE block is refused in one line with nothing written."""

from __future__ import annotations

import copy
import json
import math

import pytest
import yaml
from sqlalchemy import func, inspect, select, text

from models.jobs import Job, JobKind, JobStatus, JobWait
from models.results import Generation
from models.search import Rung
from models.sweeps import Sweep
from tests.conftest import check_rejected, cli, job_count, ok_json, queue_length, session_of, settings_of, \
    start_worker

LR_LOW, LR_HIGH, RANKS = 1e-4, 1e-2, [4, 8, 16]
TINY = {"model": "tiny-t5", "max_steps": 10, "train_limit": 64, "eval_limit": 8, "per_device_train_batch_size": 8,
        "target_modules": ["q", "v"]}
TPE = {"name": "tpe", "base": TINY,
       "random": {"learning_rate": {"low": LR_LOW, "high": LR_HIGH, "log": True}, "lora_r": RANKS},
       "strategy": {"kind": "tpe", "n": 5, "parallel": 2}, "eval": {"split": "test", "limit": 6}}


def write(tmp_path, data, name="sweep.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def submitted(args: list[str]) -> dict:
    """`manage.py sweep ARGS --json` run in this process (the environment applied to it), its JSON answer."""
    from click.testing import CliRunner

    from manage import cli as manage_cli

    result = CliRunner().invoke(manage_cli, ["sweep", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def inside(params: dict) -> bool:
    return LR_LOW <= params["learning_rate"] <= LR_HIGH and params["lora_r"] in RANKS


def study_of(env: dict, sweep_name: str):
    """The sweep's study as Optuna loads it (through tunequeue's storage: Optuna's own version check would read
    tunequeue's alembic revision from the table the two share)."""
    import optuna

    from models.search import optuna_storage

    with session_of(env) as session:
        name = session.scalar(select(Sweep).where(Sweep.name == sweep_name)).spec["strategy"]["study"]
    return optuna.load_study(study_name=name, storage=optuna_storage(settings_of(env).database_url))


def study_count(env: dict) -> int:
    from models.search import optuna_storage

    return len(optuna_storage(settings_of(env).database_url).get_all_studies())


def most_in_flight(jobs: list[Job]) -> int:
    """The most fine-tunes queued or running at one moment: each is in flight from its creation to its end."""
    return max(sum(j.created_at <= moment < j.finished_at for j in jobs) for moment in (j.created_at for j in jobs))


# ---------------------------------------------------------------------------------------------- through a worker
@pytest.mark.slow
def test_tpe_sweep_through_a_worker(env, tmp_path):
    queued = cli(env, "sweep", write(tmp_path, TPE))
    assert queued.returncode == 0, queued.stderr
    with session_of(env) as session:
        at_submit = session.scalars(select(Job).order_by(Job.id)).all()
        assert [j.kind for j in at_submit] == [JobKind.finetune] * 2 + [JobKind.generate, JobKind.score]
    assert queue_length(env) == 2  # the two first trials; the evaluation waits

    worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    with session_of(env) as session:
        sweep = session.scalar(select(Sweep).where(Sweep.name == "tpe"))
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        finetunes = [j for j in jobs if j.kind == JobKind.finetune]
        evaluation = next(j for j in jobs if j.kind == JobKind.generate)
        waits = set(session.scalars(select(JobWait.waits_for_id).where(JobWait.job_id == evaluation.id)))
        variants = dict(session.execute(select(Generation.variant, func.count(Generation.id))
                                        .group_by(Generation.variant)).all())
    assert len(finetunes) == 5 and sweep.points == 5
    assert sweep.spec["strategy"]["distributions"] == {
        "learning_rate": {"name": "FloatDistribution", "attributes": {"low": LR_LOW, "high": LR_HIGH, "log": True,
                                                                       "step": None}},
        "lora_r": {"name": "CategoricalDistribution", "attributes": {"choices": RANKS}}}
    assert all(j.status == JobStatus.succeeded for j in jobs), [(j.id, j.status, j.error) for j in jobs]
    for job in finetunes:
        assert inside(job.spec) and job.spec["search"]["strategy"] == "tpe", job.spec
        assert job.spec["max_steps"] == 10 and job.result["steps"] == 10
    assert len({(j.spec["learning_rate"], j.spec["lora_r"]) for j in finetunes}) == 5
    assert most_in_flight(finetunes) == 2

    # the evaluation waited for every point (those proposed later too) and generated for base + each adapter
    assert waits == {j.id for j in finetunes}
    assert evaluation.started_at >= max(j.finished_at for j in finetunes)
    names = [j.spec["name"] for j in finetunes]
    # its spec lists the points proposed at submit; the later ones join through job_waits when it runs
    assert evaluation.spec["adapters"] == ["base", *names[:2]] and evaluation.result["variants"] == ["base", *names]
    assert variants == {name: 6 for name in ["base", *names]}

    # Optuna's study, in the same database: one COMPLETE trial per point, its value the point's search_value
    study = study_of(env, "tpe")
    with session_of(env) as session:  # tunequeue's own connection sees Optuna's rows next to its jobs
        tables = set(inspect(session.get_bind()).get_table_names())
        states = session.execute(text("SELECT t.state FROM trials t JOIN studies s ON s.study_id = t.study_id "
                                      "WHERE s.study_name = :name"), {"name": study.study_name}).scalars().all()
    assert {"jobs", "job_waits", "rungs", "studies", "trials", "trial_params", "trial_values"} <= tables
    assert states == ["COMPLETE"] * 5
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(5))
    by_trial = {j.spec["search"]["trial"]: j for j in finetunes}
    for trial in trials:
        job = by_trial[trial.number]
        assert trial.state.name == "COMPLETE" and inside(trial.params)
        assert trial.params == {"learning_rate": job.spec["learning_rate"], "lora_r": job.spec["lora_r"]}
        assert trial.value == job.result["search_value"] and math.isfinite(trial.value)
    assert study.direction.name == "MINIMIZE"  # eval_loss, the default metric
    assert {t.number: t.value for t in trials} == {n: r.value for n, r in _complete_rungs(env, by_trial).items()}

    rows = json.loads(cli(env, "report", "--sweep", "tpe", "--format", "json").stdout)
    assert [r["variant"] for r in rows] == ["base", *names]
    assert {(r["learning_rate"], r["lora_r"]) for r in rows[1:]} == {
        (j.spec["learning_rate"], j.spec["lora_r"]) for j in finetunes}


def _complete_rungs(env: dict, by_trial: dict) -> dict:
    """The `complete` rung row of each trial's job."""
    with session_of(env) as session:
        rungs = {r.job_id: r for r in session.scalars(select(Rung).where(Rung.decision == "complete"))}
    return {number: rungs[job.id] for number, job in by_trial.items()}


# ------------------------------------------------------------------------------------- proposals, no worker needed
def test_trials_of_one_study_never_repeat_and_a_dry_run_creates_no_study(sqlite_env, tmp_path):
    """Every trial asked (at submit, then as points end) samples with the seed moved on by the trials before it: a
    continuous space never gets the same point twice; the sweep keeps `parallel` in flight and stops at `n`."""
    from worker.search import next_trials, trial_ended

    env = sqlite_env
    data = {**TPE, "random": {"learning_rate": TPE["random"]["learning_rate"],
                              "lora_dropout": {"low": 0.0, "high": 0.3}},
            "strategy": {"kind": "tpe", "n": 7, "parallel": 3, "startup_trials": 2}}
    assert submitted([write(tmp_path, data), "--dry-run"])["strategy"]["n"] == 7
    assert study_count(env) == 0 and job_count(env) == 0
    submitted([write(tmp_path, data)])
    assert study_count(env) == 1

    settings = settings_of(env)
    with session_of(env) as session:
        sweep_id = session.scalar(select(Sweep.id))
        while True:
            queued = session.scalars(select(Job).where(Job.kind == JobKind.finetune, Job.status == JobStatus.queued)
                                     .order_by(Job.id)).all()
            assert len(queued) == min(3, 7 - job_count_of(session, JobStatus.succeeded)), len(queued)
            if not queued:
                break
            ended = queued[:2]  # two points end (with their metric) before the sweep asks for more
            for job in ended:
                job.status = JobStatus.succeeded
                job.result = {"steps": 10, "search_value": job.spec["learning_rate"]}
                session.commit()
                trial_ended(settings, session, job)
            for _ in ended:  # each ended trial hands its place to one new trial, until n have been asked
                proposed_before = job_count(env) - 2  # less the evaluation and its score
                assert len(next_trials(settings, session, sweep_id)) == (1 if proposed_before < 7 else 0)
            assert session.get(Sweep, sweep_id).points == 7  # what the sweep will have, as at submit
            assert session.get(Sweep, sweep_id).trials_asked == job_count(env) - 2
        finetunes = session.scalars(select(Job).where(Job.kind == JobKind.finetune)).all()
        evaluation = session.scalar(select(Job).where(Job.kind == JobKind.generate))
        waits = set(session.scalars(select(JobWait.waits_for_id).where(JobWait.job_id == evaluation.id)))
    assert len(finetunes) == 7 and waits == {j.id for j in finetunes}
    trials = study_of(env, "tpe").get_trials()
    assert len(trials) == 7 and all(t.state.name == "COMPLETE" for t in trials)
    points = [(t.params["learning_rate"], t.params["lora_dropout"]) for t in trials]
    assert len(set(points)) == 7, points
    assert all(LR_LOW <= lr <= LR_HIGH and 0 <= dropout <= 0.3 for lr, dropout in points)

    submitted([write(tmp_path, {**data, "name": "again"}), "--dry-run"])
    assert study_count(env) == 1


def job_count_of(session, status: JobStatus) -> int:
    return session.scalar(select(func.count(Job.id)).where(Job.kind == JobKind.finetune, Job.status == status))


def test_same_seed_proposes_the_same_first_points(sqlite_env, tmp_path):
    """strategy.seed makes a sweep's proposals reproducible: the k-th trial asked samples with seed + k."""
    env = sqlite_env
    firsts = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        data = {**TPE, "name": name, "strategy": {**TPE["strategy"], "seed": seed, "parallel": 3}}
        submitted([write(tmp_path, data)])
        with session_of(env) as session:
            jobs = session.scalars(select(Job).join(Sweep, Job.sweep_id == Sweep.id).where(
                Sweep.name == name, Job.kind == JobKind.finetune).order_by(Job.id)).all()
            firsts[name] = [(j.spec["learning_rate"], j.spec["lora_r"]) for j in jobs]
    assert firsts["a"] == firsts["b"] and firsts["a"] != firsts["c"] and len(firsts["a"]) == 3
    assert len(set(firsts["a"])) == 3


# -------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("change, expected", [
    ({"random": {**TPE["random"], "n": 4}}, "random.n: a tpe strategy proposes strategy.n points"),
    ({"random": {}}, "strategy tpe: give the random block's distributions"),
    ({"grid": {"target_modules": [["q", "v"], ["q", "k", "v"]]}},
     "grid.target_modules: TPE samples numbers, strings and booleans only"),
    ({"strategy": {"kind": "tpe", "n": 1001}}, "strategy: n: Input should be less than or equal to 1000 (got 1001)"),
    ({"strategy": {"kind": "tpe", "n": 5, "parallel": 0}}, "strategy: parallel: Input should be greater than 0 (got 0)"),
])
def test_bad_tpe_blocks_are_refused_in_one_line(sqlite_env, tmp_path, change, expected):
    check_rejected(sqlite_env, ["sweep", write(tmp_path, {**TPE, **change})], expected)
    assert study_count(sqlite_env) == 0
    with session_of(sqlite_env) as session:
        assert session.scalar(select(func.count(Sweep.id))) == 0


# ------------------------------------------------------------------------------------------- the rung metric
@pytest.fixture(scope="module")
def rung_lab(tmp_path_factory, builtin_home):
    """A model cache on a home with the built-ins, and a way to get a spec's prepared eval features and model."""
    from tests.conftest import sqlite_home
    from worker.jobs.finetune import prepare
    from worker.ml.kinds import resolve_model_kind
    from worker.ml.model_cache import ModelCache
    from models.specs import FinetuneSpec

    home, _url = sqlite_home(tmp_path_factory, builtin_home, "rung-home")
    cache = ModelCache(home)

    def prepared(**fields):
        spec = resolve_model_kind(FinetuneSpec(name="rung", train_limit=16, **fields))
        return spec, prepare(spec, cache, home)

    return prepared


def test_rouge_at_a_rung_is_the_scorer_rouge_of_its_greedy_summaries(rung_lab):
    import torch

    from worker.jobs.rung_metric import rung_value
    from worker.metrics.rouge import rouge_scores

    spec, prepared = rung_lab(model="tiny-t5", eval_split="validation", eval_limit=12, max_target_length=24)
    loaded, features = prepared.loaded, prepared.evaluation
    assert len(features) == 12
    predictions, references = [], []
    with torch.no_grad():  # one example at a time: no padding, nothing shared with the batched path
        for feature in features:
            output = loaded.model.generate(input_ids=torch.tensor([feature["input_ids"]]), max_new_tokens=24,
                                           do_sample=False, num_beams=1, no_repeat_ngram_size=3)
            predictions.append(loaded.tokenizer.decode(output[0], skip_special_tokens=True).strip())
            references.append(loaded.tokenizer.decode([t for t in feature["labels"] if t != -100],
                                                      skip_special_tokens=True).strip())
    assert len(set(predictions)) > 1 and all(references)
    scores = rouge_scores(predictions, references)
    for metric in ("rouge1", "rougeL"):
        value = rung_value(loaded.model, metric, features, loaded.tokenizer, loaded.device, "seq2seq",
                           batch_size=4, max_new_tokens=24, eval_loss=lambda: pytest.fail("not the loss"))
        expected = sum(s[metric] for s in scores) / len(scores)
        assert 0 < value < 1 and value == pytest.approx(expected, abs=1e-9), metric
    assert rung_value(loaded.model, "eval_loss", features, loaded.tokenizer, loaded.device, "seq2seq", batch_size=4,
                      max_new_tokens=24, eval_loss=lambda: 2.5) == 2.5


def test_accuracy_and_f1_at_a_rung_are_the_scorer_metrics_of_the_head_labels(rung_lab):
    import torch

    from worker.jobs.rung_metric import rung_value
    from worker.metrics.classification import classification_metrics

    spec, prepared = rung_lab(model="tiny-bert", dataset="synthetic-sentiment", eval_split="validation",
                              eval_limit=24)
    loaded, features = prepared.loaded, prepared.evaluation
    head = [str(i) for i in range(loaded.model.config.num_labels)]
    assert prepared.labels == ["negative", "positive"] and head == ["0", "1"]

    def predicted(model, subset: list[dict]) -> list[str]:
        with torch.no_grad():
            return [str(model(input_ids=torch.tensor([f["input_ids"]])).logits.argmax(-1).item()) for f in subset]

    def at_rung(model, metric: str, subset: list[dict]) -> float:
        return rung_value(model, metric, subset, loaded.tokenizer, loaded.device, "classification",
                          batch_size=5, max_new_tokens=8, eval_loss=lambda: pytest.fail("not the loss"))

    truths = [str(f["label"]) for f in features]
    assert set(truths) == {"0", "1"}
    expected = classification_metrics(predicted(loaded.model, features), truths, head)
    for metric in ("accuracy", "f1"):
        assert at_rung(loaded.model, metric, features) == pytest.approx(expected[metric], abs=1e-12), metric

    # an eval split that happens to hold one class, all predicted right: F1 is still the positive label's (the
    # score job's), not the one class's
    negative_only = copy.deepcopy(loaded.model)
    with torch.no_grad():
        negative_only.classifier.bias[0] += 100.0
    negatives = [f for f in features if f["label"] == 0]
    assert set(predicted(negative_only, negatives)) == {"0"}
    expected = classification_metrics(["0"] * len(negatives), ["0"] * len(negatives), head)
    assert expected["accuracy"] == 1.0 and expected["f1"] == 0.0  # no positive example: no true positive
    assert at_rung(negative_only, "accuracy", negatives) == 1.0
    assert at_rung(negative_only, "f1", negatives) == 0.0


@pytest.mark.slow
def test_asha_decided_on_rouge1_keeps_the_higher_values(sqlite_env, tmp_path):
    """mode is max by default for ROUGE: a point goes on only when its ROUGE-1 at the rung is the best so far there
    (with three points and η 3, the top third of those that reached it), else it is pruned."""
    env = sqlite_env
    data = {"name": "rouge", "base": {**TINY, "eval_limit": 8, "max_target_length": 24},
            "grid": {"learning_rate": [1e-4, 3e-2, 3e-3]},
            "strategy": {"kind": "asha", "metric": "rouge1", "min_steps": 3, "max_steps": 9, "reduction_factor": 3,
                         "order": "as-written", "promotion": "eager"},
            "eval": {"split": "test", "limit": 6}}
    data["base"].pop("max_steps")
    ok_json(cli(env, "sweep", write(tmp_path, data), "--json"))
    worker = start_worker(env, "--burst", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    with session_of(env) as session:
        finetunes = {j.id: j for j in session.scalars(select(Job).where(Job.kind == JobKind.finetune))}
        rungs = session.scalars(select(Rung).order_by(Rung.id)).all()
        evaluation = session.scalar(select(Job).where(Job.kind == JobKind.generate))
    assert all(r.metric == "rouge1" and 0 <= r.value <= 1 for r in rungs)
    first = [r for r in rungs if r.step == 3]
    assert sorted(r.job_id for r in first) == sorted(finetunes)  # every point was decided at the first rung
    for index, rung in enumerate(first):  # asynchronous: against the values that had arrived before it
        best_so_far = max(r.value for r in first[:index + 1])
        assert rung.decision == ("promote" if rung.value >= best_so_far else "prune"), rung.reason
    for job_id, job in finetunes.items():
        own = [r for r in rungs if r.job_id == job_id]
        if job.status == JobStatus.pruned:
            assert [(r.step, r.decision) for r in own] == [(3, "prune")]
            assert job.result["pruned"]["step"] == 3 and job.result["pruned"]["value"] == pytest.approx(own[0].value)
        else:
            assert job.status == JobStatus.succeeded and [(r.step, r.decision) for r in own] == [
                (3, "promote"), (9, "complete")]
            assert job.result["steps"] == 9 and job.result["search_value"] == own[1].value
    assert {j.status for j in finetunes.values()} == {JobStatus.pruned, JobStatus.succeeded}
    assert evaluation.status == JobStatus.succeeded
    assert study_of(env, "rouge").direction.name == "MAXIMIZE"
