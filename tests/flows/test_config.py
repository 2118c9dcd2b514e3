"""Loading run configs: the guide's configs as written, Olive's flat form, YAML, and --set overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grove_helpers import SHARED_CONFIGS, tiny_run_config, write_project

from olive_grove.flows.config import load_run_config
from olive_grove.tasks.adapter_settings import LoRASettings, QLoRASettings
from olive_grove.tasks.data import AzureMLDatastore
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.merge import MergeSettings
from olive_grove.tasks.onnx_build import ModelBuilderSettings

SHARED = sorted(SHARED_CONFIGS.glob("*.json")) if SHARED_CONFIGS.is_dir() else []
needs_shared = pytest.mark.skipif(not SHARED, reason=f"no Olive configs at {SHARED_CONFIGS} (the seed documents)")


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


# ------------------------------------------------------------------------- the guide's configs, as written


@needs_shared
@pytest.mark.parametrize("path", SHARED, ids=_ids(SHARED))
def test_every_guide_config_validates_as_written(path: Path):
    cfg, notes = load_run_config(path)

    training = [s for s in cfg.passes.values() if isinstance(s, LoRASettings)]
    assert len(training) == 1
    lora = training[0]
    assert (lora.r, lora.alpha, lora.lora_dropout) == (64, 64, 0.1)  # lora_r / lora_alpha
    assert lora.train_data_config == "dataset_default_train"
    assert "eval_strategy" in lora.training_args and "evaluation_strategy" not in lora.training_args
    assert lora.training_args["train_sampling_strategy"] == "group_by_length"
    assert "group_by_length" not in lora.training_args
    assert any("evaluation_strategy is read as eval_strategy" in n for n in notes)

    text = cfg.data_configs[0].pre_process_data_config
    assert text.max_seq_len == 2048  # source_max_len
    assert text.strategy == "join"  # corpus_strategy
    assert (text.pad_to_max_len, text.use_attention_mask) == (False, False)

    assert cfg.input_model.type == "HfModel"  # PyTorchModel + hf_config
    assert cfg.input_model.load_kwargs.trust_remote_code is True
    assert cfg.engine.host == cfg.engine.target == "aml"
    assert cfg.systems["aml"].type == "AzureML"
    # Relative engine folders are read from the config file's folder.
    assert Path(cfg.engine.output_dir) == (path.parent / "../model-cache/models/phi3-finetuned").resolve()
    assert Path(cfg.engine.cache_dir).is_absolute()
    assert any(n.startswith("engine.search_strategy has no effect in olive-grove: ") for n in notes)
    # Where the flow runs is the work pool's to decide, named once as the user wrote the key.
    assert any(
        n.startswith("systems.aml.config.aml_compute has no effect in olive-grove: the work pool") for n in notes
    )


@needs_shared
def test_guide_hub_model_name_becomes_model_path():
    cfg, notes = load_run_config(SHARED_CONFIGS / "azureml-lora.json")
    assert cfg.input_model.model_path == "microsoft/Phi-3-mini-4k-instruct"
    assert isinstance(cfg.data_configs[0].load_dataset_config.data_files, AzureMLDatastore)
    assert cfg.data_configs[0].pre_process_data_config.text_cols == ["Question", "Best Answer"]
    assert [type(s) for s in cfg.passes.values()] == [LoRASettings, MergeSettings, ModelBuilderSettings]
    assert cfg.passes["builder"].precision == "int4"
    # double_quant on a LoRA pass is a QLoRA setting: accepted, dropped, and said so.
    assert any("passes.lora.double_quant has no effect on a LoRA pass" in n for n in notes)


@needs_shared
def test_guide_qlora_config_keeps_its_quantization():
    cfg, _ = load_run_config(SHARED_CONFIGS / "azureml-qlora.json")
    qlora = cfg.passes["qlora"]
    assert isinstance(qlora, QLoRASettings)
    assert (qlora.quant_type, qlora.double_quant, qlora.compute_dtype) == ("nf4", True, "bfloat16")
    assert list(cfg.passes) == ["qlora", "merge_adapter_weights"]


@needs_shared
def test_guide_registry_model_and_local_data():
    cfg, _ = load_run_config(SHARED_CONFIGS / "fragments-cloud-data-registry-model.json")
    assert cfg.input_model.model_path == {
        "type": "azureml_registry_model",
        "name": "microsoft/Phi-3-mini-4k-instruct",
        "registry_name": "azureml-msr",
        "version": "11",
    }
    assert cfg.engine.execution_providers == ["CUDAExecutionProvider"]

    local, _ = load_run_config(SHARED_CONFIGS / "fragments-local-data.json")
    assert local.input_model.model_path == str(SHARED_CONFIGS / "model-cache" / "microsoft" / "phi-3-mini")
    files = local.data_configs[0].load_dataset_config.data_files
    assert files == str((SHARED_CONFIGS / "dataset" / "dataset-classification.json").resolve())


# ------------------------------------------------------------------------------------ Olive's flat form


def test_flat_form(tmp_path: Path, tiny_phi3: Path):
    cfg_path = write_project(tmp_path, tiny_run_config("tiny", output_dir="out/here", cache_dir="c"))
    (tmp_path / "tiny").mkdir()  # a local folder named by a relative model_path is resolved too
    cfg, notes = load_run_config(cfg_path)

    assert cfg.input_model.model_path == str(tmp_path / "tiny")
    lora = cfg.passes["lora"]
    assert (lora.r, lora.alpha, lora.target_modules) == (4, 8, ["o_proj", "qkv_proj"])
    text = cfg.data_configs[0].pre_process_data_config
    assert (text.strategy, text.max_seq_len) == ("join", 64)
    assert cfg.data_configs[0].load_dataset_config.data_files == str(tmp_path / "data" / "tone.json")
    # Top-level host/target/cache_dir/output_dir are the engine's.
    assert (cfg.engine.host, cfg.engine.target) == ("local_system", "local_system")
    assert cfg.engine.output_dir == str(tmp_path / "out" / "here")
    assert cfg.engine.cache_dir == str(tmp_path / "c")
    assert notes == []


def test_flat_form_is_read_from_any_working_directory(tmp_path: Path, tiny_phi3: Path, monkeypatch):
    cfg_path = write_project(tmp_path / "project", tiny_run_config(tiny_phi3))
    monkeypatch.chdir(tmp_path)
    cfg, _ = load_run_config(Path("project") / "config.json")
    assert cfg.engine.output_dir == str(tmp_path / "project" / "outputs" / "run")
    assert Path(cfg.data_configs[0].load_dataset_config.data_files).is_file()
    assert cfg_path.exists()


def test_olive_aliases_in_flat_form(tmp_path: Path, tiny_phi3: Path):
    raw = tiny_run_config(tiny_phi3)
    lora = raw["passes"]["lora"]
    lora["lora_r"], lora["lora_alpha"] = lora.pop("r"), lora.pop("alpha")
    text = raw["data_configs"][0]["pre_process_data_config"]
    text["corpus_strategy"], text["source_max_len"] = "line-by-line", text.pop("max_seq_len")
    text.pop("strategy")
    text["use_attention_mask"] = True
    cfg, _ = load_run_config(write_project(tmp_path, raw))
    assert (cfg.passes["lora"].r, cfg.passes["lora"].alpha) == (4, 8)
    settings = cfg.data_configs[0].pre_process_data_config
    assert (settings.strategy, settings.max_seq_len) == ("line-by-line", 64)


def test_yaml_config_loads_like_json(tmp_path: Path, tiny_phi3: Path):
    raw = tiny_run_config(tiny_phi3)
    from_json, _ = load_run_config(write_project(tmp_path, raw, "config.json"))
    yaml_path = write_project(tmp_path, raw, "config.yaml")
    assert "passes:" in yaml_path.read_text()
    from_yaml, _ = load_run_config(yaml_path)
    assert from_yaml.model_dump() == from_json.model_dump()


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("bad.yaml", "passes: [unclosed", "not valid YAML"),
        ("list.yaml", "- a\n- b\n", "the config must be a mapping at the top level"),
    ],
)
def test_unreadable_config_files(tmp_path: Path, name: str, text: str, problem: str):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as exc:
        load_run_config(tmp_path / name)
    assert exc.value.where == str(tmp_path / name)
    assert problem in exc.value.problem


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(UserError, match="no such config file"):
        load_run_config(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------ --set KEY=VALUE


def test_overrides_are_typed_and_nested(tmp_path: Path, tiny_phi3: Path):
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    cfg, _ = load_run_config(
        cfg_path,
        [
            "passes.lora.training_args.max_steps=5",  # int
            "passes.lora.training_args.warmup_steps=2",  # a new key in an existing section
            "passes.lora.target_modules=[o_proj, qkv_proj, gate_up_proj]",  # list
            "passes.lora.use_dora=true",  # bool
            "passes.lora.lora_dropout=0.25",  # float
            "passes.builder.search.max_length=128",  # a section that did not exist
            "engine.output_dir=elsewhere",  # relative to the config's folder, like the file's own
            "input_model.load_kwargs.revision=main",  # a string
        ],
    )
    lora = cfg.passes["lora"]
    assert lora.training_args["max_steps"] == 5 and isinstance(lora.training_args["max_steps"], int)
    assert lora.training_args["warmup_steps"] == 2
    assert lora.target_modules == ["o_proj", "qkv_proj", "gate_up_proj"]
    assert lora.use_dora is True
    assert lora.lora_dropout == 0.25
    assert cfg.passes["builder"].search.model_dump(exclude_none=True) == {"max_length": 128}
    assert cfg.engine.output_dir == str(tmp_path / "elsewhere")
    assert cfg.input_model.load_kwargs.revision == "main"


@needs_shared
def test_overrides_apply_to_the_normalised_guide_config(tiny_phi3: Path):
    """--set names keys of the normalised (flat) config, even when the file is in the nested form."""
    cfg, _ = load_run_config(
        SHARED_CONFIGS / "fragments-local-data.json",
        [f"input_model.model_path={tiny_phi3}", "passes.lora.training_args.max_steps=2"],
    )
    assert cfg.input_model.model_path == str(tiny_phi3)
    assert cfg.passes["lora"].training_args["max_steps"] == 2


@needs_shared
def test_override_by_printed_name_replaces_the_olive_alias(tiny_phi3: Path):
    """`validate --print` shows `r`; setting `r` must win over the file's `lora_r`, not clash with it."""
    cfg, _ = load_run_config(
        SHARED_CONFIGS / "fragments-local-data.json", [f"input_model.model_path={tiny_phi3}", "passes.lora.r=8"]
    )
    assert cfg.passes["lora"].r == 8


@pytest.mark.parametrize(
    ("override", "where", "problem"),
    [
        ("passes.lora.r", "--set passes.lora.r", "expected KEY=VALUE"),
        ("=5", "--set =5", "expected KEY=VALUE"),
    ],
)
def test_malformed_overrides(tmp_path: Path, tiny_phi3: Path, override: str, where: str, problem: str):
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    with pytest.raises(UserError) as exc:
        load_run_config(cfg_path, [override])
    assert (exc.value.where, exc.value.problem) == (where, problem)


def test_override_takes_the_index_form_errors_print(tmp_path: Path, tiny_phi3: Path):
    """Errors name list entries `data_configs[0]`; --set takes that form as well as `data_configs.0`."""
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    cfg, _ = load_run_config(cfg_path, ["data_configs[0].pre_process_data_config.max_seq_len=48"])
    assert cfg.data_configs[0].pre_process_data_config.max_seq_len == 48


def test_an_unknown_key_that_looks_like_an_index_is_named(tmp_path: Path, tiny_phi3: Path):
    """A key with brackets in it, from --set or the file, is the user's key: named, never a traceback."""
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    with pytest.raises(UserError) as exc:
        load_run_config(cfg_path, ["passes[x].r=8"])
    assert exc.value.line().startswith("passes[x]: unknown key (did you mean 'passes'?)")
    raw = tiny_run_config(tiny_phi3)
    raw["passes"]["lora"]["training[args]"] = {}
    with pytest.raises(UserError) as exc:
        load_run_config(write_project(tmp_path, raw))
    assert exc.value.line().startswith("passes.lora.training[args]: unknown key")


def test_override_below_a_value_is_an_error_naming_it(tmp_path: Path, tiny_phi3: Path):
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    with pytest.raises(UserError) as exc:
        load_run_config(cfg_path, ["passes.lora.r.x=1"])
    assert "passes.lora.r" in exc.value.line()


def test_override_with_a_wrong_value_is_a_validation_error(tmp_path: Path, tiny_phi3: Path):
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    with pytest.raises(UserError) as exc:
        load_run_config(cfg_path, ["passes.builder.precision=int3"])
    assert exc.value.line().startswith("passes.builder.precision: Input should be 'int4'")


def test_validation_reports_every_problem_once(tmp_path: Path, tiny_phi3: Path):
    raw = tiny_run_config(tiny_phi3)
    raw["passes"]["lora"]["r"] = "sixteen"
    raw["passes"]["builder"]["precision"] = "int3"
    with pytest.raises(UserError) as exc:
        load_run_config(write_project(tmp_path, raw))
    lines = exc.value.line().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("passes.lora.r: Input should be a valid integer")
    assert lines[1].startswith("passes.builder.precision: ")


def test_config_file_is_not_modified(tmp_path: Path, tiny_phi3: Path):
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    before = cfg_path.read_text()
    load_run_config(cfg_path, ["passes.lora.r=2"])
    assert cfg_path.read_text() == before
    assert json.loads(before)["passes"]["lora"]["r"] == 4


def test_a_run_may_stop_early_but_not_skip_a_pass(tmp_path: Path, tiny_phi3: Path):
    config = write_project(tmp_path, tiny_run_config(tiny_phi3))
    cfg, _ = load_run_config(config, passes=["lora"])
    assert list(cfg.passes) == ["lora"]
    cfg, _ = load_run_config(config, passes=["merge", "lora"])
    assert list(cfg.passes) == ["lora", "merge"]
    with pytest.raises(
        UserError, match=r"skips a pass .*choose the first passes in order: \['lora', 'merge', 'builder'\]"
    ):
        load_run_config(config, passes=["builder"])
