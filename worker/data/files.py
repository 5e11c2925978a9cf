"""Local dataset files: where a split lives, its column names (cheaply) and its rows.

A local dataset is one file (`.jsonl`, `.json`, `.csv`, `.parquet`) or a folder written by `Dataset.save_to_disk`
(both carved 80/10/10 into train/validation/test by the seed), a folder written by `DatasetDict.save_to_disk` (its
own splits), or a folder of per-split files such as `train.jsonl`, `validation.csv`, `test.parquet`. Every error is
an `InputError` with a one-line message.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from models.errors import InputError, first_line

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLITS = ("train", "validation", "test")  # of a carved dataset (80/10/10 by seed)
FORMATS = "a .jsonl, .json, .csv or .parquet file, or a folder written by save_to_disk"


@dataclass(frozen=True)
class Source:
    """Where one split of a local dataset lives: a data file or a save_to_disk folder of one Dataset."""

    path: Path
    carved: bool  # the split is carved out of the whole (80/10/10 by seed)


def locate(ref: str, split: str) -> Source:
    """Where `split` of the local dataset `ref` lives; InputError for a missing path, format or split."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise InputError(f"dataset path {ref!r} does not exist")
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"dataset file {ref!r} has an unknown format {path.suffix or '(no extension)'!r}: "
                           f"use {FORMATS}")
        return Source(path, _carved(f"the single-file dataset {ref!r}", split))
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits") or []
        if split not in splits:
            raise InputError(f"dataset folder {ref!r} (DatasetDict.save_to_disk) has splits {', '.join(splits)}, "
                           f"not {split!r}")
        return Source(path / split, False)
    if (path / "state.json").is_file():
        return Source(path, _carved(f"the dataset folder {ref!r} (Dataset.save_to_disk)", split))
    files: dict[str, Path] = {}
    for suffix in LOCAL_SUFFIXES:
        for file in sorted(path.glob(f"*{suffix}")):
            files.setdefault(file.name.removesuffix(suffix), file)
    if split in files:
        return Source(files[split], False)
    if not files:
        raise InputError(f"dataset folder {ref!r} holds no split files (train.jsonl, validation.csv, ...) and was "
                       "not written by save_to_disk")
    raise InputError(f"dataset folder {ref!r} has no {split!r} split (found: {', '.join(sorted(files))})")


def _carved(what: str, split: str) -> bool:
    if split not in SPLITS:
        raise InputError(f"{what} has splits {', '.join(SPLITS)} (80/10/10 by seed), not {split!r}")
    return True


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"cannot read {path}: not a JSON object")
    return data


def columns(source: Source) -> list[str]:
    """Column names; parquet and save_to_disk folders read only the schema, text formats are parsed whole."""
    path = source.path
    try:
        if path.is_dir():
            import pyarrow as pa

            files = _read_json(path / "state.json").get("_data_files") or []
            if not files:
                raise InputError(f"dataset folder {path} has no data files listed in state.json")
            with pa.memory_map(str(path / files[0]["filename"])) as f:
                return pa.ipc.open_stream(f).schema.names
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            if pq.read_metadata(path).num_rows == 0:
                return []
            return pq.read_schema(path).names
    except InputError:
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, a broken state.json
        raise InputError(f"cannot read dataset {path}: {first_line(exc)}") from None
    rows = read_rows(source)
    return list(rows[0]) if rows else []


def read_rows(source: Source) -> list[dict]:
    """Every row of the file or save_to_disk folder, as plain dicts."""
    path = source.path
    try:
        if path.is_dir():
            import datasets

            return dataset_rows(datasets.load_from_disk(str(path)))
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8-sig")
    except Exception as exc:
        raise InputError(f"cannot read dataset {path}: {first_line(exc)}") from None
    if path.suffix == ".csv":
        return _csv_rows(path, text)
    rows = _json_rows(path, text) if path.suffix == ".json" else _json_lines(path, text)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"dataset file {path}: record {n} is not a JSON object")
    return rows


def _json_lines(path: Path, text: str) -> list:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"dataset file {path}: line {n} is not valid JSON ({exc.msg})") from None
    return rows


def _json_rows(path: Path, text: str) -> list:
    """A JSON array of objects, an object with a "data" array, or JSON Lines in a .json file."""
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return _json_lines(path, text)
        raise InputError(f"dataset file {path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(data, dict):
        return data["data"] if isinstance(data.get("data"), list) else [data]
    return data if isinstance(data, list) else [data]


def _csv_rows(path: Path, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        for row in reader:
            if None in row:
                raise InputError(f"dataset file {path}: line {reader.line_num} has more fields than the header "
                               f"({len(reader.fieldnames)})")
            rows.append(row)
    except csv.Error as exc:
        raise InputError(f"dataset file {path}: not valid CSV at line {reader.line_num} ({exc})") from None
    return rows


def dataset_rows(dataset) -> list[dict]:
    """Rows of a `datasets.Dataset`, with ClassLabel integers turned into their names."""
    names = {c: f.names for c, f in dataset.features.items() if type(f).__name__ == "ClassLabel"}
    rows = dataset.to_list()
    for row in rows:
        for column, labels in names.items():
            if isinstance(row.get(column), int) and 0 <= row[column] < len(labels):
                row[column] = labels[row[column]]
    return rows

