"""The worker's resident base models: loaded once per process, adapters attached and removed per job.

A `ModelCache` is a plain object owned by the worker process (one per GPU). `get()` loads a base model the first
time and counts loads; a base is keyed by reference, model_kind, quantization (None, "4bit" or "8bit": a quantized base
is an entry of its own, shared by every job on it as the full-precision one is) and, for classification, its label
set. `with_adapter()`, `with_adapters()` and `training_adapter()` inject PEFT layers into the resident model for the
duration of one job and remove them afterwards, so the base weights stay untouched and the next job on the same base
never reloads it.

The cache holds at most `budget_bytes` of weights (parameters + buffers as stored: a quantized base counts its packed
4-bit or int8 weights plus their quantization state, not their fp32 size). Before a new entry is loaded,
least-recently-used entries are evicted until its estimated size fits; once it is loaded and measured, more are
evicted if it still does not. The entry being returned is never evicted, so one larger than the whole budget is still
loaded (with a warning) and then sits alone.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from worker.ml.builtin import BUILTIN_MODELS, ensure_builtin

log = logging.getLogger("tunequeue.worker")
GIB = 1 << 30
QUANTIZATIONS = (None, "4bit", "8bit")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class LoadedModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    device: str
    model_kind: str = "seq2seq"
    labels: Optional[list[str]] = None
    quantization: Optional[str] = None  # None (full precision), "4bit" or "8bit"
    extra: dict = field(default_factory=dict)
    size_bytes: int = 0
    last_used: float = 0.0  # time.time() of the last get()

    @property
    def load_in_4bit(self) -> bool:
        return self.quantization == "4bit"


class ModelCache:
    def __init__(self, home: Path, device: str | None = None, budget_bytes: int | None = None):
        self.home = home
        self.device = device or _default_device()
        self.budget_bytes = default_budget(self.device) if budget_bytes is None else budget_bytes
        self.loads = 0
        self.evictions = 0
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()  # least recently used first
        self._measured: dict[tuple, int] = {}  # sizes of entries loaded before: the estimate when one comes back
        self._lock = threading.Lock()  # one job at a time uses the resident model

    def resolve(self, ref: str) -> str:
        if ref in BUILTIN_MODELS:
            return str(ensure_builtin(ref, self.home))
        return ref

    def _key(self, ref: str, model_kind: Optional[str], labels, quantization: Optional[str]) -> tuple:
        from worker.ml.kinds import detect_model_kind

        return (ref, model_kind or detect_model_kind(ref), tuple(labels) if labels else None, quantization)

    def get(self, ref: str, model_kind: Optional[str] = None, *, labels: Optional[list[str]] = None,
            quantization: Optional[str] = None, load_in_4bit: bool = False) -> LoadedModel:
        """The resident base for these settings, loaded on a miss. `load_in_4bit=True` is `quantization="4bit"`."""
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}")
        key = self._key(ref, model_kind, labels, quantization or ("4bit" if load_in_4bit else None))
        loaded = self._models.get(key)
        if loaded is not None:
            self._models.move_to_end(key)
            loaded.size_bytes = model_bytes(loaded.model)  # k-bit preparation upcasts some weights in place
        else:
            self._make_room(self._estimate(key))
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            from worker.ml.kinds import load_model

            hf_logging.disable_progress_bar()
            path = self.resolve(ref)
            model_kind = key[1]
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token is None:  # GPT-2 / Llama style tokenizers ship without one
                tokenizer.pad_token = tokenizer.eos_token
            if model_kind == "causal":
                tokenizer.padding_side = "left"  # batched generation continues right after each prompt
            quantization = key[3]
            model = load_model(path, model_kind, labels=labels, quantization=quantization)
            if not quantization:  # a quantized load is placed by its device_map
                model = model.to(self.device)
            model.eval()
            if labels is None and model_kind == "classification":
                labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            loaded = LoadedModel(ref, path, model, tokenizer, self.device, model_kind, labels, quantization,
                                 size_bytes=model_bytes(model))
            self._models[key] = loaded
            self._measured[key] = loaded.size_bytes
            self.loads += 1
            self._make_room(0, keep=key)
            if loaded.size_bytes > self.budget_bytes:
                log.warning("model %s takes %s, more than the whole model cache budget of %s; loaded anyway",
                            ref, _human(loaded.size_bytes), _human(self.budget_bytes))
        loaded.last_used = time.time()
        return loaded

    @property
    def resident_bytes(self) -> int:
        return sum(loaded.size_bytes for loaded in self._models.values())

    def _estimate(self, key: tuple) -> int:
        """Bytes the entry will take: its measured size if it was loaded before, else its weight files on disk
        (a quarter of them for a 4-bit load, half for 8-bit: hub weights are mostly 16-bit, and the embeddings stay
        unquantized); 0 when the files are not at hand."""
        if key in self._measured:
            return self._measured[key]
        on_disk = _weight_file_bytes(self.resolve(key[0]))
        return on_disk // {None: 1, "4bit": 4, "8bit": 2}[key[3]]

    def _make_room(self, incoming: int, keep: tuple | None = None) -> None:
        """Evict least-recently-used entries (never `keep`) until `incoming` more bytes fit in the budget."""
        while self.resident_bytes + incoming > self.budget_bytes:
            victim = next((key for key in self._models if key != keep), None)
            if victim is None:
                return
            evicted = self._models.pop(victim)
            self.evictions += 1
            log.info("model cache: evicted %s (%s) to stay within %s", evicted.name, _human(evicted.size_bytes),
                     _human(self.budget_bytes))
            del evicted
            gc.collect()  # PEFT and HF modules hold reference cycles; free the weights now, not at some later GC
            _empty_cuda_cache()

    def stats(self) -> dict:
        """Budget, usage, counters and the entries (most recently used first), JSON-ready for the worker record."""
        entries = [{"ref": loaded.name, "model_kind": loaded.model_kind, "labels": loaded.labels,
                    "quantization": loaded.quantization, "bytes": loaded.size_bytes,
                    "last_used": datetime.fromtimestamp(loaded.last_used, timezone.utc).isoformat(timespec="seconds")}
                   for loaded in reversed(self._models.values())]
        return {"budget_bytes": self.budget_bytes, "resident_bytes": self.resident_bytes, "loads": self.loads,
                "evictions": self.evictions, "entries": entries}

    def is_loaded(self, ref: str) -> bool:
        return any(key[0] == ref for key in self._models)

    @property
    def loaded_refs(self) -> list[str]:
        return sorted({key[0] for key in self._models})

    @contextlib.contextmanager
    def with_adapter(self, loaded: LoadedModel, adapter_path: Path | None) -> Iterator[Any]:
        """The resident base (adapter_path None) or base + adapter in eval mode, for one job."""
        if adapter_path is None:
            with self._lock:
                yield loaded.model
            return
        with self.with_adapters(loaded, {"default": adapter_path}) as model:
            yield model

    @contextlib.contextmanager
    def with_adapters(self, loaded: LoadedModel, adapters: dict[str, Path]) -> Iterator[Any]:
        """Base + several named LoRA adapters at once (for mixed batches with `adapter_names`)."""
        with self._lock:
            from peft import PeftModel

            names = list(adapters)
            peft_model = PeftModel.from_pretrained(loaded.model, str(adapters[names[0]]), adapter_name=names[0],
                                                   is_trainable=False)
            try:
                for name in names[1:]:
                    peft_model.load_adapter(str(adapters[name]), adapter_name=name, is_trainable=False)
                peft_model.eval()
                yield peft_model
            finally:
                loaded.model = detach(peft_model)
                loaded.model.eval()

    @contextlib.contextmanager
    def with_lora_mix(self, loaded: LoadedModel, adapters: list[Optional[Path]]) -> Iterator[Any]:
        """Several saved LoRA adapters applied row by row through hooks (worker/multi_lora.py); removed after."""
        with self._lock:
            from worker.ml.multi_lora import MixedLora

            mix = MixedLora(loaded.model, adapters)
            try:
                yield mix
            finally:
                mix.remove()

    @contextlib.contextmanager
    def with_merged_lora(self, loaded: LoadedModel, adapter: Path) -> Iterator[Any]:
        """One saved LoRA adapter merged into copies of its target layers (worker/multi_lora.py); put back after."""
        with self._lock:
            from worker.ml.multi_lora import merged_copy

            with merged_copy(loaded.model, adapter):
                yield loaded.model

    @contextlib.contextmanager
    def training_adapter(self, loaded: LoadedModel, peft_config) -> Iterator[Any]:
        """A fresh trainable PEFT adapter on the resident base; removed again when the job ends."""
        with self._lock:
            from peft import get_peft_model

            peft_model = get_peft_model(loaded.model, peft_config)
            try:
                yield peft_model
            finally:
                loaded.model = detach(peft_model)
                loaded.model.eval()


def detach(peft_model) -> Any:
    """The untouched base model back from a PeftModel: LoRA layers removed without merging, and trained copies of
    `modules_to_save` (a classification head) put back to the originals, which `unload()` alone would keep."""
    config = next(iter(peft_model.peft_config.values()))
    if config.is_prompt_learning:
        return peft_model.get_base_model()
    from peft.utils.other import AuxiliaryTrainingWrapper

    inner = peft_model.base_model.model
    for name, module in list(inner.named_modules()):
        if isinstance(module, AuxiliaryTrainingWrapper):
            parent_name, _, attr = name.rpartition(".")
            setattr(inner.get_submodule(parent_name) if parent_name else inner, attr, module.original_module)
    return peft_model.unload()


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers as stored, each tensor counted once (tied weights, and an int8
    weight's `CB`, which is its data): bitsandbytes keeps 4-bit weights packed two to a uint8 with their quantization
    state (absmax per block, the NF4 code, the double quantization's own state) beside them, and int8 weights with
    a scale per row (`SCB`), none of which are parameters or buffers."""
    seen: set = set()
    total = 0
    for tensor in itertools.chain(model.parameters(), model.buffers(), _quantization_tensors(model)):
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.nelement() else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.element_size() * tensor.nelement()
    return total


def _quantization_tensors(model) -> Iterator[Any]:
    """The tensors of the parameters' bitsandbytes quantization state (none for a full-precision model)."""
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)  # Params4bit
        while state is not None:
            yield from (value for value in vars(state).values() if _is_tensor(value))
            state = getattr(state, "state2", None)  # the double quantization's state of the absmax values
        for name in ("CB", "SCB"):  # Int8Params
            value = getattr(parameter, name, None)
            if _is_tensor(value):
                yield value


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def default_budget(device: str) -> int:
    """Half the memory free when the worker starts, on CPU at most 8 GiB. The budget covers resident weights only:
    a job also needs activations, optimizer state, a full fine-tune's private copy and the generation cache, and
    on CPU several workers may share one machine's RAM."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0] // 2
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 8 * GIB
    return min(8 * GIB, available // 2)


def _weight_file_bytes(path: str) -> int:
    """Size of the weight files of a local folder or of a hub id's snapshot in the local cache; 0 if unknown (the
    load itself then reports what is wrong)."""
    folder = Path(path)
    try:
        if not folder.is_dir():
            from huggingface_hub import try_to_load_from_cache

            config = try_to_load_from_cache(path, "config.json")
            if not isinstance(config, str):
                return 0
            folder = Path(config).parent
        return sum(_tensor_bytes(f) for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    except Exception:
        return 0


def _tensor_bytes(file: Path) -> int:
    """A weight file's size without the safetensors header (so that a budget of exactly the sum of two models'
    sizes holds both)."""
    size = file.stat().st_size
    if file.suffix != ".safetensors":
        return size
    with open(file, "rb") as f:
        return size - 8 - int.from_bytes(f.read(8), "little")


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
