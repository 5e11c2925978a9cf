"""Merging a LoRA adapter into its base: a whole model folder that plain `AutoModelFor...from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def merge_into(directory: Path, home: Path, base_model: str, model_kind: str, adapter_folder: Path, *,
               labels: Optional[list[str]] = None, dtype: str = "float32") -> None:
    """Load the base in `dtype`, apply the PEFT adapter, merge, and save model + base tokenizer to `directory`."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from worker.ml.kinds import load_model
    from worker.ml.model_cache import ModelCache

    base_path = ModelCache(home, device="cpu").resolve(base_model)
    base = load_model(base_path, model_kind, labels=labels if model_kind == "classification" else None,
                      dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_folder), is_trainable=False).merge_and_unload()
    merged.eval()
    merged.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(directory)
