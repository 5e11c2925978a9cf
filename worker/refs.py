"""Cheap checks of model and dataset references (no torch import), used before anything is enqueued or written.

A model reference is a built-in name, a local folder with a `config.json`, or a Hugging Face hub id (`org/name`).
A dataset reference is the built-in name, a local `.jsonl` / `.csv` file (or a folder of `train.jsonl`,
`validation.jsonl`, `test.jsonl` / `.csv`), or a hub dataset name.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from worker import synthetic
from worker.builtin import BUILTIN_MODELS

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
LOCAL_SUFFIXES = (".jsonl", ".csv")
SPLITS = ("train", "validation", "test")


class RefError(ValueError):
    """A reference that does not name anything usable; the message is one line for the user."""


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists() or ref.endswith(LOCAL_SUFFIXES)


def check_model(ref: str) -> str:
    """Return the kind of reference ('builtin', 'local', 'hub'), or raise RefError."""
    if ref in BUILTIN_MODELS:
        return "builtin"
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise RefError(f"model path {ref!r} does not exist or is not a folder")
        if not (path / "config.json").exists():
            raise RefError(f"model folder {ref!r} has no config.json (not a saved Hugging Face model)")
        return "local"
    if HUB_ID.match(ref):
        _check_hub(ref, "model")
        return "hub"
    raise RefError(f"unknown model {ref!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
                   "not a local folder, not a hub id like 'google/flan-t5-base'")


def _check_hub(ref: str, repo_type: str) -> None:
    """Accept a hub id already in the local cache, or one the hub confirms; fail clearly when offline."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    filename = "config.json" if repo_type == "model" else "README.md"
    if isinstance(try_to_load_from_cache(ref, filename, repo_type=repo_type), str):
        return
    from huggingface_hub import HfApi

    try:
        info = HfApi().repo_info(ref, repo_type=repo_type, timeout=5)
    except HfHubHTTPError as exc:
        raise RefError(f"unknown {repo_type} {ref!r} on the Hugging Face hub ({exc.__class__.__name__})") from None
    except Exception as exc:  # offline, DNS, timeout
        raise RefError(f"cannot reach the Hugging Face hub to check {repo_type} {ref!r} "
                       f"({exc.__class__.__name__}); download it first and pass its local folder") from None
    if info is None:
        raise RefError(f"unknown {repo_type} {ref!r} on the Hugging Face hub")


def local_split_file(ref: str, split: str) -> Path | None:
    """For a folder dataset, the file holding `split`; for a single file, the file itself."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    for suffix in LOCAL_SUFFIXES:
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_columns(path: Path) -> list[str]:
    """Column names of a local .jsonl (first record) or .csv (header)."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return next(csv.reader(f), [])
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise RefError(f"{path}: each line must be a JSON object")
                    return list(record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RefError(f"cannot read dataset file {path}: {exc}") from None
    return []


def check_dataset(ref: str, columns: list[str], splits: list[str]) -> str:
    """Return the dataset kind ('builtin', 'local', 'hub'), or raise RefError naming what is wrong."""
    if ref == synthetic.NAME:
        for split in splits:
            if split not in synthetic.SPLIT_SIZES:
                raise RefError(f"dataset {ref!r} has splits {', '.join(synthetic.SPLIT_SIZES)}, not {split!r}")
        missing = [c for c in columns if c not in ("dialogue", "summary")]
        if missing:
            raise RefError(f"dataset {ref!r} has columns dialogue, summary; no column {missing[0]!r}")
        return "builtin"
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise RefError(f"dataset path {ref!r} does not exist")
        if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
            raise RefError(f"dataset file {ref!r} must end in {' or '.join(LOCAL_SUFFIXES)}")
        for split in splits:
            file = local_split_file(ref, split)
            if file is None:
                raise RefError(f"dataset folder {ref!r} has no {split}.jsonl or {split}.csv")
            found = read_columns(file)
            if not found:
                raise RefError(f"dataset file {file} is empty")
            for column in columns:
                if column not in found:
                    raise RefError(f"dataset file {file} has no column {column!r} "
                                   f"(columns: {', '.join(found)})")
        return "local"
    if HUB_ID.match(ref) or re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", ref):
        _check_hub(ref, "dataset")
        return "hub"
    raise RefError(f"unknown dataset {ref!r}")
