"""Job specs: one pydantic model per job kind, validated once, stored as JSON in the job row.

The same shapes serve CLI flags, YAML sweep files and the HTTP API. Field names follow Hugging Face
`TrainingArguments` where one exists (`learning_rate`, `num_train_epochs`, `per_device_train_batch_size`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.ml.builtin import DEFAULT_PROMPT_TEMPLATE

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = {"base"}


class SpecError(ValueError):
    """Invalid job input; the message is one line meant for the user."""


TASKS = ("seq2seq", "causal", "classification")
Task = Literal["seq2seq", "causal", "classification"]
METHODS = ("lora", "qlora", "prompt-tuning", "full")
# Learning rates that work for each method on the built-in tiny models (prompt tuning moves few parameters, so it
# needs a larger step; full fine-tuning a smaller one). An explicit learning_rate always wins.
DEFAULT_LEARNING_RATES = {"lora": 3e-3, "qlora": 3e-3, "prompt-tuning": 3e-2, "full": 1e-3}


# Column defaults of the built-in datasets; any other dataset defaults to dialogue -> summary (and label).
BUILTIN_DATASET_COLUMNS = {
    "synthetic-dialogsum": {"text_column": "dialogue", "summary_column": "summary"},
    "synthetic-sentiment": {"text_column": "text", "label_column": "label"},
}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _DataFields(_Spec):
    dataset: str = "synthetic-dialogsum"
    dataset_config: Optional[str] = None  # a hub dataset's configuration name (e.g. "3.0.0")
    data_format: Literal["columns", "alpaca"] = "columns"  # alpaca: instruction (+ input) -> output
    task: Optional[Task] = None  # filled in from the model's config before enqueue
    text_column: str = "dialogue"
    summary_column: str = "summary"
    label_column: str = "label"  # classification targets
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    seed: int = 42

    @model_validator(mode="before")
    @classmethod
    def _dataset_column_defaults(cls, data):
        if isinstance(data, dict):
            defaults = BUILTIN_DATASET_COLUMNS.get(data.get("dataset", "synthetic-dialogsum"), {})
            data = {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
            data = {k: v for k, v in data.items() if v is not None or k not in ("text_column", "summary_column",
                                                                               "label_column")}
        return data

    @model_validator(mode="after")
    def _template_has_slot(self):
        slots = ["{dialogue}", "{text}"] + (["{instruction}"] if self.data_format == "alpaca" else [])
        if not any(slot in self.prompt_template for slot in slots):
            raise ValueError(f"prompt_template: must contain {' or '.join(slots)} where the input text goes")
        return self


class FinetuneSpec(_DataFields):
    kind: Literal["finetune"] = "finetune"
    model: str = "tiny-t5"
    name: str
    method: Literal["lora", "qlora", "prompt-tuning", "full"] = "lora"
    replace: bool = False  # re-use the name of an existing adapter, replacing it when this job succeeds
    train_split: str = "train"
    lora_r: int = Field(16, gt=0, le=1024)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    num_virtual_tokens: int = Field(20, gt=0, le=1024)  # prompt tuning
    prompt_tuning_init: Literal["text", "random"] = "text"  # text: start from the prompt's instruction words
    learning_rate: float = Field(3e-3, gt=0, le=1)  # default depends on the method (DEFAULT_LEARNING_RATES)
    num_train_epochs: float = Field(3, gt=0, le=1000)
    max_steps: Optional[int] = Field(None, gt=0)
    per_device_train_batch_size: int = Field(16, gt=0, le=4096)
    max_tokens_per_batch: Optional[int] = Field(None, gt=0)  # also cap padded source tokens per batch
    max_source_length: int = Field(256, gt=0, le=32768)
    max_target_length: int = Field(64, gt=0, le=32768)
    warmup_steps: int = Field(30, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    train_limit: Optional[int] = Field(None, gt=0)
    eval_split: Optional[str] = "validation"  # eval loss for curves and early stopping; None: no evaluation
    eval_limit: Optional[int] = Field(200, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0)  # default: once per epoch
    early_stopping_patience: Optional[int] = Field(None, gt=0)  # evaluations without improvement; None: off
    checkpoint_every_steps: Optional[int] = Field(100, gt=0)  # resumable checkpoint under TUNEQUEUE_HOME
    checkpoint_every_minutes: Optional[float] = Field(None, gt=0)  # also (or instead) by elapsed time
    time_limit_s: Optional[float] = Field(None, gt=0)  # soft limit: checkpoint, then fail with the reason

    @model_validator(mode="before")
    @classmethod
    def _method_learning_rate(cls, data):
        if isinstance(data, dict) and data.get("learning_rate") is None:
            data = {**data, "learning_rate": DEFAULT_LEARNING_RATES.get(data.get("method", "lora"), 3e-3)}
        return data

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_name(value)

    @property
    def hyperparameters(self) -> dict:
        keys = {"method", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "max_source_length", "max_target_length", "seed"}
        if self.method in ("lora", "qlora"):
            keys |= {"lora_r", "lora_alpha", "lora_dropout", "target_modules"}
        if self.method == "prompt-tuning":
            keys |= {"num_virtual_tokens", "prompt_tuning_init"}
        return self.model_dump(include=keys)


class GenerateSpec(_DataFields):
    kind: Literal["generate"] = "generate"
    model: str = "tiny-t5"
    adapter: Optional[str] = None
    adapters: list[str] = []  # several adapters of one base in one job: mixed batches, one row per adapter
    split: str = "test"
    limit: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(64, gt=0, le=4096)
    max_new_tokens: int = Field(64, gt=0, le=4096)
    max_source_length: int = Field(512, gt=0, le=32768)
    # Greedy decoding that never repeats a trigram (as BART's summarization config does): tiny or undertrained
    # models otherwise loop on a phrase until max_new_tokens. 0 turns it off.
    no_repeat_ngram_size: int = Field(3, ge=0, le=100)

    @property
    def variant(self) -> str:
        return self.adapter or "base"

    @property
    def variants(self) -> list[str]:
        """Every variant this job writes rows for, in order."""
        return list(self.adapters) if self.adapters else [self.variant]


class ScoreSpec(_Spec):
    kind: Literal["score"] = "score"
    generate_job_id: int = Field(gt=0)
    # rouge for generated text; classification: accuracy, precision, recall, F1 (binary and macro).
    # None: chosen from the generate job's task.
    metrics: Optional[list[Literal["rouge", "classification"]]] = None
    use_stemmer: bool = True


JobSpec = Annotated[Union[FinetuneSpec, GenerateSpec, ScoreSpec], Field(discriminator="kind")]
SPEC_TYPES = {"finetune": FinetuneSpec, "generate": GenerateSpec, "score": ScoreSpec}


def validate_name(value: str) -> str:
    if not NAME_PATTERN.match(value) or value in RESERVED_NAMES:
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', start with a letter or digit, "
                         f"and not be {', '.join(sorted(RESERVED_NAMES))}")
    return value


def parse_spec(data: dict) -> FinetuneSpec | GenerateSpec | ScoreSpec:
    """Build a spec from plain data, turning pydantic's report into one line for the user."""
    kind = data.get("kind")
    if kind not in SPEC_TYPES:
        raise SpecError(f"unknown job kind {kind!r} (expected one of {', '.join(SPEC_TYPES)})")
    try:
        return SPEC_TYPES[kind].model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        raise SpecError(one_line(exc)) from None


def one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        got = err.get("input")
        suffix = f" (got {got!r})" if err["type"] != "missing" and not isinstance(got, dict) else ""
        parts.append(f"{field}: {message}{suffix}" if field else f"{message}{suffix}")
    return "; ".join(parts)
