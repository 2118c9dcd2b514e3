"""Held-out loss, computed the same way for every model, so an adapter and its merge compare honestly."""

from __future__ import annotations

from pathlib import Path


def heldout_loss(model, eval_dir: Path, pad_id: int, batch_size: int = 4) -> float:
    """Mean next-token loss over every labelled token of the samples saved in `eval_dir`."""
    import datasets
    import torch

    from olive_grove.tasks.collate import IGNORE_INDEX, pad_collator

    eval_set = datasets.load_from_disk(str(eval_dir))
    collate = pad_collator(pad_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(eval_set), batch_size):
            batch = {
                k: v.to(device)
                for k, v in collate(list(eval_set.select(range(start, min(start + batch_size, len(eval_set)))))).items()
            }
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += loss.item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)
