"""Several LoRA adapters on one ONNX base (Olive's ExtractAdapters, ONNX Runtime GenAI's Adapters): each
adapter swapped in at run time generates what its merged model generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grove_helpers import LLAMA_MODULES, grove, lora_pass, read_report, tiny_run_config, write_project

pytestmark = pytest.mark.slow

PROMPT = "### Text: We just got the keys to our very first home!\n### The tone is:\n"


def _two_adapters(model: Path, precision: str) -> dict:
    cfg = tiny_run_config(model, {
        "tone": lora_pass(LLAMA_MODULES),
        "shout": {**lora_pass(LLAMA_MODULES), "train_data_config": "shouting", "r": 8},
        "builder": {"type": "ModelBuilder", "precision": precision},
        "extract": {"type": "ExtractAdapters", "make_inputs": True, "dynamic_lora_r": True},
    })  # fmt: skip
    shouting = json.loads(json.dumps(cfg["data_configs"][0]))
    shouting.update(name="shouting")
    shouting["pre_process_data_config"]["text_template"] = "### TEXT: {phrase}\n### THE TONE IS:\n{tone}!"
    cfg["data_configs"].append(shouting)
    for name in ("tone", "shout"):
        cfg["passes"][name]["training_args"].update(learning_rate=0.05, max_steps=4)
    return cfg


def _generate(folder: Path, *extra: str) -> list[str]:
    result = grove("infer", folder, "--max-new-tokens", "6", "--prompt", PROMPT, *extra)
    assert result.rc == 0, result.err
    return [row["output"] for row in result.json_lines()]


@pytest.fixture(scope="module")
def multi(tmp_path_factory, tiny_llama: Path) -> Path:
    config = write_project(tmp_path_factory.mktemp("multi"), _two_adapters(tiny_llama, "fp32"))
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    return config


def test_one_base_and_an_adapter_file_per_lora_pass(multi: Path):
    out = multi.parent / "outputs" / "run"
    assert list(read_report(multi)["outputs"]) == ["adapters/tone", "adapters/shout", "onnx/fp32-cpu"]
    onnx = out / "onnx" / "fp32-cpu"
    assert sorted(p.name for p in (onnx / "adapters").iterdir()) == ["shout.onnx_adapter", "tone.onnx_adapter"]
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in graph.graph.input}
    lora = [name for name in inputs if ".lora_A." in name or ".lora_B." in name]
    assert len(lora) == 2 * 2 * len(LLAMA_MODULES)  # A and B, per layer, per adapted projection
    assert any(d.dim_param == "lora_r" for d in inputs[lora[0]].type.tensor_type.shape.dim)


@pytest.mark.parametrize("adapter", ["tone", "shout"])
def test_each_adapter_generates_what_its_merged_model_does(multi: Path, adapter: str, tiny_llama: Path, tmp_path):
    cfg = _two_adapters(tiny_llama, "fp32")
    cfg["passes"] = {adapter: cfg["passes"][adapter], "merge": {"type": "MergeAdapterWeights"},
                     "builder": {"type": "ModelBuilder", "precision": "fp32"}}  # fmt: skip
    result = grove("run", "--config", write_project(tmp_path, cfg))  # the same adapter, trained alone and merged
    assert result.rc == 0, result.err[-3000:]
    swapped = _generate(multi.parent / "outputs" / "run" / "onnx" / "fp32-cpu", "--adapter", adapter)
    assert swapped == _generate(tmp_path / "outputs" / "run" / "onnx" / "fp32-cpu")


def test_without_an_adapter_the_base_generates_as_the_base_model(multi: Path, tiny_llama: Path, tmp_path: Path):
    cfg = tiny_run_config(tiny_llama, {"builder": {"type": "ModelBuilder", "precision": "fp32"}})
    del cfg["data_configs"]
    base = write_project(tmp_path, cfg)
    assert grove("run", "--config", base).rc == 0
    assert _generate(multi.parent / "outputs" / "run" / "onnx" / "fp32-cpu") == _generate(
        tmp_path / "outputs" / "run" / "onnx" / "fp32-cpu"
    )


def test_an_int4_base_takes_the_adapters_too(tmp_path: Path, tiny_llama: Path):
    config = write_project(tmp_path, _two_adapters(tiny_llama, "int4"))
    assert grove("run", "--config", config).rc == 0
    onnx = tmp_path / "outputs" / "run" / "onnx" / "int4-cpu"
    outputs = {name: _generate(onnx, "--adapter", name) for name in ("tone", "shout")}
    assert all(isinstance(o[0], str) for o in outputs.values())
    unknown = grove("infer", onnx, "--prompt", "x", "--adapter", "tones")
    assert unknown.errors == [f"error: --adapter: {onnx} has no adapter 'tones' (did you mean 'tone'?)"]


@pytest.mark.parametrize(
    ("passes", "expected"),
    [
        (["tone", "shout", "merge"], "passes.merge: merges one adapter, and tone, shout each left one"),
        (["dora", "builder"], "passes.builder: builds LoRA adapters unmerged, and passes.dora is a DoRA adapter"),
        (["extract"], "passes.extract: ExtractAdapters cannot follow input_model, which leaves a model"),
        (["builder", "extract"], "passes.extract: has no LoRA layers to extract"),
    ],
    ids=["merge-two", "dora-unmerged", "extract-first", "extract-without-adapter"],
)  # fmt: skip
def test_what_cannot_be_built_is_a_config_error(passes: list[str], expected: str, tmp_path: Path, tiny_llama: Path):
    known = {**_two_adapters(tiny_llama, "fp32")["passes"], "merge": {"type": "MergeAdapterWeights"},
             "dora": {**lora_pass(LLAMA_MODULES), "type": "DoRA"}}  # fmt: skip
    cfg = _two_adapters(tiny_llama, "fp32")
    cfg["passes"] = {name: known[name] for name in passes}
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    assert result.rc == 2 and len(result.errors) == 1, result.err
    assert result.errors[0].removeprefix("error: ").startswith(expected), result.errors
