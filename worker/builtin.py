"""Built-in offline base models, built on first use under `TUNEQUEUE_HOME/builtin/NAME` in the normal Hugging Face
format, then loaded through the same code path as any hub name or local folder.

`tiny-t5` is a 1.2M-parameter T5 built from a config, with a BPE tokenizer trained on the built-in corpus. Its
weights are random except for one deliberate choice: the cross-attention value and output projections of the
decoder start as scaled identities, so that attending to an input token already pushes that token's logit up. A
randomly initialised T5 needs about a thousand full-model steps before it discovers how to copy names and places
from its input, which LoRA alone cannot do in seconds; with this copy-friendly start, LoRA learns the built-in
summarization task in about 30 s on 2 CPU cores while the base model itself still scores ROUGE-1 close to 0.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from worker import synthetic

BUILTIN_MODELS = {"tiny-t5": "seq2seq"}
DEFAULT_PROMPT_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
_BUILD_VERSION = "1"  # bump when the recipe changes so that old builds are rebuilt
_COPY_INIT_SCALE = 3.0


def builtin_path(name: str, home: Path) -> Path:
    return home / "builtin" / name


def ensure_builtin(name: str, home: Path) -> Path:
    """The folder of built-in model `name`, building it first if needed (atomic: build aside, then rename)."""
    target = builtin_path(name, home)
    marker = target / "tunequeue-builtin.txt"
    if marker.exists() and marker.read_text().strip() == _BUILD_VERSION:
        return target
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build_tiny_t5(staging)
        (staging / "tunequeue-builtin.txt").write_text(_BUILD_VERSION)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same build first
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train_tokenizer(texts, vocab_size: int = 2000):
    """A BPE tokenizer in T5's conventions (<pad>=0, </s>=1, <unk>=2, </s> appended) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Newlines become a space too, so that a name at the start of a line is the same token as elsewhere.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\n", "\n ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def _build_tiny_t5(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    texts = itertools.chain([DEFAULT_PROMPT_TEMPLATE.format(dialogue="")] * 50, synthetic.corpus())
    tokenizer = train_tokenizer(texts)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=128, d_ff=512, d_kv=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        for block in model.decoder.block:
            cross = block.layer[1].EncDecAttention
            cross.v.weight.copy_(torch.eye(*cross.v.weight.shape))
            cross.o.weight.copy_(torch.eye(*cross.o.weight.shape) * _COPY_INIT_SCALE)
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                               max_new_tokens=64)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
