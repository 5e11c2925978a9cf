"""The worker's resident base models: loaded once per process, adapters attached and removed per job.

A `ModelCache` is a plain object owned by the worker process (one per GPU). `get()` loads a base model the first
time and counts loads; a base is keyed by reference, task, quantization (4-bit bases are separate entries) and, for
classification, its label set. `with_adapter()`, `with_adapters()` and `training_adapter()` inject PEFT layers into
the resident model for the duration of one job and remove them afterwards, so the base weights stay untouched and
the next job on the same base never reloads it.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from worker.builtin import BUILTIN_MODELS, ensure_builtin


@dataclass
class LoadedModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    device: str
    task: str = "seq2seq"
    labels: Optional[list[str]] = None
    load_in_4bit: bool = False
    extra: dict = field(default_factory=dict)


class ModelCache:
    def __init__(self, home: Path, device: str | None = None):
        self.home = home
        self.device = device or _default_device()
        self.loads = 0
        self._models: dict[tuple, LoadedModel] = {}
        self._lock = threading.Lock()  # one job at a time uses the resident model

    def resolve(self, ref: str) -> str:
        if ref in BUILTIN_MODELS:
            return str(ensure_builtin(ref, self.home))
        return ref

    def task_of(self, ref: str) -> str:
        from worker.model_kinds import detect_task

        return detect_task(self.resolve(ref) if ref in BUILTIN_MODELS else ref)

    def _key(self, ref: str, task: Optional[str], labels, load_in_4bit: bool) -> tuple:
        return (ref, task or self.task_of(ref), tuple(labels) if labels else None, load_in_4bit)

    def get(self, ref: str, task: Optional[str] = None, *, labels: Optional[list[str]] = None,
            load_in_4bit: bool = False) -> LoadedModel:
        key = self._key(ref, task, labels, load_in_4bit)
        if key not in self._models:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            from worker.model_kinds import load_model

            hf_logging.disable_progress_bar()
            path = self.resolve(ref)
            task = key[1]
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token is None:  # GPT-2 / Llama style tokenizers ship without one
                tokenizer.pad_token = tokenizer.eos_token
            if task == "causal":
                tokenizer.padding_side = "left"  # batched generation continues right after each prompt
            model = load_model(path, task, labels=labels, load_in_4bit=load_in_4bit)
            if not load_in_4bit:
                model = model.to(self.device)
            model.eval()
            if labels is None and task == "classification":
                labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            self._models[key] = LoadedModel(ref, path, model, tokenizer, self.device, task, labels, load_in_4bit)
            self.loads += 1
        return self._models[key]

    def is_loaded(self, ref: str) -> bool:
        return any(key[0] == ref for key in self._models)

    @property
    def loaded_refs(self) -> list[str]:
        return sorted({key[0] for key in self._models})

    @contextlib.contextmanager
    def with_adapter(self, loaded: LoadedModel, adapter_path: Path | None) -> Iterator[Any]:
        """The resident base (adapter_path None) or base + adapter in eval mode, for one job."""
        with self._lock:
            if adapter_path is None:
                yield loaded.model
                return
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_path), is_trainable=False)
            try:
                peft_model.eval()
                yield peft_model
            finally:
                loaded.model = detach(peft_model)
                loaded.model.eval()

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


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
