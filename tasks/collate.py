"""Batching training samples: pad to the longest, and keep packed rows apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IGNORE_INDEX = -100


def pad_collator(pad_id: int, pad_to: int = 0) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Pad a batch to its longest sample (or to `pad_to`, if longer); padded labels are ignored by the loss.

    Packed samples (with `position_ids`) get no attention mask: transformers then reads the restarting
    positions as separate sequences, and the padding becomes one more sequence of its own.
    """
    import torch

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(s["input_ids"]) for s in batch]
        longest = max(*lengths, pad_to)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(s[key]) + [value] * (longest - len(s[key])) for s in batch])

        out = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX)}
        if "position_ids" in batch[0]:
            out["position_ids"] = torch.tensor(
                [list(s["position_ids"]) + list(range(longest - len(s["position_ids"]))) for s in batch]
            )
        elif "attention_mask" in batch[0]:
            out["attention_mask"] = pad("attention_mask", 0)
        elif min(lengths) != longest:
            out["attention_mask"] = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])
        return out

    return collate
