"""The gather-matmul mixer (worker/multi_lora.py) gives PEFT's own outputs, row by row, for adapters of different
ranks, scalings (alpha, rsLoRA, alpha_pattern) and target sets, leaves base rows and the base model untouched, and
says which adapters it cannot take (PEFT's adapter_names path takes those)."""

from __future__ import annotations

import pytest
import torch

from worker.ml.multi_lora import MixedLora, supported

ADAPTERS = [  # (rank, LoraConfig extras)
    (4, {"lora_alpha": 8}),
    (8, {"lora_alpha": 11, "use_rslora": True}),
    (16, {"lora_alpha": 16, "alpha_pattern": {"v": 40}, "rank_pattern": {"q": 2}}),
]


def _save_adapters(cls, path, targets, tmp_path) -> list:
    from peft import LoraConfig, get_peft_model

    folders = []
    for i, (rank, extra) in enumerate(ADAPTERS):
        torch.manual_seed(i)
        model = get_peft_model(cls.from_pretrained(path), LoraConfig(r=rank, target_modules=targets[i % len(targets)],
                                                                       init_lora_weights=False, **extra))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)  # far from zero: every adapter changes the output clearly
        model.save_pretrained(tmp_path / f"adapter-{i}")
        folders.append(tmp_path / f"adapter-{i}")
    return folders


@pytest.mark.parametrize("model, dense_width", [("tiny-t5", None), ("tiny-t5", 0), ("tiny-llama", None)],
                         ids=["t5-dense", "t5-gathered", "llama-dense"])
def test_mixed_rows_equal_peft_adapter_names(model, dense_width, builtin_home, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    seq2seq = model == "tiny-t5"
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    path = builtin_home / "builtin" / model
    targets = [["q", "v"], ["q", "k", "v", "o"]] if seq2seq else [["q_proj", "v_proj"], "all-linear"]
    folders = _save_adapters(cls, path, targets, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = cls.from_pretrained(path).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = dict(tokenizer(["#Person1#: hello there, how are you?", "fine", "what is it", "a b c d e"],
                            return_tensors="pt", padding=True))
    if seq2seq:
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 7], [0, 3, 4], [0, 8, 2]])
    slots = [2, None, 0, 1]

    mixer = MixedLora(base, [folders[0], folders[1], folders[2]], dense_width=dense_width)
    assert bool(mixer.dense) == (dense_width is None) and bool(mixer.stacks) == (dense_width == 0)
    with torch.no_grad(), mixer.batch(slots):
        mixed = base(**inputs).logits
    mixer.remove()
    assert not any(m._forward_hooks for m in base.modules())
    with torch.no_grad():
        plain = base(**inputs).logits

    peft_model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a0")
    for i in (1, 2):
        peft_model.load_adapter(str(folders[i]), adapter_name=f"a{i}")
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(**inputs, adapter_names=["a2", "__base__", "a0", "a1"]).logits
    peft_model.unload()

    assert (reference - plain).abs().amax(dim=(1, 2))[[0, 2, 3]].min() > 0.1  # the adapters matter
    torch.testing.assert_close(mixed, reference, atol=1e-3, rtol=1e-3)  # float sums reordered
    assert torch.equal(mixed[1], plain[1])  # the base row gets no adapter at all
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_single_adapter_merged_copy_equals_peft_and_leaves_the_base(builtin_home, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.ml.multi_lora import merged_copy

    path = builtin_home / "builtin" / "tiny-llama"
    folder = _save_adapters(AutoModelForCausalLM, path, ["all-linear"], tmp_path)[1]  # rsLoRA, rank 8
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tensors = {name: param for name, param in base.named_parameters()}
    before = {name: param.clone() for name, param in tensors.items()}
    inputs = dict(tokenizer(["#Person1#: hello there", "fine thanks"], return_tensors="pt", padding=True))
    with torch.no_grad(), merged_copy(base, folder) as layers:
        merged = base(**inputs).logits
    assert layers == 14  # q, k, v, o, gate, up, down in both layers
    with torch.no_grad():
        plain = base(**inputs).logits
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
        reference = peft_model(**inputs).logits
        peft_model.unload()
    assert (reference - plain).abs().max() > 0.1
    torch.testing.assert_close(merged, reference, atol=1e-3, rtol=1e-3)
    after = dict(base.named_parameters())
    assert all(after[name] is tensors[name] and torch.equal(after[name], before[name]) for name in tensors)


def test_unsupported_adapters_are_named(builtin_home, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    path = builtin_home / "builtin" / "tiny-t5"
    get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(path), LoraConfig(r=4, target_modules=["q", "v"],
                                                                           use_dora=True)).save_pretrained(tmp_path / "dora")
    get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(path), LoraConfig(r=4, target_modules=["q", "v"])
                   ).save_pretrained(tmp_path / "plain")
    assert supported(tmp_path / "plain") and not supported(tmp_path / "dora")
    assert not supported(tmp_path / "missing")
