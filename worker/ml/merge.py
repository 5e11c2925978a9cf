"""Merging a LoRA adapter into its base: a whole model folder that plain `AutoModelFor...from_pretrained` loads.

The base is always loaded unquantized (float32 unless asked otherwise), also for a qlora adapter: its LoRA matrices
are ordinary weights over the base, and merging them into 4-bit weights is where other tools silently lose them.
Every adapted layer is merged one at a time and compared with the base weight it started from; a merge that
leaves the base as it was (LoRA B all zero, as an adapter saved before any training step has it, or a change
below the dtype's precision next to the base weights) is refused instead of saved.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional

from models.errors import InputError

log = logging.getLogger("tunequeue.merge")
MIN_KEPT = 0.1  # a merge keeping less of the adapter's change than this is the base with rounding noise


def merge_into(directory: Path, home: Path, base_model: str, model_kind: str, adapter_folder: Path, *,
               labels: Optional[list[str]] = None, dtype: str = "float32", name: str = "") -> dict:
    """Load the base in `dtype`, apply the PEFT adapter, merge, check the merge changed the base, and save model +
    base tokenizer to `directory`. Returns how much of the adapter's change the merged weights hold."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from worker.ml.kinds import load_model
    from worker.ml.model_cache import ModelCache

    base_path = ModelCache(home, device="cpu").resolve(base_model)
    base = load_model(base_path, model_kind, labels=labels if model_kind == "classification" else None,
                      dtype=getattr(torch, dtype))
    peft_model = PeftModel.from_pretrained(base, str(adapter_folder), is_trainable=False)
    kept = merge_layers(peft_model)
    check_changed(kept, name or adapter_folder.name, dtype,
                  trains_modules=bool(getattr(peft_model.peft_config["default"], "modules_to_save", None)))
    with warnings.catch_warnings():  # PEFT notes that the LoRA layers are merged already; anything else merges now
        warnings.simplefilter("ignore", UserWarning)
        merged = peft_model.merge_and_unload()
    merged.eval()
    merged.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(directory)
    log.info("merged %s in %s: %s layers, %.4f of the adapter's change kept", adapter_folder, dtype, kept["layers"],
             kept["kept"])
    return kept


def merge_layers(peft_model, adapter: str = "default") -> dict:
    """Merge `adapter` into every LoRA layer, one layer at a time (one copy of one weight extra), and measure what the
    merged weights hold: `kept` is the adapter's change projected on what it should be (⟨W' − W, ΔW⟩ / |ΔW|², 1
    for an exact merge, 0 when nothing changed), `changed` the layers whose weight moved at all."""
    import torch
    from peft.tuners.lora import LoraLayer

    intended = projected = 0.0
    layers = changed = 0
    with torch.no_grad():
        for module in peft_model.base_model.model.modules():
            if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
                continue
            weight = module.get_base_layer().weight
            if not weight.dtype.is_floating_point:
                raise InputError(f"cannot merge into quantized weights ({weight.dtype}); load the base unquantized")
            before = weight.detach().clone()
            delta = module.get_delta_weight(adapter).float()
            module.merge(adapter_names=[adapter])
            actual = weight.detach().float() - before.float()
            intended += float((delta * delta).sum())
            projected += float((actual * delta).sum())
            layers += 1
            changed += int(not torch.equal(weight, before))
    return {"layers": layers, "changed_layers": changed, "kept": projected / intended if intended else 0.0,
            "delta_norm": intended ** 0.5}


def check_changed(kept: dict, name: str, dtype: str, trains_modules: bool = False) -> None:
    """InputError when the merged model is the base: the adapter changes no weight, or the merge lost its change."""
    if trains_modules:  # a classifier's head is trained whole and saved with the adapter: the model differs
        return
    if kept["delta_norm"] == 0:
        raise InputError(f"adapter {name!r} changes no weight: its LoRA B matrices are all zero (an adapter saved "
                         "before any training step, or one whose training never moved them); the merged model "
                         "would equal the base, so nothing was written")
    if kept["changed_layers"] == 0 or kept["kept"] < MIN_KEPT:
        raise InputError(f"merging adapter {name!r} into {dtype} weights kept {100 * max(kept['kept'], 0):.0f}% of "
                         f"its change ({kept['changed_layers']} of {kept['layers']} layers changed): its updates are "
                         f"below {dtype}'s precision next to the base weights, so the merged model would be the base; "
                         "merge with --dtype float32")
