"""Fine-tuning methods: what is trained and on which copy of the base.

- lora: LoRA layers injected into the resident base (`target_modules` "all-linear" or a list), removed after the job;
  with `load_in_8bit` the base is a resident int8 copy (bitsandbytes LLM.int8, a cache entry of its own).
- qlora: the base loaded in 4-bit NF4 (double quantization; bf16 compute on CUDA, fp32 on CPU; a cache entry of its
  own, shared by every QLoRA job on it), prepared once with `prepare_model_for_kbit_training`, LoRA on top. Runs on
  CUDA and CPU workers (bitsandbytes >= 0.49 has CPU kernels for 4-bit and int8 layers).
- prompt-tuning: `num_virtual_tokens` trained prompt embeddings, initialised from the prompt's instruction words or
  at random.
- full: every weight of a private copy loaded from disk (the resident base is never touched); the output is a whole
  model folder.

Every method takes `optim` (torch AdamW, or bitsandbytes' AdamW8bit / PagedAdamW8bit) and `gradient_checkpointing`
(switched on for the job and off again, so the resident base is left as it was). A job bitsandbytes cannot run on
the worker fails at once with the reason (`check_method_supported`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Optional

from models.errors import InputError, JobFailed
from models.specs import FinetuneSpec
from worker.ml.kinds import CLASSIFIER_HEADS, PEFT_TASK_TYPES
from worker.ml.model_cache import LoadedModel, ModelCache

LORA_LAYERS = "Linear, Embedding, Conv1d/2d/3d, Conv1D or MultiheadAttention"  # what PEFT's LoRA can wrap
BNB_DEVICES = ("cuda", "cpu", "xpu")  # device types bitsandbytes 0.50 has kernels for (4-bit, int8, 8-bit optimizers)
BNB_CPU_OPTIMIZERS = (0, 50)  # the first bitsandbytes with CPU kernels for its 8-bit optimizers


def quantization_of(spec: FinetuneSpec) -> Optional[str]:
    """How the job's base is loaded: "4bit" (qlora), "8bit" (lora with load_in_8bit) or None (full precision)."""
    return "4bit" if spec.method == "qlora" else "8bit" if spec.method == "lora" and spec.load_in_8bit else None


def base_quantization(method: str, hyperparameters: Optional[dict]) -> Optional[str]:
    """The quantization of the base an adapter row was trained on (what `quantization_of` chose for its job)."""
    return "4bit" if method == "qlora" else "8bit" if (hyperparameters or {}).get("load_in_8bit") else None


def check_method_supported(spec: FinetuneSpec, device: str) -> None:
    """JobFailed (no retry) when this worker cannot run the job's bitsandbytes parts: the package is missing, the
    device is one bitsandbytes has no kernels for, or an 8-bit optimizer on a CPU with a bitsandbytes before 0.50."""
    uses = [what for what, used in (("qlora (a 4-bit base)", spec.method == "qlora"),
                                    ("--load-in-8bit", quantization_of(spec) == "8bit"),
                                    (f"--optim {spec.optim}", spec.optim != "adamw")) if used]
    if not uses:
        return
    import socket

    what = " and ".join(uses) + (" needs" if len(uses) == 1 else " need")

    try:
        import bitsandbytes
    except ImportError:
        raise JobFailed(f"{what} the bitsandbytes package on the worker "
                        f"({socket.gethostname()}): pip install 'bitsandbytes>=0.50'") from None
    device_type = str(device).split(":")[0]
    if device_type not in BNB_DEVICES:
        raise JobFailed(f"{what} bitsandbytes kernels for {device_type}, which it does not have "
                        f"(it runs on {', '.join(BNB_DEVICES)}); worker {socket.gethostname()}")
    version = tuple(int(part) for part in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if device_type == "cpu" and spec.optim != "adamw" and version < BNB_CPU_OPTIMIZERS:
        raise JobFailed(f"--optim {spec.optim} on a CPU worker needs bitsandbytes >= 0.50 (the first with CPU kernels "
                        f"for 8-bit optimizers); worker {socket.gethostname()} has {bitsandbytes.__version__}")


def prompt_init_text(template: str) -> str:
    """The instruction words of a prompt template (the text before its first slot), for prompt-tuning init."""
    words = re.sub(r"\s+", " ", template.split("{", 1)[0]).strip()
    return words or "Complete the task."


def peft_config(spec: FinetuneSpec, model_kind: str, loaded: LoadedModel):
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit

    if spec.method == "prompt-tuning":
        text_init = spec.prompt_tuning_init == "text"
        return PromptTuningConfig(
            task_type=PEFT_TASK_TYPES[model_kind], num_virtual_tokens=spec.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=prompt_init_text(spec.prompt_template) if text_init else None,
            tokenizer_name_or_path=loaded.path if text_init else None)
    # a classifier's head is trained whole (PEFT's modules_to_save), so LoRA must not wrap it as well
    exclude = CLASSIFIER_HEADS if model_kind == "classification" and spec.target_modules == "all-linear" else None
    return LoraConfig(task_type=PEFT_TASK_TYPES[model_kind], r=spec.lora_r, lora_alpha=spec.lora_alpha,
                      lora_dropout=spec.lora_dropout, target_modules=spec.target_modules, exclude_modules=exclude)


def classification_labels(path: str, targets) -> list[str]:
    """Label names in head order: the model config's own names when they cover the data (tiny-bert's
    negative/positive), else the data's labels sorted."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    names = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else []
    found = sorted({str(t) for t in targets if t is not None})
    if names and not all(n.startswith("LABEL_") for n in names) and set(found) <= set(names):
        return names
    return found


def base_for(spec: FinetuneSpec, cache: ModelCache, model_kind: str, labels) -> LoadedModel:
    return cache.get(spec.model, model_kind, labels=labels, quantization=quantization_of(spec))


@contextlib.contextmanager
def trainable_model(spec: FinetuneSpec, cache: ModelCache, loaded: LoadedModel, model_kind: str) -> Iterator[Any]:
    """The model to train for `spec.method`, cleaned up (adapter removed, private copy dropped) afterwards."""
    if spec.method == "full":
        from worker.ml.kinds import load_model

        model = load_model(loaded.path, model_kind, labels=loaded.labels).to(loaded.device)
        model.train()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        if spec.gradient_checkpointing:
            enable_checkpointing(model)
        try:
            yield model
        finally:
            del model
        return
    check_target_modules(spec, loaded.model, model_kind)
    if loaded.quantization and not loaded.extra.get("prepared_for_kbit"):
        from peft import prepare_model_for_kbit_training

        # once per cached entry (it freezes the base and upcasts its 16-bit norms and embeddings to fp32); its
        # default of switching gradient checkpointing on is left to each job's own setting
        loaded.model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
        loaded.extra["prepared_for_kbit"] = True
    with checkpointing(loaded.model, spec.gradient_checkpointing), \
            cache.training_adapter(loaded, peft_config(spec, model_kind, loaded)) as model:
        yield model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant: it needs no input that requires grad, so it works on a
    frozen base with only LoRA layers or virtual tokens trained."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def checkpointing(model, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing on the resident base for one job, switched off again afterwards (with the input-grad
    hook PEFT adds when it finds checkpointing on), so the next job finds the base as it was."""
    if not enabled:
        yield
        return
    enable_checkpointing(model)
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.disable_input_require_grads()


def _lora_layer_types() -> tuple:
    import torch
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    return nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D


def check_target_modules(spec: FinetuneSpec, model, model_kind: str) -> None:
    """A LoRA job's `target_modules` list names layers of `model` LoRA can wrap, matched as PEFT matches a list (the
    module's full name, or its name ending in `.NAME`). InputError naming the ones that match no layer, match
    something else (a block, a norm) or only a classifier's head (PEFT trains it whole and never wraps it), with the
    model's own layer names; checked before PEFT touches the resident base, so such a job fails at once as a data
    error instead of crashing on each attempt."""
    if spec.method not in ("lora", "qlora") or isinstance(spec.target_modules, str):
        return
    layer_types = _lora_layer_types()
    # PEFT's sequence-classification models train their heads whole (modules_to_save: every module whose name ends
    # in classifier or score, pre_classifier too) and wrap nothing inside them
    heads = re.compile(r"(classifier|score)($|\.)") if model_kind == "classification" else None
    every = list(model.named_modules())
    modules = [(name, module) for name, module in every if not (heads and heads.search(name))]
    layer_names = sorted({name.rpartition(".")[2] for name, module in modules
                          if name and isinstance(module, layer_types) and not list(module.children())})
    shown = ", ".join(layer_names[:16]) + (", ..." if len(layer_names) > 16 else "")
    hint = f"; the {model_kind} model {spec.model!r} has layers named {shown}"
    missing, wrong, in_heads = [], [], []

    def named(target: str, candidates) -> list:
        return [(name, module) for name, module in candidates if name == target or name.endswith(f".{target}")]

    for target in spec.target_modules:
        matched = named(target, modules)
        if not matched:
            missing.append(target)
            if heads and named(target, every):
                in_heads.append(target)
        elif not all(isinstance(module, layer_types) for _, module in matched):
            name, module = next((n, m) for n, m in matched if not isinstance(m, layer_types))
            wrong.append(f"{target} ({name} is a {type(module).__name__})")
    if missing:
        head = f" ({', '.join(in_heads)}: the classification head is trained whole, not wrapped)" if in_heads else ""
        raise InputError(f"target modules {', '.join(missing)} match no layer of the model{head} (--target-modules "
                         f"takes layer names such as q,v, or all-linear){hint}")
    if wrong:
        raise InputError(f"target modules {', '.join(wrong)} match modules that are not layers LoRA can wrap "
                         f"({LORA_LAYERS}){hint}")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) as PEFT prints them; for a plain model every parameter is trainable."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def save_output(spec: FinetuneSpec, model, loaded: LoadedModel, directory) -> None:
    """PEFT's adapter folder, or for full fine-tuning a whole model folder with its tokenizer."""
    model.save_pretrained(directory)
    if spec.method == "full":
        loaded.tokenizer.save_pretrained(directory)
