"""The merge step: the merged model computes what base + adapter computed, saved as a plain HF model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from olive_grove.tasks.merge import MergeSettings, merge_adapter
from olive_grove.tasks.models import load_causal_lm, load_tokenizer

PROMPT = "### Text: We just got the keys to our very first home!\n### The tone is:\n"


@pytest.fixture(scope="module")
def merged(llama_adapter, llama_dataset, tiny_llama: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merged")
    stats = merge_adapter(
        str(tiny_llama), str(llama_adapter["adapter"]), "float32", out, eval_dir=llama_dataset / "eval"
    )
    return out, stats


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def test_merged_folder_is_a_plain_hf_model(merged):
    out, stats = merged
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert stats["size_bytes"] == (out / "model.safetensors").stat().st_size
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_merged_model_computes_what_base_plus_adapter_computed(merged, llama_adapter, tiny_llama: Path):
    from peft import PeftModel

    out, stats = merged
    tokenizer = load_tokenizer(str(out))
    base = load_causal_lm(str(tiny_llama), "float32").eval()
    base_logits = _logits(base, tokenizer)
    with_adapter = PeftModel.from_pretrained(base, str(llama_adapter["adapter"])).eval()
    adapter_logits = _logits(with_adapter, tokenizer)
    merged_model = load_causal_lm(str(out), "float32").eval()
    merged_logits = _logits(merged_model, tokenizer)

    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # training changed something
    assert stats["parameters"] == sum(p.numel() for p in merged_model.parameters())


def test_merge_measures_the_same_held_out_loss_as_the_adapter(merged, llama_adapter):
    _, stats = merged
    assert stats["merged_heldout_loss"] == pytest.approx(llama_adapter["metrics"]["eval_loss"], rel=1e-4)


def test_merge_in_float16(llama_adapter, tiny_llama: Path, tmp_path: Path):
    stats = merge_adapter(str(tiny_llama), str(llama_adapter["adapter"]), "float16", tmp_path)
    assert stats["dtype"] == "float16"
    assert "merged_heldout_loss" not in stats  # no dataset given
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensor = f.get_tensor(next(iter(f.keys())))
    assert tensor.dtype == torch.float16


def test_merge_settings():
    assert MergeSettings().torch_dtype is None  # the adapter's training dtype
    with pytest.raises(ValueError):
        MergeSettings.model_validate({"type": "MergeAdapterWeights", "torch_dtype": "int8"})
