"""Examples of one dataset split as `{id, text, source, target}` dicts, for training and generation.

`examples_for(spec, split, ...)` reads the dataset (a built-in, a local file or folder, or a hub dataset with its
configuration), maps its columns (`text_column` and a target column, or alpaca's instruction / input / output onto
prompt and target) and applies the prompt template. A single local file or `Dataset.save_to_disk` folder is carved
80/10/10 into train/validation/test by a seeded shuffle (`worker.data.files`).
"""

from __future__ import annotations

import random
import re

from models.builtins import BUILTIN_DATASETS, DEFAULT_PROMPT_TEMPLATE
from models.errors import InputError, first_line
from worker.data import files as datafiles
from worker.data import synthetic, synthetic_sentiment
from worker.data.refs import looks_like_path

GENERATORS = {module.NAME: module.generate_split for module in (synthetic, synthetic_sentiment)}

SPLIT_FRACTIONS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
# The Stanford Alpaca prompts, used for --format alpaca while the prompt template is the default one.
ALPACA_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
SLOT = re.compile(r"\{(text|dialogue|instruction|input)\}")


def split_rows(dataset: str, split: str, seed: int, dataset_config: str | None = None) -> list[tuple[str, dict]]:
    """`(example id, row)` pairs of one split, in the dataset's order (a carved split: file order)."""
    if dataset in BUILTIN_DATASETS:
        sizes = BUILTIN_DATASETS[dataset].split_sizes
        if split not in sizes:
            raise InputError(f"dataset {dataset!r} has splits {', '.join(sizes)}, not {split!r}")
        return [(ex["id"], ex) for ex in GENERATORS[dataset](split)]
    if looks_like_path(dataset):
        source = datafiles.locate(dataset, split)
        rows = datafiles.read_rows(source)
        if not source.carved:
            return [(str(row.get("id", i)), row) for i, row in enumerate(rows)]
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        lo, hi = SPLIT_FRACTIONS[split]
        return [(str(i), rows[i]) for i in sorted(order[int(lo * len(rows)):int(hi * len(rows))])]
    return _hub_rows(dataset, split, dataset_config)


def _hub_rows(dataset: str, split: str, config: str | None) -> list[tuple[str, dict]]:
    import datasets

    try:
        hub = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:
        named = f"{dataset!r}" + (f" (config {config!r})" if config else "")
        raise InputError(f"cannot load hub dataset {named} split {split!r}: {first_line(exc)} "
                       "(needs the network or the local Hugging Face cache)") from None
    return [(str(row.get("id", i)), row) for i, row in enumerate(datafiles.dataset_rows(hub))]


def render(template: str, values: dict[str, str]) -> str:
    """The template with {text} / {dialogue} (and for alpaca {instruction} / {input}) filled in, in one pass."""
    return SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _value(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise InputError(f"{where} has no column {column!r} (columns: {', '.join(map(str, row))})")
    return "" if row[column] is None else str(row[column])


def to_examples(rows: list[tuple[str, dict]], where: str, *, text_column: str, target_column: str | None,
                template: str, alpaca: bool = False, limit: int | None = None) -> list[dict]:
    """Map rows onto `{id, text, source, target}`; alpaca rows: instruction (+ input) -> output."""
    default_alpaca = alpaca and template == DEFAULT_PROMPT_TEMPLATE
    examples = []
    for example_id, row in rows[:limit]:
        if alpaca:
            instruction, extra = _value(row, "instruction", where), str(row.get("input") or "")
            text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            values = {"instruction": instruction, "input": extra}
            if default_alpaca:
                template = ALPACA_PROMPT_TEMPLATE if extra.strip() else ALPACA_PROMPT_TEMPLATE_NO_INPUT
            target = row.get("output") if target_column else None
        else:
            text, values = _value(row, text_column, where), {}
            target = row.get(target_column) if target_column else None
        examples.append({"id": example_id, "text": text, "source": render(template, {**values, "text": text,
                                                                                    "dialogue": text}),
                         "target": None if target is None else str(target)})
    if not examples:
        raise InputError(f"{where} is empty")
    return examples


def examples_for(spec, split: str, *, target_column: str | None, limit: int | None = None,
                 shuffle: bool = False) -> list[dict]:
    """Examples of `split` for a finetune/generate spec (dataset, dataset_config, data_format, text_column,
    prompt_template, seed). `shuffle` orders them by a shuffle seeded with `spec.seed` before `limit` applies, so a
    limit takes the same random subset for the same seed."""
    rows = split_rows(spec.dataset, split, spec.seed, spec.dataset_config)
    if shuffle:
        random.Random(f"subset-{spec.seed}").shuffle(rows)
    return to_examples(rows, f"dataset {spec.dataset!r} split {split!r}", text_column=spec.text_column,
                       target_column=target_column, template=spec.prompt_template,
                       alpaca=spec.data_format == "alpaca", limit=limit)


def load_examples(dataset: str, split: str, text_column: str, summary_column: str | None, *,
                  template: str, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Examples of one split with the prompt template applied to the text column (older entry point)."""
    return to_examples(split_rows(dataset, split, seed), f"dataset {dataset!r} split {split!r}",
                       text_column=text_column, target_column=summary_column, template=template, limit=limit)
