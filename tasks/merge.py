"""Merge step: fold a trained adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

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
        None, description="dtype of the merged weights; default: the adapter's training dtype"
    )


class MergedInfo(ModelInfo):
    """A base model with an adapter folded in; loads like any Hugging Face model."""

    dtype: str
    size_bytes: int
    parameters: int
    adapter_heldout_loss: float | None = Field(None, description="the adapter's loss on its eval samples")
    merged_heldout_loss: float | None = Field(None, description="the merged model's loss on the same samples")


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
    dtype = settings.torch_dtype or adapter.info.dtype or "float32"
    base = load_causal_lm(model.path, dtype, trust)
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
    report.log(f"merged the adapter into {Path(model.path).name} ({dtype})")
    return info
