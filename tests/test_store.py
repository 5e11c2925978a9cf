"""The artifact store against a real S3-compatible server (moto's server mode on 127.0.0.1, through s3fs).

Store level: a folder goes in under a content-hashed key with its manifest last, a key without a manifest is never
read, a damaged cached copy is fetched again, the local cache keeps to its byte budget, a re-upload is harmless.
Through real workers with separate TUNEQUEUE_HOME folders (one PostgreSQL database, one Redis): a fine-tune whose
worker is killed resumes from the store's checkpoint on another machine's worker, its adapter lands in the bucket and
nowhere under either home, a generate job on the other home uses it (fetched and verified), and `adapters delete`
removes its objects.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from models.errors import InputError, NotFound
from models.jobs import Job, JobStatus
from models.results import Adapter, Generation
from models.settings import Settings
from tests.conftest import cli, session_of, start_worker, wait_until

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

FAST_REAPER = {"TUNEQUEUE_HEARTBEAT_SECONDS": "0.5", "TUNEQUEUE_STALE_SECONDS": "4", "TUNEQUEUE_REAP_SECONDS": "1"}
# a fine-tune small enough for a loaded CPU: short sequences, no evaluation, a checkpoint every 4 steps
SMALL = ["--max-steps", "40", "--batch-size", "4", "--train-limit", "64", "--eval-split", "none",
         "--max-source-length", "64", "--max-target-length", "16", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the AWS variables that point s3fs (and the workers) at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    aws = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(tmp_path_factory.mktemp("aws") / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path_factory.mktemp("aws") / "none")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in aws.items():
            patch.setenv(key, value)
        yield aws
    server.stop()


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket; returns its name."""
    import boto3

    name = f"tq-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def objects(bucket: str, prefix: str = "") -> list[str]:
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(entry["Key"] for entry in listed.get("Contents", []))


def remote_store(tmp_path: Path, bucket: str, budget: int | None = None):
    from worker.store import RemoteStore

    return RemoteStore(f"s3://{bucket}/prefix", tmp_path / "home", budget)


def folder_with(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------ settings
def test_settings_check_the_store_url():
    assert Settings.from_env({}).artifacts == ""
    assert Settings.from_env({"TUNEQUEUE_ARTIFACTS": "s3://bucket/runs"}).artifacts == "s3://bucket/runs"
    assert Settings.from_env({"TUNEQUEUE_ARTIFACTS": "file:///srv/shared/"}).artifacts == "/srv/shared"
    assert Settings.from_env({"TUNEQUEUE_ARTIFACT_CACHE_BYTES": "2GiB"}).artifact_cache_bytes == 2 << 30
    with pytest.raises(InputError, match=r"^TUNEQUEUE_ARTIFACTS='nope://user:\*\*\*@host/x': unknown scheme") as err:
        Settings.from_env({"TUNEQUEUE_ARTIFACTS": "nope://user:secret@host/x"})
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="TUNEQUEUE_ARTIFACTS='s3://': names no bucket"):
        Settings.from_env({"TUNEQUEUE_ARTIFACTS": "s3://"})
    with pytest.raises(InputError, match="^TUNEQUEUE_ARTIFACT_CACHE_BYTES: not a size"):
        Settings.from_env({"TUNEQUEUE_ARTIFACT_CACHE_BYTES": "lots"})
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(InputError, match=r"gs:// store needs the Python package 'gcsfs' \(pip install gcsfs\)"):
            Settings.from_env({"TUNEQUEUE_ARTIFACTS": "gs://bucket/x"})


def test_default_store_is_the_home_with_todays_layout(tmp_path, monkeypatch):
    from worker.store import LocalStore, store_for

    monkeypatch.delenv("TUNEQUEUE_ARTIFACTS", raising=False)
    store = store_for(tmp_path)
    assert isinstance(store, LocalStore) and store.root == tmp_path
    staging = folder_with(store.staging_folder("adapters", "a"), {"adapter_config.json": b"{}"})
    assert store.put_folder(staging, "adapters", "a") == "adapters/a"
    assert store.fetch_folder("adapters/a") == tmp_path / "adapters" / "a" and not staging.exists()
    assert store.local_path("checkpoints/u/checkpoint.pt") == tmp_path / "checkpoints" / "u" / "checkpoint.pt"
    for bad in ("../x", "/etc", "a/../../b", ""):
        with pytest.raises(InputError, match="not an artifact key"):
            store.fetch_folder(bad)


# ------------------------------------------------------------------------------------------------ the store
def test_folder_goes_in_under_its_content_hash_manifest_last(tmp_path, bucket):
    from worker.store import MANIFEST

    store = remote_store(tmp_path, bucket)
    source = folder_with(tmp_path / "a", {"adapter_config.json": b"{}", "weights/w.bin": b"x" * 1000})
    key = store.put_folder(source, "adapters", "one")
    name, digest = key.split("/")[1:]
    assert name == "one" and len(digest) == 64
    assert objects(bucket) == [f"prefix/{key}/{MANIFEST}", f"prefix/{key}/adapter_config.json",
                               f"prefix/{key}/weights/w.bin"]
    manifest = json.loads(store.fs.cat_file(store.remote(f"{key}/{MANIFEST}")))
    assert [(f["name"], f["size"]) for f in manifest["files"]] == [("adapter_config.json", 2), ("weights/w.bin", 1000)]
    assert store.put_folder(source, "adapters", "one") == key  # the same content: the same key, nothing new
    assert len(objects(bucket)) == 3
    changed = store.put_folder(folder_with(tmp_path / "b", {"adapter_config.json": b"{ }"}), "adapters", "one")
    assert changed != key
    store.delete_other_versions("adapters", "one", keep=changed)  # a re-run's older upload goes
    assert {o.split("/")[3] for o in objects(bucket)} == {changed.split("/")[2]}
    copy = store.fetch_folder(changed)
    assert copy.is_relative_to(tmp_path / "home" / "cache" / "artifacts")
    assert (copy / "adapter_config.json").read_bytes() == b"{ }"


def test_a_key_without_its_manifest_is_never_read(tmp_path, bucket):
    from worker.store import MANIFEST

    store = remote_store(tmp_path, bucket)
    key = store.put_folder(folder_with(tmp_path / "a", {"adapter_config.json": b"{}"}), "adapters", "half")
    store.fs.rm(store.remote(f"{key}/{MANIFEST}"))  # as an upload that died before its last object
    assert not store.exists(key)
    with pytest.raises(NotFound, match="missing or incomplete"):
        store.fetch_folder(key)
    assert not (store.cache_dir / key).exists()


def test_a_damaged_cached_copy_is_fetched_again(tmp_path, bucket):
    store = remote_store(tmp_path, bucket)
    weights = os.urandom(4096)
    key = store.put_folder(folder_with(tmp_path / "a", {"adapter_model.safetensors": weights}), "adapters", "x")
    copy = store.fetch_folder(key)
    (copy / "adapter_model.safetensors").write_bytes(bytes(4096))  # same size, other bytes
    again = store.fetch_folder(key)
    assert again == copy and (again / "adapter_model.safetensors").read_bytes() == weights
    (copy / "adapter_model.safetensors").unlink()
    assert (store.fetch_folder(key) / "adapter_model.safetensors").read_bytes() == weights


def test_the_cache_keeps_to_its_byte_budget_least_recently_used_first(tmp_path, bucket):
    store = remote_store(tmp_path, bucket, budget=10_000)
    keys = [store.put_folder(folder_with(tmp_path / n, {"w.bin": os.urandom(4000)}), "adapters", n)
            for n in ("a", "b", "c")]
    cached = lambda: {p.relative_to(store.cache_dir).parts[1] for p, _, _ in store.cached()}  # noqa: E731
    store.fetch_folder(keys[0])
    time.sleep(0.02)
    store.fetch_folder(keys[1])
    time.sleep(0.02)
    store.fetch_folder(keys[0])  # a used again: b is now the least recent
    time.sleep(0.02)
    store.fetch_folder(keys[2])
    assert cached() == {"a", "c"}
    assert sum(size for _, size, _ in store.cached()) <= 10_000
    assert [p.name for p in store.fetch_folders(keys[1:])] == [k.split("/")[2] for k in keys[1:]]  # a job's own stay
    assert cached() == {"b", "c"}


def test_a_checkpoint_file_moves_between_homes(tmp_path, bucket):
    from worker.store import RemoteStore

    first = RemoteStore(f"s3://{bucket}/p", tmp_path / "one")
    second = RemoteStore(f"s3://{bucket}/p", tmp_path / "two")
    key = "checkpoints/uid1/checkpoint.pt"
    first.local_path(key).parent.mkdir(parents=True)
    first.local_path(key).write_bytes(b"step 4")
    first.put_file(first.local_path(key), key)
    assert second.fetch_file(key).read_bytes() == b"step 4"
    first.delete("checkpoints/uid1")
    assert second.fetch_file(key) is None and not second.local_path(key).exists() and not objects(bucket)


# ------------------------------------------------------------------------------------------------ workers
def job_row(env, job_id) -> Job:
    with session_of(env) as session:
        return session.get(Job, job_id)


def enqueued(result) -> int:
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.split()[1])


def stop(worker) -> None:
    """A warm shutdown: the job it ran has cleaned up after itself."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def home_files(home: Path) -> set[str]:
    """The top folders under which a home holds files (the built-in models copied in by the fixture aside)."""
    return {f.relative_to(home).parts[0] for f in home.rglob("*") if f.is_file()} - {"builtin"}


@pytest.mark.slow
def test_two_homes_share_adapters_and_checkpoints_through_the_bucket(make_env, bucket, s3, tmp_path):
    first = {**make_env("postgresql"), **s3, **FAST_REAPER, "TUNEQUEUE_ARTIFACTS": f"s3://{bucket}/team"}
    second_home = tmp_path / "second-home"
    second_home.mkdir()
    (second_home / "builtin").symlink_to(Path(first["TUNEQUEUE_HOME"]) / "builtin")
    second = {**first, "TUNEQUEUE_HOME": str(second_home)}  # another machine: same database, Redis and bucket
    job_id = enqueued(cli(first, "finetune", "--name", "shared", *SMALL))
    uid = job_row(first, job_id).uid
    checkpoint = f"team/checkpoints/{uid}/checkpoint.pt"

    worker = start_worker(first, log=tmp_path / "first.log")
    try:
        wait_until(lambda: checkpoint in objects(bucket), 150, "the first checkpoint in the bucket", poll=0.1)
        worker.send_signal(signal.SIGKILL)  # the machine dies mid-training
        worker.wait(timeout=30)
    finally:
        stop(worker)
    assert job_row(first, job_id).status == JobStatus.running

    worker = start_worker(second, log=tmp_path / "second.log")
    try:
        job = wait_until(lambda: (j := job_row(first, job_id)).status.finished and j, 150, "the resumed fine-tune")
    finally:
        stop(worker)
    log = (tmp_path / "second.log").read_text()[-3000:]
    assert job.status == JobStatus.succeeded and job.attempts == 2, log
    assert job.result["resumed_from_step"] >= 4 and job.result["steps"] == 40  # from the first machine's checkpoint
    with session_of(first) as session:
        adapter = session.scalar(select(Adapter).where(Adapter.name == "shared"))
    assert adapter.path.startswith("adapters/shared/") and len(adapter.path.split("/")[2]) == 64
    stored = objects(bucket, "team/")
    assert {f"team/{adapter.path}/adapter_model.safetensors", f"team/{adapter.path}/.manifest.json"} <= set(stored)
    assert not [o for o in stored if "/checkpoints/" in o or not o.startswith(f"team/{adapter.path}/")]
    for home in (Path(first["TUNEQUEUE_HOME"]), second_home):  # nothing but caches and logs on either machine
        assert home_files(home) <= {"cache", "logs"}, sorted(home.rglob("*"))
        assert not list(home.rglob("checkpoint.pt")) and not list(home.rglob("adapter_model.safetensors"))

    generate = enqueued(cli(first, "generate", "--adapter", "shared", "--limit", "4", "--max-new-tokens", "8"))
    worker = start_worker(first, "--burst", log=tmp_path / "generate.log")  # the first machine never saw the adapter
    assert worker.wait(timeout=150) == 0, (tmp_path / "generate.log").read_text()[-3000:]
    assert job_row(first, generate).status == JobStatus.succeeded
    with session_of(first) as session:
        assert len(session.scalars(select(Generation).where(Generation.job_id == generate)).all()) == 4
    copy = Path(first["TUNEQUEUE_HOME"]) / "cache" / "artifacts" / adapter.path
    assert (copy / "adapter_model.safetensors").is_file() and (copy / ".verified.json").is_file()

    deleted = cli(first, "adapters", "delete", "shared", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert objects(bucket) == []  # no orphan objects: adapter and checkpoints are gone
