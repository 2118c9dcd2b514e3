"""Olive's other adapter passes — DoRA, LoftQ, LoHa, LoKr — each trained, merged and built into an ONNX model
that generates, on the CPU, through the same steps as LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grove_helpers import LLAMA_MODULES, grove, lora_pass, read_report, step, tiny_run_config, write_project

pytestmark = pytest.mark.slow

PROMPT = "### Text: The storm knocked out our power all night.\n### The tone is:\n"


def _adapter_pass(kind: str, **extra) -> dict:
    settings = lora_pass(LLAMA_MODULES, eval_dataset_size=0.1, **extra)
    settings["type"] = kind
    if kind in ("LoHa", "LoKr"):
        settings.pop("lora_dropout")
    if kind == "LoftQ":
        settings.update(quant_type="nf4", compute_dtype="float32")
        settings.pop("torch_dtype")
    return settings


@pytest.fixture(scope="module", params=["DoRA", "LoftQ", "LoHa", "LoKr"])
def pipeline(request, tmp_path_factory, tiny_llama: Path):
    kind = request.param
    passes = {"adapter": _adapter_pass(kind), "merge": {"type": "MergeAdapterWeights"},
              "builder": {"type": "ModelBuilder", "precision": "fp32"}}  # fmt: skip
    config = write_project(tmp_path_factory.mktemp(kind), tiny_run_config(tiny_llama, passes))
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    return kind, config, read_report(config)


def test_the_pass_trains_merges_and_builds_a_model_that_generates(pipeline):
    kind, config, report = pipeline
    out = config.parent / "outputs" / "run"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == {"DoRA": "LORA", "LoftQ": "LORA", "LoHa": "LOHA", "LoKr": "LOKR"}[kind]
    assert adapter.get("use_dora", False) is (kind == "DoRA")
    assert set(adapter["target_modules"]) == set(LLAMA_MODULES)
    assert step(report, "adapter")["info"]["steps"] == 3
    result = grove("infer", out / "onnx" / "fp32-cpu", "--prompt", PROMPT, "--max-new-tokens", "3")
    assert result.rc == 0, result.err
    assert len(result.json_lines()) == 1


def test_the_merged_model_computes_what_the_adapter_did(pipeline):
    """The merge is honest for each kind: the held-out loss barely moves — for LoftQ because it merges into
    the dequantized 4-bit base its adapter was fitted to."""
    kind, _, report = pipeline
    merged = step(report, "merge")["info"]
    assert merged["merged_heldout_loss"] == pytest.approx(merged["adapter_heldout_loss"], rel=1e-3 if kind != "LoftQ"
                                                          else 2e-2)  # fmt: skip
    if kind == "LoftQ":
        assert step(report, "adapter")["info"]["merge_into"] == "quantized"
