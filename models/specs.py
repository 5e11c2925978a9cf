"""Job specs: one pydantic model per job kind, validated once, stored as JSON in the job row.

The same shapes serve CLI flags, YAML sweep files and the HTTP API: each field carries its default, its range, its
help text and (where it differs from `--field-name`) its CLI flags, and manage.py builds its options from them, so a
new hyperparameter is added here and nowhere else. Field names follow Hugging Face `TrainingArguments` where one
exists (`learning_rate`, `num_train_epochs`, `per_device_train_batch_size`).
"""

from __future__ import annotations

import re
import reprlib
from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import (AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from models.builtins import (BUILTIN_DATASETS, DEFAULT_DATASET, DEFAULT_MODEL, DEFAULT_PROMPT_TEMPLATE,
                             builtin_datasets_help, builtin_models_help)
from models.errors import InputError
from models.metrics import DEFAULT_BERTSCORE_MODEL, EVALUATE_PREFIX, METRIC_FAMILIES, METRIC_NEEDS, is_evaluate
from models.settings import parse_bytes

# fullmatch, never match + `$`: `$` also matches before a trailing newline, so "name\n" would pass
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = {"base"}

# Upper bounds of the numeric fields (every numeric field has one, and floats must be finite: see _Spec). Ids are
# 64-bit signed integers in every database we run on.
MAX_ID = 2**63 - 1
MAX_SEED = 2**32 - 1  # what numpy and torch accept as a seed
MAX_STEPS = 10_000_000
MAX_EXAMPLES = 100_000_000
MAX_SECONDS = 366 * 24 * 3600  # a year
ECHO_CHARS = 60  # at most this much of a user's value is echoed back in an error message

ModelKind = Literal["seq2seq", "causal", "classification"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
Method = Literal["lora", "qlora", "prompt-tuning", "full"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
# Learning rates that work for each method on the built-in tiny models (prompt tuning moves few parameters, so it
# needs a larger step; full fine-tuning a smaller one). An explicit learning_rate always wins.
DEFAULT_LEARNING_RATES = {"lora": 3e-3, "qlora": 3e-3, "prompt-tuning": 3e-2, "full": 1e-3}
# What the column fields default to for a dataset that is not built-in.
DEFAULT_COLUMNS = {"text_column": "dialogue", "summary_column": "summary", "label_column": "label"}


def option(default: Any, help: str, *flags: str, shown: Optional[str] = None, repeat: bool = False,
           **constraints) -> Any:
    """A spec field with its CLI face: `help`, `flags` (default `--field-name`), where the real default depends
    on other fields, the text `shown` as the default in --help, and for a list, `repeat`: the option is given once
    per item (--metric a --metric b) rather than as one comma-separated value."""
    extra = {"flags": list(flags), "shown": shown, "repeat": repeat}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class _Spec(BaseModel):
    # allow_inf_nan=False: no float field takes inf or nan, whatever its range (a NaN compares false with every bound)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class _DataFields(_Spec):
    dataset: str = option(
        DEFAULT_DATASET, f"A built-in ({builtin_datasets_help()}); a local .jsonl, .json, .csv or .parquet file or "
        "Dataset.save_to_disk folder (split 80/10/10 by --seed); a DatasetDict.save_to_disk folder or a folder of "
        "per-split files (train.jsonl, validation.csv, ...); or a Hugging Face dataset name (needs the network or "
        "its cache).")
    dataset_config: Optional[str] = option(
        None, "Configuration of a hub dataset, as in load_dataset(name, config), e.g. 3.0.0.")
    data_format: Literal["columns", "alpaca"] = option(
        "columns", "columns: --text-column -> --summary-column (or --label-column). alpaca: rows with instruction / "
        "input / output; the prompt is the instruction (plus the input when there is one), the target is the output.",
        "--format")
    model_kind: Optional[ModelKind] = option(
        None, "Model kind. seq2seq: T5/FLAN-T5/BART. causal: Llama/Qwen/GPT-2 style, loss on the summary tokens "
        "only. classification: DistilBERT style, text -> --label-column.", "--model-kind", "--task",
        shown="read from the model's config", validation_alias=AliasChoices("model_kind", "task"))
    text_column: str = option(DEFAULT_COLUMNS["text_column"], "Column with the input text.",
                              shown="the built-in dataset's, else dialogue")
    summary_column: str = option(DEFAULT_COLUMNS["summary_column"],
                                 "Column with the reference output (seq2seq, causal).")
    label_column: str = option(DEFAULT_COLUMNS["label_column"], "Column with the class label (classification).")
    prompt_template: str = option(
        DEFAULT_PROMPT_TEMPLATE, "Template with {text} (or {dialogue}) where the input text goes; with --format "
        "alpaca also {instruction} and {input}.", shown="'Summarize the following conversation.' prompt; the "
        "standard Alpaca prompt for --format alpaca; the bare text for classification")
    seed: int = option(42, "Seeds the 80/10/10 split of a single file or Dataset folder, the --train-limit subset "
                           "and training.", ge=0, le=MAX_SEED)

    @model_validator(mode="before")
    @classmethod
    def _dataset_column_defaults(cls, data):
        if isinstance(data, dict):
            dataset = data.get("dataset", DEFAULT_DATASET)
            builtin = BUILTIN_DATASETS.get(dataset) if isinstance(dataset, str) else None  # a list: its own error
            defaults = builtin.columns if builtin else {}
            data = {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
            data = {k: v for k, v in data.items() if v is not None or k not in DEFAULT_COLUMNS}
        return data

    @model_validator(mode="after")
    def _template_has_slot(self):
        slots = ["{dialogue}", "{text}"] + (["{instruction}"] if self.data_format == "alpaca" else [])
        if not any(slot in self.prompt_template for slot in slots):
            raise ValueError(f"prompt_template: must contain {' or '.join(slots)} where the input text goes")
        return self

    @property
    def target_column(self) -> str:
        """The column the job learns or is scored against: the label for classification, else the summary."""
        return self.label_column if self.model_kind == "classification" else self.summary_column

    def with_model_kind(self, model_kind: str):
        """The spec with its model kind set, and the defaults that depend on it: classification reads the bare text
        unless a template was chosen."""
        update: dict = {"model_kind": model_kind}
        if model_kind == "classification" and self.prompt_template == DEFAULT_PROMPT_TEMPLATE:
            update["prompt_template"] = "{text}"
        return self.model_copy(update=update)


def _size(value):
    """A size given as text (`40GiB`, `500MB`) becomes bytes; a number is taken as bytes."""
    return parse_bytes(value) if isinstance(value, str) else value


# bytes, or a size as text; typed str on the command line (the option's type is not a plain int)
ByteSize = Annotated[int, BeforeValidator(_size), Field(gt=0, le=2**60)]


class _WorkerNeeds(_Spec):
    """What a job needs of the worker that runs it (worker/capabilities.py routes it to a queue only capable workers
    consume). Spec fields, so the command line, a sweep file's base block and the HTTP API give them alike."""

    requires: list[Literal["cuda", "bf16", "bitsandbytes"]] = option(
        [], "Run only on a worker that has this, repeatable: cuda, bf16 (a GPU with bfloat16), bitsandbytes. Implied "
        "needs are added: bitsandbytes for qlora, --load-in-8bit and the 8-bit optimizers; cuda for --min-gpu-mem.",
        "--require", repeat=True)
    min_gpu_mem: Optional[ByteSize] = option(
        None, "Run only on a CUDA worker with this much free GPU memory (e.g. 40GiB; stored in bytes).")

    @field_validator("requires")
    @classmethod
    def _distinct(cls, value):
        return sorted(set(value), key=["cuda", "bf16", "bitsandbytes"].index)


MAX_TRIALS = 1000
NOT_OPTIONS = ("search",)  # spec fields no CLI flag sets: the sweep that queues the job writes them


class SearchSpec(_Spec):
    """What a fine-tune of an ASHA or TPE sweep knows of its search: its Optuna study and trial, its bracket, the
    steps where it reports `metric`, and the direction that is better."""

    study: str = Field(min_length=1, max_length=128)
    trial: int = Field(ge=0, le=MAX_TRIALS * 100)
    strategy: Literal["asha", "tpe"]
    metric: str
    direction: Literal["min", "max"]
    rungs: list[int] = Field([], max_length=64)  # ASHA: the decision steps, then max_steps; TPE: none
    bracket: int = Field(0, ge=0, le=20)
    reduction_factor: int = Field(3, ge=2, le=100)
    min_steps: int = Field(1, gt=0, le=MAX_STEPS)
    promotion: Literal["lazy", "eager"] = "eager"  # ASHA: see models.search.AshaStrategy (specs before it: eager)

    @model_validator(mode="after")
    def _increasing(self):
        if any(b <= a for a, b in zip(self.rungs, self.rungs[1:])) or any(r <= 0 for r in self.rungs):
            raise ValueError("rungs must be increasing positive step counts")
        return self

    @property
    def decision_steps(self) -> list[int]:
        """The rungs where a point can be stopped: all but the last (the end of training)."""
        return self.rungs[:-1]


class FinetuneSpec(_DataFields, _WorkerNeeds):
    kind: Literal["finetune"] = "finetune"
    model: str = option(DEFAULT_MODEL, f"Base model: a built-in ({builtin_models_help()}), a local folder saved "
                                       "with save_pretrained, or a hub id (e.g. google/flan-t5-base).")
    name: str = option(..., "Adapter name (letters, digits, . _ -); unique.")
    method: Method = option(
        "lora", "lora: LoRA layers (--lora-r, --target-modules) on the resident base (--load-in-8bit: on an int8 "
        "base). qlora: base loaded in 4-bit NF4 with bitsandbytes, LoRA on top (CPU and CUDA workers). "
        "prompt-tuning: --num-virtual-tokens trained prompt embeddings. full: every weight; writes a whole model "
        "folder.")
    load_in_8bit: bool = option(
        False, "LoRA on the base loaded in 8-bit (bitsandbytes LLM.int8 weights, a cache entry of its own); --method "
        "lora only.")
    replace: bool = option(False, "Re-use the name of an existing adapter: it is replaced when this job succeeds.")
    train_split: str = option("train", "Split to train on.")
    lora_r: int = option(16, "LoRA rank.", "--lora-r", "--r", gt=0, le=1024)
    lora_alpha: float = option(32, "LoRA scaling numerator (scale = alpha / r).", "--lora-alpha", "--alpha",
                               gt=0, le=10_000)
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.", "--lora-dropout", "--dropout", ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = option(
        "all-linear", "'all-linear' or a comma-separated list such as q,v.")
    num_virtual_tokens: int = option(20, "Prompt tuning: prompt length.", gt=0, le=1024)
    prompt_tuning_init: Literal["text", "random"] = option(
        "text", "Prompt tuning: start from the embeddings of the prompt template's instruction, or at random.")
    learning_rate: float = option(3e-3, "Peak learning rate.", "--learning-rate", "--lr", gt=0, le=1,
                                  shown=", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LEARNING_RATES.items()))
    num_train_epochs: float = option(3, "Passes over the training split.", "--epochs", gt=0, le=1000)
    max_steps: Optional[int] = option(None, "Stop after this many steps (overrides --epochs).", gt=0, le=MAX_STEPS)
    per_device_train_batch_size: int = option(16, "Examples per optimizer step.", "--batch-size", gt=0, le=4096)
    max_tokens_per_batch: Optional[int] = option(
        None, "Also cap each batch at this many padded input tokens (length-bucketed batches).", gt=0,
        le=4096 * 32768)
    max_source_length: int = option(256, "Input tokens kept per example.", gt=0, le=32768)
    max_target_length: int = option(64, "Target tokens kept per example.", gt=0, le=32768)
    warmup_steps: int = option(30, "Linear warm-up steps (at most a tenth of the run).", ge=0, le=MAX_STEPS)
    max_grad_norm: float = option(1.0, "Gradient clipping norm.", gt=0, le=10_000)
    optim: Optimizer = option(
        "adamw", "adamw: torch AdamW. adamw_8bit: bitsandbytes AdamW with 8-bit states (tensors under 4096 "
        "elements keep 32-bit ones). paged_adamw_8bit: the same, states paged to CPU memory under CUDA memory "
        "pressure (on a CPU worker it is adamw_8bit).")
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass instead of keeping them: less memory, slower steps.")
    train_limit: Optional[int] = option(
        None, "Train on N examples of the split, a random subset chosen by --seed (the same seed, the same subset).",
        gt=0, le=MAX_EXAMPLES)
    eval_split: Optional[str] = option(
        "validation", "Split for the eval loss (loss curves, early stopping); none: no evaluation.")
    eval_limit: Optional[int] = option(200, "Evaluate on the first N examples.", gt=0, le=MAX_EXAMPLES)
    eval_steps: Optional[int] = option(None, "Evaluate every N steps.", gt=0, le=MAX_STEPS,
                                       shown="once per epoch")
    early_stopping_patience: Optional[int] = option(
        None, "Stop after this many evaluations without improvement, keeping the best weights.", gt=0,
        le=10_000)
    checkpoint_every_steps: Optional[int] = option(
        100, "Save a resumable checkpoint every N steps; a re-run after a crash resumes from it.",
        "--checkpoint-every", gt=0, le=MAX_STEPS)
    checkpoint_every_minutes: Optional[float] = option(None, "Also save a checkpoint every N minutes.", gt=0,
                                                       le=MAX_SECONDS / 60)
    time_limit_s: Optional[float] = option(
        None, "Soft limit in seconds: checkpoint, then fail with the reason.", "--time-limit", gt=0, le=MAX_SECONDS)
    # set by an ASHA or TPE sweep for each of its points (models/search.py), never by a flag (NOT_OPTIONS)
    search: Optional[SearchSpec] = Field(None, description="A sweep point's search: its Optuna trial and rungs.")

    @model_validator(mode="before")
    @classmethod
    def _method_learning_rate(cls, data):
        if isinstance(data, dict) and data.get("learning_rate") is None:
            method = data.get("method", "lora")
            data = {**data, "learning_rate": DEFAULT_LEARNING_RATES.get(method, 3e-3) if isinstance(method, str)
                    else 3e-3}
        return data

    @model_validator(mode="after")
    def _int8_base_for_lora_only(self):
        if self.load_in_8bit and self.method != "lora":
            raise ValueError(f"load_in_8bit: only with --method lora (got --method {self.method}; qlora loads its "
                             "base in 4-bit, prompt-tuning and full train on the full-precision base)")
        return self

    @field_validator("eval_split", mode="before")
    @classmethod
    def _no_evaluation(cls, value):
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules(cls, value):
        if isinstance(value, list) and value == ["all-linear"]:
            return "all-linear"
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or 'all-linear'")
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_name(value)

    @property
    def hyperparameters(self) -> dict:
        keys = {"method", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "max_source_length", "max_target_length", "seed", "optim", "gradient_checkpointing"}
        if self.method in ("lora", "qlora"):
            keys |= {"lora_r", "lora_alpha", "lora_dropout", "target_modules"}
        if self.method == "lora":
            keys |= {"load_in_8bit"}
        if self.method == "prompt-tuning":
            keys |= {"num_virtual_tokens", "prompt_tuning_init"}
        return self.model_dump(include=keys)


# Padded tokens per generation batch when no batch size is given: the budget above which throughput stops growing
# (tiny-t5 on 2 CPU cores, `python bench/generate.py --tiny --budgets`, bench/RESULTS.md).
GENERATE_BATCH_TOKENS = 16384


class GenerateSpec(_DataFields, _WorkerNeeds):
    kind: Literal["generate"] = "generate"
    model: str = option(DEFAULT_MODEL, "Base model.", shown=f"the adapter's base, else {DEFAULT_MODEL}")
    adapter: Optional[str] = option(None, "Name of a trained adapter; without it the base model alone.")
    adapters: list[str] = option(
        [], "Comma-separated adapters of one base, generated together in mixed batches (one row per adapter and "
        "example); 'base' in the list adds the base model's own rows.")
    split: str = option("test", "Split to generate for: train/validation/test of a built-in or carved file, or any "
                                "split of a folder or hub dataset.", "--split", "--test-split")
    limit: Optional[int] = option(None, "Only the first N examples of the split.", gt=0, le=MAX_EXAMPLES)
    batch_size: Optional[int] = option(
        None, "Examples per generation batch; without it, each length-sorted batch takes as many examples as fit "
        f"{GENERATE_BATCH_TOKENS:,} padded tokens (input + max new tokens, per row).", gt=0, le=4096,
        shown=f"a budget of {GENERATE_BATCH_TOKENS:,} tokens")
    max_new_tokens: int = option(64, "Tokens generated at most per example.", gt=0, le=4096)
    max_source_length: int = option(512, "Input tokens kept per example.", gt=0, le=32768)
    # Greedy decoding that never repeats a trigram (as BART's summarization config does): tiny or undertrained
    # models otherwise loop on a phrase until max_new_tokens.
    no_repeat_ngram_size: int = option(3, "Never repeat an n-gram of this size (0: off).", ge=0, le=100)

    @property
    def variant(self) -> str:
        return self.adapter or "base"

    @property
    def variants(self) -> list[str]:
        """Every variant this job writes rows for, in order."""
        return list(self.adapters) if self.adapters else [self.variant]


class ScoreSpec(_Spec):
    kind: Literal["score"] = "score"
    generate_job_id: int = Field(gt=0, le=MAX_ID)
    metrics: Optional[list[str]] = option(
        None, f"A metric family, repeatable: {', '.join(METRIC_NEEDS)} (what each needs: score --help).",
        "--metric", shown="rouge, or classification for a classifier", repeat=True)
    use_stemmer: bool = True
    bertscore_model: Optional[str] = option(
        None, "BERTScore model: a hub name (usual: roberta-large with --bertscore-layer 17, or "
        "microsoft/deberta-xlarge-mnli) or a local folder.", shown=f"{DEFAULT_BERTSCORE_MODEL}, packaged, offline")
    bertscore_num_layers: Optional[int] = option(
        None, "BERTScore: the model layer whose embeddings are compared.", "--bertscore-layer",
        shown="bert-score's choice for the model; 6 for all-MiniLM-L6-v2", gt=0, le=1000)
    bertscore_idf: bool = option(False, "BERTScore: weight tokens by idf computed over the references.")
    bertscore_rescale: bool = option(
        False, "BERTScore: rescale with bert-score's English baseline for the model (roberta-large and the other "
        "models bert-score ships baselines for).")
    bertscore_batch_size: int = option(32, "BERTScore: pairs per forward pass.", gt=0, le=4096)
    judge_backend: Literal["local", "openai"] = option(
        "local", "Judge backend. local: a causal model run in the worker through its model cache. openai: any "
        "OpenAI-compatible chat-completions endpoint (JUDGE_BASE_URL and JUDGE_API_KEY in the worker's environment).")
    judge_model: Optional[str] = option(
        None, "Judge model (needed with --metric judge). local: a built-in such as tiny-llama, a folder or a hub "
        "name; openai: the endpoint's model name.")
    judge_scoring: Optional[Literal["sample", "probabilities"]] = option(
        None, "Judge scores (local backend). probabilities: the expected score under the model's probabilities of "
        "the tokens 1-5, as G-Eval does. sample: parse a generated reply.",
        shown="probabilities (local); sample (openai)")
    judge_references: bool = option(
        False, "Also judge the dataset's reference summaries: the report gets a 'reference' row.")
    judge_concurrency: int = option(4, "Judge (openai): requests under way at once.", gt=0, le=256)
    judge_max_requests: Optional[int] = option(
        None, "Judge (openai): requests this job may send, retries included.", shown="twice the prompts",
        gt=0, le=MAX_EXAMPLES)
    judge_max_seconds: Optional[float] = option(None, "Judge: seconds this job may spend judging.",
                                                shown="an hour", gt=0, le=MAX_SECONDS)
    judge_timeout_s: float = option(60.0, "Judge (openai): seconds to wait for each reply.", gt=0, le=3600)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value):
        for name in value or []:
            if is_evaluate(name):
                if not name[len(EVALUATE_PREFIX):].strip():
                    raise ValueError(f"{EVALUATE_PREFIX} needs a metric name or a local folder, e.g. "
                                     f"{EVALUATE_PREFIX}exact_match")
                if len(name) > 1024:
                    raise ValueError(f"{brief(name)}: at most 1024 characters")
            elif name not in METRIC_FAMILIES:
                raise ValueError(f"unknown metric {brief(name)} (expected {', '.join(METRIC_FAMILIES)} or "
                                 f"{EVALUATE_PREFIX}NAME_OR_PATH)")
        return list(dict.fromkeys(value)) if value else value

    @model_validator(mode="before")
    @classmethod
    def _judge_scoring_default(cls, data):
        if isinstance(data, dict) and data.get("judge_scoring") is None:
            data = {**data, "judge_scoring": "sample" if data.get("judge_backend") == "openai" else "probabilities"}
        return data

    @model_validator(mode="after")
    def _judge_needs(self):
        if "judge" in (self.metrics or []) and not self.judge_model:
            raise ValueError("judge_model: --metric judge needs --judge-model (e.g. tiny-llama for the local "
                             "backend, or the endpoint's model name with --judge-backend openai)")
        if self.judge_backend == "openai" and self.judge_scoring == "probabilities":
            raise ValueError("judge_scoring: probabilities needs --judge-backend local (the openai backend parses "
                             "the reply)")
        return self


class Submission(_Spec):
    """How a job (or a sweep's jobs) is queued, beside its spec."""

    priority: int = option(0, "0..9; a job of higher priority is taken before queued jobs of lower.", ge=0, le=9)
    max_attempts: int = option(3, "Runs allowed (crashes and lost workers count) before the job fails.", ge=1, le=100)


JobSpec = Annotated[Union[FinetuneSpec, GenerateSpec, ScoreSpec], Field(discriminator="kind")]
SPEC_TYPES = {"finetune": FinetuneSpec, "generate": GenerateSpec, "score": ScoreSpec}


def validate_name(value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or value in RESERVED_NAMES:
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', start with a letter or digit, "
                         f"and not be {', '.join(sorted(RESERVED_NAMES))}")
    return value


def parse_spec(data: dict) -> FinetuneSpec | GenerateSpec | ScoreSpec:
    """Build a spec from plain data (a stored row, an API body: None is a value, e.g. eval_split None means no
    evaluation; a door whose None means "not given" drops it first); pydantic's report becomes one InputError line."""
    kind = data.get("kind")
    if kind not in SPEC_TYPES:
        raise InputError(f"unknown job kind {kind!r} (expected one of {', '.join(SPEC_TYPES)})")
    return build(SPEC_TYPES[kind], data)


def build(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InputError(one_line(exc)) from None


def one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]).replace("\n", "\\n")
        field = field if len(field) <= ECHO_CHARS else field[:ECHO_CHARS - 3] + "..."
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        got = err.get("input")
        suffix = f" (got {brief(got)})" if err["type"] != "missing" and not isinstance(got, dict) else ""
        parts.append(f"{field}: {message}{suffix}" if field else f"{message}{suffix}")
    more = f"; and {len(parts) - 5} more" if len(parts) > 5 else ""
    return "; ".join(parts[:5]) + more


def brief(value, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` cut to at most `limit` characters, for echoing a user's value in a one-line error: a value can be
    a megabyte string, a list of a million items or a self-referencing YAML alias, so it is never formatted whole."""
    short = reprlib.Repr()  # attributes, not keywords: Python 3.11 has no keywords for them
    short.maxlevel, short.maxstring, short.maxlong, short.maxother = 3, limit, limit, limit
    short.maxtuple = short.maxlist = short.maxdict = short.maxset = short.maxfrozenset = 8
    try:
        text = short.repr(value)
    except Exception:  # noqa: BLE001 - a value whose own repr fails is shown by its type
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n")  # one line, always
    return text if len(text) <= limit else text[:limit - 3] + "..."
