"""BLEU by sacrebleu with its defaults (13a tokenisation, one reference): a variant's `bleu` row is corpus BLEU over
its rows (n-gram counts summed over the corpus, one brevity penalty), the number papers report; corpus BLEU is not
a mean of per-example values, so each example gets its sentence BLEU (exponential smoothing, sacrebleu's
`sentence_bleu`) under `bleu_sentence`, whose mean is the `bleu_sentence` row and which gives the report its
interval, box plot and agreement. Both on sacrebleu's 0-100 scale."""

from __future__ import annotations

from typing import Optional

from worker.metrics.base import Scored


class BleuScorer:
    settings = None  # sacrebleu's defaults, always

    def score(self, predictions: list[str], references: list[str], *, labels: Optional[list[str]] = None) -> Scored:
        import sacrebleu

        per_example = [{"bleu_sentence": sacrebleu.sentence_bleu(p, [r]).score}
                       for p, r in zip(predictions, references)]
        corpus = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
        sentence_mean = sum(v["bleu_sentence"] for v in per_example) / len(per_example)
        return Scored(per_example, {"bleu": corpus, "bleu_sentence": sentence_mean})
