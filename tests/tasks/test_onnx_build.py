"""The ONNX step: ModelBuilder on tiny phi3/llama folders, its options, and ORT GenAI reading the result."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from grove_helpers import Recorder, model_artifact, step_files

from olive_grove.tasks.errors import UserError
from olive_grove.tasks.inference import generate, model_kind
from olive_grove.tasks.onnx_build import ModelBuilderSettings, build_onnx_model, builder_call, builder_options


def _matmul_nbits(folder: Path) -> list[dict]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
    ]


def test_builder_options_use_the_builders_own_names():
    settings = ModelBuilderSettings(
        int4_block_size=32, int4_accuracy_level=1, metadata_only=True, extra_options={"exclude_embeds": True}
    )
    assert builder_options(settings) == [
        "hf_token=false",
        "block_size=32",
        "accuracy_level=1",
        "config_only=true",
        "exclude_embeds=true",
    ]
    olive = ModelBuilderSettings(int4_op_types_to_quantize=["MatMul", "Gather"], int4_nodes_to_exclude=["a", "b"],
                                 int4_is_symmetric=False, enable_cuda_graph=True,
                                 extra_options={"enable_cuda_graph": False})  # fmt: skip
    assert builder_options(olive) == ["hf_token=false", "is_symmetric=false", "op_types_to_quantize=MatMul/Gather",
                                      "nodes_to_exclude=a,b", "enable_cuda_graph=false"]  # fmt: skip


def test_settings_are_olive_names():
    with pytest.raises(ValueError):
        ModelBuilderSettings.model_validate({"type": "ModelBuilder", "int4_block_size": 48})
    assert ModelBuilderSettings().precision == "int4"


def build(settings: ModelBuilderSettings, model: Path, root: Path):
    files = step_files(root, root / "out")
    return files.out, build_onnx_model(settings, files, Recorder(), model=model_artifact(model))


def test_fp32_llama_builds_and_generates(tiny_llama: Path, tmp_path: Path):
    out, stats = build(ModelBuilderSettings(precision="fp32", search={"max_length": 96}), tiny_llama, tmp_path)
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert (stats.precision, stats.execution_provider) == ("fp32", "cpu")
    assert stats.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == 96
    assert genai["model"]["type"] == "llama"
    assert _matmul_nbits(out) == []  # not quantized
    assert (tmp_path / "work" / "builder.log").is_file()  # the builder's chatter, kept out of the terminal

    assert model_kind(out) == "onnx"
    [text] = generate(out, ["### Text: I miss him.\n### The tone is:\n"], max_new_tokens=4)
    assert isinstance(text, str)

    # The same model as if built for CUDA: this CPU build of ONNX Runtime GenAI says so, and runs it on the CPU.
    genai["model"]["decoder"]["session_options"]["provider_options"] = [{"cuda": {"enable_cuda_graph": "0"}}]
    (out / "genai_config.json").write_text(json.dumps(genai))
    with pytest.raises(UserError, match="is built for cuda, which this onnxruntime-genai cannot run") as error:
        generate(out, ["hi"], max_new_tokens=2)
    assert "pip install onnxruntime-genai-cuda; or generate on the CPU: --ep cpu" in error.value.line()
    assert generate(out, ["### Text: I miss him.\n### The tone is:\n"], max_new_tokens=4, on_cpu=True) == [text]
    with pytest.raises(UserError, match=r"--max-new-tokens: 100000 is more than the model's context \(4096 tokens\)"):
        generate(out, ["hi"], max_new_tokens=100_000, on_cpu=True)


def test_a_part_of_a_model_is_one_line_when_generating(tiny_llama: Path, tmp_path: Path):
    out, _ = build(ModelBuilderSettings(precision="fp32", exclude_lm_head=True), tiny_llama, tmp_path)
    with pytest.raises(UserError, match="ONNX Runtime GenAI cannot run it") as error:
        generate(out, ["hi"], max_new_tokens=2)
    assert error.value.hint == "it is part of a model: built with exclude_embeds, exclude_lm_head or metadata_only"


def test_int4_block_size_and_accuracy_level_reach_the_builder(tiny_phi3: Path, tmp_path: Path):
    settings = ModelBuilderSettings(precision="int4", int4_block_size=32, int4_accuracy_level=1)
    out, _ = build(settings, tiny_phi3, tmp_path)
    nodes = _matmul_nbits(out)
    assert nodes, "int4 has MatMulNBits nodes"
    assert {n["block_size"] for n in nodes} == {32}
    assert {n["accuracy_level"] for n in nodes} == {1}
    assert {n["bits"] for n in nodes} == {4}


@pytest.mark.parametrize("options", [{"precision": "int4"}, {"precision": "int4", "use_qdq": True},
                                     {"precision": "int4", "int4_algo_config": "k_quant"},
                                     {"precision": "int8", "execution_provider": "cuda"}])  # fmt: skip
def test_quantized_builds_with_weights_on_disk_are_the_builders_own_bytes(options, tiny_phi3: Path, tmp_path: Path):
    """The step quantizes the float weights from a scratch file (to keep host memory down); what it writes is
    byte for byte what ModelBuilder writes on its own, holding them all in memory."""
    from onnxruntime_genai.models.builder import create_model

    settings = ModelBuilderSettings(**options)
    args, kwargs = builder_call(settings, tiny_phi3, tmp_path / "plain", tmp_path / "cache")
    create_model(*args, **kwargs)
    out, _ = build(settings, tiny_phi3, tmp_path / "step")
    for name in ("model.onnx", "model.onnx.data"):
        assert (out / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert ops & {"MatMulNBits", "DequantizeLinear"}, "quantized"
    assert not (tmp_path / "step" / "work" / "float-weights").exists()


def test_metadata_only_writes_config_without_weights(tiny_phi3: Path, tmp_path: Path):
    out, _ = build(ModelBuilderSettings(metadata_only=True), tiny_phi3, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert "genai_config.json" in names and "tokenizer.json" in names
    assert "model.onnx" not in names
