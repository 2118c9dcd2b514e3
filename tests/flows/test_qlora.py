"""QLoRA end to end on the CPU (bitsandbytes 0.50 runs 4-bit layers there): 4-bit base, merge into a
dequantized base, int4 ONNX that generates — the conversion Olive's guide says it cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grove_helpers import grove, lora_pass, read_report, step, tiny_run_config, write_project

pytestmark = pytest.mark.slow

PHI3 = ["o_proj", "qkv_proj"]


def qlora_pass(**extra) -> dict:
    settings = lora_pass(PHI3, eval_dataset_size=0.1, **extra)
    settings.update(type="QLoRA", quant_type="nf4", double_quant=True, compute_dtype="float32")
    settings.pop("torch_dtype")
    return settings


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_phi3: Path):
    passes = {
        "qlora": qlora_pass(),
        "merge_adapter_weights": {"type": "MergeAdapterWeights"},
        "builder": {"type": "ModelBuilder", "precision": "int4"},
    }
    config = write_project(tmp_path_factory.mktemp("qlora"), tiny_run_config(tiny_phi3, passes))
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    return config


def test_qlora_merge_and_int4_onnx_generate(qlora_run: Path):
    out = qlora_run.parent / "outputs" / "run"
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged, "the merge is into a dequantized base, not the 4-bit one"
    result = grove("infer", out / "onnx" / "int4-cpu", "--prompt", "### Text: hello\n### The tone is:\n",
                   "--max-new-tokens", "4")  # fmt: skip
    assert result.rc == 0, result.err
    assert len(result.json_lines()) == 1


def test_report_shows_4bit_settings_and_what_merging_cost(qlora_run: Path):
    report = read_report(qlora_run)
    trained = step(report, "qlora")["info"]
    assert trained["quantization"] == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    merged = step(report, "merge_adapter_weights")["info"]
    assert merged["adapter_heldout_loss"] == pytest.approx(trained["eval_loss"])
    assert merged["merged_heldout_loss"] > 0
    # Merging into full-precision weights changes the model a little, not a lot.
    assert merged["merged_heldout_loss"] == pytest.approx(merged["adapter_heldout_loss"], rel=0.05)
    md = (qlora_run.parent / "outputs" / "run" / "report.md").read_text()
    assert "merged_heldout_loss" in md and "nf4" in md


def test_dora_on_a_4bit_base_trains(tmp_path: Path, tiny_phi3: Path):
    config = write_project(tmp_path, tiny_run_config(tiny_phi3, {"qlora": qlora_pass(use_dora=True)}))
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    adapter = json.loads((tmp_path / "outputs" / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True
