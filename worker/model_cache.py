"""The worker's resident base models: loaded once per process, adapters attached and removed per job.

A `ModelCache` is a plain object owned by the worker process (one per GPU). `get()` loads a base model the first
time and counts loads; `with_adapter()` and `training_adapter()` inject LoRA layers into the resident model for the
duration of one job and unload them afterwards, so the base weights stay untouched and the next job on the same
base never reloads it.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from worker.builtin import BUILTIN_MODELS, ensure_builtin


@dataclass
class LoadedModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    device: str


class ModelCache:
    def __init__(self, home: Path, device: str | None = None):
        self.home = home
        self.device = device or _default_device()
        self.loads = 0
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()  # one job at a time uses the resident model

    def resolve(self, ref: str) -> str:
        if ref in BUILTIN_MODELS:
            return str(ensure_builtin(ref, self.home))
        return ref

    def get(self, ref: str) -> LoadedModel:
        if ref not in self._models:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            path = self.resolve(ref)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSeq2SeqLM.from_pretrained(path).to(self.device)
            model.eval()
            self._models[ref] = LoadedModel(ref, path, model, tokenizer, self.device)
            self.loads += 1
        return self._models[ref]

    def is_loaded(self, ref: str) -> bool:
        return ref in self._models

    @contextlib.contextmanager
    def with_adapter(self, ref: str, adapter_path: Path | None) -> Iterator[Any]:
        """The resident base (adapter_path None) or base + adapter in eval mode, for one job."""
        loaded = self.get(ref)
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
                loaded.model = peft_model.unload()
                loaded.model.eval()

    @contextlib.contextmanager
    def training_adapter(self, ref: str, lora_config) -> Iterator[Any]:
        """A fresh trainable LoRA adapter on the resident base; removed again when the job ends."""
        loaded = self.get(ref)
        with self._lock:
            from peft import get_peft_model

            peft_model = get_peft_model(loaded.model, lora_config)
            try:
                yield peft_model
            finally:
                loaded.model = peft_model.unload()
                loaded.model.eval()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
