"""ONNX step: convert a Hugging Face model with ONNX Runtime GenAI's ModelBuilder."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact, PassSettings, Reporter, Settings, StepFiles, StepInfo
from olive_grove.tasks.builder_memory import float_weights_on_disk
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import ModelFacts, ModelInfo

EXECUTION_PROVIDERS = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
    "WebGpuExecutionProvider": "webgpu",
    "NvTensorRTRTXExecutionProvider": "NvTensorRtRtx",
}


class SearchOptions(Settings):
    """genai_config.json's `search` section: ONNX Runtime GenAI refuses a model whose section it cannot read."""

    max_length: int | None = Field(None, gt=0)
    min_length: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    num_beams: int | None = Field(None, gt=0)
    num_return_sequences: int | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    diversity_penalty: float | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    early_stopping: bool | None = None
    past_present_share_buffer: bool | None = None
    random_seed: int | None = None


class ModelBuilderSettings(PassSettings):
    """Olive's `ModelBuilder` pass."""

    type: Literal["ModelBuilder"] = "ModelBuilder"
    precision: Literal["int4", "int8", "fp16", "bf16", "fp32"] = "int4"
    execution_provider: Literal["cpu", "cuda", "dml", "webgpu", "NvTensorRtRtx"] | None = Field(
        None, description="default: the run's (engine.execution_providers, else the target system's, else cpu)"
    )
    int4_block_size: Literal[16, 32, 64, 128, 256] | None = Field(None, description="block size of int4 weights")
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None, description="least accuracy of MatMul in int4: 1 fp32, 2 fp16, 3 bf16, 4 int8"
    )
    int4_is_symmetric: bool | None = Field(None, description="quantize int4 weights symmetrically")
    int4_op_types_to_quantize: list[Literal["MatMul", "Gather"]] | None = Field(
        None, description="op types int4 quantization targets"
    )
    int4_nodes_to_exclude: list[str] | None = Field(None, description="nodes int4 quantization leaves alone")
    int4_algo_config: Literal["default", "rtn", "k_quant"] | None = Field(None, description="int4 quantization method")
    use_qdq: bool | None = Field(None, description="use the QDQ decomposition for ops")
    use_8bits_moe: bool | None = Field(None, description="8-bit MoE layers")
    use_webgpu_fp32: bool | None = Field(None, description="fp32 inputs and outputs for WebGPU")
    use_cuda_bf16: bool | None = Field(None, description="bf16 inputs and outputs of quantized models on CUDA")
    include_hidden_states: bool | None = Field(None, description="hidden states as an output")
    exclude_embeds: bool | None = Field(None, description="leave the embedding layer out")
    exclude_lm_head: bool | None = Field(None, description="leave the language-model head out")
    enable_cuda_graph: bool | None = Field(None, description="capture CUDA graphs when the model runs")
    metadata_only: bool = Field(False, description="write genai_config.json and the tokenizer only")
    search: SearchOptions | None = Field(None, description="genai_config search options, e.g. max_length")
    extra_options: dict[str, Any] = Field(default_factory=dict, description="passed to the builder as is, last")

    @property
    def provider(self) -> str:
        """The execution provider it builds for: its own, or the run's (which the config fills in), or CPU."""
        return self.execution_provider or "cpu"

    @property
    def writes_graph(self) -> bool:
        """Whether it writes model.onnx (metadata_only and the builder's config_only write the config alone)."""
        return not (self.metadata_only or str(self.extra_options.get("config_only", "")).lower() in ("true", "1"))

    def check_before_work(self, model: ModelFacts) -> None:
        if self.use_qdq and "Gather" in (self.int4_op_types_to_quantize or []):
            raise UserError("int4_op_types_to_quantize", "Gather is quantized in the QOperator format only",
                            "leave Gather out with use_qdq, or set use_qdq: false")  # fmt: skip
        block = self.extra_options.get("block_size")
        if block is not None and str(block) not in ("16", "32", "64", "128", "256"):
            raise UserError("extra_options.block_size", f"must be 16, 32, 64, 128 or 256 (got {block!r})")
        if self.precision == "bf16" and self.provider == "cpu":
            raise UserError("precision", "bf16 models do not run on the CPU execution provider",
                            "use int4, int8, fp16 or fp32 for cpu")  # fmt: skip


# Olive's names for the builder's options, where they differ; the builder wants lists joined.
BUILDER_NAMES = {"int4_block_size": "block_size", "int4_accuracy_level": "accuracy_level",
                 "int4_is_symmetric": "is_symmetric", "int4_op_types_to_quantize": "op_types_to_quantize",
                 "int4_nodes_to_exclude": "nodes_to_exclude", "int4_algo_config": "algo_config",
                 "metadata_only": "config_only"}  # fmt: skip
LIST_JOINERS = {"op_types_to_quantize": "/", "nodes_to_exclude": ","}


def builder_options(settings: ModelBuilderSettings) -> list[str]:
    """ModelBuilder's extra options as the `KEY=VALUE` strings its own parser expects: the pass's settings
    under the builder's names, then `extra_options`, which win (as in Olive)."""
    fields = settings.model_dump(exclude={"type", "precision", "execution_provider", "search", "extra_options",
                                          "evaluator", "host"}, exclude_none=True)  # fmt: skip
    options = {"hf_token": "false"}
    for key, value in fields.items():
        if key == "metadata_only" and not value:
            continue
        name = BUILDER_NAMES.get(key, key)
        options[name] = LIST_JOINERS.get(name, ",").join(value) if isinstance(value, list) else _text(value)
    options.update({k: _text(v) for k, v in settings.extra_options.items()})
    return [f"{k}={v}" for k, v in options.items()]


def builder_call(
    settings: ModelBuilderSettings, model_dir: Path, out: Path, cache: Path, extra: Sequence[str] = ()
) -> tuple[tuple, dict[str, Any]]:
    """The arguments of ModelBuilder's `create_model` for these settings, as its own command line makes them
    (its parser prints them: call it where the builder's output goes)."""
    from onnxruntime_genai.models.builder import parse_extra_options

    args = (None, str(model_dir), str(out), settings.precision, settings.provider, str(cache))
    return args, parse_extra_options(*args, [*builder_options(settings), *extra])


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class OnnxInfo(StepInfo):
    precision: str
    execution_provider: str
    size_bytes: int
    builder: dict[str, Any] = Field(default_factory=dict, description="the ModelBuilder settings it was built with")
    adapter_fingerprint: str | None = Field(None, description="the adapter whose LoRA layers it holds, unmerged")


# ModelBuilder prints to the process's stdout (redirected to the step's log while it runs) and its class is
# patched while it saves: two builds in one process (steps in threads) take turns.
ONE_BUILD_AT_A_TIME = threading.Lock()


def build_onnx_model(
    settings: ModelBuilderSettings,
    files: StepFiles,
    report: Reporter,
    *,
    model: Artifact[ModelInfo],
    adapter: Artifact[AdapterInfo] | None = None,
) -> OnnxInfo:
    """Run ModelBuilder in-process on a local HF model folder; its chatter and progress bars go to builder.log.

    With an adapter, the model keeps its LoRA layers unmerged (Olive's adapter_path), in float whatever the
    precision, so that ExtractAdapters can make them swappable. Quantized builds keep their float weights in
    the work folder while they are quantized (builder_memory: a third of the host memory for Phi-3-mini).
    """
    from onnxruntime_genai.models.builder import create_model

    provider = settings.provider
    files.work.mkdir(parents=True, exist_ok=True)
    extra = lora_options(Path(model.path), Path(adapter.path), settings) if adapter else []
    with (
        ONE_BUILD_AT_A_TIME,
        (files.work / "builder.log").open("w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
        float_weights_on_disk(files.work / "float-weights") as not_spilled,
    ):
        args, kwargs = builder_call(settings, Path(model.path), files.out, files.work / "hf-cache", extra)
        create_model(*args, **kwargs)
    for line in not_spilled:
        report.log(line)
    if settings.search:
        _set_search_options(files.out / "genai_config.json", settings.search.model_dump(exclude_none=True))
    report.log(f"built {settings.precision} ONNX model for {provider}" + (" with LoRA layers" if adapter else ""))
    size = sum(p.stat().st_size for p in files.out.iterdir() if p.is_file())
    return OnnxInfo(precision=settings.precision, execution_provider=provider, size_bytes=size,
                    builder=settings.model_dump(mode="json"),
                    adapter_fingerprint=adapter.fingerprint if adapter else None)  # fmt: skip


def lora_options(model_dir: Path, adapter_dir: Path, settings: ModelBuilderSettings) -> list[str]:
    """The builder's adapter_path, and its LoRA MatMuls left out of weight quantization by their node names
    (`/model/layers.<i>/<attn|mlp>/<layer>/lora_<A|B>/MatMul`; fused layers are split into their parts)."""
    layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 0)
    targets = json.loads((adapter_dir / "adapter_config.json").read_text()).get("target_modules") or []
    names = set(targets if isinstance(targets, list) else []) | SPLIT_PROJECTIONS
    nodes = [f"/model/layers.{i}/{block}/{name}/lora_{part}/MatMul" for i in range(layers)
             for block in ("attn", "mlp") for name in sorted(names) for part in "AB"]  # fmt: skip
    excluded = [*(settings.int4_nodes_to_exclude or []), *nodes]
    return [f"adapter_path={adapter_dir}", f"nodes_to_exclude={','.join(excluded)}"]


# What ModelBuilder splits fused LoRA layers into (Phi-3's qkv_proj, gate_up_proj).
SPLIT_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def _set_search_options(config_path: Path, search: dict[str, Any]) -> None:
    config = json.loads(config_path.read_text())
    config.setdefault("search", {}).update(search)
    config_path.write_text(json.dumps(config, indent=4))
