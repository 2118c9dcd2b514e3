"""How good each model of a run is, on the same held-out samples: the base model before fine-tuning, the
merged model, and each ONNX model built from it — what fine-tuning bought, and what int4 cost. Each model is
its own cached step, so a build added to a finished config is measured without measuring the others again.

Samples are measured one sequence at a time (a packed sample is cut where its positions restart, padding is
dropped), so the Hugging Face and ONNX models see exactly the same tokens without a padding or
position-id convention between them.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact, Reporter, Settings, StepFiles, StepInfo
from olive_grove.tasks.collate import IGNORE_INDEX
from olive_grove.tasks.runners import Runner, open_runner

PREDICTIONS = "predictions.json"


class QualitySettings(Settings):
    max_samples: int = Field(64, gt=0, description="held-out samples measured: the first ones")


class QualityInfo(StepInfo):
    heldout_loss: float
    perplexity: float
    tokens: int = Field(description="labelled tokens measured")
    predictions: str = Field(PREDICTIONS, description="the greedy next token at each of them, in order")


def measure_model(
    settings: QualitySettings, files: StepFiles, report: Reporter, *, model: Artifact, samples: Artifact[AdapterInfo]
) -> QualityInfo:
    """Mean next-token loss on the labelled tokens of the adapter's held-out samples, and the greedy
    predictions there (the report compares them between models)."""
    import datasets

    held_out = datasets.load_from_disk(str(Path(samples.path) / samples.info.eval_samples))
    held_out = held_out.select(range(min(settings.max_samples, len(held_out))))
    loss, predictions = scored_tokens(held_out, open_runner(model))
    (files.out / PREDICTIONS).write_text(json.dumps(predictions))
    report.log(f"held-out loss {loss:.4f} on {len(predictions)} tokens of {len(held_out)} samples")
    return QualityInfo(heldout_loss=loss, perplexity=perplexity(loss), tokens=len(predictions))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700))


def scored_tokens(samples, runner: Runner) -> tuple[float, list[int]]:
    """The mean next-token loss over the samples' labelled tokens, and the greedy prediction at each."""
    import numpy as np

    total, predictions = 0.0, []
    for ids, labels in _sequences(samples):
        logits = runner.logits(ids)[:-1].astype(np.float64)
        targets = np.array(labels[1:])
        scored = targets != IGNORE_INDEX
        if not scored.any():
            continue
        picked = logits[scored]
        picked -= picked.max(axis=1, keepdims=True)
        log_probs = picked - np.log(np.exp(picked).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(picked)), targets[scored]].sum())
        predictions += [int(t) for t in picked.argmax(axis=1)]
    return total / max(len(predictions), 1), predictions


def _sequences(held_out) -> Iterator[tuple[list[int], list[int]]]:
    """Each sample's sequences without padding; a packed sample's rows one by one."""
    for sample in held_out:
        ids, labels = list(sample["input_ids"]), list(sample["labels"])
        if "attention_mask" in sample:
            kept = [i for i, m in enumerate(sample["attention_mask"]) if m]
            ids, labels = [ids[i] for i in kept], [labels[i] for i in kept]
        starts = [i for i, p in enumerate(sample.get("position_ids") or [0]) if p == 0] + [len(ids)]
        for begin, end in itertools.pairwise(starts):
            yield ids[begin:end], labels[begin:end]


def agreement(predictions: Path, reference: Path) -> float | None:
    """The share of held-out positions where two models' greedy next tokens are the same."""
    mine, theirs = json.loads(predictions.read_text()), json.loads(reference.read_text())
    if not mine or len(mine) != len(theirs):
        return None
    return sum(a == b for a, b in zip(mine, theirs)) / len(mine)
