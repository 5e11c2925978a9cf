"""Load dataset examples as `{id, source, target}` dicts for one split (built-in, local file, or hub dataset).

A single local file is split deterministically (80/10/10 by a seeded shuffle) into train/validation/test; a folder
holds one file per split. Hub datasets go through `datasets.load_dataset` (needs the network or a local cache).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from worker import synthetic
from worker.refs import SPLITS, RefError, local_split_file

SPLIT_FRACTIONS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


def _read_local(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rows_for_split(dataset: str, split: str, seed: int) -> list[tuple[str, dict]]:
    if dataset == synthetic.NAME:
        return [(ex["id"], ex) for ex in synthetic.generate_split(split)]
    path = Path(dataset).expanduser()
    if path.exists():
        file = local_split_file(dataset, split)
        if file is None:
            raise RefError(f"dataset folder {dataset!r} has no {split} file")
        rows = _read_local(file)
        if path.is_file():
            if split not in SPLIT_FRACTIONS:
                raise RefError(f"a single-file dataset has splits {', '.join(SPLITS)}, not {split!r}")
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            lo, hi = SPLIT_FRACTIONS[split]
            picked = sorted(order[int(lo * len(rows)):int(hi * len(rows))])
            return [(str(i), rows[i]) for i in picked]
        return [(str(row.get("id", i)), row) for i, row in enumerate(rows)]
    import datasets

    try:
        hub = datasets.load_dataset(dataset, split=split)
    except Exception as exc:
        raise RefError(f"cannot load hub dataset {dataset!r} split {split!r}: {exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return [(str(row.get("id", i)), row) for i, row in enumerate(hub)]


def load_examples(dataset: str, split: str, text_column: str, summary_column: str | None, *,
                  template: str, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Examples of one split with the prompt template applied to the text column."""
    examples = []
    for example_id, row in _rows_for_split(dataset, split, seed):
        if text_column not in row:
            raise RefError(f"dataset {dataset!r} split {split!r} has no column {text_column!r}")
        target = row.get(summary_column) if summary_column else None
        text = str(row[text_column])
        examples.append({
            "id": example_id,
            "text": text,
            "source": template.replace("{dialogue}", text).replace("{text}", text),
            "target": None if target is None else str(target),
        })
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise RefError(f"dataset {dataset!r} split {split!r} is empty")
    return examples
