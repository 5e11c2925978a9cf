"""Examples → token ids for each model kind, padded batches, and the tokenization cache.

- seq2seq: encoder input = prompt, labels = summary ids (+ EOS from the tokenizer).
- causal: one sequence prompt + summary + EOS; labels are -100 over the prompt, so the loss is the summary's only.
- classification: input = text, label = the label's index.

Tokenized features are cached under `TUNEQUEUE_HOME/cache/tokenized`, keyed by a hash of the tokenizer, the model kind,
the lengths, the label set and the examples' text, so that twenty jobs of a sweep on one dataset tokenize once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Optional

CACHE_FORMAT = "1"


def encode(model_kind: str, tokenizer, examples: list[dict], *, max_source_length: int, max_target_length: int,
           label2id: Optional[dict[str, int]] = None) -> list[dict]:
    sources = tokenizer([e["source"] for e in examples], truncation=True, max_length=max_source_length)["input_ids"]
    if model_kind == "classification":
        return [{"input_ids": ids, "label": label2id[e["target"]]} for ids, e in zip(sources, examples)]
    if model_kind == "causal":
        targets = tokenizer([e["target"] for e in examples], add_special_tokens=False, truncation=True,
                            max_length=max_target_length)["input_ids"]
        eos = [tokenizer.eos_token_id]
        return [{"input_ids": src + tgt + eos, "labels": [-100] * len(src) + tgt + eos}
                for src, tgt in zip(sources, targets)]
    targets = tokenizer([e["target"] for e in examples], truncation=True, max_length=max_target_length)["input_ids"]
    return [{"input_ids": src, "labels": tgt} for src, tgt in zip(sources, targets)]


def tokenizer_fingerprint(tokenizer) -> str:
    cached = getattr(tokenizer, "_tunequeue_fingerprint", None)
    if cached is None:
        backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(
            sorted(tokenizer.get_vocab().items()))
        cached = hashlib.sha256(f"{backend}|{tokenizer.all_special_ids}|{tokenizer.padding_side}".encode()
                                ).hexdigest()
        tokenizer._tunequeue_fingerprint = cached
    return cached


def cached_encode(home: Optional[Path], model_kind: str, tokenizer, examples: list[dict], **options) -> tuple[list[dict], bool]:
    """`encode` through the on-disk cache; returns (features, whether they came from the cache)."""
    if home is None:
        return encode(model_kind, tokenizer, examples, **options), False
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT, model_kind, tokenizer_fingerprint(tokenizer), options], sort_keys=True,
                             default=str).encode())
    for example in examples:
        digest.update(f"{example['source']}\x00{example['target']}\x01".encode())
    path = home / "cache" / "tokenized" / f"{digest.hexdigest()}.pkl"
    if path.exists():
        try:
            with path.open("rb") as f:
                return pickle.load(f), True
        except (OSError, EOFError, pickle.UnpicklingError):
            pass  # a damaged entry is rebuilt
    features = encode(model_kind, tokenizer, examples, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    with staging.open("wb") as f:
        pickle.dump(features, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(staging, path)
    return features, False


def pad(sequences: list[list[int]], value: int, left: bool = False):
    import torch

    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s))
                         for s in sequences])


def attention_mask(sequences: list[list[int]], left: bool = False):
    return pad([[1] * len(s) for s in sequences], 0, left)


def collate(features: list[dict], indices: list[int], pad_id: int, device) -> dict:
    """A training/eval batch: right-padded inputs, its mask, and labels (-100 padding, or label indices)."""
    import torch

    inputs = [features[i]["input_ids"] for i in indices]
    batch = {"input_ids": pad(inputs, pad_id), "attention_mask": attention_mask(inputs)}
    if "label" in features[indices[0]]:
        batch["labels"] = torch.tensor([features[i]["label"] for i in indices])
    else:
        batch["labels"] = pad([features[i]["labels"] for i in indices], -100)
    if str(device).startswith("cuda"):  # page-locked host memory: the copy overlaps the GPU's work, no sync
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def label_tokens(batch: dict) -> int:
    labels = batch["labels"]
    return int(labels.numel()) if labels.dim() == 1 else int((labels != -100).sum())
