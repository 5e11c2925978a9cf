"""Local dataset files: where a split lives, its column names (cheaply) and its rows, streamed with their line or
row numbers.

A local dataset is one file (`.jsonl`, `.json`, `.csv`, `.parquet`) or a folder written by `Dataset.save_to_disk`
(both carved 80/10/10 into train/validation/test by the seed), a folder written by `DatasetDict.save_to_disk` (its
own splits), or a folder of per-split files such as `train.jsonl`, `validation.csv`, `test.parquet`. Every error is
an `InputError` with a one-line message.

Rows are read without torch or `datasets`: JSON Lines and CSV line by line, parquet and save_to_disk folders (Arrow
streams) batch by batch, a `.json` array whole. JSON Lines are split on "\\n" only, as JSON Lines defines them ("\\r\\n"
is tolerated): Unicode line separators (U+2028, U+2029, U+0085, \\x1c-\\x1e, \\x0b, \\x0c) inside strings are text.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from models.errors import InputError, TunequeueError, Unavailable, first_line

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLITS = ("train", "validation", "test")  # of a carved dataset (80/10/10 by seed)
FORMATS = "a .jsonl, .json, .csv or .parquet file, or a folder written by save_to_disk"
BATCH_ROWS = 4096  # rows per batch read from parquet
# Raw control characters inside strings (\x0b, \x0c, \x1c...) are read as text, as most JSON writers' readers do.
_JSON = json.JSONDecoder(strict=False)


def looks_like_path(ref: str) -> bool:
    if ref.startswith((".", "/", "~")) or ref.endswith(LOCAL_SUFFIXES):
        return True
    try:
        return Path(ref).expanduser().exists()
    except (OSError, ValueError):  # a name too long for a path, or one holding a NUL, names no file
        return False


@dataclass(frozen=True)
class Source:
    """Where one split of a local dataset lives: a data file or a save_to_disk folder of one Dataset."""

    path: Path
    carved: bool  # the split is carved out of the whole (80/10/10 by seed)

    @property
    def what(self) -> str:
        """How messages name it: 'dataset file PATH' or 'dataset folder PATH'."""
        return f"dataset {'folder' if self.path.is_dir() else 'file'} {self.path}"


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


def read_error(path: Path, exc: Exception) -> TunequeueError:
    """What reading `path` failing means: the operating system failing to read it (permissions, a network file
    system, a disk error) may pass, so a worker retries; anything about the content is the user's to fix."""
    if isinstance(exc, OSError):
        return Unavailable(f"cannot read dataset {path}: {first_line(exc)}")
    return InputError(f"cannot read dataset {path}: {first_line(exc)}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise read_error(path, exc) from None
    if not isinstance(data, dict):
        raise InputError(f"cannot read {path}: not a JSON object")
    return data


def columns(source: Source) -> list[str]:
    """Column names; parquet and save_to_disk folders read only the schema, the other formats their first row."""
    path = source.path
    try:
        if path.is_dir():
            return _arrow_schema(path).names
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            if pq.read_metadata(path).num_rows == 0:
                return []
            return pq.read_schema(path).names
    except InputError:
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, a broken state.json
        raise read_error(path, exc) from None
    first = next(iter_rows(source), None)
    return list(first[1]) if first else []


def read_rows(source: Source) -> list[dict]:
    """Every row of the file or save_to_disk folder, as plain dicts."""
    return [row for _, row in iter_rows(source)]


def iter_rows(source: Source, only: Optional[Iterable[str]] = None) -> Iterator[tuple[str, dict]]:
    """`(where, row)` for every row in file order, `where` naming it for messages: 'line N' (JSON Lines, CSV),
    'record N' (a JSON array) or 'row N' (parquet, save_to_disk folders). `only` limits the columns read from the
    columnar formats (the others read whole rows). InputError for what cannot be read, naming the line."""
    path = source.path
    if path.is_dir() or path.suffix == ".parquet":
        yield from _columnar_rows(path, only)
    elif path.suffix == ".csv":
        yield from _csv_rows(path)
    elif path.suffix == ".json":
        yield from _json_rows(path)
    else:
        yield from _json_lines(path)


# ---------------------------------------------------------------------------------------------- text formats
def _open(path: Path, newline: str):
    try:
        return open(path, encoding="utf-8-sig", newline=newline)
    except OSError as exc:
        raise read_error(path, exc) from None


def _json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """JSON Lines: one value per "\\n"-terminated line (a trailing "\\r" is JSON whitespace); blank lines skipped."""
    n = records = 0
    with _open(path, "\n") as file:
        try:
            for n, line in enumerate(file, 1):
                if not line.strip():
                    continue
                records += 1
                try:
                    value = _JSON.decode(line.strip(" \t\r\n"))
                except json.JSONDecodeError as exc:
                    raise InputError(f"dataset file {path}: line {n} is not valid JSON ({exc.msg})") from None
                if not isinstance(value, dict):
                    raise InputError(f"dataset file {path}: record {records} is not a JSON object (line {n})")
                yield f"line {n}", value
        except UnicodeDecodeError:
            raise InputError(f"dataset file {path}: line {n + 1} is not UTF-8 text") from None


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """A JSON array of objects, an object with a "data" array, or JSON Lines in a .json file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise read_error(path, exc) from None
    try:
        data = _JSON.decode(text.strip(" \t\r\n")) if text.strip() else []
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            yield from _json_lines(path)
            return
        raise InputError(f"dataset file {path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(data, dict):
        data = data["data"] if isinstance(data.get("data"), list) else [data]
    elif not isinstance(data, list):
        data = [data]
    for n, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise InputError(f"dataset file {path}: record {n} is not a JSON object")
        yield f"record {n}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with _open(path, "") as file:
        reader = csv.DictReader(file, strict=True)
        try:
            for row in reader:
                if None in row:
                    raise InputError(f"dataset file {path}: line {reader.line_num} has more fields than the header "
                                     f"({len(reader.fieldnames)})")
                yield f"line {reader.line_num}", row
        except csv.Error as exc:
            raise InputError(f"dataset file {path}: not valid CSV at line {reader.line_num} ({exc})") from None
        except UnicodeDecodeError:
            raise InputError(f"dataset file {path}: line {reader.line_num + 1} is not UTF-8 text") from None


# ------------------------------------------------------------------------------------------ columnar formats
def _arrow_files(folder: Path) -> list[Path]:
    files = _read_json(folder / "state.json").get("_data_files") or []
    if not files:
        raise InputError(f"dataset folder {folder} has no data files listed in state.json")
    return [folder / f["filename"] for f in files]


def _arrow_schema(folder: Path):
    import pyarrow as pa

    with pa.memory_map(str(_arrow_files(folder)[0])) as f:
        return pa.ipc.open_stream(f).schema


def _class_labels(folder: Path) -> dict[str, list[str]]:
    """Names of the ClassLabel columns of a save_to_disk folder (its dataset_info.json), by column."""
    try:
        features = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8")).get("features") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {name: f["names"] for name, f in features.items()
            if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list)}


def _batches(path: Path, only: Optional[Iterable[str]]):
    import pyarrow as pa

    if path.is_dir():
        for file in _arrow_files(path):
            with pa.memory_map(str(file)) as f:
                reader = pa.ipc.open_stream(f)
                names = _selected(reader.schema.names, only)
                for batch in reader:
                    yield batch.select(names) if names else batch
        return
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=_selected(parquet.schema_arrow.names, only))


def _selected(names: list[str], only: Optional[Iterable[str]]) -> Optional[list[str]]:
    """The columns of `names` that `only` asks for; None (every column) when it asks for none of them."""
    picked = [n for n in names if only is not None and n in set(only)]
    return picked or None


def _columnar_rows(path: Path, only: Optional[Iterable[str]]) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet file or of the Arrow files of a save_to_disk folder (ClassLabel integers as their names)."""
    labels = _class_labels(path) if path.is_dir() else {}
    n = 0
    batches = _batches(path, only)
    while True:
        try:
            batch = next(batches, None)
        except InputError:
            raise
        except Exception as exc:  # pyarrow's ArrowInvalid, OSError, a broken state.json
            raise read_error(path, exc) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            n += 1
            for column, names in labels.items():
                value = row.get(column)
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
                    row[column] = names[value]
            yield f"row {n}", row


def dataset_rows(dataset) -> list[dict]:
    """Rows of a `datasets.Dataset` (a hub dataset), with ClassLabel integers turned into their names."""
    names = {c: f.names for c, f in dataset.features.items() if type(f).__name__ == "ClassLabel"}
    rows = dataset.to_list()
    for row in rows:
        for column, labels in names.items():
            if isinstance(row.get(column), int) and 0 <= row[column] < len(labels):
                row[column] = labels[row[column]]
    return rows
