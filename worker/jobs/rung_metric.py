"""The metric an ASHA or TPE sweep point reports at a rung, computed on its eval split with the model as it is at
that step: the eval loss, ROUGE of greedy summaries (seq2seq and causal models), or accuracy / macro F1 of a
classifier's labels."""

from __future__ import annotations

from models.search import CLASSIFICATION_METRICS, GENERATION_METRICS

GENERATE_BATCH = 32


def rung_value(model, metric: str, features: list[dict], tokenizer, device, model_kind: str, *, batch_size: int,
               max_new_tokens: int, eval_loss) -> float:
    """`metric` of `model` on `features` (the eval split's); `eval_loss()` gives the loss when that is the metric."""
    if metric == "eval_loss":
        return float(eval_loss())
    was_training = model.training
    model.eval()
    try:
        if metric in GENERATION_METRICS:
            return _rouge(model, metric, features, tokenizer, device, model_kind, max_new_tokens)
        if metric in CLASSIFICATION_METRICS:
            return _classification(model, metric, features, tokenizer, device, batch_size)
    finally:
        model.train(was_training)
    raise ValueError(f"unknown rung metric {metric!r}")


def _rouge(model, metric: str, features: list[dict], tokenizer, device, model_kind: str,
           max_new_tokens: int) -> float:
    import torch

    from worker.metrics.rouge import rouge_scores
    from worker.ml.features import attention_mask, pad

    left = model_kind == "causal"
    prompts, references = [], []
    for feature in features:
        labels = feature["labels"]
        if left:  # prompt + summary + EOS, with -100 over the prompt
            prompts.append([t for t, label in zip(feature["input_ids"], labels) if label == -100])
        else:
            prompts.append(list(feature["input_ids"]))
        references.append(tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True).strip())
    predictions = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_index = {}
    with torch.no_grad():
        for start in range(0, len(order), GENERATE_BATCH):
            part = order[start:start + GENERATE_BATCH]
            ids = [prompts[i] for i in part]
            input_ids = pad(ids, tokenizer.pad_token_id, left=left).to(device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask(ids, left=left).to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    no_repeat_ngram_size=3, pad_token_id=tokenizer.pad_token_id)
            if left:
                output = output[:, input_ids.shape[1]:]
            for i, text in zip(part, tokenizer.batch_decode(output, skip_special_tokens=True)):
                by_index[i] = text.strip()
    predictions = [by_index[i] for i in range(len(prompts))]
    scores = rouge_scores(predictions, references)
    return sum(s[metric] for s in scores) / max(len(scores), 1)


def _classification(model, metric: str, features: list[dict], tokenizer, device, batch_size: int) -> float:
    import torch

    from worker.metrics.classification import classification_metrics
    from worker.ml.features import collate

    predicted, truth = [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            indices = list(range(start, min(start + batch_size, len(features))))
            batch = collate(features, indices, tokenizer.pad_token_id, device)
            labels = batch.pop("labels")
            predicted += model(**batch).logits.argmax(-1).tolist()
            truth += labels.tolist()
    # the head's label ids as strings (not the ones this split happens to hold): F1 is the positive (last) label's
    # when binary, as the score job's is
    labels = [str(x) for x in range(model.config.num_labels)]
    return classification_metrics([str(p) for p in predicted], [str(t) for t in truth], labels)[metric]
