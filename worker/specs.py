"""Job specs: one pydantic model per job kind, validated once, stored as JSON in the job row.

The same shapes serve CLI flags, YAML sweep files and the HTTP API. Field names follow Hugging Face
`TrainingArguments` where one exists (`learning_rate`, `num_train_epochs`, `per_device_train_batch_size`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.builtin import DEFAULT_PROMPT_TEMPLATE

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = {"base"}


class SpecError(ValueError):
    """Invalid job input; the message is one line meant for the user."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _DataFields(_Spec):
    dataset: str = "synthetic-dialogsum"
    text_column: str = "dialogue"
    summary_column: str = "summary"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    seed: int = 42

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        if "{dialogue}" not in value and "{text}" not in value:
            raise ValueError("must contain {dialogue} (or {text}) where the input text goes")
        return value


class FinetuneSpec(_DataFields):
    kind: Literal["finetune"] = "finetune"
    model: str = "tiny-t5"
    name: str
    method: Literal["lora"] = "lora"
    train_split: str = "train"
    lora_r: int = Field(16, gt=0, le=1024)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    learning_rate: float = Field(3e-3, gt=0, le=1)
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

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_name(value)

    @property
    def hyperparameters(self) -> dict:
        return self.model_dump(include={
            "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "num_train_epochs",
            "max_steps", "per_device_train_batch_size", "max_source_length", "max_target_length", "seed",
        })


class GenerateSpec(_DataFields):
    kind: Literal["generate"] = "generate"
    model: str = "tiny-t5"
    adapter: Optional[str] = None
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


class ScoreSpec(_Spec):
    kind: Literal["score"] = "score"
    generate_job_id: int = Field(gt=0)
    metrics: list[Literal["rouge"]] = ["rouge"]
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
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        got = err.get("input")
        suffix = f" (got {got!r})" if err["type"] != "missing" and not isinstance(got, dict) else ""
        parts.append(f"{field}: {message}{suffix}")
    return "; ".join(parts)
