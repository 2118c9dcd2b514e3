"""The ONNX step: ModelBuilder on tiny phi3/llama folders, its options, and ORT GenAI reading the result."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
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


def builder_alone(settings: ModelBuilderSettings, model: Path, out: Path) -> Path:
    """ModelBuilder on its own, every float weight in memory as it quantizes."""
    from onnxruntime_genai.models.builder import create_model

    args, kwargs = builder_call(settings, model, out, out.parent / f"{out.name}-cache")
    create_model(*args, **kwargs)
    return out


def same_files(step_out: Path, alone: Path) -> None:
    for name in ("model.onnx", "model.onnx.data"):
        assert (step_out / name).read_bytes() == (alone / name).read_bytes(), name


@pytest.fixture
def spills(monkeypatch) -> list[Path]:
    """The folders the step wrote its float weights to, as it writes them."""
    from olive_grove.tasks import builder_memory

    written, spill = [], builder_memory._spill
    monkeypatch.setattr(builder_memory, "_spill", lambda model, folder: (written.append(folder), spill(model, folder)))
    return written


@pytest.mark.parametrize(("options", "spilled"), [
    ({"precision": "int4"}, True),
    ({"precision": "int4", "use_qdq": True}, True),
    ({"precision": "int4", "int4_op_types_to_quantize": ["MatMul", "Gather"]}, True),  # the embedding stays in memory
    ({"precision": "int4", "int4_algo_config": "k_quant"}, False),  # reads weights through onnx's loader
    ({"precision": "int8", "execution_provider": "cuda"}, True),
])  # fmt: skip
def test_quantized_builds_with_weights_on_disk_are_the_builders_own_bytes(options, spilled, spills, tiny_phi3: Path,
                                                                          tmp_path: Path):  # fmt: skip
    """The step quantizes the float weights from a scratch file (to keep host memory down); what it writes is
    byte for byte what ModelBuilder writes on its own, holding them all in memory."""
    settings = ModelBuilderSettings(**options)
    out, _ = build(settings, tiny_phi3, tmp_path / "step")
    same_files(out, builder_alone(settings, tiny_phi3, tmp_path / "alone"))
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert ops & {"MatMulNBits", "DequantizeLinear"}, "quantized"
    assert bool(spills) == spilled
    assert not (tmp_path / "step" / "work" / "float-weights").exists()


def test_a_build_that_cannot_write_its_float_weights_quantizes_in_memory(tiny_phi3: Path, tmp_path: Path):
    (tmp_path / "step" / "work").mkdir(parents=True)
    (tmp_path / "step" / "work" / "float-weights").write_text("in the way")
    files = step_files(tmp_path / "step", tmp_path / "step" / "out")
    recorder = Recorder()
    build_onnx_model(ModelBuilderSettings(), files, recorder, model=model_artifact(tiny_phi3))
    same_files(files.out, builder_alone(ModelBuilderSettings(), tiny_phi3, tmp_path / "alone"))
    assert any("could not write the float weights to" in line and "quantized them in memory" in line
               for line in recorder.lines), recorder.lines  # fmt: skip


def test_builds_in_two_threads_take_turns_and_leave_the_builder_as_it_was(tiny_phi3: Path, tmp_path: Path):
    from onnxruntime_genai.models import builder

    save_model, stdout = builder.Model.save_model, sys.stdout
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda name: build(ModelBuilderSettings(), tiny_phi3, tmp_path / name)[0], ["a", "b"]))
    assert builder.Model.save_model is save_model and sys.stdout is stdout
    alone = builder_alone(ModelBuilderSettings(), tiny_phi3, tmp_path / "alone")
    for out in outs:
        same_files(out, alone)


def test_metadata_only_writes_config_without_weights(tiny_phi3: Path, tmp_path: Path):
    out, _ = build(ModelBuilderSettings(metadata_only=True), tiny_phi3, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert "genai_config.json" in names and "tokenizer.json" in names
    assert "model.onnx" not in names
