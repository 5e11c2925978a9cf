"""Examples of one dataset split as `{id, text, source, target}` dicts, for training and generation.

`examples_for(spec, split, ...)` reads the dataset (a built-in, a local file or folder, or a hub dataset with its
configuration), maps its columns (`text_column` and a target column, or alpaca's instruction / input / output onto
prompt and target) and applies the prompt template. A single local file or `Dataset.save_to_disk` folder is carved
80/10/10 into train/validation/test by a seeded shuffle (`worker.data.files`).

What a row must hold is decided here once (`cell`, `ExampleIds`, `RowRules`) and applied twice: by the check before
enqueue (`worker.data.refs.check_dataset`, streaming the whole file) and by the worker reading the split, so a row
the worker would refuse is refused at submit time with the same one-line message naming the row:

- the text (alpaca: instruction) and, for a fine-tune, the target must be there and not null; an optional value
  (a generate job's reference, alpaca's input) may be missing or null;
- a value is text, or a number or boolean taken as text (`str()`: a label 1 or True becomes "1" or "True");
  lists, objects and other values are refused;
- a generate job stores every example's id, text and reference: ids (a row's "id", else its position) are unique
  within the split and at most `EXAMPLE_ID_LENGTH` characters, and no stored value holds a NUL character.
"""

from __future__ import annotations

import math
import numbers
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from models.builtins import BUILTIN_DATASETS, DEFAULT_PROMPT_TEMPLATE
from models.errors import InputError, Unavailable, first_line
from models.results import Generation
from worker.data import files as datafiles
from worker.data import synthetic, synthetic_sentiment
from worker.data.files import looks_like_path

GENERATORS = {module.NAME: module.generate_split for module in (synthetic, synthetic_sentiment)}

SPLIT_FRACTIONS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
EXAMPLE_ID_LENGTH = Generation.__table__.c.example_id.type.length  # the generations table's column
# The Stanford Alpaca prompts, used for --format alpaca while the prompt template is the default one.
ALPACA_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
SLOT = re.compile(r"\{(text|dialogue|instruction|input)\}")


# ------------------------------------------------------------------------------------------------- row rules
def _kind_of(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def cell(row: dict, column: str, where: str, *, required: bool, stored: bool = False) -> Optional[str]:
    """The value of `column` in one row as text; None when it is missing or null and not `required`. `where` names
    the row ('dataset file PATH: line 7'). InputError for a required value that is missing or null, a list, object
    or other non-scalar value, and (`stored`: the database keeps it) a NUL character."""
    if column not in row:
        if not required:
            return None
        raise InputError(f"{where} has no column {column!r} (columns: {', '.join(map(str, row))})")
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if not required:
            return None
        raise InputError(f"{where}: column {column!r} is null; every row needs a value")
    if isinstance(value, str):
        text = value
    elif isinstance(value, numbers.Number) and not isinstance(value, complex):
        text = str(value)
    else:
        raise InputError(f"{where}: column {column!r} holds {_kind_of(value)}, not text, a number or a boolean")
    if stored and "\x00" in text:
        raise InputError(f"{where}: column {column!r} holds a NUL character (\\x00), which the database cannot "
                         "store")
    return text


@dataclass
class ExampleIds:
    """Example ids of one split: a row's "id", else its position. Checked (`check`) when the job stores them."""

    check: bool
    seen: dict[str, str] = field(default_factory=dict)  # id -> the row it was first seen in ('line 3')

    def take(self, row: dict, position: int, what: str, where: str) -> str:
        """The id of the row at `position`, named `where` ('line 7') in `what` ('dataset file PATH')."""
        if not self.check:
            return str(row.get("id", position))
        example_id = cell(row, "id", f"{what}: {where}", required=True, stored=True) if "id" in row else str(position)
        if len(example_id) > EXAMPLE_ID_LENGTH:
            raise InputError(f"{what}: {where}: id {example_id[:24]!r}... is {len(example_id)} characters long; "
                             f"example ids may have at most {EXAMPLE_ID_LENGTH}")
        if example_id in self.seen:
            raise InputError(f"{what}: {where}: id {example_id!r} is used again (first at {self.seen[example_id]}); "
                             "example ids must be unique within a split")
        self.seen[example_id] = where
        return example_id


@dataclass(frozen=True)
class RowRules:
    """What every row of a split must hold for one job: the `required` columns with a value, the `optional` ones a
    scalar where present, and (`stored`) unique ids of at most EXAMPLE_ID_LENGTH characters and no NUL."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    stored: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional + (("id",) if self.stored else ())

    def check(self, rows: Iterable[tuple[str, dict]], what: str, *, carved: bool) -> int:
        """Check `(where, row)` pairs of `what` ('dataset file PATH'); returns how many there were."""
        ids = ExampleIds(check=self.stored and not carved)
        n = 0
        for n, (where, row) in enumerate(rows, 1):
            at = f"{what}: {where}"
            for column in self.required:
                cell(row, column, at, required=True, stored=self.stored)
            for column in self.optional:
                cell(row, column, at, required=False, stored=self.stored)
            ids.take(row, n - 1, what, where)
        return n


def rules_for(spec, target_column: Optional[str]) -> RowRules:
    """The rules a job's rows must meet (for the check before enqueue): its text column (alpaca: instruction, with
    input optional) and `target_column` (alpaca: output), required when a fine-tune trains on it."""
    target_required, stored = _needs(spec)
    text, optional = ("instruction", ("input",)) if spec.data_format == "alpaca" else (spec.text_column, ())
    target = ("output" if spec.data_format == "alpaca" else target_column) if target_column else None
    if target and target_required:
        return RowRules((text, target), optional, stored)
    return RowRules((text,), optional + ((target,) if target else ()), stored)


def _needs(spec) -> tuple[bool, bool]:
    """(target required, rows stored): a fine-tune trains on every target; a generate job stores its examples."""
    return spec.kind == "finetune", spec.kind == "generate"


def carved_size(rows: int, split: str) -> int:
    """Rows of `split` when `rows` rows are carved 80/10/10."""
    lo, hi = SPLIT_FRACTIONS[split]
    return int(hi * rows) - int(lo * rows)


# ---------------------------------------------------------------------------------------------- reading splits
@dataclass
class SplitRows:
    """The rows of one split: `(position, where, row)` in the dataset's order (a carved split: file order), `what`
    names the source in messages, and a carved split's example ids are its rows' positions in the file."""

    what: str
    rows: list[tuple[int, str, dict]]
    carved: bool = False


def split_rows(dataset: str, split: str, seed: int, dataset_config: str | None = None) -> SplitRows:
    if dataset in BUILTIN_DATASETS:
        sizes = BUILTIN_DATASETS[dataset].split_sizes
        if split not in sizes:
            raise InputError(f"dataset {dataset!r} has splits {', '.join(sizes)}, not {split!r}")
        return SplitRows(f"dataset {dataset!r} split {split!r}",
                         [(i, f"row {i + 1}", ex) for i, ex in enumerate(GENERATORS[dataset](split))])
    if looks_like_path(dataset):
        source = datafiles.locate(dataset, split)
        rows = [(i, where, row) for i, (where, row) in enumerate(datafiles.iter_rows(source))]
        if not source.carved:
            return SplitRows(source.what, rows)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        lo, hi = SPLIT_FRACTIONS[split]
        return SplitRows(source.what, [rows[i] for i in sorted(order[int(lo * len(rows)):int(hi * len(rows))])],
                         carved=True)
    return _hub_rows(dataset, split, dataset_config)


def _hub_rows(dataset: str, split: str, config: str | None) -> SplitRows:
    import datasets

    named = f"{dataset!r}" + (f" (config {config!r})" if config else "")
    try:
        hub = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # the hub was checked at enqueue: a network failure now may pass, so it is retried
        passing = isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("httpx", "requests", "urllib3")
        raise (Unavailable if passing else InputError)(
            f"cannot load hub dataset {named} split {split!r}: {first_line(exc)} "
            "(needs the network or the local Hugging Face cache)") from None
    return SplitRows(f"hub dataset {named} split {split!r}",
                     [(i, f"row {i + 1}", row) for i, row in enumerate(datafiles.dataset_rows(hub))])


def render(template: str, values: dict[str, str]) -> str:
    """The template with {text} / {dialogue} (and for alpaca {instruction} / {input}) filled in, in one pass."""
    return SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def to_examples(split: SplitRows, where: str, *, text_column: str, target_column: str | None, template: str,
                alpaca: bool = False, limit: int | None = None, target_required: bool = False,
                stored: bool = False) -> list[dict]:
    """Map rows onto `{id, text, source, target}`; alpaca rows: instruction (+ input) -> output. Every row of the
    split is checked (the rules above), also those past `limit`, as the check before enqueue does."""
    default_alpaca = alpaca and template == DEFAULT_PROMPT_TEMPLATE
    ids = ExampleIds(check=stored and not split.carved)
    examples = []
    for position, row_where, row in split.rows:
        at = f"{split.what}: {row_where}"
        if alpaca:
            instruction = cell(row, "instruction", at, required=True, stored=stored)
            extra = cell(row, "input", at, required=False, stored=stored) or ""
            text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            values = {"instruction": instruction, "input": extra}
            row_template = (ALPACA_PROMPT_TEMPLATE if extra.strip() else ALPACA_PROMPT_TEMPLATE_NO_INPUT) \
                if default_alpaca else template
            target_name = "output"
        else:
            text, values, row_template = cell(row, text_column, at, required=True, stored=stored), {}, template
            target_name = target_column
        target = cell(row, target_name, at, required=target_required, stored=stored) if target_column else None
        example_id = str(position) if split.carved else ids.take(row, position, split.what, row_where)
        if limit is None or len(examples) < limit:
            examples.append({"id": example_id, "text": text,
                             "source": render(row_template, {**values, "text": text, "dialogue": text}),
                             "target": target})
    if not examples:
        raise InputError(f"{where} is empty")
    return examples


def examples_for(spec, split: str, *, target_column: str | None, limit: int | None = None,
                 shuffle: bool = False) -> list[dict]:
    """Examples of `split` for a finetune/generate spec (dataset, dataset_config, data_format, text_column,
    prompt_template, seed). `shuffle` orders them by a shuffle seeded with `spec.seed` before `limit` applies, so a
    limit takes the same random subset for the same seed. A fine-tune needs every target; a generate job stores its
    examples (ids checked)."""
    split_data = split_rows(spec.dataset, split, spec.seed, spec.dataset_config)
    if shuffle:
        random.Random(f"subset-{spec.seed}").shuffle(split_data.rows)
    target_required, stored = _needs(spec)
    return to_examples(split_data, f"dataset {spec.dataset!r} split {split!r}", text_column=spec.text_column,
                       target_column=target_column, template=spec.prompt_template,
                       alpaca=spec.data_format == "alpaca", limit=limit, target_required=target_required,
                       stored=stored)


def load_examples(dataset: str, split: str, text_column: str, summary_column: str | None, *,
                  template: str, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Examples of one split with the prompt template applied to the text column (older entry point)."""
    return to_examples(split_rows(dataset, split, seed), f"dataset {dataset!r} split {split!r}",
                       text_column=text_column, target_column=summary_column, template=template, limit=limit)
