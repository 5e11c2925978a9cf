"""Capability routing: what a worker can run, what a job needs, and why a queued job finds no taker.

A worker detects its capabilities once at start, in its own process (`detect`): CUDA, the GPU's name, its total and
free memory, bf16 support and whether bitsandbytes is installed; free memory is measured again on every heartbeat
(`refresh`). They go in the worker's registry record (worker/registry.py). A job's needs (`needs_of`) are what its
spec asks for (`requires`, `min_gpu_mem`, models/specs.py) plus what its options imply: a 4-bit or 8-bit base or an
8-bit optimizer needs bitsandbytes, a memory floor needs CUDA. A job with needs is published to a queue whose name
encodes them (worker/routing.py), and a worker consumes a queue only while it meets that queue's needs. A queued job
that no live worker meets gets a reason (`unmet_reason`), computed from the live records whenever it is shown.

Free memory is what this worker could use: the device's free memory plus what this process's CUDA allocator holds
(its resident models and a running job's tensors, which it can give back), so a worker's own work never makes it
refuse a queue; other processes on the same GPU do.

TUNEQUEUE_FAKE_CAPABILITIES (TESTS ONLY): a JSON object laid over the detected capabilities, e.g. '{"cuda": true,
"gpu_mem_free_bytes": 25769803776}', so that a CPU test machine can run a worker that claims a GPU. The record then
says `"fake": true`. Nothing in a real deployment sets it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from dataclasses import dataclass

from models.errors import InputError

log = logging.getLogger("tunequeue.capabilities")

FAKE_CAPABILITIES = "TUNEQUEUE_FAKE_CAPABILITIES"  # tests only: see the module's docstring
CAPABILITY_KEYS = ("cuda", "gpu_name", "gpu_mem_total_bytes", "gpu_mem_free_bytes", "bf16", "bitsandbytes")
REQUIREMENTS = ("cuda", "bf16", "bitsandbytes")  # what --require names
MIB, GIB = 2**20, 2**30
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


# ------------------------------------------------------------------------------------------------------- needs
@dataclass(frozen=True)
class Needs:
    """What a job needs of its worker; the empty Needs() is what every worker meets."""

    cuda: bool = False
    bf16: bool = False
    bitsandbytes: bool = False
    gpu_mem_bytes: int | None = None  # free GPU memory, rounded up to whole MiB (queue names carry it)

    def __bool__(self) -> bool:
        return self != Needs()

    def tokens(self) -> list[str]:
        """The needs as queue-name words: cuda, bf16, bnb, mem40g (or mem1536m), in that order."""
        words = [word for word, wanted in (("cuda", self.cuda), ("bf16", self.bf16), ("bnb", self.bitsandbytes))
                 if wanted]
        if self.gpu_mem_bytes:
            mib = self.gpu_mem_bytes // MIB
            words.append(f"mem{mib // 1024}g" if mib % 1024 == 0 else f"mem{mib}m")
        return words

    @classmethod
    def from_tokens(cls, words: list[str]) -> "Needs | None":
        """The needs a queue name's words encode; None when a word is not one of ours."""
        found: dict = {}
        for word in words:
            memory = re.fullmatch(r"mem([1-9][0-9]{0,12})([gm])", word)
            if word in ("cuda", "bf16", "bnb"):
                found[{"bnb": "bitsandbytes"}.get(word, word)] = True
            elif memory:
                found["gpu_mem_bytes"] = int(memory[1]) * (GIB if memory[2] == "g" else MIB)
            else:
                return None
        return cls(**found)

    def as_dict(self) -> dict:
        return {"requires": [name for name in REQUIREMENTS if getattr(self, name)],
                "min_gpu_mem_bytes": self.gpu_mem_bytes}


def needs_of(spec: dict) -> Needs:
    """A job's needs from its stored spec: declared (`requires`, `min_gpu_mem`) and implied."""
    declared = set(spec.get("requires") or [])
    memory = spec.get("min_gpu_mem")
    bitsandbytes = ("bitsandbytes" in declared or spec.get("method") == "qlora" or bool(spec.get("load_in_8bit"))
                    or spec.get("optim") in BITSANDBYTES_OPTIMIZERS)
    return Needs(cuda="cuda" in declared or bool(memory), bf16="bf16" in declared, bitsandbytes=bitsandbytes,
                 gpu_mem_bytes=math.ceil(memory / MIB) * MIB if memory else None)


def meets(capabilities: dict | None, needs: Needs) -> bool:
    """Whether a worker with these capabilities (its record's; None: unknown, an older worker) can run the job."""
    caps = capabilities or {}
    if needs.cuda and caps.get("cuda") is not True:
        return False
    if needs.bf16 and caps.get("bf16") is not True:
        return False
    if needs.bitsandbytes and caps.get("bitsandbytes") is not True:
        return False
    return not needs.gpu_mem_bytes or (caps.get("gpu_mem_free_bytes") or 0) >= needs.gpu_mem_bytes


def unmet_reason(needs: Needs, workers: list[dict]) -> str | None:
    """Why no live worker (their registry records) can take a job with `needs`; None when one can. The first need
    that leaves no candidate is named: "no live worker has CUDA", "no live worker has 40 GiB free (largest: 24 GiB
    on host-b)"."""
    if not needs:
        return None
    candidates = workers
    asked: list[str] = []
    for wanted, key, words in ((needs.cuda, "cuda", "CUDA"), (needs.bf16, "bf16", "bf16"),
                               (needs.bitsandbytes, "bitsandbytes", "bitsandbytes")):
        if not wanted:
            continue
        asked.append(words)
        candidates = [w for w in candidates if (w.get("capabilities") or {}).get(key) is True]
        if not candidates:
            none_running = " (no worker is running)" if not workers else ""
            return f"no live worker has {' and '.join(asked)}{none_running}"
    if needs.gpu_mem_bytes:
        sizes = [((w.get("capabilities") or {}).get("gpu_mem_free_bytes") or 0, w.get("hostname", "?"))
                 for w in candidates]
        if not any(size >= needs.gpu_mem_bytes for size, _ in sizes):
            largest = max(sizes, default=None)
            shown = f" (largest: {gib(largest[0])} on {largest[1]})" if largest else ""
            return f"no live worker has {gib(needs.gpu_mem_bytes)} free{shown}"
    return None


def gib(size: int) -> str:
    """Bytes as GiB for a reason or a listing: `40 GiB`, `23.6 GiB`."""
    return f"{size / GIB:.3g} GiB" if size < 1000 * GIB else f"{size / GIB:.0f} GiB"


# ------------------------------------------------------------------------------------------------ capabilities
def detect() -> dict:
    """This process's capabilities (imports torch; CUDA queries go to the device this process sees, so a worker
    pinned with --gpu N describes GPU N). bitsandbytes counts as present when it is installed: importing it takes
    seconds, and the job that needs it imports it anyway."""
    caps: dict = {"cuda": False, "gpu_name": None, "gpu_mem_total_bytes": None, "gpu_mem_free_bytes": None,
                  "bf16": False, "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None}
    try:
        import torch

        if torch.cuda.is_available():
            caps.update(cuda=True, gpu_name=torch.cuda.get_device_name(0), bf16=bool(torch.cuda.is_bf16_supported()))
            caps.update(_memory())
    except Exception as exc:  # a broken torch install must not stop the worker from starting
        log.warning("could not tell whether CUDA is available: %s", exc)
        caps["cuda"] = None
    return _with_fake(caps)


def refresh(caps: dict) -> dict:
    """The capabilities with free memory measured again (for the heartbeat); the same dict when nothing changed."""
    if caps.get("cuda") is not True or caps.get("fake"):
        return caps
    try:
        return {**caps, **_memory()}
    except Exception as exc:
        log.warning("could not measure free GPU memory: %s", exc)
        return caps


def _memory() -> dict:
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return {"gpu_mem_total_bytes": int(total), "gpu_mem_free_bytes": int(free + torch.cuda.memory_reserved(0))}


def _with_fake(caps: dict) -> dict:
    raw = os.environ.get(FAKE_CAPABILITIES)
    if not raw:
        return caps
    try:
        fake = json.loads(raw)
    except json.JSONDecodeError:
        fake = None
    if not isinstance(fake, dict) or not set(fake) <= set(CAPABILITY_KEYS):
        raise InputError(f"{FAKE_CAPABILITIES} (tests only) must be a JSON object with keys among "
                         f"{', '.join(CAPABILITY_KEYS)}")
    log.warning("%s is set: this worker advertises capabilities it may not have (tests only)", FAKE_CAPABILITIES)
    return {**caps, **fake, "fake": True}


def describe(caps: dict | None) -> str:
    """One line for `manage.py workers`: `cuda NVIDIA A100 (80 GiB, 72 GiB free), bf16, bitsandbytes`."""
    if not caps:
        return "capabilities ?"
    if caps.get("cuda") is True:
        memory = ", ".join(part for part in (
            gib(caps["gpu_mem_total_bytes"]) if caps.get("gpu_mem_total_bytes") else "",
            f"{gib(caps['gpu_mem_free_bytes'])} free" if caps.get("gpu_mem_free_bytes") is not None else "") if part)
        parts = [f"cuda {caps.get('gpu_name') or 'yes'}" + (f" ({memory})" if memory else "")]
    else:
        parts = ["cuda ?" if caps.get("cuda") is None else "no cuda"]
    parts += [name for name in ("bf16", "bitsandbytes") if caps.get(name)]
    return ", ".join(parts) + (" [fake]" if caps.get("fake") else "")
