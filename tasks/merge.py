"""Merge step: fold a trained adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from olive_grove.tasks.evaluate import heldout_loss
from olive_grove.tasks.models import load_causal_lm, load_tokenizer


class MergeSettings(BaseModel):
    """Olive's `MergeAdapterWeights` pass."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["MergeAdapterWeights"] = "MergeAdapterWeights"
    torch_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="dtype of the merged weights; default: the adapter's training dtype"
    )


def merge_adapter(
    base_path: str,
    adapter_path: str,
    dtype: str,
    out_dir: Path,
    trust_remote_code: bool = False,
    eval_dir: Path | None = None,
) -> dict[str, Any]:
    """Load the base unquantized in `dtype` (a QLoRA adapter too), merge, and save with the tokenizer.

    With the adapter's evaluation samples, also measure the merged model's loss on them: what merging cost.
    """
    from peft import PeftModel

    base = load_causal_lm(base_path, dtype, trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    has_tokenizer = (Path(adapter_path) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(adapter_path if has_tokenizer else base_path, trust_remote_code)
    tokenizer.save_pretrained(str(out_dir))
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    stats = {"dtype": dtype, "size_bytes": size, "parameters": sum(p.numel() for p in merged.parameters())}
    if eval_dir is not None:
        stats["merged_heldout_loss"] = heldout_loss(merged, eval_dir, tokenizer.pad_token_id)
    return stats
