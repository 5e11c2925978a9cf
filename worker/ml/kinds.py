"""Model kinds (model kinds): seq2seq, causal LM and sequence classification, told apart from a model's config.

`detect_model_kind` reads `config.json` only (no torch), so the CLI can check a job before enqueueing it;
`load_model` loads weights with the Auto class of its kind, optionally in 4-bit (QLoRA) or in a given dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from models.builtins import BUILTIN_MODELS
from models.errors import InputError

AUTO_CLASSES = {
    "seq2seq": "AutoModelForSeq2SeqLM",
    "causal": "AutoModelForCausalLM",
    "classification": "AutoModelForSequenceClassification",
}
PEFT_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "classification": "SEQ_CLS"}
# Encoder-only families: without a head in `architectures`, these are loaded for classification.
ENCODER_MODEL_TYPES = {"bert", "distilbert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra",
                       "albert", "camembert", "modernbert"}


def model_kind_from_config(config: dict) -> str:
    for architecture in config.get("architectures") or []:
        if architecture.endswith("ForConditionalGeneration") and config.get("is_encoder_decoder", True):
            return "seq2seq"
        if architecture.endswith("ForCausalLM"):
            return "causal"
        if architecture.endswith("ForSequenceClassification"):
            return "classification"
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    if config.get("model_type") in ENCODER_MODEL_TYPES:
        return "classification"
    if config.get("model_type"):
        return "causal"
    raise InputError("cannot tell the model's kind from its config.json; pass --model-kind")


def read_config(ref: str) -> Optional[dict]:
    """config.json of a local folder or of a hub id in the local cache; None when it is not at hand. InputError when
    it is not a JSON object."""
    path = Path(ref).expanduser()
    if path.is_dir():
        file = path / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the config of model {ref!r}: {exc}") from None
    if not isinstance(config, dict):
        held = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(config), "a number")
        raise InputError(f"the config.json of model {ref!r} is not a JSON object (it holds {held}); save the model "
                         "with save_pretrained")
    return config


def detect_model_kind(ref: str) -> str:
    """The kind of model `ref` (built-in name, local folder or cached hub id)."""
    if ref in BUILTIN_MODELS:
        return BUILTIN_MODELS[ref].model_kind
    config = read_config(ref)
    if config is None:
        raise InputError(f"cannot read the config of model {ref!r} to tell its kind; pass --model-kind")
    return model_kind_from_config(config)


def resolve_model_kind(spec):
    """The spec with its model kind (given, else read from the model's config) and the defaults that depend on it;
    the one place a kind is resolved. Validation calls it before enqueueing, so a worker finds it done."""
    return spec.with_model_kind(spec.model_kind or detect_model_kind(spec.model))


def model_class(model_kind: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[model_kind])


def load_model(path: str, model_kind: str, *, labels: Optional[list[str]] = None, dtype: Any = None,
               load_in_4bit: bool = False) -> Any:
    """Weights of `path` with the model kind's Auto class. `labels` sizes a classification head (a new head is made when
    the saved one has another size); `load_in_4bit` loads NF4 weights with double quantization and bf16 compute."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if model_kind == "classification" and labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
    if load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    return model_class(model_kind).from_pretrained(path, **kwargs)
