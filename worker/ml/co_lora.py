"""Several LoRA adapters trained at once on one frozen base, in one forward and backward pass, without PEFT layers.

A co-trained batch holds the same examples once per adapter, in equal contiguous blocks: block j's rows go through
adapter `blocks[j]`. Every targeted `nn.Linear` gets a forward hook (as worker/ml/multi_lora.py does for inference)
adding `dropout(x) · Aᵢᵀ · Bᵢᵀ · scaleᵢ` to each block's rows. Each adapter owns its parameters, `A` (r, in) and `B`
(out, r) per layer; in the forward they are stacked over the blocks (ranks padded with zeros by `F.pad`, so the padding
is never a parameter and gets no gradient), and two batched matmuls serve every block of a layer at once (1.1× faster
than a loop over the blocks on 2 CPU cores). One pass over K× the rows does the FLOPs of K passes in fewer, larger
operators: it gains where per-operator cost dominates (a small model, a GPU, a CPU shared with other work).

Adapters are initialised as PEFT initialises them (A kaiming-uniform with a = √5, B zeros), drawing from the random
generator exactly as `get_peft_model` would after the same seed, so a co-trained adapter starts where it would have
started alone. `save()` writes each one as the PEFT folder `PeftModel.save_pretrained` writes for its `LoraConfig`.

Plain LoRA on linear layers only (no DoRA, LoRA bias, rank or alpha patterns, modules_to_save, other inits).
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

PREFIX = "base_model.model."  # PEFT's key prefix for a LoRA model's layers


def check_config(config) -> None:
    """ValueError when a LoraConfig asks for something the hooks do not implement."""
    problems = [name for name, bad in [
        ("DoRA", config.use_dora), ("LoRA bias", config.lora_bias), ("modules_to_save", config.modules_to_save),
        ("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern),
        ("fan_in_fan_out", config.fan_in_fan_out), ("layer_replication", config.layer_replication),
        (f"init_lora_weights={config.init_lora_weights!r}", config.init_lora_weights is not True)] if bad]
    if problems:
        raise ValueError(f"co-trained LoRA is plain LoRA only, not {', '.join(problems)}")


def resolved_config(config, model):
    """The config as PEFT holds it once injected into `model` (and writes it): target_modules a set, "all-linear"
    expanded into the model's linear layer names, the base model's name recorded."""
    from peft.tuners.tuners_utils import (MIN_TARGET_MODULES_FOR_OPTIMIZATION, _find_minimal_target_modules,
                                          _maybe_include_all_linear_layers)

    original, config = config, copy.deepcopy(config)
    if isinstance(original.target_modules, set):
        # a deep copy re-inserts a set's names, which can change their order when two collide in the hash table;
        # set(s) copies the table as it is, so adapter_config.json lists them as PEFT's own save would
        config.target_modules = set(original.target_modules)
    config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    config = _maybe_include_all_linear_layers(config, model)
    targets = config.target_modules
    if isinstance(targets, (list, set)) and len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        # PEFT's inject_adapter shortens a long list of layer names to the suffixes that pick the same layers
        suffixes = tuple("." + suffix for suffix in targets)
        others = [name for name, _ in model.named_modules() if name not in targets and not name.endswith(suffixes)]
        shorter = _find_minimal_target_modules(targets, others)
        if len(shorter) < len(targets):
            config.target_modules = shorter
    return config


def target_layers(config, model) -> list[str]:
    """Names of the layers PEFT would wrap for `config` on `model` (in module order); ValueError for a target that
    is not an nn.Linear."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    config = resolved_config(config, model)
    names = []
    for name, module in model.named_modules():
        if name and check_target_module_exists(config, name):
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"LoRA target {name} is a {type(module).__name__}: co-training wraps linear "
                                 "layers only")
            names.append(name)
    if not names:
        raise ValueError(f"target modules {config.target_modules} match no layer of the model")
    return names


def peft_initial_weights(layers: list[tuple[int, int]], r: int, seed: Optional[int]) -> list[tuple]:
    """(A, B) per layer ((in, out) each) as `get_peft_model` makes them right after `torch.manual_seed(seed)`: it
    builds nn.Linear(in, r) and nn.Linear(r, out), each drawing its default init, then redraws A (kaiming-uniform,
    a = √5) and zeroes B; on the CPU generator, whatever the base's device. Without a seed, the current state."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    weights = []
    for in_features, out_features in layers:
        a = torch.nn.Linear(in_features, r, bias=False).weight.data
        b = torch.nn.Linear(r, out_features, bias=False).weight.data
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        weights.append((a, torch.zeros_like(b)))
    return weights


class CoLora:
    """K trainable LoRA adapters (one `LoraConfig` each, the same target layers) hooked onto `model`. The base is
    never written; `remove()` takes the hooks away. `parameters(i)` are adapter i's, A and B per layer in order."""

    def __init__(self, model, configs: Sequence, *, seed: Optional[int] = None, mode: str = "bmm"):
        import torch

        if mode not in ("bmm", "loop"):
            raise ValueError(f"mode: bmm or loop, not {mode!r}")
        for config in configs:
            check_config(config)
        self.model, self.configs, self.mode = model, list(configs), mode
        self.layers = target_layers(configs[0], model)
        for config in configs[1:]:
            if target_layers(config, model) != self.layers:
                raise ValueError("co-trained adapters must target the same layers")
        modules = dict(model.named_modules())
        shapes = [(modules[n].in_features, modules[n].out_features) for n in self.layers]
        device = modules[self.layers[0]].weight.device
        self.ranks = [c.r for c in configs]
        self.scales = [c.lora_alpha / (math.sqrt(c.r) if c.use_rslora else c.r) for c in configs]
        self.dropouts = [float(c.lora_dropout) for c in configs]
        self.a: list[dict] = []  # per adapter: {layer: Parameter (r, in)}
        self.b: list[dict] = []  # per adapter: {layer: Parameter (out, r)}
        for config in configs:
            initial = peft_initial_weights(shapes, config.r, seed)
            self.a.append({n: torch.nn.Parameter(a.to(device)) for n, (a, _) in zip(self.layers, initial)})
            self.b.append({n: torch.nn.Parameter(b.to(device)) for n, (_, b) in zip(self.layers, initial)})
        self.blocks: Optional[list[int]] = None
        self.per_pass: dict = {}  # (blocks, device) -> scale and dropout tensors for that layout
        # the base is frozen while hooked (a freshly loaded one requires grad: its weight gradients would cost a
        # third of the backward and pile up on the resident model), its flags put back by remove()
        self.unfrozen = [p for p in model.parameters() if p.requires_grad]
        for parameter in self.unfrozen:
            parameter.requires_grad_(False)
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]

    # --------------------------------------------------------------------------------------------- parameters
    def parameters(self, i: int) -> list:
        return [p for n in self.layers for p in (self.a[i][n], self.b[i][n])]

    def trainable_count(self, i: int) -> int:
        return sum(p.numel() for p in self.parameters(i))

    def state_dict(self, i: int) -> dict:
        """Adapter i's tensors under the keys PEFT saves them with (B unscaled, as PEFT keeps it)."""
        out = {}
        for n in self.layers:
            out[f"{PREFIX}{n}.lora_A.weight"] = self.a[i][n].detach().cpu().contiguous()
            out[f"{PREFIX}{n}.lora_B.weight"] = self.b[i][n].detach().cpu().contiguous()
        return out

    def load_state_dict(self, i: int, state: dict) -> None:
        import torch

        with torch.no_grad():
            for n in self.layers:
                self.a[i][n].copy_(state[f"{PREFIX}{n}.lora_A.weight"])
                self.b[i][n].copy_(state[f"{PREFIX}{n}.lora_B.weight"])

    def save(self, i: int, folder: Path) -> None:
        """Adapter i as `PeftModel.save_pretrained` writes it: adapter_config.json (the config as PEFT resolves it,
        inference_mode on) and adapter_model.safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(i), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = resolved_config(self.configs[i], self.model)
        config.inference_mode = True
        config.save_pretrained(str(folder))
        write_model_card(self.model, config, folder)

    # --------------------------------------------------------------------------------------------- the pass
    @contextlib.contextmanager
    def rows(self, blocks: Sequence[int]) -> Iterator[None]:
        """The next forward passes take a batch of len(blocks) equal contiguous blocks of rows, block j through
        adapter blocks[j]."""
        self.blocks = list(blocks)
        try:
            yield
        finally:
            self.blocks = None

    def _layout(self, device):
        """Per-block scale (k, 1, 1) and dropout (k, 1, 1) tensors of the current blocks, made once per layout."""
        import torch

        key = (tuple(self.blocks), str(device))
        if key not in self.per_pass:
            scales = torch.tensor([self.scales[i] for i in self.blocks], device=device).view(-1, 1, 1)
            drops = [self.dropouts[i] for i in self.blocks]
            dropout = torch.tensor(drops, device=device).view(-1, 1, 1) if any(drops) else None
            self.per_pass[key] = (scales, dropout, len(set(drops)) == 1)
        return self.per_pass[key]

    def _hook(self, name: str):
        import torch
        import torch.nn.functional as F

        def add_lora(module, args, output):
            if self.blocks is None:
                return output
            x, k = args[0], len(self.blocks)
            if x.shape[0] % k:
                raise RuntimeError(f"batch of {x.shape[0]} rows does not split into {k} equal blocks")
            xb = x.reshape(k, -1, x.shape[-1])  # (blocks, rows·positions, in)
            if self.mode == "loop":
                delta = torch.cat([self._block_delta(xb[j], i, name) for j, i in enumerate(self.blocks)])
                return output + delta.reshape(output.shape).to(output.dtype)
            scales, dropout, same_dropout = self._layout(x.device)
            if dropout is not None and module.training:
                if same_dropout:
                    xb = F.dropout(xb, float(dropout.flatten()[0]), training=True)
                else:  # each block its own rate
                    keep = (torch.rand_like(xb) >= dropout).to(xb.dtype)
                    xb = xb * keep / (1 - dropout)
            rank = max(self.ranks[i] for i in self.blocks)
            a = torch.stack([_pad_rows(self.a[i][name], rank) for i in self.blocks])  # (k, r, in)
            b = torch.stack([_pad_columns(self.b[i][name], rank) for i in self.blocks]) * scales  # (k, out, r)
            delta = torch.bmm(torch.bmm(xb.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
            return output + delta.reshape(output.shape).to(output.dtype)

        return add_lora

    def _block_delta(self, x, i: int, name: str):
        import torch.nn.functional as F

        if self.dropouts[i]:
            x = F.dropout(x, self.dropouts[i], training=self.model.training)
        a, b = self.a[i][name], self.b[i][name]
        return (x.to(a.dtype) @ a.T) @ b.T * self.scales[i]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for parameter in self.unfrozen:
            parameter.requires_grad_(True)
        self.handles, self.unfrozen = [], []


def write_model_card(model, config, folder: Path) -> None:
    """The README.md `PeftModel.save_pretrained` writes beside an adapter (PEFT's `create_or_update_model_card` for a
    LoRA adapter on a full-precision transformers model), so a co-trained folder holds the same files."""
    import transformers
    from huggingface_hub import ModelCard, ModelCardData
    from peft import __version__

    card = ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = set(getattr(model, "model_tags", None) or []) | {"lora"}
    if isinstance(model, transformers.PreTrainedModel):
        tags.add("transformers")
    if hasattr(model, "name_or_path"):
        tags.add(f"base_model:adapter:{model.name_or_path}")
    card.data["tags"] = sorted(tags)
    if str(config.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM"):
        card.data.pipeline_tag = "text-generation"
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    if "_name_or_path" in model_config:
        card.data["base_model"] = model_config["_name_or_path"]
    card.text = "\n".join(card.text.splitlines() + [f"### Framework versions\n\n- PEFT {__version__}"])
    card.save(str(Path(folder) / "README.md"))


def _pad_rows(a, rank: int):
    import torch.nn.functional as F

    return a if a.shape[0] == rank else F.pad(a, (0, 0, 0, rank - a.shape[0]))


def _pad_columns(b, rank: int):
    import torch.nn.functional as F

    return b if b.shape[1] == rank else F.pad(b, (0, rank - b.shape[1]))
