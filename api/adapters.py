"""Trained adapters as things a user manages: list, look up, export, merge into a full model, delete.

Plain functions over the `adapters` table and the artifact store (worker/store.py: folders under `TUNEQUEUE_HOME`
by default, or a remote store whose folders are fetched into a verified local copy; manage.py's `adapters` group
only formats). `merge` has the worker's code (worker/ml/merge.py) load the base in full precision (or `dtype`;
never 4-bit, also for a qlora adapter), apply the PEFT adapter, refuse a result equal to the base, and write a whole
model folder plus the base tokenizer, so plain `AutoModelFor...from_pretrained(DIR)` loads it. `delete` removes the
folder and the row together: in a local store the folder is moved aside first and put back if the row cannot be
deleted; in a remote store the row goes first and then the objects; either way no row is ever left pointing at
missing files.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path
from typing import Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import InputError, NotFound
from models.jobs import Job, JobKind, JobStatus
from models.results import Adapter
from models.specs import brief
from worker.store import LocalStore, store_for

MERGE_DTYPES = ("float32", "bfloat16", "float16")


def list_adapters(session: Session, base_model: Optional[str] = None) -> list[Adapter]:
    query = select(Adapter).order_by(Adapter.created_at, Adapter.id)
    if base_model is not None:
        query = query.where(Adapter.base_model == base_model)
    return list(session.scalars(query))


def get_adapter(session: Session, name: str) -> Adapter:
    adapter = session.scalar(select(Adapter).where(Adapter.name == name))
    if adapter is None:
        names = list(session.scalars(select(Adapter.name)))
        close = difflib.get_close_matches(name[:100], names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see 'adapters list')"
        raise NotFound(f"adapter {brief(name)} does not exist{hint}")
    return adapter


def adapter_dict(adapter: Adapter, home: Path) -> dict:
    store = store_for(home)
    return {
        "name": adapter.name, "job_id": adapter.job_id, "base_model": adapter.base_model, "method": adapter.method,
        "model_kind": adapter.model_kind, "hyperparameters": adapter.hyperparameters, "path": adapter.path,
        "folder": store.describe(adapter.path), "exists": store.exists(adapter.path),
        "size_bytes": adapter.size_bytes,
        "trainable_params": adapter.trainable_params, "total_params": adapter.total_params,
        "percent_trainable": round(adapter.percent_trainable, 4), "is_full_model": adapter.is_full_model,
        "train_loss": adapter.train_loss, "eval_loss": adapter.eval_loss, "best_eval_loss": adapter.best_eval_loss,
        "duration_s": adapter.duration_s, "created_at": adapter.created_at,
    }


def adapter_folder(adapter: Adapter, home: Path) -> Path:
    """The adapter's folder on this machine: in place in a local store, else a verified copy in the local cache."""
    store = store_for(home)
    try:
        return store.fetch_folder(adapter.path)
    except NotFound:
        raise InputError(f"adapter {adapter.name!r} is recorded but its folder {store.describe(adapter.path)} is "
                         "missing") from None


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(home: Path, directory) -> Path:
    """`directory` as an absolute path with symlinks resolved, if a folder can be written there: outside
    TUNEQUEUE_HOME (whatever is inside belongs to the store: 'adapters delete' or a later fine-tune would remove it),
    new or empty, and under a folder that exists or can be made. InputError otherwise; nothing is created."""
    artifacts = store_for(home)
    try:
        target = Path(directory).expanduser().resolve()
        managed = [("TUNEQUEUE_HOME", Path(home).expanduser().resolve())]
        if isinstance(artifacts, LocalStore):
            managed.append(("the artifact store", artifacts.root.expanduser().resolve()))
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise InputError(f"cannot use {str(directory)[:60]!r} as a destination: {exc}") from None
    for what, folder in managed:
        if _is_within(target, folder):
            raise InputError(f"{target} is inside {what} ({folder}), which tunequeue manages; choose a folder "
                             "outside it")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target} already exists and is not an empty folder; choose a new directory")
    parent = target.parent
    while not parent.exists():  # the nearest folder that exists must be a folder we may write in
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {target}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {target}: {parent} is not writable")
    return target


def _write_folder(target: Path, what: str, write) -> Path:
    """Have `write(staging)` fill a staging folder beside `target`, then move it to `target` (absent or an empty
    folder): a failed write leaves nothing behind. A write the system refuses (a read-only or full disk) is one
    InputError line."""
    staging = target.parent / f".{target.name}.{what}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            write(staging)
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (OSError, shutil.Error) as exc:
        reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        where = getattr(exc, "filename", None)
        raise InputError(f"could not write {target}: {reason}" + (f" ({where})" if where else "")) from None
    return target


def export_adapter(session: Session, home: Path, name: str, target: Path) -> Path:
    """Copy the adapter's folder (PEFT adapter, or whole model for method full) to `target`."""
    folder = adapter_folder(get_adapter(session, name), home)
    target = check_destination(home, target)
    return _write_folder(target, "export", lambda staging: shutil.copytree(folder, staging))


def check_mergeable(adapter: Adapter, dtype: Optional[str]) -> None:
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (expected one of {', '.join(MERGE_DTYPES)})")
    if adapter.method == "full":
        raise InputError(f"adapter {adapter.name!r} is already a full model; use 'adapters export' to copy it")
    if adapter.method == "prompt-tuning":
        raise InputError(f"adapter {adapter.name!r} is a prompt-tuning adapter: its virtual tokens cannot be "
                         "merged into the weights; use 'adapters export' and load it with PEFT")


def merge_adapter(session: Session, home: Path, name: str, target: Path, dtype: Optional[str] = None) -> Path:
    """Write base + adapter merged into one model folder (with the base tokenizer) at `target`. The base is loaded
    in `dtype` (float32 by default: every bit of the adapter's change survives; a qlora adapter's 4-bit base is not
    used); InputError, and nothing written, when the merged model would equal the base."""
    adapter = get_adapter(session, name)
    check_mergeable(adapter, dtype)
    folder = adapter_folder(adapter, home)
    target = check_destination(home, target)

    from worker.ml.merge import merge_into

    labels = (adapter.hyperparameters or {}).get("labels")
    return _write_folder(target, "merge", lambda staging: merge_into(
        staging, home, adapter.base_model, adapter.model_kind, folder, labels=labels, dtype=dtype or "float32",
        name=adapter.name))


def jobs_using(session: Session, name: str) -> list[Job]:
    """Queued or running generate jobs that read adapter `name`."""
    active = select(Job).where(Job.kind == JobKind.generate, Job.status.in_((JobStatus.queued, JobStatus.running)))
    return [job for job in session.scalars(active.order_by(Job.id))
            if job.spec.get("adapter") == name or name in (job.spec.get("adapters") or [])]


def delete_adapter(session: Session, home: Path, name: str) -> None:
    """Remove the adapter's folder and row together; refused while a queued or running job uses it."""
    adapter = get_adapter(session, name)
    users = jobs_using(session, name)
    if users:
        raise InputError(f"adapter {name!r} is used by queued or running job(s) "
                         f"{', '.join(str(j.id) for j in users)}; cancel them or wait until they finish")
    store = store_for(home)
    if not isinstance(store, LocalStore):  # the row first: no row may point at objects already gone
        key = adapter.path
        session.delete(adapter)
        session.commit()
        store.delete(key)
        return
    folder = store.path(adapter.path)
    aside = folder.parent / f".{folder.name}.deleting-{os.getpid()}"
    moved = folder.is_dir()
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(folder, aside)
    try:
        session.delete(adapter)
        session.commit()
    except BaseException:
        session.rollback()
        if moved:
            os.replace(aside, folder)
        raise
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
