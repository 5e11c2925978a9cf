"""Score metrics beyond ROUGE: BLEU and ROUGE against values worked out by hand, BERTScore offline with the packaged
MiniLM, an `evaluate` metric from a local script folder, several metrics in one resumable score job (the judge with
tiny-llama among them), the report's refusal to mix BERTScore settings, the agreement table, and the whole path
through a real burst worker."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import delete, func, select

from api.report import ReportQuery, metric_agreement, report_rows, resolve_metrics
from api.validate import check_metric_options
from models import make_session_factory
from models.errors import InputError
from models.jobs import Job, JobKind, JobStatus
from models.metrics import JUDGE_CRITERIA, METRIC_FAMILIES
from models.report import spearman
from models.results import ExampleScore, Generation, Judgement, Metric
from models.specs import GenerateSpec, ScoreSpec
from tests.conftest import check_rejected, cli, new_job, ok_json, session_of, sqlite_home, start_worker
from worker.jobs.score import score_rows
from worker.metrics.bertscore import BertScorer, default_model_folder
from worker.metrics.bleu import BleuScorer
from worker.metrics.rouge import rouge_scores

SAME = "the cat sat on the mat"
WORD_OVERLAP = '''
import datasets
import evaluate


class WordOverlap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="reference words found in the prediction", citation="",
                                   inputs_description="", features=datasets.Features(
                                       {"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scores = [len(set(p.split()) & set(r.split())) / len(set(r.split())) for p, r in zip(predictions, references)]
        return {"overlap": sum(scores) / len(scores), "scores": scores, "name": "not a number"}
'''


@pytest.fixture(scope="module")
def db(tmp_path_factory, builtin_home):
    home, url = sqlite_home(tmp_path_factory, builtin_home, "metrics-home")
    session = make_session_factory(url)()
    yield {"home": home, "session": session, "url": url}
    session.close()


@pytest.fixture
def offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def generated(session, runs: dict[str, list[tuple[str, str]]]) -> int:
    """A succeeded generate job with one row per (prediction, reference) of each variant; its id."""
    size = max(len(pairs) for pairs in runs.values())
    job = new_job(session, JobKind.generate, GenerateSpec(model="tiny-t5", model_kind="seq2seq", limit=size))
    job.status = JobStatus.succeeded
    for variant, pairs in runs.items():
        session.add_all([Generation(job_id=job.id, variant=variant, split="test", example_id=f"ex{i:02d}",
                                    source=f"Dialogue {i}: {reference}", prediction=prediction, reference=reference)
                         for i, (prediction, reference) in enumerate(pairs)])
    session.commit()
    return job.id


def scored(session, generate_job_id: int, **fields) -> tuple[int, dict]:
    spec = ScoreSpec(generate_job_id=generate_job_id, **fields)
    job = new_job(session, JobKind.score, spec)
    return job.id, score_rows(spec, session, job_id=job.id)


def stored(session, job_id: int, variant: str = "base") -> dict[str, float]:
    return dict(session.execute(select(Metric.name, Metric.value).where(Metric.job_id == job_id,
                                                                         Metric.variant == variant)).tuples().all())


# ------------------------------------------------------------------------------------------- by hand: BLEU, ROUGE
def test_bleu_against_hand_computed_values(db):
    # "the cat sat on a mat" vs SAME: clipped n-gram matches 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    one = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    # "the cat sat on" vs SAME: every n-gram matches, brevity penalty exp(1 - 6/4)
    short = 100 * math.exp(1 - 6 / 4)
    bleu = BleuScorer()
    assert bleu.score(["the cat sat on a mat"], [SAME]).aggregate["bleu"] == pytest.approx(one, abs=1e-9)
    assert bleu.score(["the cat sat on"], [SAME]).aggregate["bleu"] == pytest.approx(short, abs=1e-9)
    # corpus BLEU sums the counts over both pairs (11/12, 8/10, 6/8, 4/6), it is not the mean of sentence BLEU
    job_id, result = scored(db["session"], generated(db["session"], {"base": [(SAME, SAME),
                                                                          ("the cat sat on a mat", SAME)]}),
                            metrics=["bleu"])
    corpus = 100 * (11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25
    values = stored(db["session"], job_id)
    assert values["bleu"] == pytest.approx(corpus, abs=1e-9) and result["bleu"] == round(corpus, 4)
    assert values["bleu_sentence"] == pytest.approx((100 + one) / 2, abs=1e-9)
    per_example = db["session"].scalars(select(ExampleScore.value).where(ExampleScore.job_id == job_id)
                                        .order_by(ExampleScore.generation_id)).all()
    assert per_example == pytest.approx([100, one], abs=1e-9)


def test_rouge_against_hand_computed_values():
    # unigrams in common 5 of 6 each side; bigrams 3 of 5 ("the cat", "cat sat", "sat on"); LCS 5 of 6
    for fast in (True, False):
        (scores,) = rouge_scores(["the cat sat on a mat"], [SAME], fast=fast)
        assert scores["rouge1"] == pytest.approx(5 / 6) and scores["rouge2"] == pytest.approx(3 / 5)
        assert scores["rougeL"] == pytest.approx(5 / 6) and scores["rougeLsum"] == pytest.approx(5 / 6)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # d² = 0+1+1+0
    # a tie shares ranks 2 and 3: x ranks 1, 2.5, 2.5, 4; Pearson of the ranks 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None


# --------------------------------------------------------------------------------------------------- BERTScore
def test_bertscore_offline_ranks_a_paraphrase_first_and_equals_bert_score(offline):
    import bert_score

    candidates = ["a cat was sitting on the mat", "stock markets fell sharply on monday"]
    references = [SAME, SAME]
    ours = BertScorer("all-MiniLM-L6-v2", None, False, False, 32).score(candidates, references).per_example
    assert ours[0]["bertscore_f1"] > ours[1]["bertscore_f1"] + 0.2
    precision, recall, f1 = bert_score.score(candidates, references, model_type=default_model_folder(),
                                             num_layers=6)
    for mine, p, r, f in zip(ours, precision.tolist(), recall.tolist(), f1.tolist()):
        assert (mine["bertscore_precision"], mine["bertscore_recall"], mine["bertscore_f1"]) == \
            pytest.approx((p, r, f), abs=1e-6)


# ---------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_metric_from_a_local_script_folder(db, tmp_path, offline):
    folder = tmp_path / "word_overlap"
    folder.mkdir()
    (folder / "word_overlap.py").write_text(WORD_OVERLAP)
    metric = f"evaluate:{folder}"
    generate_job_id = generated(db["session"], {"base": [(SAME, SAME), ("a dog", SAME)]})
    job_id, result = scored(db["session"], generate_job_id, metrics=[metric])
    values = stored(db["session"], job_id)
    # 5 distinct reference words: all found, then none
    assert values == {"word_overlap_overlap": 0.5, "word_overlap_scores": 0.5}
    per_example = db["session"].scalars(select(ExampleScore.value).where(
        ExampleScore.job_id == job_id, ExampleScore.name == "word_overlap_scores").order_by(ExampleScore.id)).all()
    assert per_example == [1.0, 0.0]
    assert result["settings"] == {metric: {"evaluate": str(folder)}}
    query = resolve_metrics(db["session"], ReportQuery([metric]))
    assert query.metrics == ["word_overlap_overlap", "word_overlap_scores"]


def test_a_missing_local_evaluate_metric_is_refused_at_enqueue(sqlite_env, tmp_path):
    missing = tmp_path / "no_such_metric"
    with pytest.raises(InputError, match="no such metric script or folder"):
        check_metric_options(ScoreSpec(generate_job_id=1, metrics=[f"evaluate:{missing}"]))
    check_rejected(sqlite_env, ["score", "1", "--metric", f"evaluate:{missing}"], "no such metric script or folder")
    check_rejected(sqlite_env, ["score", "1", "--metric", "judge"], "--metric judge needs --judge-model")
    check_rejected(sqlite_env, ["score", "1", "--metric", "bertscore", "--bertscore-rescale"],
                   "no English baseline for 'all-MiniLM-L6-v2'")


# ------------------------------------------------------------------------------------ several metrics, resumed
def test_several_metrics_in_one_job_each_resumed_on_its_own(db, offline):
    session = db["session"]
    pairs = [(SAME, SAME), ("the cat sat on a mat", SAME), ("a dog barked", "the dog barked loudly")]
    generate_job_id = generated(session, {"base": pairs, "tuned": pairs[::-1]})
    spec = ScoreSpec(generate_job_id=generate_job_id, metrics=["rouge", "bleu", "bertscore"])
    job_id = new_job(session, JobKind.score, spec).id
    first = score_rows(spec, session, job_id=job_id)
    assert first["metrics"] == ["rouge", "bleu", "bertscore"]
    assert first["settings"]["bertscore"] == {"model": "all-MiniLM-L6-v2", "num_layers": 6, "idf": False,
                                              "rescale_with_baseline": False}
    names = {n for family in ("rouge", "bleu", "bertscore") for n in METRIC_FAMILIES[family]}
    assert set(stored(session, job_id)) == set(stored(session, job_id, "tuned")) == names
    assert session.scalar(select(func.count()).select_from(ExampleScore).where(ExampleScore.job_id == job_id)) \
        == 2 * 3 * (4 + 1 + 3)  # variants x examples x per-example metrics (bleu: the sentence BLEU)
    # an attempt that crashed after ROUGE and BERTScore were written but before BLEU was
    kept = set(session.scalars(select(Metric.id).where(Metric.job_id == job_id, Metric.name.not_like("bleu%"))))
    session.execute(delete(ExampleScore).where(ExampleScore.job_id == job_id, ExampleScore.name.like("bleu%")))
    session.execute(delete(Metric).where(Metric.job_id == job_id, Metric.name.like("bleu%")))
    session.commit()
    again = score_rows(spec, session, job_id=job_id)
    assert again == first
    assert kept <= set(session.scalars(select(Metric.id).where(Metric.job_id == job_id)))  # not recomputed


def test_judge_verdicts_resume_where_they_stopped(db):
    from models.settings import Settings
    from worker.metrics.judge import CRITERIA
    from worker.ml.model_cache import ModelCache

    assert tuple(CRITERIA) == JUDGE_CRITERIA  # the judge's criteria are the metric names' criteria
    session = db["session"]
    generate_job_id = generated(session, {"base": [(SAME, SAME), ("a dog", "the dog barked")]})
    spec = ScoreSpec(generate_job_id=generate_job_id, metrics=["judge"], judge_model="tiny-llama",
                     judge_references=True)
    job_id = new_job(session, JobKind.score, spec).id
    cache = ModelCache(db["home"], device="cpu")
    settings = Settings.from_env({"TUNEQUEUE_HOME": str(db["home"]), "DATABASE_URL": db["url"]})
    first = score_rows(spec, session, job_id=job_id, cache=cache, settings=settings)
    verdicts = session.scalars(select(Judgement).where(Judgement.job_id == job_id)).all()
    assert len(verdicts) == 4 * len(JUDGE_CRITERIA)  # two summaries and two references
    assert all(v.parsed and 1 <= v.score <= 5 for v in verdicts)  # probabilities: always a score
    assert {v.variant for v in verdicts} == {"base", "reference"}
    assert first["settings"]["judge"] == {"backend": "local", "model": "tiny-llama", "scoring": "probabilities"}
    assert set(stored(session, job_id, "reference")) == set(METRIC_FAMILIES["judge"])
    # a crash after three of the four examples' verdicts were committed, before the means were written
    lost = verdicts[0]
    kept = {v.id for v in verdicts if (v.variant, v.example_id) != (lost.variant, lost.example_id)}
    session.execute(delete(Judgement).where(Judgement.job_id == job_id, Judgement.variant == lost.variant,
                                            Judgement.example_id == lost.example_id))
    session.execute(delete(Metric).where(Metric.job_id == job_id))
    session.commit()
    again = score_rows(spec, session, job_id=job_id, cache=cache, settings=settings)
    after = session.scalars(select(Judgement).where(Judgement.job_id == job_id)).all()
    assert len(after) == len(verdicts) and kept <= {v.id for v in after}  # only the lost example judged again
    assert again == first  # the model's probabilities are deterministic: the same verdicts, the same means


# ------------------------------------------------------------------------------------------------------ report
def test_report_refuses_bertscore_of_different_settings_in_one_column(db):
    session = db["session"]
    generate_job_id = generated(session, {"left": [(SAME, SAME)], "right": [(SAME, SAME)]})
    job = new_job(session, JobKind.score, ScoreSpec(generate_job_id=generate_job_id))
    for variant, model, layers in (("left", "all-MiniLM-L6-v2", 6), ("right", "roberta-large", 17)):
        session.add(Metric(job_id=job.id, generate_job_id=generate_job_id, variant=variant, base_model="mixed",
                           split="mixed", name="bertscore_f1", value=0.9, n_examples=1,
                           settings={"model": model, "num_layers": layers, "idf": False,
                                     "rescale_with_baseline": False}))
    session.commit()
    with pytest.raises(InputError) as refused:
        report_rows(session, ReportQuery(["bertscore_f1"], split="mixed"))
    message = str(refused.value)
    assert "\n" not in message and "bertscore_f1 was scored with different settings" in message
    assert "model=all-MiniLM-L6-v2 num_layers=6 idf=off" in message and "model=roberta-large num_layers=17" in message


def test_agreement_of_per_example_scores(db):
    session = db["session"]
    generate_job_id = generated(session, {"agree": [(f"p{i}", f"r{i}") for i in range(4)]})
    job = new_job(session, JobKind.score, ScoreSpec(generate_job_id=generate_job_id))
    rows = session.scalars(select(Generation).where(Generation.job_id == generate_job_id)
                           .order_by(Generation.example_id)).all()
    columns = {"m_one": [1, 2, 3, 4], "m_two": [1, 3, 2, 4], "m_three": [4, 3, 2, 1]}
    for name, values in columns.items():
        session.add_all([ExampleScore(job_id=job.id, generation_id=row.id, name=name, value=value)
                         for row, value in zip(rows, values)])
        session.add(Metric(job_id=job.id, generate_job_id=generate_job_id, variant="agree", base_model="tiny-t5",
                           split="agreement", name=name, value=2.5, n_examples=4))
    session.commit()
    pairs = metric_agreement(session, ReportQuery(list(columns), split="agreement"))
    found = {(p["metric_a"], p["metric_b"]): (p["spearman"], p["examples"]) for p in pairs}
    assert found[("m_one", "m_two")] == (pytest.approx(0.8), 4)
    assert found[("m_one", "m_three")] == (pytest.approx(-1.0), 4)
    assert found[("m_two", "m_three")] == (pytest.approx(-0.8), 4)
    with pytest.raises(InputError, match="name at least two"):
        metric_agreement(session, ReportQuery(["m_one"], split="agreement"))


# ----------------------------------------------------------------------------------------------- real worker
@pytest.mark.slow
def test_rouge_bleu_bertscore_and_judge_through_a_real_worker(sqlite_env, tmp_path):
    env = {**sqlite_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    generate = ok_json(cli(env, "generate", "--limit", "6", "--json"))
    burst = start_worker(env, "--burst", log=tmp_path / "generate.log")
    assert burst.wait(timeout=600) == 0, (tmp_path / "generate.log").read_text()[-3000:]
    queued = ok_json(cli(env, "score", str(generate["id"]), "--metric", "rouge", "--metric", "bleu", "--metric",
                         "bertscore", "--metric", "judge", "--judge-model", "tiny-llama", "--judge-references",
                         "--json"))
    burst = start_worker(env, "--burst", log=tmp_path / "score.log")
    assert burst.wait(timeout=900) == 0, (tmp_path / "score.log").read_text()[-3000:]
    with session_of(env) as session:
        job = session.get(Job, queued["id"])
        assert job.status == JobStatus.succeeded, job.error
        assert job.spec["metrics"] == ["rouge", "bleu", "bertscore", "judge"]
        assert set(job.result["settings"]) == {"bertscore", "judge"} and job.result["judge_unparsed"] == 0
    rows = ok_json(cli(env, "report", "--metric", "rouge", "--metric", "bleu", "--metric", "bertscore", "--metric",
                       "judge", "--format", "json"))
    assert [r["variant"] for r in rows] == ["base", "reference"]
    base, reference = rows
    for name in ("rouge1", "bleu", "bleu_sentence", "bertscore_f1", "judge_relevance", "judge_fluency"):
        assert base[name] is not None, name
    assert base["bertscore_f1_ci_low"] <= base["bertscore_f1"] <= base["bertscore_f1_ci_high"]
    assert reference["judge_coherence"] is not None and reference.get("rouge1") is None
    table = cli(env, "report", "--metric", "judge", "--metric", "bertscore")
    assert table.returncode == 0 and "judge_relevance" in table.stdout and "reference" in table.stdout, table.stderr
    agreement = ok_json(cli(env, "report", "--agreement", "--metric", "rouge1", "--metric", "bertscore_f1",
                            "--metric", "judge_relevance", "--format", "json"))
    assert [(p["metric_a"], p["metric_b"]) for p in agreement][:2] == [("rouge1", "bertscore_f1"),
                                                                       ("rouge1", "judge_relevance")]
    assert all(p["examples"] == 6 for p in agreement)
    plot = tmp_path / "judge.png"
    assert cli(env, "report", "--metric", "judge", "--plot", str(plot)).returncode == 0 and plot.stat().st_size
    help_text = cli(env, "score", "--help").stdout
    assert all(f"  {family}:" in help_text for family in ("rouge", "bleu", "bertscore", "judge", "classification"))


def test_the_http_door_refuses_code_metrics_unless_allowed(sqlite_env, tmp_path, monkeypatch):
    """An `evaluate:` metric runs its script on the workers: the API takes it only with TUNEQUEUE_API_EVALUATE=1,
    and refuses it before anything is written (the CLI, whose user runs code anyway, always takes it)."""
    from fastapi.testclient import TestClient

    from api.web.app import create_app
    from tests.conftest import create_token, job_count

    token = create_token(sqlite_env, "writer")
    sweep = {"name": "code", "base": {"model": "tiny-t5", "max_steps": 2}, "grid": {"learning_rate": [1e-3]},
             "eval": {"limit": 4, "metrics": ["rouge", "evaluate:exact_match"]}}
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app()) as client:
        for path, body in (("/jobs", {"kind": "score", "generate_job_id": 1, "metrics": ["evaluate:exact_match"]}),
                           ("/sweeps", sweep)):
            answer = client.post(path, json=body, headers=headers)
            assert answer.status_code == 422 and "TUNEQUEUE_API_EVALUATE=1" in answer.json()["detail"], answer.text
    assert job_count(sqlite_env) == 0
    monkeypatch.setenv("TUNEQUEUE_API_EVALUATE", "1")
    with TestClient(create_app()) as client:  # allowed: the sweep gets past the gate to its dry run
        answer = client.post("/sweeps?dry_run=true", json=sweep, headers=headers)
        assert answer.status_code == 200, answer.text


def test_rouge_without_stemming_is_not_comparable_with_stemmed():
    from worker.metrics.rouge import RougeScorer

    assert RougeScorer(True).settings is None and RougeScorer(False).settings == {"use_stemmer": False}
