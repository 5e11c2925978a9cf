"""The model cache's byte budget (LRU eviction of whole entries, on the built-in tiny models) and a night of jobs on
one cache: after each job the resident base has no PEFT layers left and unchanged weights, and memory stays flat."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import logging
import shutil
import weakref

import pytest

from models import make_session_factory
from models.jobs import JobKind
from models.migrate import upgrade
from worker.jobs.generate import generate_summaries
from worker.ml.model_cache import ModelCache, model_bytes
from models.settings import Settings
from models.specs import FinetuneSpec, GenerateSpec
from worker.jobs.finetune import train_adapter
from tests.conftest import new_job

NIGHT_JOBS = 20
# RSS growth allowed from after the first job to after the last (read after gc + malloc_trim). Measured: +2.0 MiB,
# flat from the third job on. Keeping each job's LoRA layers (180k parameters on tiny-t5) with their gradients and
# AdamW state would add ~2.7 MiB per fine-tune and ~0.7 MiB per generation, ~34 MiB over the night.
RSS_SLACK_BYTES = 8 << 20


@pytest.fixture(scope="module")
def home(tmp_path_factory, builtin_home):
    home = tmp_path_factory.mktemp("cache-home")
    shutil.copytree(builtin_home / "builtin", home / "builtin")
    return home


@pytest.fixture(scope="module")
def sizes(home) -> dict[str, int]:
    """Measured bytes of each tiny model as the cache holds it."""
    cache = ModelCache(home, device="cpu", budget_bytes=1 << 40)
    return {ref: model_bytes(cache.get(ref).model) for ref in ("tiny-t5", "tiny-llama", "tiny-bert")}


def test_budget_for_one_model_evicts_on_every_switch(home, sizes):
    t5, llama = sizes["tiny-t5"], sizes["tiny-llama"]
    cache = ModelCache(home, device="cpu", budget_bytes=max(t5, llama) + min(t5, llama) // 2)
    for step, ref in enumerate(["tiny-t5", "tiny-llama", "tiny-t5", "tiny-llama"], start=1):
        assert cache.get(ref).size_bytes == sizes[ref]
        assert (cache.loads, cache.evictions) == (step, step - 1)
        assert cache.loaded_refs == [ref] and cache.resident_bytes == sizes[ref] <= cache.budget_bytes
    cache.get("tiny-llama")  # a hit: no load, no eviction
    assert (cache.loads, cache.evictions) == (4, 3)


def test_budget_for_both_never_evicts(home, sizes):
    cache = ModelCache(home, device="cpu", budget_bytes=sizes["tiny-t5"] + sizes["tiny-llama"])
    for ref in ["tiny-t5", "tiny-llama"] * 3:
        cache.get(ref)
    assert (cache.loads, cache.evictions) == (2, 0)
    assert cache.resident_bytes == sizes["tiny-t5"] + sizes["tiny-llama"]


def test_least_recently_used_goes_first_and_is_freed(home, sizes):
    cache = ModelCache(home, device="cpu", budget_bytes=sum(sizes.values()) - 1)  # any two, never all three
    t5_model = weakref.ref(cache.get("tiny-t5").model)
    llama_model = weakref.ref(cache.get("tiny-llama").model)
    cache.get("tiny-t5")  # now tiny-llama is the least recently used
    cache.get("tiny-bert")
    assert cache.loaded_refs == ["tiny-bert", "tiny-t5"] and cache.evictions == 1
    assert llama_model() is None and t5_model() is not None  # the evicted weights are gone at once
    stats = cache.stats()
    assert [e["ref"] for e in stats["entries"]] == ["tiny-bert", "tiny-t5"]  # most recently used first
    assert [e["bytes"] for e in stats["entries"]] == [sizes["tiny-bert"], sizes["tiny-t5"]]
    assert {k: stats[k] for k in ("loads", "evictions", "resident_bytes", "budget_bytes")} == {
        "loads": 3, "evictions": 1, "resident_bytes": sizes["tiny-bert"] + sizes["tiny-t5"],
        "budget_bytes": cache.budget_bytes}


def test_model_larger_than_budget_is_loaded_alone_with_a_warning(home, sizes, caplog):
    cache = ModelCache(home, device="cpu", budget_bytes=1000)
    with caplog.at_level(logging.WARNING, logger="tunequeue.worker"):
        assert cache.get("tiny-t5").size_bytes == sizes["tiny-t5"]
    assert "more than the whole model cache budget" in caplog.text
    cache.get("tiny-llama")
    assert cache.loaded_refs == ["tiny-llama"] and (cache.loads, cache.evictions) == (2, 1)


def test_budget_setting(home):
    assert Settings.from_env({"TUNEQUEUE_MODEL_CACHE_BYTES": "1.5GiB"}).model_cache_bytes == 3 << 29
    assert Settings.from_env({"TUNEQUEUE_MODEL_CACHE_BYTES": "500MB"}).model_cache_bytes == 500_000_000
    assert Settings.from_env({}).model_cache_bytes is None
    with pytest.raises(ValueError, match="not a size"):
        Settings.from_env({"TUNEQUEUE_MODEL_CACHE_BYTES": "lots"})
    assert 0 < ModelCache(home, device="cpu").budget_bytes <= 8 << 30  # the CPU default


def _rss_bytes() -> int:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap pages back, less allocator noise
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _fingerprint(model) -> tuple[int, int, str, set[str]]:
    """(parameter count, module count, checksum of every weight, PEFT leftovers) of the resident model."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    leftovers = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft")}
    leftovers |= {"peft_config"} if hasattr(model, "peft_config") else set()
    return sum(p.numel() for p in model.parameters()), len(list(model.modules())), digest.hexdigest(), leftovers


def test_a_night_of_jobs_leaves_the_resident_base_as_it_was(home, tmp_path):
    """20 jobs alternate a short LoRA fine-tune and a generation with the adapter just trained, on one cache."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    session = make_session_factory(url)()
    cache = ModelCache(home, device="cpu")
    start = _fingerprint(cache.get("tiny-t5").model)
    assert not start[3]
    rss = []
    for i in range(NIGHT_JOBS):
        if i % 2 == 0:
            # eval_limit too: the spec currently reads eval_split=None as "use the default split"
            spec = FinetuneSpec(name=f"night-{i}", max_steps=3, eval_split=None, eval_limit=8, train_limit=64,
                                checkpoint_every_steps=None)
            train_adapter(spec, session, cache, home, job_id=new_job(session, JobKind.finetune, spec).id)
        else:
            spec = GenerateSpec(adapter=f"night-{i - 1}", limit=4, max_new_tokens=16)
            generate_summaries(spec, session, cache, home, job_id=new_job(session, JobKind.generate, spec).id)
        assert _fingerprint(cache.get("tiny-t5").model) == start, f"job {i + 1} left the base changed"
        rss.append(_rss_bytes())
    session.close()
    assert (cache.loads, cache.evictions, cache.loaded_refs) == (1, 0, ["tiny-t5"])
    print("RSS after each job (MiB):", [round(r / (1 << 20), 1) for r in rss])
    assert rss[-1] - rss[0] < RSS_SLACK_BYTES, [round(r / (1 << 20), 1) for r in rss]
