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
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import Field

from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact, Reporter, Settings, StepFiles, StepInfo
from olive_grove.tasks.collate import IGNORE_INDEX
from olive_grove.tasks.models import ModelInfo, load_causal_lm
from olive_grove.tasks.onnx_build import OnnxInfo

PREDICTIONS = "predictions.json"
ONNX_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class QualitySettings(Settings):
    max_samples: int = Field(64, gt=0, description="held-out samples measured: the first ones")


class QualityInfo(StepInfo):
    heldout_loss: float
    perplexity: float
    tokens: int = Field(description="labelled tokens measured")
    predictions: str = Field(PREDICTIONS, description="the greedy next token at each of them, in order")


def measurable(artifact: Artifact) -> bool:
    """A model this machine can measure: a Hugging Face model, or an ONNX model without LoRA inputs for an
    execution provider that onnxruntime has here."""
    if isinstance(artifact.info, OnnxInfo):
        import onnxruntime

        provider = ONNX_PROVIDERS.get(artifact.info.execution_provider)
        return artifact.info.adapter_fingerprint is None and provider in onnxruntime.get_available_providers()
    return isinstance(artifact.info, ModelInfo)


def measure_model(
    settings: QualitySettings, files: StepFiles, report: Reporter, *, model: Artifact, samples: Artifact[AdapterInfo]
) -> QualityInfo:
    """Mean next-token loss on the labelled tokens of the adapter's held-out samples, and the greedy
    predictions there (the report compares them between models)."""
    import datasets
    import numpy as np

    held_out = datasets.load_from_disk(str(Path(samples.path) / samples.info.eval_samples))
    held_out = held_out.select(range(min(settings.max_samples, len(held_out))))
    logits_of = _onnx_logits(model) if isinstance(model.info, OnnxInfo) else _hf_logits(model)
    total, predictions = 0.0, []
    for ids, labels in _sequences(held_out):
        logits = logits_of(ids)[:-1].astype(np.float64)
        targets = np.array(labels[1:])
        scored = targets != IGNORE_INDEX
        if not scored.any():
            continue
        picked = logits[scored]
        picked -= picked.max(axis=1, keepdims=True)
        log_probs = picked - np.log(np.exp(picked).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(picked)), targets[scored]].sum())
        predictions += [int(t) for t in picked.argmax(axis=1)]
    (files.out / PREDICTIONS).write_text(json.dumps(predictions))
    loss = total / max(len(predictions), 1)
    report.log(f"held-out loss {loss:.4f} on {len(predictions)} tokens of {len(held_out)} samples")
    return QualityInfo(heldout_loss=loss, perplexity=math.exp(min(loss, 700)), tokens=len(predictions))


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


def _hf_logits(model: Artifact) -> Callable[[list[int]], object]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    network = load_causal_lm(model.path, dtype, model.info.trust_remote_code).to(device).eval()

    def logits(ids: list[int]):
        with torch.no_grad():
            return network(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()

    return logits


def _onnx_logits(model: Artifact[OnnxInfo]) -> Callable[[list[int]], object]:
    """The ONNX model's logits for a whole sequence at once: its decoder run with an empty KV cache."""
    import numpy as np
    import onnxruntime

    config = json.loads((Path(model.path) / "genai_config.json").read_text())["model"]["decoder"]
    session = onnxruntime.InferenceSession(str(Path(model.path) / config["filename"]),
                                           providers=[ONNX_PROVIDERS[model.info.execution_provider]])  # fmt: skip
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = {i.name: types.get(i.type, np.float32) for i in session.get_inputs() if i.name.startswith("past_key")}
    heads, head_size = config["num_key_value_heads"], config["head_size"]

    def logits(ids: list[int]):
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        feeds |= {name: np.zeros((1, heads, 0, head_size), dtype) for name, dtype in past.items()}
        return session.run(["logits"], feeds)[0][0]

    return logits


def agreement(predictions: Path, reference: Path) -> float | None:
    """The share of held-out positions where two models' greedy next tokens are the same."""
    mine, theirs = json.loads(predictions.read_text()), json.loads(reference.read_text())
    if not mine or len(mine) != len(theirs):
        return None
    return sum(a == b for a, b in zip(mine, theirs)) / len(mine)
