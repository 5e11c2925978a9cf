"""Built-in offline base models, built on first use under `TUNEQUEUE_HOME/builtin/NAME` in the normal Hugging Face
format, then loaded through the same code path as any hub name or local folder.

`tiny-t5` (seq2seq) is a 1.2M-parameter T5 built from a config, with a BPE tokenizer trained on the built-in
corpus. Its weights are random except for one deliberate choice: the cross-attention value and output projections
of the decoder start as scaled identities, so that attending to an input token already pushes that token's logit
up. A randomly initialised T5 needs about a thousand full-model steps before it discovers how to copy names and
places from its input, which LoRA alone cannot do in seconds; with this copy-friendly start, LoRA learns the
built-in summarization task in about 30 s on 2 CPU cores while the base model itself still scores ROUGE-1 close
to 0. `tiny-llama` (causal LM) gets the same start in its self-attention, `tiny-bert` (DistilBERT, sequence
classification, labels negative/positive) is random with a tokenizer trained on `synthetic-sentiment`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from models.builtins import BUILTIN_MODELS, DEFAULT_PROMPT_TEMPLATE
from worker.data import synthetic, synthetic_sentiment
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
        BUILDERS[name](staging)
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


def train_tokenizer(texts, vocab_size: int = 2000, style: str = "t5"):
    """A BPE tokenizer trained on `texts`, in T5's conventions (<pad>=0, </s>=1, <unk>=2, </s> appended), Llama's
    (<s> prepended, padding on the left for batched generation) or BERT's ([CLS] text [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "llama":
        return _special_tokenizer(texts, vocab_size, ["<pad>", "</s>", "<unk>", "<s>"], "<s> $A",
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
                                  padding_side="left")
    if style == "bert":
        return _special_tokenizer(texts, vocab_size, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                  "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]",
                                  model_input_names=["input_ids", "attention_mask"])
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


def _special_tokenizer(texts, vocab_size: int, specials: list[str], template: str, **kwargs):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=kwargs["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\n", "\n ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    used = [t for t in specials if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
        (t, tok.token_to_id(t)) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **kwargs)


def _copy_friendly(value_proj, output_proj) -> None:
    """Value and output projections as scaled identities: attending to a token raises that token's logit."""
    import torch

    with torch.no_grad():
        value_proj.weight.copy_(torch.eye(*value_proj.weight.shape))
        output_proj.weight.copy_(torch.eye(*output_proj.weight.shape) * _COPY_INIT_SCALE)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    texts = itertools.chain([DEFAULT_PROMPT_TEMPLATE.format(dialogue="")] * 50, synthetic.corpus())
    tokenizer = train_tokenizer(texts, style="llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        _copy_friendly(layer.self_attn.v_proj, layer.self_attn.o_proj)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, max_new_tokens=64)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_bert(out: Path) -> None:
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = train_tokenizer(synthetic_sentiment.corpus(), vocab_size=1000, style="bert")
    labels = list(synthetic_sentiment.LABELS)
    config = DistilBertConfig(
        vocab_size=len(tokenizer), dim=128, hidden_dim=512, n_layers=2, n_heads=4, max_position_embeddings=512,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


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
    for block in model.decoder.block:
        _copy_friendly(block.layer[1].EncDecAttention.v, block.layer[1].EncDecAttention.o)
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                               max_new_tokens=64)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILDERS = {"tiny-t5": _build_tiny_t5, "tiny-llama": _build_tiny_llama, "tiny-bert": _build_tiny_bert}
