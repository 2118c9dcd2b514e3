"""Adapters for ONNX Runtime GenAI (Olive's `ExtractAdapters`): one ONNX base whose LoRA weights are inputs,
and one `.onnx_adapter` file per trained adapter, which `og.Adapters` loads and swaps at run time.

ModelBuilder builds the base with the first adapter's LoRA layers left unmerged (float, so they can be
swapped); this step turns their weights into optional inputs (an absent adapter adds nothing) with the rank
as a free dimension, and writes each adapter's weights, as ModelBuilder lays them out, to its own file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact, PassSettings, Reporter, StepFiles, no_effect
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import ModelInfo
from olive_grove.tasks.onnx_build import ModelBuilderSettings, OnnxInfo, build_onnx_model

ADAPTERS_FOLDER = "adapters"
LORA_WEIGHTS = (".lora_A.", ".lora_B.")
EXTERNAL_DATA = "the ONNX model keeps ModelBuilder's external data file"


class ExtractAdaptersSettings(PassSettings):
    """Olive's `ExtractAdapters` pass, for the LoRA adapters ModelBuilder built into the model before it."""

    type: Literal["ExtractAdapters"] = "ExtractAdapters"
    adapter_type: Literal["lora"] = Field("lora", description="ModelBuilder builds LoRA adapters unmerged")
    make_inputs: Literal[True] = Field(True, description="the LoRA weights become inputs of the model")
    dynamic_lora_r: Literal[True] = Field(
        True, description="the rank is a free dimension (a fixed rank clashes with the empty default weights)"
    )
    optional_inputs: bool = Field(True, description="without an adapter, the LoRA layers add nothing")
    save_format: Literal["onnx_adapter"] = Field("onnx_adapter", description="what og.Adapters loads")
    save_as_external_data: Any = no_effect(EXTERNAL_DATA)
    all_tensors_to_one_file: Any = no_effect(EXTERNAL_DATA)
    external_data_name: Any = no_effect(EXTERNAL_DATA)
    size_threshold: Any = no_effect(EXTERNAL_DATA)
    convert_attribute: Any = no_effect(EXTERNAL_DATA)


class AdaptersInfo(OnnxInfo):
    adapters: list[str] = Field(description=f"the adapters in {ADAPTERS_FOLDER}/, by the pass that trained each")


def extract_adapters(
    settings: ExtractAdaptersSettings,
    files: StepFiles,
    report: Reporter,
    *,
    model: Artifact[ModelInfo],
    onnx: Artifact[OnnxInfo],
    adapters: dict[str, Artifact[AdapterInfo]],
) -> AdaptersInfo:
    import onnx as onnx_lib

    source = Path(onnx.path)
    for item in source.iterdir():  # the base's files, then its LoRA weights turned into inputs
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, files.out / item.name)
    graph_file = files.out / source_graph_name(source)
    graph = onnx_lib.load(str(graph_file), load_external_data=False)
    built = lora_weights(graph, source)
    if not built:
        raise UserError("", "the ONNX model has no LoRA layers to extract", "put a LoRA pass before ModelBuilder")
    make_lora_inputs(graph, built, settings)
    onnx_lib.save(graph, str(graph_file))
    (files.out / ADAPTERS_FOLDER).mkdir()
    builder = ModelBuilderSettings.model_validate(onnx.info.builder)
    for name, adapter in adapters.items():
        if adapter.fingerprint == onnx.info.adapter_fingerprint:
            weights = built
        else:  # ModelBuilder lays this adapter out as it did the first: scaled, transposed, split per layer
            weights = _built_weights(builder, files, report, model, adapter, name)
        if set(weights) != set(built):
            raise UserError("", f"the adapter of {name} adapts other layers than the one ModelBuilder built",
                            "train every adapter on the same target_modules")  # fmt: skip
        write_adapter_file(weights, files.out / ADAPTERS_FOLDER / f"{name}.onnx_adapter")
    report.log(f"{len(adapters)} adapter(s) for ONNX Runtime GenAI in {ADAPTERS_FOLDER}/")
    size = sum(p.stat().st_size for p in files.out.rglob("*") if p.is_file())
    return AdaptersInfo(**{**onnx.info.model_dump(exclude={"seconds", "size_bytes"}), "size_bytes": size,
                           "adapters": list(adapters)})  # fmt: skip


def source_graph_name(folder: Path) -> str:
    """The ONNX graph ModelBuilder wrote (`model.onnx`, or the `filename` extra option's name)."""
    import json

    config = json.loads((folder / "genai_config.json").read_text())
    return config["model"]["decoder"]["filename"]


def lora_weights(graph, folder: Path) -> dict[str, Any]:
    """The LoRA weights of a ModelBuilder graph, by initializer name, as arrays."""
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t, base_dir=str(folder)) for t in graph.graph.initializer
            if any(part in t.name for part in LORA_WEIGHTS)}  # fmt: skip


def make_lora_inputs(graph, weights: dict[str, Any], settings: ExtractAdaptersSettings) -> None:
    """Each LoRA weight becomes a graph input; with `optional_inputs`, its default is an empty one (rank 0)."""
    from onnx import helper, numpy_helper

    kept = [t for t in graph.graph.initializer if t.name not in weights]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for name, array in weights.items():
        rank_axis = 1 if ".lora_A." in name else 0
        shape: list[Any] = list(array.shape)
        shape[rank_axis] = "lora_r" if settings.dynamic_lora_r else shape[rank_axis]
        graph.graph.input.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), shape)
        )
        if settings.optional_inputs:
            empty = list(array.shape)
            empty[rank_axis] = 0
            graph.graph.initializer.append(numpy_helper.from_array(array.reshape(-1)[:0].reshape(empty), name))


def write_adapter_file(weights: dict[str, Any], path: Path) -> None:
    import onnxruntime

    adapter = onnxruntime.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: onnxruntime.OrtValue.ortvalue_from_numpy(array) for name, array in weights.items()})
    adapter.export_adapter(str(path))


def _built_weights(builder: ModelBuilderSettings, files: StepFiles, report: Reporter, model: Artifact[ModelInfo],
                   adapter: Artifact[AdapterInfo], name: str) -> dict[str, Any]:  # fmt: skip
    import onnx as onnx_lib

    scratch = files.work / f"build-{name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    built = StepFiles(out=scratch / "out", work=scratch / "work", downloads=files.downloads)
    built.out.mkdir()
    build_onnx_model(builder, built, report, model=model, adapter=adapter)
    graph = onnx_lib.load(str(built.out / source_graph_name(built.out)), load_external_data=False)
    weights = lora_weights(graph, built.out)
    shutil.rmtree(scratch, ignore_errors=True)
    return weights
