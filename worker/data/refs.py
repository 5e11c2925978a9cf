"""Cheap checks of model and dataset references (no torch import), used before anything is enqueued or written.

A model reference is a built-in name, a local folder with a `config.json` (a JSON object) and its weights, or a
Hugging Face hub id (`org/name`). A dataset reference is a built-in name (models/builtins.py), a local file or
folder (formats in `worker.data.files`), or a hub dataset name. A local dataset is read whole, streaming, against the
rules the worker applies to its rows (`worker.data.examples`), so a file the worker would refuse is refused here,
naming the line or row. Every failure is an `InputError` with a one-line message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from models.builtins import BUILTIN_DATASETS, BUILTIN_MODELS
from models.errors import InputError
from models.specs import brief
from worker.data import files as datafiles
from worker.data.examples import RowRules, carved_size
from worker.data.files import looks_like_path
from worker.ml.kinds import read_config

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")  # matched whole (fullmatch)
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_REF = 1024  # characters of a model or dataset reference
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what from_pretrained loads (model.safetensors, pytorch_model.bin, shards)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_length(what: str, ref: str) -> None:
    if len(ref) > MAX_REF:
        raise InputError(f"{what} reference {brief(ref)} is {len(ref)} characters long; at most {MAX_REF}")


def check_model(ref: str) -> str:
    """Return the kind of reference ('builtin', 'local', 'hub'), or raise InputError."""
    check_length("model", ref)
    if ref in BUILTIN_MODELS:
        return "builtin"
    if looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise InputError(f"model path {ref!r} does not exist or is not a folder")
        if not (path / "config.json").exists():
            raise InputError(f"model folder {ref!r} has no config.json (not a saved Hugging Face model)")
        read_config(ref)  # a JSON object, else InputError
        _check_weights(ref, path)
        return "local"
    if HUB_ID.fullmatch(ref):
        _check_hub(ref, "model")
        return "hub"
    raise InputError(f"unknown model {ref!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
                   "not a local folder, not a hub id like 'google/flan-t5-base'")


def _check_weights(ref: str, path: Path) -> None:
    """A local model folder holds weights from_pretrained can load: a .safetensors or .bin file, and every shard its
    index names."""
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            try:
                shards = set(json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
                raise InputError(f"model folder {ref!r}: {index} is not a weight index (no weight_map)") from None
            missing = sorted(s for s in shards if not (path / str(s)).is_file())
            if missing:
                raise InputError(f"model folder {ref!r}: {index} names weight file {missing[0]!r}, which is missing"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return
    if not any(f.is_file() and f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
        raise InputError(f"model folder {ref!r} has a config.json but no weights (model.safetensors or "
                         "pytorch_model.bin); save the model with save_pretrained")


def _check_hub(ref: str, repo_type: str) -> None:
    """Accept a hub id already in the local cache, or one the hub confirms; fail clearly when offline."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    from huggingface_hub.errors import HFValidationError

    filename = "config.json" if repo_type == "model" else "README.md"
    try:
        cached = try_to_load_from_cache(ref, filename, repo_type=repo_type)
    except HFValidationError as exc:  # e.g. longer than the hub allows
        raise InputError(f"{repo_type} {brief(ref)} is not a valid Hugging Face hub id: "
                         f"{str(exc).split(':')[0]}") from None
    if isinstance(cached, str):
        return
    from huggingface_hub import HfApi

    try:
        info = HfApi().repo_info(ref, repo_type=repo_type, timeout=5)
    except HfHubHTTPError as exc:
        raise InputError(f"unknown {repo_type} {ref!r} on the Hugging Face hub ({exc.__class__.__name__})") from None
    except Exception as exc:  # offline, DNS, timeout
        raise InputError(f"cannot reach the Hugging Face hub to check {repo_type} {ref!r} "
                       f"({exc.__class__.__name__}); download it first and pass its local folder") from None
    if info is None:
        raise InputError(f"unknown {repo_type} {ref!r} on the Hugging Face hub")


def required_columns(data_format: str, text_column: str, target_column: str | None = None) -> list[str]:
    """The columns a job reads: its text and target columns, or alpaca's instruction and output."""
    if data_format == "alpaca":
        return ["instruction"] + (["output"] if target_column else [])
    return [text_column] + ([target_column] if target_column else [])


def _check_columns(what: str, found, columns: list[str], data_format: str) -> None:
    hint = "; --format alpaca reads instruction, input (optional) and output" if data_format == "alpaca" else ""
    for column in columns:
        if column not in found:
            raise InputError(f"{what} has no column {column!r} (columns: {', '.join(found)}){hint}")


def check_dataset(ref: str, columns: list[str], splits: list[str], *, dataset_config: str | None = None,
                  data_format: str = "columns", rules: Optional[RowRules] = None) -> str:
    """Return the dataset kind ('builtin', 'local', 'hub'), or raise InputError naming what is wrong. A local
    dataset is read whole against `rules` (default: every one of `columns` holds a value in every row), and a carved
    split must not come out empty."""
    check_length("dataset", ref)
    if dataset_config and (ref in BUILTIN_DATASETS or looks_like_path(ref)):
        raise InputError(f"--dataset-config is for hub datasets; {ref!r} is not one")
    if ref in BUILTIN_DATASETS:
        builtin = BUILTIN_DATASETS[ref]
        for split in splits:
            if split not in builtin.split_sizes:
                raise InputError(f"dataset {ref!r} has splits {', '.join(builtin.split_sizes)}, not {split!r}")
        missing = [c for c in columns if c not in builtin.column_names]
        if missing:
            raise InputError(f"dataset {ref!r} has columns {', '.join(builtin.column_names)}; "
                             f"no column {missing[0]!r}")
        return "builtin"
    if looks_like_path(ref):
        rules = rules or RowRules(tuple(columns))
        for split in splits:
            source = datafiles.locate(ref, split)
            found = datafiles.columns(source)
            if not found:
                raise InputError(f"{source.what} is empty")
            _check_columns(source.what, found, columns, data_format)
            rows = check_rows(source, rules)
            if not rows:
                raise InputError(f"{source.what} is empty")
            if source.carved and not carved_size(rows, split):
                raise InputError(f"{source.what} has {rows} rows: split {split!r} of its 80/10/10 carving is empty; "
                                 "use more rows, or a folder of per-split files (train.jsonl, validation.jsonl, ...)")
        return "local"
    if HUB_ID.fullmatch(ref) or HUB_NAME.fullmatch(ref):
        _check_hub(ref, "dataset")
        return "hub"
    raise InputError(f"unknown dataset {ref!r}")


_CHECKED: dict[tuple, int] = {}  # (source, its files' sizes and times, rules) -> rows, for a sweep's many jobs


def check_rows(source: datafiles.Source, rules: RowRules) -> int:
    """Read every row of `source` (streaming) against `rules`; returns the number of rows. A file already checked
    against the same rules, unchanged since, is not read again."""
    key = (source, _fingerprint(source.path), rules)
    if key not in _CHECKED:
        if len(_CHECKED) > 256:
            _CHECKED.clear()
        _CHECKED[key] = rules.check(datafiles.iter_rows(source, rules.columns), source.what, carved=source.carved)
    return _CHECKED[key]


def _fingerprint(path: Path) -> tuple:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
