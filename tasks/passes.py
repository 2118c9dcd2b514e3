"""The pass types, in one table: what each is configured with, what does its work, what may come before it,
and what it leaves. The config's pass union, its order checks, the checks before work and the flow's
dispatch all read this table; adding a pass type is one entry here plus its module.

Every step function has one shape: `run(settings, files, report, **inputs) -> Info`, where the inputs are
the Artifacts it works from (`model`, `adapter`, and the dataset steps its settings ask for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from olive_grove.tasks.adapter_export import ExtractAdaptersSettings, extract_adapters
from olive_grove.tasks.adapter_settings import (
    DoRASettings,
    LoftQSettings,
    LoHaSettings,
    LoKrSettings,
    LoRASettings,
    QLoRASettings,
)
from olive_grove.tasks.adapters import train_adapter
from olive_grove.tasks.artifact import PassSettings, StepInfo
from olive_grove.tasks.data import prepare_dataset
from olive_grove.tasks.evaluators import evaluate_model
from olive_grove.tasks.merge import MergeSettings, merge_adapter
from olive_grove.tasks.onnx_build import ModelBuilderSettings, build_onnx_model
from olive_grove.tasks.quality import measure_model

# What a pass leaves for the next one: a Hugging Face model, an unmerged adapter, an ONNX model.
Output = Literal["model", "adapter", "onnx"]
# What a step may be handed from the passes before it: the latest model, the first adapter not yet merged
# (adapters trained one after another are siblings on the same model), all of them by pass name, and the
# latest ONNX model.
Upstream = Literal["model", "adapter", "adapters", "onnx"]


@dataclass(frozen=True)
class Step:
    """A cached step: the plain function that does the work, and the version of what it produces.

    Bump `version` when a change to the function changes its output: older cache entries then miss.
    """

    run: Callable[..., StepInfo]
    version: str

    @property
    def name(self) -> str:
        return self.run.__name__


@dataclass(frozen=True)
class PassType:
    settings: type[PassSettings]
    step: Step
    takes: tuple[Upstream, ...]  # the step inputs it is given from the passes before it
    after: frozenset[Output]  # what the pass before it may have left
    gives: Output
    output: Callable[[Any], str | None]  # its folder in engine.output_dir; None: the pass before it's

    @property
    def name(self) -> str:
        return self.settings.model_fields["type"].default


PREPARE_DATASET = Step(prepare_dataset, version="3")
TRAIN_ADAPTER = Step(train_adapter, version="10")
MERGE_ADAPTER = Step(merge_adapter, version="5")
BUILD_ONNX_MODEL = Step(build_onnx_model, version="3")
EXTRACT_ADAPTERS = Step(extract_adapters, version="1")
MEASURE_MODEL = Step(measure_model, version="1")  # no pass: the flow measures the run's models with it
EVALUATE_MODEL = Step(evaluate_model, version="1")  # no pass: the run's evaluators, one model at a time

# An adapter pass after another trains a sibling adapter on the same model (multi-LoRA).
_TRAINING = {"step": TRAIN_ADAPTER, "takes": ("model",), "after": frozenset({"model", "adapter"}), "gives": "adapter"}
PASS_TYPES: dict[str, PassType] = {
    entry.name: entry
    for entry in (
        *(PassType(settings, **_TRAINING, output=lambda _: "adapter")
          for settings in (LoRASettings, DoRASettings, QLoRASettings, LoftQSettings, LoHaSettings, LoKrSettings)),
        PassType(MergeSettings, MERGE_ADAPTER, takes=("model", "adapter"), after=frozenset({"adapter"}),
                 gives="model", output=lambda _: "merged"),
        # Several ModelBuilder passes in a row build the same model for several precisions or providers; after
        # adapter passes, it builds the model with the first adapter's LoRA layers unmerged (Olive's adapter_path).
        PassType(ModelBuilderSettings, BUILD_ONNX_MODEL, takes=("model", "adapter"),
                 after=frozenset({"model", "onnx", "adapter"}), gives="onnx",
                 output=lambda s: f"onnx/{s.precision}-{s.provider}"),
        PassType(ExtractAdaptersSettings, EXTRACT_ADAPTERS, takes=("model", "onnx", "adapters"),
                 after=frozenset({"onnx"}), gives="onnx", output=lambda _: None),
    )
}  # fmt: skip
