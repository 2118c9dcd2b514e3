"""Merge step: fold a trained adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact, PassSettings, Reporter, StepFiles
from olive_grove.tasks.evaluate import heldout_loss
from olive_grove.tasks.models import ModelInfo, load_causal_lm, load_tokenizer


class MergeSettings(PassSettings):
    """Olive's `MergeAdapterWeights` pass."""

    type: Literal["MergeAdapterWeights"] = "MergeAdapterWeights"
    torch_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="dtype of the merged weights; default: the base model's own"
    )


class MergedInfo(ModelInfo):
    """A base model with an adapter folded in; loads like any Hugging Face model."""

    dtype: str
    size_bytes: int
    parameters: int
    adapter_heldout_loss: float | None = Field(None, description="the adapter's loss on its eval samples")
    merged_heldout_loss: float | None = Field(None, description="the merged model's loss on the same samples")


def base_dtype(model_dir: Path) -> str:
    """The dtype the base model's weights are saved in (its config says), so the merge keeps them exact."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    saved = config.get("dtype") or config.get("torch_dtype")
    return saved if saved in ("bfloat16", "float16", "float32") else "float32"


def load_merge_base(model_path: str, dtype: str, trust_remote_code: bool, adapter: AdapterInfo):
    """The base an adapter merges into: the original weights, or — for an adapter fitted to a 4-bit base
    (LoftQ) — that 4-bit base, dequantized, which is what the adapter was trained against."""
    if adapter.merge_into == "original" or adapter.quantization is None:
        return load_causal_lm(model_path, dtype, trust_remote_code)
    from olive_grove.tasks.adapters import load_4bit

    quantized = load_4bit(model_path, {**adapter.quantization, "compute_dtype": dtype}, trust_remote_code,
                          {"": "cpu"})  # fmt: skip
    return quantized.dequantize()


def merge_adapter(
    settings: MergeSettings,
    files: StepFiles,
    report: Reporter,
    *,
    model: Artifact[ModelInfo],
    adapter: Artifact[AdapterInfo],
) -> MergedInfo:
    """Load the base unquantized (a QLoRA adapter's too), merge, and save with the tokenizer.

    With the adapter's evaluation samples, also measure the merged model's loss on them: what merging cost.
    """
    from peft import PeftModel

    trust = model.info.trust_remote_code
    dtype = settings.torch_dtype or base_dtype(Path(model.path))
    base = load_merge_base(model.path, dtype, trust, adapter.info)
    merged = PeftModel.from_pretrained(base, adapter.path).merge_and_unload()
    merged.save_pretrained(str(files.out))
    has_tokenizer = (Path(adapter.path) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(adapter.path if has_tokenizer else model.path, trust)
    tokenizer.save_pretrained(str(files.out))
    info = MergedInfo(
        source="merged",
        name=model.info.name,
        trust_remote_code=trust,
        dtype=dtype,
        size_bytes=sum(p.stat().st_size for p in files.out.glob("*.safetensors")),
        parameters=sum(p.numel() for p in merged.parameters()),
        adapter_heldout_loss=adapter.info.eval_loss,
    )
    if adapter.info.eval_samples:
        info.merged_heldout_loss = heldout_loss(merged, Path(adapter.path) / adapter.info.eval_samples,
                                                tokenizer.pad_token_id)  # fmt: skip
    into = "its 4-bit base, dequantized" if adapter.info.merge_into == "quantized" else Path(model.path).name
    report.log(f"merged the adapter into {into} ({dtype})")
    return info
