"""The artifact store: where adapters, full models and checkpoints are kept, on this machine or shared by many.

`store_for(home)` is the process's store, built from `TUNEQUEUE_ARTIFACTS` (models/settings.py). Keys are
store-relative paths made of ids and validated names (`adapters/NAME...`, `checkpoints/UID/checkpoint.pt`); a row
holds the key, never a machine's path.

- `LocalStore` (the default: TUNEQUEUE_HOME itself, or a folder such as a shared mount) keeps today's layout:
  `adapters/NAME` is the folder, written into a staging folder beside it and renamed over it, and read in place.
- `RemoteStore` (any other fsspec URL: s3://, gs://, az://...) puts a folder under a content-hashed key,
  `adapters/NAME/<sha256 of its manifest>`: the files first, the manifest (every file's name, size and sha256) last,
  so a key without a manifest is an upload in progress (or a crashed one) and is never read, and uploading the same
  content again rewrites the same bytes. `fetch_folder` copies a folder into the worker-local cache
  (TUNEQUEUE_HOME/cache/artifacts), checks every file against the manifest, and evicts the least recently used
  copies beyond the byte budget (TUNEQUEUE_ARTIFACT_CACHE_BYTES). A cached copy is re-hashed whenever a file's size
  or modification time differs from when it was verified, and fetched again when a hash does not match.
  Single files (checkpoints) are single objects, which S3, GCS and Azure replace atomically.

A caller publishes a folder's key in the database only after `put_folder` has returned, so a half-uploaded adapter
is never visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from models.errors import InputError, NotFound
from models.settings import LOCAL_PROTOCOLS, Settings, artifact_settings, mask_url

log = logging.getLogger("tunequeue.store")
MANIFEST = ".manifest.json"
VERIFIED = ".verified.json"  # in a cached copy: each file's (size, mtime_ns) when its hash was last checked
DEFAULT_CACHE_BYTES = 20 << 30
CHUNK = 1 << 20


def check_key(key: str) -> str:
    """`key` if it is a relative path of plain names (no '..', '.', empty or absolute parts); InputError else."""
    parts = PurePosixPath(key).parts if key else ()
    if not parts or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"not an artifact key: {key[:80]!r}")
    return "/".join(parts)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path) -> dict:
    """{"files": [{"name", "size", "sha256"}, ...]} of every file under `folder`, sorted by name."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {"files": [{"name": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_of(p)}
                      for p in files]}


def manifest_digest(manifest: dict) -> str:
    """The content hash a folder's key ends with: sha256 of its manifest's canonical JSON."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class ArtifactStore:
    """What every store does; `LocalStore` and `RemoteStore` say how."""

    is_local = True

    def __init__(self, home: Path):
        self.home = Path(home)

    def describe(self, key: str) -> str:
        """Where `key` is, for messages."""
        raise NotImplementedError

    def staging_folder(self, kind: str, name: str) -> Path:
        """A new local folder to write a folder into before `put_folder(that, kind, name)`."""
        raise NotImplementedError

    def put_folder(self, local: Path, kind: str, name: str) -> str:
        raise NotImplementedError

    def fetch_folder(self, key: str) -> Path:
        raise NotImplementedError

    def fetch_folders(self, keys: Iterable[str]) -> list[Path]:
        """Several folders for one job: none of them is evicted to make room for another."""
        return [self.fetch_folder(key) for key in keys]

    def local_path(self, key: str) -> Path:
        """Where a single file's working copy is written before `put_file(that, key)` (and fetched to)."""
        raise NotImplementedError

    def put_file(self, local: Path, key: str) -> str:
        raise NotImplementedError

    def fetch_file(self, key: str) -> Optional[Path]:
        """A local copy of the file at `key`; None when the store has none."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove the folder or file at `key` (and any local copy of it); nothing at `key` is not an error."""
        raise NotImplementedError

    def delete_other_versions(self, kind: str, name: str, keep: str) -> None:
        """Remove every version of `kind/name` but the key `keep` (a re-run's or --replace's older upload)."""


class LocalStore(ArtifactStore):
    """A folder on this machine (TUNEQUEUE_HOME by default): keys are paths under it, read in place."""

    def __init__(self, root: Path, home: Optional[Path] = None):
        super().__init__(home or root)
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def describe(self, key: str) -> str:
        return str(self.path(key))

    def staging_folder(self, kind: str, name: str) -> Path:
        # beside its final place, so that publishing it is a rename on one file system
        return self.root / check_key(kind) / f".{check_key(name)}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def put_folder(self, local: Path, kind: str, name: str) -> str:
        """`local` renamed to `kind/name` (copied first when it is not a staging folder beside it), replacing the
        folder there (a re-run, or --replace)."""
        key = f"{check_key(kind)}/{check_key(name)}"
        target = self.path(key)
        local = Path(local)
        if local.parent != target.parent:
            staging = self.staging_folder(kind, name)
            staging.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, staging)
            local = staging
        if target.exists():
            shutil.rmtree(target)
        local.rename(target)
        return key

    def fetch_folder(self, key: str) -> Path:
        folder = self.path(key)
        if not folder.is_dir():
            raise NotFound(f"artifact {key!r} is recorded but its folder {folder} is missing")
        return folder

    def local_path(self, key: str) -> Path:
        return self.path(key)

    def put_file(self, local: Path, key: str) -> str:
        target = self.path(key)
        if Path(local) != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(local, partial)
            os.replace(partial, target)
        return check_key(key)

    def fetch_file(self, key: str) -> Optional[Path]:
        path = self.path(key)
        return path if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class RemoteStore(ArtifactStore):
    """An fsspec URL (s3://bucket/prefix ...): content-hashed folders, verified copies in a local LRU cache."""

    is_local = False

    def __init__(self, url: str, home: Path, cache_bytes: Optional[int] = None):
        super().__init__(home)
        self.url = url.rstrip("/")
        self.cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
        self.cache_dir = self.home / "cache" / "artifacts"  # verified copies of folders, LRU within the budget
        self.files_dir = self.home / "cache" / "files"  # working copies of single files (checkpoints)
        self._fs = None
        self._root = ""
        self._pid = None
        self._lock = threading.Lock()

    @property
    def fs(self):
        """The fsspec file system, made in this process (an async client does not survive a fork)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            options = {"skip_instance_cache": True}
            if self.url.split("://", 1)[0] in ("s3", "s3a"):
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                if endpoint:  # botocore reads it too, but not every version aiobotocore pins
                    options["endpoint_url"] = endpoint
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **options)
            except ImportError as exc:
                raise InputError(f"TUNEQUEUE_ARTIFACTS={mask_url(self.url)!r}: {exc}") from None
            self._pid = os.getpid()
        return self._fs

    def remote(self, key: str) -> str:
        """The store's own path of `key` (making the file system sets its root)."""
        self.fs
        return f"{self._root.rstrip('/')}/{check_key(key)}"

    def describe(self, key: str) -> str:
        return f"{mask_url(self.url)}/{check_key(key)}"

    def staging_folder(self, kind: str, name: str) -> Path:
        return self.home / "cache" / "staging" / f"{check_key(kind)}-{check_key(name)}-{os.getpid()}-" \
                                                 f"{uuid.uuid4().hex[:8]}"

    # folders

    def put_folder(self, local: Path, kind: str, name: str) -> str:
        """Upload `local` to `kind/name/<content hash>`: files first, manifest last; a key whose manifest is
        already there holds these very bytes and is left as it is."""
        local = Path(local)
        manifest = manifest_of(local)
        key = f"{check_key(kind)}/{check_key(name)}/{manifest_digest(manifest)}"
        fs = self.fs
        fs.invalidate_cache()
        if fs.exists(self.remote(f"{key}/{MANIFEST}")):
            return key
        for entry in manifest["files"]:
            fs.put_file(str(local / entry["name"]), self.remote(f"{key}/{entry['name']}"))
        fs.pipe_file(self.remote(f"{key}/{MANIFEST}"), json.dumps(manifest, indent=1).encode())
        log.info("stored %s (%s files, %s bytes)", self.describe(key), len(manifest["files"]),
                 sum(e["size"] for e in manifest["files"]))
        return key

    def fetch_folder(self, key: str) -> Path:
        return self.fetch_folders([key])[0]

    def fetch_folders(self, keys: Iterable[str]) -> list[Path]:
        keys = [check_key(key) for key in keys]
        with self._lock:
            return [self._fetch(key, keep=set(keys)) for key in keys]

    def _fetch(self, key: str, keep: set) -> Path:
        folder = self.cache_dir / key
        if folder.is_dir():
            if self._verified(key, folder):
                _touch(folder)
                return folder
            shutil.rmtree(folder, ignore_errors=True)  # damaged: fetched again below
        manifest = self._remote_manifest(key)
        size = sum(entry["size"] for entry in manifest["files"])
        self._evict(size, keep)
        partial = self.cache_dir / ".partial" / f"{uuid.uuid4().hex}"
        try:
            for entry in manifest["files"]:
                target = partial / entry["name"]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self.remote(f"{key}/{entry['name']}"), str(target))
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if not self._verified(key, partial):
                raise InputError(f"artifact {self.describe(key)} does not match its manifest (changed in the store "
                                 "after it was written?)")
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(partial, folder)
            except OSError:  # another process on this home fetched it meanwhile: its copy is checked next time
                pass
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _touch(folder)
        log.info("fetched %s into %s", self.describe(key), folder)
        return folder

    def _remote_manifest(self, key: str) -> dict:
        self.fs.invalidate_cache()
        try:
            manifest = json.loads(self.fs.cat_file(self.remote(f"{key}/{MANIFEST}")))
        except FileNotFoundError:
            raise NotFound(f"artifact {self.describe(key)} is missing or incomplete (it has no manifest)") from None
        if manifest_digest(manifest) != key.rsplit("/", 1)[-1]:
            raise InputError(f"artifact {self.describe(key)}: its manifest does not match its key")
        return manifest

    def _verified(self, key: str, folder: Path) -> bool:
        """Whether the copy in `folder` holds the files of `key`'s manifest: by their recorded sizes and times when
        nothing changed since they were checked, else by their hashes (then recorded again)."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if manifest_digest(manifest) != key.rsplit("/", 1)[-1]:
                return False
            stats = {e["name"]: _stat(folder / e["name"]) for e in manifest["files"]}
            checked = json.loads((folder / VERIFIED).read_text()) if (folder / VERIFIED).exists() else {}
            if all(checked.get(name) == list(stat) for name, stat in stats.items()):
                return True
            for entry in manifest["files"]:
                path = folder / entry["name"]
                if path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
                    log.warning("cached copy of %s: %s does not match its hash; fetching it again", key,
                                entry["name"])
                    return False
            (folder / VERIFIED).write_text(json.dumps({name: list(stat) for name, stat in stats.items()}))
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def cached(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of each cached copy, least recently used first."""
        entries = []
        for manifest in self.cache_dir.rglob(MANIFEST) if self.cache_dir.is_dir() else []:
            folder = manifest.parent
            if ".partial" in folder.relative_to(self.cache_dir).parts:
                continue
            entries.append((folder, folder_size(folder), folder.stat().st_mtime))
        return sorted(entries, key=lambda entry: entry[2])

    def _evict(self, incoming: int, keep: set) -> None:
        """Remove least recently used copies (never those of `keep`) until `incoming` more bytes fit the budget."""
        entries = self.cached()
        total = sum(size for _, size, _ in entries)
        kept = {self.cache_dir / key for key in keep}
        for folder, size, _ in entries:
            if total + incoming <= self.cache_bytes:
                break
            if folder in kept:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            log.info("artifact cache: evicted %s (%s bytes) to stay within %s bytes", folder, size, self.cache_bytes)
        if total + incoming > self.cache_bytes:
            log.warning("artifact cache: %s bytes more than its budget of %s bytes (the job's own folders stay)",
                        total + incoming - self.cache_bytes, self.cache_bytes)

    # single files

    def local_path(self, key: str) -> Path:
        return self.files_dir / check_key(key)

    def put_file(self, local: Path, key: str) -> str:
        self.fs.put_file(str(local), self.remote(key))
        return check_key(key)

    def fetch_file(self, key: str) -> Optional[Path]:
        target = self.local_path(key)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get_file(self.remote(key), str(partial))
        except FileNotFoundError:
            partial.unlink(missing_ok=True)
            target.unlink(missing_ok=True)  # the store is the truth: a copy it no longer has is stale
            return None
        os.replace(partial, target)
        return target

    # both

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.remote(f"{key}/{MANIFEST}")) or self.fs.isfile(self.remote(key))

    def delete(self, key: str) -> None:
        path = self.remote(key)
        self.fs.invalidate_cache()
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()
        for local in (self.cache_dir / key, self.files_dir / key):
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)

    def delete_other_versions(self, kind: str, name: str, keep: str) -> None:
        folder = f"{check_key(kind)}/{check_key(name)}"
        self.fs.invalidate_cache()
        try:
            versions = self.fs.ls(self.remote(folder), detail=False)
        except FileNotFoundError:
            return
        for version in versions:
            key = f"{folder}/{version.rstrip('/').rsplit('/', 1)[-1]}"
            if key != keep:
                self.delete(key)


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _touch(folder: Path) -> None:
    """Mark a cached copy as just used (its folder's modification time orders the LRU)."""
    try:
        os.utime(folder)
    except OSError:
        pass


_STORES: dict[tuple, ArtifactStore] = {}


def store_for(home: Path, settings: Optional[Settings] = None) -> ArtifactStore:
    """The process's store for TUNEQUEUE_HOME `home`: from `settings`, or TUNEQUEUE_ARTIFACTS and
    TUNEQUEUE_ARTIFACT_CACHE_BYTES of the environment. One object per (home, URL, budget)."""
    url, cache_bytes = (settings.artifacts, settings.artifact_cache_bytes) if settings else artifact_settings()
    home = Path(home)
    key = (home, url, cache_bytes)
    store = _STORES.get(key)
    if store is None:
        protocol = url.split("://", 1)[0].lower() if "://" in url else ""
        if not url:
            store = LocalStore(home)
        elif not protocol or protocol in LOCAL_PROTOCOLS:
            store = LocalStore(Path(url.split("://", 1)[-1] if protocol else url), home)
        else:
            store = RemoteStore(url, home, cache_bytes)
        _STORES[key] = store
    return store
