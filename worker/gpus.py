"""One worker per GPU: which GPUs there are, pinning a worker process to one, and the supervisor of `--gpus`.

`manage.py worker --gpu N` pins its process to GPU N (`CUDA_VISIBLE_DEVICES=N`, set before anything imports torch;
the worker imports it at its first job) under the node name `tunequeue-gpuN@host`. `manage.py worker --gpus
all|0,1,3` runs a `Supervisor`: one `worker --gpu N` child per GPU, a child that dies restarted after a backoff (one
that keeps dying right after its start is given up with a log line), SIGTERM/SIGINT/SIGQUIT passed on to every
child, and an exit once all children have exited by themselves (`--burst`), non-zero if any failed.

GPUs are found with `nvidia-smi --query-gpu=index` (torch is not imported here: it would pin the CUDA devices of
this process before a child could choose). Its indices follow the PCI bus order, so `CUDA_DEVICE_ORDER=PCI_BUS_ID`
is set with the index, else CUDA's own order (fastest first) could map index 1 to another card.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import InputError

log = logging.getLogger("tunequeue.gpus")

MANAGE = Path(__file__).resolve().parent.parent / "manage.py"
MAX_GPU_INDEX = 1023
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


# --------------------------------------------------------------------------------------------- finding GPUs
def detect_gpus() -> tuple[list[int], str]:
    """(GPU indices nvidia-smi lists, why the list is empty: '' when it is not)."""
    try:
        done = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return [], "nvidia-smi is not installed or not on PATH"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi could not be run: {exc}"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return [], f"nvidia-smi failed (exit {done.returncode}{': ' + said[0][:200] if said else ''})"
    found = sorted({int(line) for line in (x.strip() for x in done.stdout.splitlines()) if line.isdigit()})
    return found, "" if found else "nvidia-smi lists no GPU"


def parse_gpu_list(text: str) -> list[int] | None:
    """`--gpus`: None for 'all', else the distinct indices of a comma list such as 0,1,3 (InputError otherwise)."""
    value = text.strip()
    if value.lower() == "all":
        return None
    parts = [part.strip() for part in value.split(",")]
    shown = repr(text[:60])
    if not value or any(not part for part in parts):
        raise InputError(f"--gpus {shown}: write all or a comma list of GPU indices such as 0,1,3")
    bad = next((part for part in parts if not part.isdigit() or int(part) > MAX_GPU_INDEX), None)
    if bad is not None:
        raise InputError(f"--gpus {shown}: {bad[:20]!r} is not a GPU index (0 to {MAX_GPU_INDEX}); write all or a "
                         "comma list such as 0,1,3")
    indices = [int(part) for part in parts]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise InputError(f"--gpus {shown}: GPU {', '.join(map(str, twice))} named twice (one worker per GPU)")
    return indices


def resolve_gpus(text: str) -> list[int]:
    """The GPUs `--gpus` names: every GPU nvidia-smi lists for 'all' (InputError when there is none); a list is
    checked against nvidia-smi's where it answers, and taken as given where it does not."""
    asked = parse_gpu_list(text)
    found, why = detect_gpus()
    if asked is None:
        if not found:
            raise InputError(f"--gpus all: no GPU found ({why})")
        return found
    missing = [i for i in asked if found and i not in found]
    if missing:
        raise InputError(f"--gpus: GPU {', '.join(map(str, missing))} not found (nvidia-smi lists "
                         f"{', '.join(map(str, found))})")
    return asked


def check_gpu(index: int) -> None:
    """`--gpu N`: an InputError when nvidia-smi answers and does not list GPU N (no nvidia-smi: taken as given)."""
    found, _ = detect_gpus()
    if found and index not in found:
        raise InputError(f"--gpu {index}: no such GPU (nvidia-smi lists {', '.join(map(str, found))})")


def pin_gpu(index: int) -> None:
    """Make GPU `index` (nvidia-smi's numbering) the only CUDA device of this process; call it before torch loads."""
    if "torch" in sys.modules:  # too late: CUDA may already have read the variable
        log.warning("torch was imported before --gpu %s took effect; the worker may see every GPU", index)
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


# ------------------------------------------------------------------------------------------------ supervisor
def worker_command(gpu: int, worker_args: list[str]) -> list[str]:
    return [sys.executable, str(MANAGE), "worker", "--gpu", str(gpu), *worker_args]


@dataclass
class Child:
    gpu: int
    process: subprocess.Popen | None = None
    started: float = 0.0
    quick_deaths: int = 0  # deaths within `quick_death_s` of a start, in a row
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)
    done: bool = False  # exited for good: finished (burst), stopped, or given up
    failed: bool = False


class Supervisor:
    """Runs one worker process per GPU and keeps it running (see the module's docstring).

    `burst`: a child that exits with 0 has finished its work and is not restarted. Exit code 2 (the worker refused
    its input) is not retried either. Any other exit is restarted after `backoff` seconds, doubled for each death
    in a row within `quick_death_s` of its start, at most `max_backoff`; after `give_up_after` such deaths in a row
    the GPU is given up."""

    def __init__(self, gpus: list[int], command, *, burst: bool = False, backoff: float = 1.0,
                 max_backoff: float = 60.0, quick_death_s: float = 30.0, give_up_after: int = 5, poll: float = 0.2):
        self.children = [Child(gpu) for gpu in gpus]
        self.command, self.burst = command, burst
        self.backoff, self.max_backoff, self.quick_death_s = backoff, max_backoff, quick_death_s
        self.give_up_after, self.poll = give_up_after, poll
        self.stopping = False

    def run(self) -> int:
        """Supervise until every child has exited for good; 0 when all finished cleanly, else 1."""
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED_SIGNALS}
        try:
            for child in self.children:
                self._start(child)
            while not all(child.done for child in self.children):
                time.sleep(self.poll)
                for child in self.children:
                    self._check(child)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        failed = [c.gpu for c in self.children if c.failed]
        if failed:
            log.error("workers of GPU %s failed", ", ".join(map(str, failed)))
        return 1 if failed else 0

    def _start(self, child: Child) -> None:
        child.restart_at = None
        try:
            # its own process group: a Ctrl-C at the terminal reaches the supervisor only, which passes it on once
            # (a second SIGINT would make Celery stop cold, abandoning the running job)
            child.process = subprocess.Popen(self.command(child.gpu), process_group=0, preexec_fn=_die_with_parent)
        except OSError as exc:
            log.error("GPU %s: could not start a worker: %s", child.gpu, exc)
            child.process = None
            child.exit_codes.append(-1)
            self._died(child, -1, lived=0.0)
            return
        child.started = time.monotonic()
        log.info("GPU %s: worker started (pid %s)", child.gpu, child.process.pid)
        if self.stopping:  # a signal came while it was being started: it stops with the others
            child.process.send_signal(signal.SIGTERM)

    def _check(self, child: Child) -> None:
        if child.done:
            return
        if child.process is None:
            if child.restart_at is not None and time.monotonic() >= child.restart_at and not self.stopping:
                self._start(child)
            elif self.stopping:  # it was waiting for its restart: its last exit stands
                child.done, child.failed = True, bool(child.exit_codes) and child.exit_codes[-1] != 0
            return
        code = child.process.poll()
        if code is None:
            return
        child.process = None
        child.exit_codes.append(code)
        self._died(child, code, lived=time.monotonic() - child.started)

    def _died(self, child: Child, code: int, lived: float) -> None:
        if self.stopping:
            child.done, child.failed = True, code != 0
            log.info("GPU %s: worker stopped (exit %s)", child.gpu, code)
            return
        if code == 0 and self.burst:
            child.done = True
            log.info("GPU %s: worker finished its work", child.gpu)
            return
        if code == 2:
            child.done = child.failed = True
            log.error("GPU %s: the worker refused its settings or flags (exit 2); not restarting it", child.gpu)
            return
        child.quick_deaths = child.quick_deaths + 1 if lived < self.quick_death_s else 1
        if child.quick_deaths >= self.give_up_after:
            child.done = child.failed = True
            log.error("GPU %s: the worker died %d times in a row within %gs of starting (last exit %s); giving up "
                      "on this GPU", child.gpu, child.quick_deaths, self.quick_death_s, code)
            return
        delay = min(self.backoff * 2 ** (child.quick_deaths - 1), self.max_backoff)
        child.restart_at = time.monotonic() + delay
        log.warning("GPU %s: the worker exited unexpectedly (%s) after %.0fs; restarting it in %gs", child.gpu,
                    _exit_text(code), lived, delay)

    def _forward(self, signum, _frame) -> None:
        self.stopping = True
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                try:
                    child.process.send_signal(signum)
                except ProcessLookupError:
                    pass
        log.info("%s passed on to the workers; waiting for them to stop", signal.Signals(signum).name)


def supervise(gpus: list[int], worker_args: list[str], *, burst: bool) -> int:
    """`worker --gpus`: supervise one `worker --gpu N` child per GPU (with `worker_args`), logging to stderr."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    log.info("one worker per GPU: %s", ", ".join(map(str, gpus)))
    return Supervisor(gpus, lambda gpu: worker_command(gpu, worker_args), burst=burst).run()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the supervisor dies (a worker left without its
    supervisor would go on holding its GPU)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except Exception:
            pass
