"""Olive's nested (guide) form translated to ours, with the user's own paths kept for error messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from grove_helpers import SHARED_CONFIGS, write_project

from olive_grove.flows import olive_compat
from olive_grove.flows.config import EngineConfig, load_run_config
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.passes import PASS_TYPES


def normalise(raw: dict) -> olive_compat.Normalised:
    return olive_compat.normalise(raw, set(EngineConfig.model_fields), set(PASS_TYPES))


NESTED = {
    "input_model": {
        "type": "PyTorchModel",
        "config": {
            "hf_config": {
                "model_name": "org/model",
                "task": "text-generation",
                "from_pretrained_args": {"trust_remote_code": True},
            }
        },
    },
    "systems": {"local": {"type": "LocalSystem", "config": {"accelerators": ["cpu"]}}},
    "data_configs": [
        {
            "name": "train",
            "type": "HuggingfaceContainer",
            "load_dataset_config": {"params": {"data_name": "json", "data_files": "data/tone.json"}},
            "pre_process_data_config": {
                "params": {"text_cols": ["phrase"], "corpus_strategy": "join", "source_max_len": 64}
            },
        }
    ],
    "passes": {
        "lora": {
            "type": "LoRA",
            "config": {
                "lora_r": 8,
                "double_quant": True,
                "train_data_config": "train",
                "training_args": {"evaluation_strategy": "steps", "group_by_length": False, "no_cuda": True},
            },
        },
        "qlora": {"type": "QLoRA", "config": {"double_quant": True, "train_data_config": "train"}},
        "builder": {"type": "ModelBuilder", "config": {"precision": "int4"}},
    },
    "engine": {"host": "local", "cache_dir": "cache"},
}


def test_nested_form_becomes_flat():
    out = normalise(NESTED)
    cfg = out.config
    assert cfg["input_model"] == {
        "type": "HfModel",
        "model_path": "org/model",
        "task": "text-generation",
        "load_kwargs": {"trust_remote_code": True},
    }
    assert cfg["systems"]["local"] == {"type": "LocalSystem", "accelerators": ["cpu"]}
    data = cfg["data_configs"][0]
    assert data["load_dataset_config"] == {"data_name": "json", "data_files": "data/tone.json"}
    assert "params" not in data["pre_process_data_config"]
    lora = cfg["passes"]["lora"]
    assert lora["type"] == "LoRA" and "config" not in lora
    assert "double_quant" not in lora  # a QLoRA setting, dropped from a LoRA pass
    assert cfg["passes"]["qlora"]["double_quant"] is True  # ... and kept on QLoRA
    assert lora["training_args"] == {"eval_strategy": "steps", "use_cpu": True}  # group_by_length false: dropped
    assert cfg["passes"]["builder"] == {"type": "ModelBuilder", "precision": "int4"}
    assert cfg["engine"] == {"host": "local", "cache_dir": "cache"}


def test_nested_guide_names_validate(tmp_path: Path):
    raw = copy.deepcopy(NESTED)
    del raw["passes"]["qlora"], raw["passes"]["builder"]
    cfg, _ = load_run_config(write_project(tmp_path, raw))
    assert cfg.passes["lora"].r == 8  # lora_r
    text = cfg.data_configs[0].pre_process_data_config
    assert (text.strategy, text.max_seq_len) == ("join", 64)  # corpus_strategy, source_max_len


def test_normalise_never_changes_its_input():
    before = copy.deepcopy(NESTED)
    normalise(NESTED)
    assert before == NESTED


def test_every_translation_is_noted():
    notes = normalise(NESTED).notes
    assert "input_model.type PyTorchModel with hf_config is read as HfModel" in notes
    assert "passes.lora.training_args.evaluation_strategy is read as eval_strategy" in notes
    assert "passes.lora.training_args.no_cuda is read as use_cpu" in notes
    assert "passes.lora.training_args.group_by_length is read as train_sampling_strategy" in notes
    assert "passes.lora.double_quant has no effect on a LoRA pass (it is a QLoRA setting)" in notes


def test_user_paths_point_back_at_what_was_written():
    out = normalise(NESTED)
    assert out.user_path("passes.lora.train_data_config") == "passes.lora.config.train_data_config"
    assert out.user_path("passes.lora.training_args.max_steps") == "passes.lora.config.training_args.max_steps"
    assert out.user_path("input_model.model_path") == "input_model.config.hf_config.model_name"
    assert out.user_path("input_model.load_kwargs.revision") == (
        "input_model.config.hf_config.from_pretrained_args.revision"
    )
    assert out.user_path("data_configs[0].load_dataset_config.data_files") == (
        "data_configs[0].load_dataset_config.params.data_files"
    )
    assert out.user_path("systems.local.accelerators[0]") == "systems.local.config.accelerators[0]"
    assert out.user_path("passes.lora.type") == "passes.lora.type"  # not inside config


def test_flat_engine_keys_are_lifted_and_keep_their_names():
    out = normalise({"host": "h", "output_dir": "o", "cache_dir": "c", "passes": {}})
    assert out.config["engine"] == {"cache_dir": "c", "host": "h", "output_dir": "o"}
    assert "host" not in out.config
    assert out.user_path("engine.output_dir") == "output_dir"


def test_model_path_wins_over_hf_config_model_name():
    out = normalise({"input_model": {"type": "HfModel", "model_path": "local/dir", "hf_config": {"model_name": "o/m"}}})
    assert out.config["input_model"]["model_path"] == "local/dir"
    assert any("model_name is the hub id of input_model.model_path; the path is used" in n for n in out.notes)


def test_model_loading_args_are_load_kwargs():
    out = normalise({"input_model": {"hf_config": {"model_name": "m", "model_loading_args": {"revision": "v1"}}}})
    assert out.config["input_model"]["load_kwargs"] == {"revision": "v1"}


def test_nested_registry_model_path_is_unwrapped():
    raw = {
        "input_model": {
            "type": "PyTorchModel",
            "config": {"model_path": {"type": "azureml_registry_model", "config": {"name": "n", "registry_name": "r"}}},
        }
    }
    assert normalise(raw).config["input_model"]["model_path"] == {
        "type": "azureml_registry_model",
        "name": "n",
        "registry_name": "r",
    }


def test_unknown_hf_config_key_is_reported_where_it_was_written(tmp_path: Path):
    raw = copy.deepcopy(NESTED)
    raw["input_model"]["config"]["hf_config"]["model_nam"] = "typo"
    with pytest.raises(UserError) as exc:
        load_run_config(write_project(tmp_path, raw))
    assert exc.value.line().startswith("input_model.config.hf_config.model_nam: unknown key")


def test_unknown_key_in_nested_pass_names_the_config_path_and_the_nearest_key(tmp_path: Path):
    raw = copy.deepcopy(NESTED)
    raw["passes"]["lora"]["config"]["lora_rr"] = 8
    with pytest.raises(UserError) as exc:
        load_run_config(write_project(tmp_path, raw))
    assert exc.value.line() == "passes.lora.config.lora_rr: unknown key (did you mean 'lora_r'?)"


@pytest.mark.skipif(not SHARED_CONFIGS.is_dir(), reason=f"no Olive configs at {SHARED_CONFIGS}")
@pytest.mark.parametrize("name", sorted(p.name for p in SHARED_CONFIGS.glob("*.json")))
def test_guide_configs_normalise_without_nested_leftovers(name: str):
    cfg = normalise(json.loads((SHARED_CONFIGS / name).read_text())).config
    assert "config" not in cfg["input_model"] and "hf_config" not in cfg["input_model"]
    for settings in cfg["passes"].values():
        assert "config" not in settings
    for data in cfg["data_configs"]:
        assert "params" not in data["load_dataset_config"]
        assert "params" not in data["pre_process_data_config"]
