"""The merge step: the merged model computes what base + adapter computed, saved as a plain HF model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from grove_helpers import Recorder, model_artifact, step_files
from safetensors import safe_open

from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.merge import MergeSettings, merge_adapter
from olive_grove.tasks.models import load_causal_lm, load_tokenizer

PROMPT = "### Text: We just got the keys to our very first home!\n### The tone is:\n"


def merge(settings: MergeSettings, base: Path, adapter: Path, info: AdapterInfo, out: Path):
    files = step_files(out.parent / f"{out.name}-step", out)
    adapter_artifact = Artifact(path=str(adapter), fingerprint="a", info=info)
    return merge_adapter(settings, files, Recorder(), model=model_artifact(base), adapter=adapter_artifact)


@pytest.fixture(scope="module")
def merged(llama_adapter, tiny_llama: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged")
    return out, merge(MergeSettings(), tiny_llama, llama_adapter["adapter"], llama_adapter["info"], out)


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def test_merged_folder_is_a_plain_hf_model(merged):
    out, stats = merged
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert stats.size_bytes == (out / "model.safetensors").stat().st_size
    assert stats.dtype == "float32"  # the base model's own
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
    assert stats.parameters == sum(p.numel() for p in merged_model.parameters())


def test_merge_measures_the_same_held_out_loss_as_the_adapter(merged, llama_adapter):
    _, stats = merged
    assert stats.merged_heldout_loss == pytest.approx(llama_adapter["info"].eval_loss, rel=1e-4)
    assert stats.adapter_heldout_loss == llama_adapter["info"].eval_loss


def test_merge_in_float16(llama_adapter, tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "merged"
    stats = merge(MergeSettings(torch_dtype="float16"), tiny_llama, llama_adapter["adapter"], AdapterInfo(), out)
    assert stats.dtype == "float16"
    assert stats.merged_heldout_loss is None  # an adapter without eval samples
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensor = f.get_tensor(next(iter(f.keys())))
    assert tensor.dtype == torch.float16


def test_merge_settings():
    assert MergeSettings().torch_dtype is None  # the adapter's training dtype
    with pytest.raises(ValueError):
        MergeSettings.model_validate({"type": "MergeAdapterWeights", "torch_dtype": "int8"})
