"""Model kinds (model kinds): seq2seq, causal LM and sequence classification, told apart from a model's config.

`detect_model_kind` reads `config.json` only (no torch), so the CLI can check a job before enqueueing it;
`load_model` loads weights with the Auto class of its kind, optionally quantized by bitsandbytes (4-bit NF4 for QLoRA,
8-bit for LoRA on an int8 base) or in a given dtype.
"""

from __future__ import annotations

import json
import logging
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
# A classifier's head modules (DistilBERT's pre_classifier + classifier, BERT's classifier, Llama-style score): trained
# whole, never quantized nor wrapped by LoRA.
CLASSIFIER_HEADS = ["pre_classifier", "classifier", "score"]
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
               load_in_4bit: bool = False, quantization: Optional[str] = None) -> Any:
    """Weights of `path` with the model kind's Auto class. `labels` sizes a classification head (a new head is made when
    the saved one has another size); `quantization` "4bit" (or `load_in_4bit`) loads NF4 weights with double
    quantization, "8bit" LLM.int8 weights (bitsandbytes, see `quantization_config`)."""
    quantization = quantization or ("4bit" if load_in_4bit else None)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if model_kind == "classification" and labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
    if quantization:
        import torch

        kwargs["quantization_config"] = quantization_config(quantization, model_kind)
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"  # bitsandbytes >= 0.49 runs on CPU too
    model = model_class(model_kind).from_pretrained(path, **kwargs)
    if quantization:
        check_quantized(model, path, model_kind, quantization)
    return model


def compute_dtype(cuda: bool):
    """The dtype 4-bit layers compute in: bf16 on CUDA; fp32 on CPU, where bf16 measured slower (no native bf16
    matmul on CPUs without AVX512-BF16/AMX: bench/qlora_dtype.py)."""
    import torch

    return torch.bfloat16 if cuda else torch.float32


def quantization_config(quantization: str, model_kind: str):
    """bitsandbytes settings: "4bit" is QLoRA's NF4 with double quantization, "8bit" LLM.int8. A classifier's heads
    stay in full precision (PEFT trains them whole, as modules_to_save); transformers keeps a generative model's
    output projection (lm_head) unquantized by itself."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = CLASSIFIER_HEADS if model_kind == "classification" else None
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(torch.cuda.is_available()),
                                  llm_int8_skip_modules=skip)
    if quantization == "8bit":
        _drop_int8_cast_notice()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"unknown quantization {quantization!r}")


class _Int8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _drop_int8_cast_notice() -> None:
    """LLM.int8 quantizes activations through fp16 by design, and bitsandbytes logs a warning saying so at every int8
    matmul whose input is not fp16: every layer of every step on CPU, thousands of lines per job in the worker's and
    the job's logs. Only that line is dropped."""
    notices = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in notices.filters):
        notices.addFilter(_Int8CastNotice())


def check_quantized(model, path: str, model_kind: str, quantization: str) -> None:
    """A quantized load that quantized nothing (bitsandbytes replaces nn.Linear and GPT-2's Conv1D layers only) is
    refused, naming the layers the model has, rather than training a full-precision base under a 4-bit label."""
    import bitsandbytes as bnb

    if any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules()):
        return
    layers = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    raise InputError(f"bitsandbytes found no layer to quantize to {quantization} in the {model_kind} model {path!r} "
                     f"(it quantizes Linear and Conv1D layers; this model has {', '.join(layers)}); use --method lora "
                     "without --load-in-8bit")
