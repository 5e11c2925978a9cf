"""One worker per GPU (worker/gpus.py) and stable worker names (worker/registry.py): `--gpus` parsing and
detection through nvidia-smi, `worker --gpu N` pinned and named before torch loads, name claims that a live worker
keeps and a dead one gives back, and the `--gpus` supervisor (restarts, give-up, signals, burst exit). Runs on a
machine without GPUs: the indices are only environment and names here."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from models.errors import InputError
from tests.conftest import REPO, broker_of, check_rejected, wait_until
from worker import gpus
from worker.gpus import Supervisor, parse_gpu_list, resolve_gpus
from worker.registry import claim_node_name, node_claim_key

HOST = socket.gethostname()
FAST_RECORDS = {"TUNEQUEUE_HEARTBEAT_SECONDS": "0.5", "TUNEQUEUE_STALE_SECONDS": "4"}


def fake_nvidia_smi(tmp_path, monkeypatch, script: str) -> None:
    """An `nvidia-smi` on PATH that runs `script` (a shell body)."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{script}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))


def test_gpu_lists():
    assert parse_gpu_list("all") is None and parse_gpu_list(" ALL ") is None
    assert parse_gpu_list("0") == [0] and parse_gpu_list("3, 1,0") == [3, 1, 0]
    for bad, says in [("0,x", "'x' is not a GPU index"), ("-1", "'-1' is not a GPU index"),
                      ("1,1", "GPU 1 named twice"), ("", "write all or a comma list"), ("0,", "write all or a comma list"),
                      ("1.5", "'1.5' is not a GPU index"), ("99999", "'99999' is not a GPU index")]:
        with pytest.raises(InputError, match=re.escape(says)):
            parse_gpu_list(bad)


def test_gpus_are_found_with_nvidia_smi(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, 'printf "0\\n1\\n3\\n"')
    assert resolve_gpus("all") == [0, 1, 3] and resolve_gpus("3,0") == [3, 0]
    with pytest.raises(InputError, match=r"GPU 2 not found \(nvidia-smi lists 0, 1, 3\)"):
        resolve_gpus("0,2")
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "NVIDIA-SMI has failed because it could not talk to the driver" >&2; '
                                           'exit 9')
    with pytest.raises(InputError, match=r"--gpus all: no GPU found \(nvidia-smi failed \(exit 9: NVIDIA-SMI has"):
        resolve_gpus("all")
    assert resolve_gpus("0,2") == [0, 2]  # nothing to check against: taken as given
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="nvidia-smi is not installed"):
        resolve_gpus("all")


def test_bad_gpu_flags_are_one_line_errors(sqlite_env, tmp_path, monkeypatch):
    for args, says in [(["--gpu", "1", "--gpus", "0"], "--gpu and --gpus cannot be used together"),
                       (["--gpus", "0,x"], "'x' is not a GPU index"), (["--gpus", "0,0"], "GPU 0 named twice"),
                       (["--gpus", "-1"], "'-1' is not a GPU index"), (["--gpu", "-1"], "-1 is not in the range"),
                       (["--gpus", "0", "--name", "w"], "--name names one worker"),
                       (["--name", "two words"], "a worker name is letters")]:
        check_rejected(sqlite_env, ["worker", *args], says)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    check_rejected(sqlite_env, ["worker", "--gpus", "all"], "no GPU found (nvidia-smi is not installed")


def test_pinning_comes_before_torch(monkeypatch):
    # the modules a worker loads before its first job do not import torch, so CUDA_VISIBLE_DEVICES still counts
    code = ("import sys, manage, worker.gpus, worker.launch, worker.registry, worker.runner, worker.reaper, "
            "worker.notify; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    gpus.pin_gpu(3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_a_live_worker_keeps_its_name_and_a_dead_one_gives_it_back(sqlite_env):
    broker, base = broker_of(sqlite_env), f"tq-test-{uuid.uuid4().hex[:6]}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert claim_node_name(broker, f"{base}@%h") == f"{base}@{HOST}"
        broker.redis.set(node_claim_key(f"{base}@{HOST}"), other.pid)  # another live process holds it
        assert claim_node_name(broker, f"{base}@%h") == f"{base}-2@{HOST}"
        broker.redis.set(node_claim_key(f"{base}-2@{HOST}"), other.pid)
        assert claim_node_name(broker, f"{base}@%h") == f"{base}-3@{HOST}"
        with pytest.raises(InputError, match=f"a worker named {base}@{HOST} is already running \\(pid {other.pid}\\)"):
            claim_node_name(broker, f"{base}@%h", exact=True)
        other.kill()
        other.wait()
        assert claim_node_name(broker, f"{base}@%h", exact=True) == f"{base}@{HOST}"  # its holder is gone
        assert broker.redis.get(node_claim_key(f"{base}@{HOST}")) == str(os.getpid()).encode()
        assert broker.redis.ttl(node_claim_key(f"{base}@{HOST}")) > 0
    finally:
        other.kill()
        for n in ("", "-2", "-3"):
            broker.redis.delete(node_claim_key(f"{base}{n}@{HOST}"))


# ------------------------------------------------------------------------------------------------ supervisor
def python(code: str):
    return lambda gpu: [sys.executable, "-c", code, str(gpu)]


def test_supervisor_gives_up_on_a_worker_that_keeps_dying(caplog):
    supervisor = Supervisor([0, 1], python("import sys; sys.exit(3 if sys.argv[1] == '1' else 0)"), burst=True,
                            backoff=0.05, give_up_after=3, poll=0.05)
    caplog.set_level("INFO", logger="tunequeue.gpus")
    assert supervisor.run() == 1
    gpu0, gpu1 = supervisor.children
    assert gpu0.exit_codes == [0] and not gpu0.failed  # a burst worker that finished
    assert gpu1.exit_codes == [3, 3, 3] and gpu1.failed
    assert "GPU 1: the worker died 3 times in a row" in caplog.text and "giving up on this GPU" in caplog.text
    assert Supervisor([4], python("import sys; sys.exit(2)"), poll=0.05).run() == 1  # refused input: no retry


def test_supervisor_restarts_a_killed_worker_and_passes_signals_on():
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(120)"
    supervisor = Supervisor([0, 1], python(code), backoff=0.05, poll=0.05)
    seen: dict = {}

    def operator():
        first = wait_until(lambda: all(c.process for c in supervisor.children) and
                           [c.process.pid for c in supervisor.children], 20, "two children")
        os.kill(first[0], signal.SIGKILL)
        seen["restarted"] = wait_until(lambda: (p := supervisor.children[0].process) and p.pid != first[0] and p.pid,
                                       20, "the restart")
        seen["other"] = supervisor.children[1].process.pid == first[1]
        supervisor._forward(signal.SIGTERM, None)  # what the handler does on SIGTERM

    thread = threading.Thread(target=operator)
    thread.start()
    started = time.monotonic()
    assert supervisor.run() == 0  # both stopped cleanly on the signal
    thread.join()
    assert seen["restarted"] and seen["other"] and time.monotonic() - started < 30
    assert supervisor.children[0].exit_codes == [-signal.SIGKILL, 0] and supervisor.children[1].exit_codes == [0]


def supervisor_process(env, *args, log):
    return subprocess.Popen([sys.executable, str(REPO / "manage.py"), "worker", "--gpus", *args], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def test_gpus_runs_one_pinned_named_worker_per_gpu_and_restarts_one_that_dies(make_env, tmp_path):
    env = {**make_env("sqlite"), **FAST_RECORDS}
    broker, log = broker_of(env), tmp_path / "supervisor.log"

    def by_gpu():
        records = {w["cuda_visible_devices"]: w for w in broker.live_workers()}
        return records if set(records) == {"0", "1"} else None

    with open(log, "w") as out:
        supervisor = supervisor_process(env, "0,1", log=out)
    try:
        first = wait_until(by_gpu, 120, "a worker on each GPU")
        for gpu, record in first.items():
            assert re.fullmatch(rf"tunequeue-gpu{gpu}(-\d+)?@{re.escape(HOST)}", record["hostname"]), record
        os.kill(first["0"]["pid"], signal.SIGKILL)
        again = wait_until(lambda: (r := by_gpu()) and r["0"]["pid"] != first["0"]["pid"] and r, 120, "the restart")
        assert again["0"]["hostname"] == first["0"]["hostname"]  # the same name, given back by the dead worker
        assert again["1"]["pid"] == first["1"]["pid"]
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    text = log.read_text()
    assert "GPU 0: the worker exited unexpectedly (killed by SIGKILL)" in text and "restarting it in" in text, text
    assert broker.live_workers() == []  # each stopped worker removed its record
    assert not any(broker.redis.exists(node_claim_key(r["hostname"])) for r in again.values())


def test_gpus_burst_exits_when_every_worker_has_finished(make_env, tmp_path):
    env = make_env("sqlite")
    with open(tmp_path / "supervisor.log", "w") as out:
        supervisor = supervisor_process(env, "0,1", "--burst", log=out)
    try:
        assert supervisor.wait(timeout=120) == 0, (tmp_path / "supervisor.log").read_text()[-3000:]
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    text = (tmp_path / "supervisor.log").read_text()
    assert "GPU 0: worker finished its work" in text and "GPU 1: worker finished its work" in text
