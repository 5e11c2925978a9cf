"""Many LoRA adapters on one resident base inside one batch, without PEFT layers.

Every targeted `nn.Linear` gets a forward hook that adds `x · Aᵢᵀ · Bᵢᵀ · scaleᵢ` for each row's adapter `i`. The
adapters' A and B matrices are stacked (ranks padded with zeros, the scale folded into B), so one matmul pair serves
every adapter in every layer: while the stacked rank is no wider than the layer, as two plain matmuls over all
adapters side by side with a per-row mask; beyond that, gathered per row once per batch into one batched matmul
(the gather-matmul of S-LoRA / punica). PEFT's `adapter_names` path instead loops over the adapters inside every
LoRA layer at every decoding step. The base weights are never written, and the hooks are removed when the pass
ends. The hooks only add to a layer's output, so they work the same on bitsandbytes' 4-bit and int8 layers (QLoRA
adapters on their 4-bit base), computing in the layer's compute dtype.

`merged_copy()` serves a single adapter on a full-precision base: merged into copies of the layers it targets, the
original tensors untouched.

Plain LoRA on linear layers only (no DoRA, no LoRA bias, no `modules_to_save`, no embedding or Conv1D targets);
`supported()` says whether an adapter folder qualifies, and generation falls back to PEFT otherwise.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Iterator, Optional

PREFIX = "base_model.model."


def _config(path: Path) -> dict:
    config = json.loads((path / "adapter_config.json").read_text())
    problems = [name for name, bad in [
        ("not LoRA", config.get("peft_type") != "LORA"), ("DoRA", config.get("use_dora")),
        ("LoRA bias", config.get("lora_bias")), ("modules_to_save", config.get("modules_to_save")),
        ("fan_in_fan_out (Conv1D)", config.get("fan_in_fan_out")),
        ("layer replication", config.get("layer_replication"))] if bad]
    if problems:
        raise ValueError(f"adapter {path.name}: {', '.join(problems)}")
    return config


def supported(path: Path) -> bool:
    try:
        _config(path)
        return True
    except (OSError, ValueError):  # not plain LoRA on linear layers, or unreadable
        return False


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # how PEFT matches its patterns
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(path: Path) -> dict[str, tuple]:
    """{module path in the base model: (A (r, in), B (out, r) with the scale folded in)} of a saved LoRA adapter."""
    from safetensors.torch import load_file

    config = _config(path)
    weights = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            if ".lora_A." not in key and ".lora_B." not in key:
                raise ValueError(f"adapter {path.name}: unexpected tensor {key}")
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        out[module] = (a, b * _scale(config, module, a.shape[0]))
    return out


def compute_dtype(layer):
    """The dtype a linear layer computes in: its weight's, or for a bitsandbytes layer (uint8 / int8 storage) the
    compute dtype it was loaded with (fp32 when it does not say)."""
    import torch

    if layer.weight.dtype.is_floating_point:
        return layer.weight.dtype
    return getattr(layer, "compute_dtype", None) or torch.float32


def is_quantized(layer) -> bool:
    return not layer.weight.dtype.is_floating_point


class MixedLora:
    """Hooks on the base model that apply, row by row, the adapter chosen for that row. `dense_width` (default: the
    layer's larger side) is the widest stacked rank handled in the dense form."""

    def __init__(self, model, adapters: list[Optional[Path]], dense_width: Optional[int] = None):
        import torch

        self.model, self.handles, self.stacks, self.dense = model, [], {}, {}
        read = [read_adapter(p) if p is not None else {} for p in adapters]
        modules = dict(model.named_modules())
        for name in sorted({m for r in read for m in r}):
            layer = modules.get(name)
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(f"LoRA target {name} is not a linear layer of the base model")
            rank = max(r[name][0].shape[0] for r in read if name in r)
            dtype, device = compute_dtype(layer), layer.weight.device
            # slot len(adapters) stays zero: rows without an adapter (the base) gather it
            a_stack = torch.zeros(len(adapters) + 1, rank, layer.in_features, dtype=dtype, device=device)
            b_stack = torch.zeros(len(adapters) + 1, layer.out_features, rank, dtype=dtype, device=device)
            for slot, weights in enumerate(read):
                if name in weights:
                    a, b = weights[name]
                    a_stack[slot, : a.shape[0]] = a.to(device, dtype)
                    b_stack[slot, :, : b.shape[1]] = b.to(device, dtype)
            widest = max(layer.in_features, layer.out_features)  # a 4-bit layer's weight is packed: not its shape
            if len(adapters) * rank <= (dense_width if dense_width is not None else widest):
                # narrow enough: every adapter side by side, (in, n·r) and (n·r, out), two plain matmuls and a
                # mask that keeps each row's own adapter; cheaper than a batched matmul of tiny matrices
                self.dense[name] = (a_stack[:-1].reshape(-1, layer.in_features).T.contiguous(),
                                    b_stack[:-1].transpose(1, 2).reshape(-1, layer.out_features).contiguous(), rank)
            else:
                self.stacks[name] = (a_stack.transpose(1, 2).contiguous(), b_stack.transpose(1, 2).contiguous())
            self.handles.append(layer.register_forward_hook(self._hook(name)))
        self.empty_slot = len(adapters)
        self.rows: Optional[object] = None
        self.per_batch: dict[str, object] = {}  # each layer's mask or gathered matrices for the current rows

    def _hook(self, name: str):
        def add_lora(module, args, output):
            if self.rows is None:
                return output
            x = args[0]
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            if flat.shape[0] != self.rows.shape[0]:
                raise RuntimeError(f"batch of {flat.shape[0]} rows, but {self.rows.shape[0]} adapter choices")
            if name in self.dense:
                a_cat, b_cat, rank = self.dense[name]
                if name not in self.per_batch:  # once per batch: every decoding step reuses the rows' mask
                    self.per_batch[name] = self._mask(a_cat.shape[1] // rank, rank, a_cat.dtype, a_cat.device)
                delta = ((flat.to(a_cat.dtype) @ a_cat) * self.per_batch[name]) @ b_cat
                return output + delta.reshape(output.shape).to(output.dtype)
            if name not in self.per_batch:  # once per batch: every decoding step reuses the rows' matrices
                a_t, b_t = self.stacks[name]
                self.per_batch[name] = (a_t[self.rows], b_t[self.rows])
            a_rows, b_rows = self.per_batch[name]
            delta = (flat.to(a_rows.dtype) @ a_rows) @ b_rows
            return output + delta.reshape(output.shape).to(output.dtype)

        return add_lora

    def _mask(self, slots: int, rank: int, dtype, device):
        """(rows, 1, slots·r): ones over the columns of each row's adapter, zeros elsewhere (all zero: the base)."""
        import torch

        mask = torch.zeros(len(self.rows), slots, rank, dtype=dtype, device=device)
        chosen = (self.rows < slots).nonzero().flatten()
        mask[chosen, self.rows[chosen]] = 1
        return mask.reshape(len(self.rows), 1, slots * rank)

    @contextlib.contextmanager
    def batch(self, slots: list[Optional[int]]) -> Iterator[None]:
        """Rows of the next forward passes use these adapters (index into `adapters`; None: the base alone)."""
        import torch

        weights = [w[0] for w in list(self.stacks.values()) + list(self.dense.values())]
        device = weights[0].device if weights else "cpu"
        self.rows = torch.tensor([self.empty_slot if s is None else s for s in slots], device=device)
        self.per_batch = {}
        try:
            yield
        finally:
            self.rows, self.per_batch = None, {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.stacks, self.dense = [], {}, {}


@contextlib.contextmanager
def merged_copy(model, adapter: Path) -> Iterator[int]:
    """The model with one LoRA adapter merged into copies of the layers it targets: generation then runs at the base
    model's own speed (no LoRA matmuls per step). The targeted layers' `weight` attributes point at the merged copies
    for the duration; the original tensors are never written, and are put back afterwards. Yields the layer count."""
    import torch

    modules = dict(model.named_modules())
    originals = {}
    try:
        with torch.no_grad():
            for name, (a, b) in read_adapter(adapter).items():
                layer = modules.get(name)
                if not isinstance(layer, torch.nn.Linear):
                    raise ValueError(f"LoRA target {name} is not a linear layer of the base model")
                if is_quantized(layer):
                    raise ValueError(f"LoRA target {name} holds quantized weights: a merged copy needs a "
                                     "full-precision base (use MixedLora's hooks)")
                weight = layer.weight
                delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
                originals[name] = weight
                layer.weight = torch.nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
        yield len(originals)
    finally:
        for name, weight in originals.items():
            modules[name].weight = weight
