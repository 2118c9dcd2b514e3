"""Tiny random models of real architectures, with a tokenizer trained on the spot: demos and tests offline."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

Arch = Literal["phi3", "llama"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer fitted to `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: Arch, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, Phi3Config

    shape = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,  # as Phi-3-mini-4k: configs written for it fit
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "phi3":
        # Equal lengths keep plain RoPE, like Phi-3-mini-4k (ModelBuilder reads unequal ones as LongRoPE).
        return Phi3Config(original_max_position_embeddings=shape["max_position_embeddings"], **shape)
    return LlamaConfig(**shape)


def build_tiny_model(out_dir: Path, arch: Arch, texts: Iterable[str], seed: int = 0) -> Path:
    """Save a random `arch` model and its tokenizer to `out_dir`, the way `save_pretrained` lays them out."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))
    return out_dir
