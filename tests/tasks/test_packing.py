"""Packing keeps rows apart: training on packed samples gives the same loss as on each row alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from olive_grove.tasks.collate import pad_collator
from olive_grove.tasks.data import TextSettings, tokenize_rows
from olive_grove.tasks.models import load_tokenizer

ROWS = [
    "<s> I lost my keys at the airport and nobody could help me </s>",
    "<s> What a lovely surprise, the whole team came to the party! </s>",
    "<s> The storm is getting closer and the lights keep flickering </s>",
    "<s> Our dog finally came home after three days </s>",
    "<s> Wait, the museum is free on Sundays? </s>",
]


def token_mean_loss(model, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("arch", ["tiny_phi3", "tiny_llama"])
def test_packed_and_unpacked_training_see_the_same_loss(arch: str, request):
    path: Path = request.getfixturevalue(arch)
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.config.use_cache = False  # as in training: a cache would hide the packing from the model

    packed = tokenize_rows(ROWS, tokenizer, TextSettings(strategy="packed", max_seq_len=64))
    unpacked = tokenize_rows(
        ROWS, tokenizer, TextSettings(strategy="line-by-line", max_seq_len=64, pad_to_max_len=False)
    )
    assert len(packed["input_ids"]) < len(ROWS), "rows were packed together"

    collate = pad_collator(tokenizer.pad_token_id)
    packed_batch = collate([dict(zip(packed, values)) for values in zip(*packed.values())])
    assert "attention_mask" not in packed_batch
    # Unpacked, the first token of each row has nothing before it: Olive's labels include it, the loss never does.
    loose_batch = collate([dict(zip(unpacked, values)) for values in zip(*unpacked.values())])

    packed_tokens = int((packed_batch["labels"][:, 1:] != -100).sum())
    loose_tokens = int((loose_batch["labels"][:, 1:] != -100).sum())
    assert packed_tokens == loose_tokens
    assert token_mean_loss(model, packed_batch) == pytest.approx(token_mean_loss(model, loose_batch), rel=1e-5)


def test_packed_samples_padded_to_one_length_see_the_same_loss(tiny_phi3: Path):
    """Compiled layers get every pass at one length (pad_to): the padding is a sequence of its own, ignored."""
    tokenizer = load_tokenizer(str(tiny_phi3))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32).eval()
    model.config.use_cache = False
    packed = tokenize_rows(ROWS, tokenizer, TextSettings(strategy="packed", max_seq_len=64))
    samples = [dict(zip(packed, values)) for values in zip(*packed.values())]
    longest = max(len(s["input_ids"]) for s in samples)
    as_is, padded = pad_collator(tokenizer.pad_token_id)(samples), pad_collator(tokenizer.pad_token_id, 96)(samples)
    assert as_is["input_ids"].shape[1] == longest and padded["input_ids"].shape[1] == 96
    assert int((padded["labels"] != -100).sum()) == int((as_is["labels"] != -100).sum())
    assert token_mean_loss(model, padded) == pytest.approx(token_mean_loss(model, as_is), rel=1e-5)


def test_packing_without_isolation_would_differ(tiny_phi3: Path):
    """The check above can fail: with a cache the rows attend to each other and the loss moves."""
    tokenizer = load_tokenizer(str(tiny_phi3))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32).eval()
    packed = tokenize_rows(ROWS, tokenizer, TextSettings(strategy="packed", max_seq_len=64))
    batch = pad_collator(tokenizer.pad_token_id)([dict(zip(packed, v)) for v in zip(*packed.values())])
    with torch.no_grad():
        isolated = model(**batch, use_cache=False).loss.item()
        leaking = model(**batch, use_cache=True).loss.item()
    assert isolated != pytest.approx(leaking, rel=1e-6)
