"""ONNX step: convert a Hugging Face model with ONNX Runtime GenAI's ModelBuilder."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from olive_grove.tasks.artifact import Artifact, PassSettings, Reporter, StepFiles, StepInfo
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import ModelFacts, ModelInfo

EXECUTION_PROVIDERS = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
    "WebGpuExecutionProvider": "webgpu",
}


class ModelBuilderSettings(PassSettings):
    """Olive's `ModelBuilder` pass."""

    type: Literal["ModelBuilder"] = "ModelBuilder"
    precision: Literal["int4", "int8", "fp16", "bf16", "fp32"] = "int4"
    execution_provider: Literal["cpu", "cuda", "dml", "webgpu"] | None = Field(
        None, description="default: the run's (engine.execution_providers, else the target system's, else cpu)"
    )
    int4_block_size: Literal[16, 32, 64, 128, 256] | None = None
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    metadata_only: bool = False
    search: dict[str, Any] | None = Field(None, description="genai_config search options, e.g. max_length")
    extra_options: dict[str, Any] = Field(default_factory=dict, description="passed to the builder as is")

    @property
    def provider(self) -> str:
        """The execution provider it builds for: its own, or the run's (which the config fills in), or CPU."""
        return self.execution_provider or "cpu"

    def check_before_work(self, model: ModelFacts) -> None:
        if self.precision == "bf16" and self.provider == "cpu":
            raise UserError("precision", "bf16 models do not run on the CPU execution provider",
                            "use int4, int8, fp16 or fp32 for cpu")  # fmt: skip


def builder_options(settings: ModelBuilderSettings) -> list[str]:
    """ModelBuilder's extra options as the `KEY=VALUE` strings its own parser expects."""
    options = {
        "hf_token": "false",
        **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.extra_options.items()},
    }
    # The builder's own names; it silently ignores the int4_-prefixed spellings that Olive's pass uses.
    if settings.int4_block_size:
        options["block_size"] = str(settings.int4_block_size)
    if settings.int4_accuracy_level is not None:
        options["accuracy_level"] = str(settings.int4_accuracy_level)
    if settings.metadata_only:
        options["config_only"] = "true"
    return [f"{k}={v}" for k, v in options.items()]


class OnnxInfo(StepInfo):
    precision: str
    execution_provider: str
    size_bytes: int


def build_onnx_model(
    settings: ModelBuilderSettings, files: StepFiles, report: Reporter, *, model: Artifact[ModelInfo]
) -> OnnxInfo:
    """Run ModelBuilder in-process on a local HF model folder; its chatter and progress bars go to builder.log."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    provider = settings.provider
    files.work.mkdir(parents=True, exist_ok=True)
    args = (None, model.path, str(files.out), settings.precision, provider, str(files.work / "hf-cache"))
    with (
        (files.work / "builder.log").open("w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        options = parse_extra_options(*args, builder_options(settings))
        create_model(*args, **options)
    if settings.search:
        _set_search_options(files.out / "genai_config.json", settings.search)
    report.log(f"built {settings.precision} ONNX model for {provider}")
    size = sum(p.stat().st_size for p in files.out.iterdir() if p.is_file())
    return OnnxInfo(precision=settings.precision, execution_provider=provider, size_bytes=size)


def _set_search_options(config_path: Path, search: dict[str, Any]) -> None:
    config = json.loads(config_path.read_text())
    config.setdefault("search", {}).update(search)
    config_path.write_text(json.dumps(config, indent=4))
