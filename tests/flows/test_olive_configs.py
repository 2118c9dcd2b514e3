"""Configs in the shape of Olive's own (its old examples/ and microsoft/olive-recipes): their keys, spellings
and defaults, on tiny models of their architectures, with local data of the same columns."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from grove_helpers import grove, step, write_project

pytestmark = pytest.mark.slow

TEMPLATE = "### Question: {prompt} \n### Answer: {response}"


def tiny_codes(root: Path, rows: int = 240) -> str:
    """Rows with tiny-codes' columns (prompt, response, programming_language), written as JSON Lines."""
    rng = random.Random(0)
    verbs, things = ["reverse", "sort", "count", "sum", "print"], ["a list", "a string", "the words", "numbers"]
    lines = []
    for i in range(rows):
        verb, thing = rng.choice(verbs), rng.choice(things)
        language = "Python" if i % 3 else "JavaScript"
        lines.append(
            json.dumps(
                {
                    "prompt": f"Write a function to {verb} {thing}.",
                    "response": f"def {verb}(x):\n    return {verb}(x)  # {thing}",
                    "programming_language": language,
                }
            )
        )
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "tiny-codes.jsonl").write_text("\n".join(lines) + "\n")
    return "data/tiny-codes.jsonl"


def tiny_codes_config(files: str, split: str = "train") -> dict[str, Any]:
    return {"data_name": "json", "data_files": files, "split": split, "col_filters": {"programming_language": "Python"}}


def test_open_llama_lora_tinycodes_shape(tmp_path: Path, tiny_llama: Path):
    """examples/open_llama/open_llama_lora_tinycodes.json: no text_cols, col_filters, an eval count, the older
    evaluation_strategy, load_best_model_at_end, engine keys at the top."""
    cfg = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_llama)},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [{"device": "gpu"}]}},
        "data_configs": [{"name": "tiny_codes_train", "type": "HuggingfaceContainer",
                          "load_dataset_config": tiny_codes_config(tiny_codes(tmp_path)),
                          "pre_process_data_config": {"text_template": TEMPLATE, "max_seq_len": 64}}],
        "passes": {"lora": {"type": "LoRA", "lora_dropout": 0.1, "train_data_config": "tiny_codes_train",
                            "eval_dataset_size": 8, "training_args": {
                                "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
                                "gradient_accumulation_steps": 1, "max_steps": 4, "logging_steps": 2,
                                "save_steps": 2, "evaluation_strategy": "steps", "adam_beta2": 0.999,
                                "max_grad_norm": 0.3, "load_best_model_at_end": True}}},
        "log_severity_level": 0, "search_strategy": False, "evaluate_input_model": False,
        "host": "local_system", "target": "local_system", "cache_dir": "cache",
        "output_dir": "models/open_llama_lora_tinycodes",
    }  # fmt: skip
    config = write_project(tmp_path, cfg)
    report = json.loads((run_ok_at(config, "models/open_llama_lora_tinycodes")).read_text())
    dataset = step(report, "lora/dataset")["info"]
    assert dataset["rows"] == 160 and dataset["samples"]["eval"] == 8  # the Python rows only; 8 held out
    adapter = json.loads((tmp_path / "models/open_llama_lora_tinycodes/adapter/adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}  # peft's default for llama, as in Olive
    assert step(report, "lora")["info"]["eval_curve"]  # evaluated every 2 steps, as the config asks


def run_ok_at(config: Path, output_dir: str) -> Path:
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    return config.parent / output_dir / "report.json"


def test_phi3_template_qlora_shape_builds_int4_that_generates(tmp_path: Path, tiny_phi3: Path):
    """examples/phi3/phi3_template.json as phi3.py writes it for QLoRA on the CPU: lower-case pass types,
    device "CPU", split slices, no target_modules (every linear layer for QLoRA), group_by_length."""
    files = tiny_codes(tmp_path)
    data = [{"name": name, "type": "HuggingfaceContainer", "load_dataset_config": tiny_codes_config(files, split),
             "pre_process_data_config": {"text_template": TEMPLATE, "max_seq_len": 64}}
            for name, split in (("tiny_codes_train", "train[:70%]"), ("tiny_codes_eval", "train[-32:]"))]  # fmt: skip
    cfg = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_phi3), "load_kwargs": {"trust_remote_code": True}},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "CPU", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": data,
        "passes": {
            "qlora": {"type": "qlora", "train_data_config": "tiny_codes_train", "eval_data_config": "tiny_codes_eval",
                      "r": 8, "compute_dtype": "float32", "training_args": {
                          "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
                          "gradient_accumulation_steps": 4, "gradient_checkpointing": False, "max_steps": 3,
                          "logging_steps": 1, "group_by_length": True, "max_grad_norm": 0.3}},
            "merge_adapter_weights": {"type": "mergeadapterweights"},
            "builder": {"type": "modelbuilder", "precision": "int4", "int4_accuracy_level": 4},
        },
        "cache_dir": "cache", "output_dir": "models", "host": "local_system", "target": "local_system",
    }  # fmt: skip
    config = write_project(tmp_path, cfg)
    report = json.loads(run_ok_at(config, "models").read_text())
    adapter = json.loads((tmp_path / "models/adapter/adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # every linear layer but the head
    assert step(report, "merge_adapter_weights")["info"]["merged_heldout_loss"] > 0
    result = grove("infer", tmp_path / "models/onnx/int4-cpu", "--prompt", "### Question: Write", "--max-new-tokens",
                   "4")  # fmt: skip
    assert result.rc == 0, result.err


def test_loftq_tinycodes_shape(tmp_path: Path, tiny_llama: Path):
    """examples/open_llama/open_llama_loftq_tinycodes.json: the LoftQ pass, then a merge."""
    cfg = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_llama)},
        "data_configs": [{"name": "tiny_codes_train", "type": "HuggingfaceContainer",
                          "load_dataset_config": tiny_codes_config(tiny_codes(tmp_path)),
                          "pre_process_data_config": {"text_template": TEMPLATE, "max_seq_len": 64}}],
        "passes": {"loftq": {"type": "LoftQ", "lora_dropout": 0.1, "train_data_config": "tiny_codes_train",
                             "eval_dataset_size": 8, "compute_dtype": "float32", "r": 8,
                             "training_args": {"per_device_train_batch_size": 2, "max_steps": 3}},
                   "merge": {"type": "MergeAdapterWeights"}},
        "cache_dir": "cache", "output_dir": "models",
    }  # fmt: skip
    report = json.loads(run_ok_at(write_project(tmp_path, cfg), "models").read_text())
    merged = step(report, "merge")["info"]
    assert merged["merged_heldout_loss"] == pytest.approx(merged["adapter_heldout_loss"], rel=2e-2)


@pytest.mark.parametrize(
    ("target", "folder"),
    [({"device": "gpu", "execution_providers": ["DmlExecutionProvider"]}, "int4-dml"),
     ({"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}, "int4-cuda")],
    ids=["aitk-dml", "builtin-cuda-inline-target"],
)  # fmt: skip
def test_modelbuilder_recipes_shape(target: dict, folder: str, tmp_path: Path, tiny_llama: Path):
    """olive-recipes' ModelBuilder-only configs: a host and a target system (inline in the engine, for the
    builtin ones), int4 options, extra_options, no_artifacts."""
    cfg: dict[str, Any] = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_llama)},
        "passes": {"mb": {"type": "ModelBuilder", "precision": "int4", "int4_block_size": 32,
                          "int4_algo_config": "rtn", "extra_options": {"filename": "text.onnx"}}},
        "log_severity_level": 1, "output_dir": "model/tiny", "cache_dir": "cache", "no_artifacts": True,
        "evaluate_input_model": False,
    }  # fmt: skip
    if folder == "int4-dml":
        cfg["systems"] = {"host_system": {"type": "LocalSystem", "accelerators": [{"device": "cpu"}]},
                          "target_system": {"type": "LocalSystem", "accelerators": [target]}}  # fmt: skip
        cfg.update(host="host_system", target="target_system")
    else:
        cfg["engine"] = {"target": {"type": "LocalSystem", "accelerators": [target]}}
    run_ok_at(write_project(tmp_path, cfg), "model/tiny")
    built = tmp_path / "model" / "tiny" / "onnx" / folder
    genai = json.loads((built / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "text.onnx" and (built / "text.onnx").is_file()


def test_a_config_with_passes_olive_grove_does_not_run_names_them(tmp_path: Path, tiny_llama: Path):
    passes = {"conversion": {"type": "OnnxConversion"}, "quant": {"type": "GptqQuantizer", "bits": 4},
              "mb": {"type": "ModelBuilder", "precision": "int4"}, "surgery": {"type": "graph_surgeries"}}  # fmt: skip
    cfg = {"input_model": {"type": "HfModel", "model_path": str(tiny_llama)}, "passes": passes}
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    assert result.rc == 2
    assert result.errors == ["error: passes: olive-grove does not run conversion (OnnxConversion), quant "
                             "(GptqQuantizer), surgery (graph_surgeries) (olive-grove runs LoRA, DoRA, QLoRA, LoftQ, "
                             "LoHa, LoKr, MergeAdapterWeights, ModelBuilder, ExtractAdapters)"]  # fmt: skip


def test_olive_recipes_evaluator_block_runs_on_base_and_merged(tmp_path: Path, tiny_llama: Path):
    """The `evaluators` block of olive-recipes' sample (.aitk/non_model_projects/templates/empty/sample.json),
    named by `engine.evaluator`, on a fine-tuning config: its metrics for the base and the merged model."""
    files = tiny_codes(tmp_path, rows=60)
    evaluators = {"common_evaluator": {"metrics": [
        {"name": "accuracy", "type": "accuracy", "data_config": "evaluation",
         "sub_types": [{"name": "accuracy_score", "priority": 1}]},
        {"name": "latency", "type": "latency", "data_config": "evaluation",
         "sub_types": [{"name": "avg", "priority": 2}]},
    ]}}  # fmt: skip
    text = {"text_template": TEMPLATE, "max_seq_len": 64}
    cfg = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_llama)},
        "data_configs": [
            {"name": "train", "load_dataset_config": tiny_codes_config(files, "train[:40]"),
             "pre_process_data_config": text},
            {"name": "evaluation", "load_dataset_config": tiny_codes_config(files, "train[40:]"),
             "pre_process_data_config": {**text, "max_samples": 4}},
        ],
        "passes": {"lora": {"type": "LoRA", "train_data_config": "train", "eval_data_config": "evaluation",
                            "training_args": {"per_device_train_batch_size": 2, "max_steps": 2}},
                   "merge": {"type": "MergeAdapterWeights"}},
        "evaluators": evaluators,
        "engine": {"evaluator": "common_evaluator", "evaluate_input_model": True, "cache_dir": "cache",
                   "output_dir": "models"},
    }  # fmt: skip
    report = json.loads(run_ok_at(write_project(tmp_path, cfg), "models").read_text())
    table = report["evaluation"]["common_evaluator"]
    assert list(table) == ["accuracy-accuracy_score", "latency-avg"]
    assert all(list(row) == ["base", "merged"] for row in table.values())
    assert table["latency-avg"]["merged"] > 0
