"""The grove CLI as a user meets it: one error line per mistake and exit code 2, before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grove_helpers import (
    LLAMA_MODULES,
    PHI3_MODULES,
    grove,
    lora_pass,
    tiny_run_config,
    tree,
    write_project,
)

Edit = Callable[[dict[str, Any]], Any]


def _text(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["data_configs"][0]["pre_process_data_config"]


GUIDE_NAMES = {"r": "lora_r", "alpha": "lora_alpha", "strategy": "corpus_strategy", "max_seq_len": "source_max_len"}


def _guide_names(section: dict[str, Any]) -> dict[str, Any]:
    return {GUIDE_NAMES.get(k, k): v for k, v in section.items()}


def nested(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same run in the guide's nested form and names: type + config, hf_config, params, lora_r, ..."""
    model = cfg["input_model"]
    return {
        "input_model": {"type": "PyTorchModel", "config": {"hf_config": {"model_name": model["model_path"]}}},
        "systems": {name: {"type": s["type"], "config": {k: v for k, v in s.items() if k != "type"}}
                    for name, s in cfg["systems"].items()},
        "data_configs": [
            {
                "name": d["name"],
                "type": d["type"],
                "load_dataset_config": {"params": d["load_dataset_config"]},
                "pre_process_data_config": {"params": _guide_names(d["pre_process_data_config"])},
            }
            for d in cfg["data_configs"]
        ],
        "passes": {
            name: {"type": p["type"], "config": _guide_names({k: v for k, v in p.items() if k != "type"})}
            for name, p in cfg["passes"].items()
        },
        "engine": {k: cfg[k] for k in ("host", "target", "cache_dir", "output_dir")},
    }  # fmt: skip


def _set(path: str, value: Any) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, leaf = path.split("/")
        node = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[leaf] = value

    return edit


def _drop_pass(name: str) -> Edit:
    return lambda cfg: cfg["passes"].pop(name)


TEXT = "data_configs/0/pre_process_data_config"
BAD_INPUTS = {
    "wrong-type": (_set("passes/lora/r", "sixteen"), False,
                   "passes.lora.r: Input should be a valid integer "
                   "(got 'sixteen')"),
    "wrong-type-nested": (_set("passes/lora/config/lora_r", "sixteen"), True,
                          "passes.lora.config.lora_r: Input should be a valid integer (got 'sixteen')"),
    "unknown-key-nested": (_set("passes/lora/config/lora_rr", 8), True,
                           "passes.lora.config.lora_rr: unknown key (did you mean 'lora_r'?)"),
    "unknown-key-flat": (_set("passes/lora/lora_rr", 8), False,
                         "passes.lora.lora_rr: unknown key (did you mean 'lora_r'?)"),
    "unknown-top-level-key": (_set("outptu_dir", "x"), False, "outptu_dir: unknown key"),
    "unknown-pass-type": (_set("passes/lora/type", "LoRAX"), False,
                          "passes.lora.type: olive-grove does not run 'LoRAX' passes (did you mean 'LoRA'?)"),
    "placeholder-not-in-text-cols": (_set(f"{TEXT}/text_template", "### {tones}"), False,
                                     "data_configs[0].pre_process_data_config.text_template: placeholder '{tones}' "
                                     "is not one of text_cols (text_cols: phrase, tone)"),
    "template-attribute": (_set(f"{TEXT}/text_template", "{phrase.upper}"), False,
                           "data_configs[0].pre_process_data_config.text_template: placeholder {phrase.upper} "
                           "is not a plain column name (write {column} only)"),
    "template-index": (_set(f"{TEXT}/text_template", "{phrase[0]}"), False,
                       "data_configs[0].pre_process_data_config.text_template: placeholder {phrase[0]} "
                       "is not a plain column name (write {column} only)"),
    "template-conversion": (_set(f"{TEXT}/text_template", "{phrase!r}"), False,
                            "data_configs[0].pre_process_data_config.text_template: placeholder {phrase!r} "
                            "is not a plain column name (write {column} only)"),
    "template-unbalanced": (_set(f"{TEXT}/text_template", "{phrase"), False,
                            "data_configs[0].pre_process_data_config.text_template: not a valid template"),
    "missing-data-file": (_set("data_configs/0/load_dataset_config/data_files", "data/missing.json"), False,
                          "data_configs[0].load_dataset_config.data_files: no file at "),
    "train-data-config-unknown": (_set("passes/lora/train_data_config", "tone_trian"), False,
                                  "passes.lora.train_data_config: no data config named 'tone_trian' "
                                  "(did you mean 'tone_train'?)"),
    "train-data-config-unknown-nested": (_set("passes/lora/config/train_data_config", "tone_trian"), True,
                                         "passes.lora.config.train_data_config: no data config named 'tone_trian' "
                                         "(did you mean 'tone_train'?)"),
    "target-module-unknown": (_set("passes/lora/target_modules", ["o_proj", "q_projj"]), False,
                              "passes.lora.target_modules.q_projj: is not a linear layer of this model "
                              "(did you mean 'qkv_proj'?)"),
    "merge-without-adapter": (_drop_pass("lora"), False,
                              "passes.merge: MergeAdapterWeights cannot follow input_model, which leaves a model "
                              "(put one of LoRA, DoRA, QLoRA, LoftQ, LoHa, LoKr before it, or set "
                              "input_model.adapter_path)"),
    "pass-after-builder": (_set("passes/later", {"type": "MergeAdapterWeights"}), False,
                           "passes.later: MergeAdapterWeights cannot follow passes.builder, which leaves an ONNX "
                           "model (put passes.builder after it)"),
    "unknown-host": (_set("host", "local_sytem"), False,
                     "host: no systems entry named 'local_sytem' (did you mean 'local_system'?)"),
    "unknown-execution-provider": (
        _set("systems/local_system/accelerators/0/execution_providers", ["FooExecutionProvider"]), False,
        "systems.local_system.accelerators: unknown execution provider 'FooExecutionProvider'"),
    "bf16-on-cpu": (_set("passes/builder/precision", "bf16"), False,
                    "passes.builder.precision: bf16 models do not run on the CPU execution provider"),
    "missing-model-folder": (_set("input_model/model_path", "/nonexistent/model"), False,
                             "input_model.model_path: no folder /nonexistent/model, and it is not a hub id"),
    "eval-size-zero": (_set("passes/lora/eval_dataset_size", 0), False,
                       "passes.lora.eval_dataset_size: Input should be greater than 0 (got 0)"),
    "passes-not-a-mapping": (_set("passes", [{"type": "LoRA"}]), False,
                             "passes: Input should be a valid dictionary"),
    "remote-cache-no-credentials": (_set("cache_dir", "az://container/cache"), False,
                                    "cache_dir: az://container/cache: no storage credentials"),  # as written: flat
    "training-arg-value": (_set("passes/lora/training_args/learning_rate", "fast"), False,
                           "passes.lora.training_args.learning_rate: Input should be a valid number"),
    "training-arg-choice": (_set("passes/lora/training_args/eval_strategy", "often"), False,
                            "passes.lora.training_args: often is not a valid IntervalStrategy"),
    "unreadable-data": (lambda cfg: cfg["data_configs"][0]["load_dataset_config"].update(data_files="data/bad.json"),
                        False, "data_configs[0].load_dataset_config: could not load the dataset"),
}  # fmt: skip


UNREACHABLE = {"remote-cache-no-credentials"}


def _bad_project(root: Path, model: Path, edit: Edit, in_nested_form: bool) -> Path:
    cfg = tiny_run_config(model)
    if in_nested_form:
        cfg = nested(cfg)
    edit(cfg)
    path = write_project(root, cfg)
    (root / "data" / "bad.json").write_text('{"phrase": "cut off in the mid')  # malformed JSON Lines
    return path


def _assert_one_error_and_nothing_written(result, root: Path, expected: str | None) -> str:
    assert result.rc == 2, result.err
    assert len(result.errors) == 1, result.err
    assert result.err.strip().splitlines() == result.errors, "stderr has more than the error line"
    line = result.errors[0].removeprefix("error: ")
    if expected is not None:
        assert line.startswith(expected), line
    assert tree(root / "outputs") == [] and tree(root / "cache") == [], "a failed check wrote files"
    assert result.out == ""
    return line


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_2(case: str, tmp_path: Path, tiny_phi3: Path):
    edit, in_nested_form, expected = BAD_INPUTS[case]
    cfg_path = _bad_project(tmp_path, tiny_phi3, edit, in_nested_form)
    result = grove("run", "--config", cfg_path)
    _assert_one_error_and_nothing_written(result, tmp_path, expected)
    # validate says the same thing; what cannot be reached from here is a warning there, not a mistake.
    again = grove("validate", "--config", cfg_path)
    if case in UNREACHABLE:
        assert again.rc == 0 and f"warning: not checked here: {result.errors[0].removeprefix('error: ')}" in again.err
    else:
        assert (again.rc, again.errors) == (2, result.errors)


def test_padding_needs_an_attention_mask(tmp_path: Path, tiny_phi3: Path):
    cfg = tiny_run_config(tiny_phi3)
    _text(cfg).update(strategy="line-by-line", pad_to_max_len=True, use_attention_mask=False)
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    line = _assert_one_error_and_nothing_written(result, tmp_path, None)
    assert line.startswith("data_configs[0].pre_process_data_config.pad_to_max_len: padding needs an attention mask")


def test_unknown_target_module_of_a_llama_suggests_its_own_layer(tmp_path: Path, tiny_llama: Path):
    cfg = tiny_run_config(tiny_llama, passes={"lora": lora_pass(["q_projj", "v_proj"])})
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    line = _assert_one_error_and_nothing_written(result, tmp_path, None)
    assert line == "passes.lora.target_modules.q_projj: is not a linear layer of this model (did you mean 'q_proj'?)"


def test_adapter_path_must_be_an_adapter(tmp_path: Path, tiny_phi3: Path):
    (tmp_path / "not-an-adapter").mkdir()
    cfg = tiny_run_config(tiny_phi3, passes={"merge": {"type": "MergeAdapterWeights"}})
    cfg["input_model"]["adapter_path"] = "not-an-adapter"
    result = grove("run", "--config", write_project(tmp_path, cfg))
    line = _assert_one_error_and_nothing_written(result, tmp_path, None)
    assert line == f"input_model.adapter_path: {tmp_path / 'not-an-adapter'} has no adapter_config.json " \
                   "(point it at a PEFT adapter folder)"  # fmt: skip


def test_several_mistakes_are_one_line_each(tmp_path: Path, tiny_phi3: Path):
    cfg = tiny_run_config(tiny_phi3)
    cfg["passes"]["lora"]["lora_rr"] = 3
    cfg["passes"]["builder"]["precision"] = "int3"
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    assert result.rc == 2
    assert [e.split(":")[1] for e in result.errors] == [" passes.lora.lora_rr", " passes.builder.precision"]


def test_training_args_olive_grove_decides_itself_are_named_once(tmp_path: Path, tiny_phi3: Path):
    cfg = tiny_run_config(tiny_phi3)
    cfg["passes"]["lora"]["training_args"]["output_dir"] = "x"
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    assert result.rc == 0, result.err
    assert "note: passes.lora.training_args.output_dir has no effect in olive-grove: checkpoints go to the " \
           "step's cache folder, outputs to engine.output_dir" in result.out.splitlines()  # fmt: skip
    again = grove("validate", "--config", write_project(tmp_path, tiny_run_config(tiny_phi3)), "--set",
                  "passes.lora.training_args.output_dir=x")  # fmt: skip
    assert again.errors == ["error: passes.lora.training_args.output_dir: is set by olive-grove (checkpoints go to "
                            "the step's cache folder)"]  # fmt: skip


# ------------------------------------------------------------------------ known bugs: wrong key paths


def test_nested_form_placeholder_error_names_the_written_path(tmp_path: Path, tiny_phi3: Path):
    edit = _set(f"{TEXT}/params/text_template", "{tones}")
    result = grove("validate", "--config", _bad_project(tmp_path, tiny_phi3, edit, True))
    _assert_one_error_and_nothing_written(
        result, tmp_path, "data_configs[0].pre_process_data_config.params.text_template: placeholder '{tones}'"
    )


def test_unknown_training_arg_names_its_path_once(tmp_path: Path, tiny_phi3: Path):
    edit = _set("passes/lora/training_args/max_stepz", 3)
    result = grove("validate", "--config", _bad_project(tmp_path, tiny_phi3, edit, False))
    _assert_one_error_and_nothing_written(
        result, tmp_path, "passes.lora.training_args.max_stepz: is not a TrainingArguments field "
        "(did you mean 'max_steps'?)"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set("passes/lora/config/target_modules", ["q_projj"]), "passes.lora.config.target_modules"),
        (_set("data_configs/0/load_dataset_config/params/data_files", "missing.json"),
         "data_configs[0].load_dataset_config.params.data_files: no file at"),
    ],
    ids=["target_modules", "data_files"],
)  # fmt: skip
def test_nested_form_preflight_errors_name_the_written_path(edit: Edit, expected: str, tmp_path, tiny_phi3):
    result = grove("validate", "--config", _bad_project(tmp_path, tiny_phi3, edit, True))
    _assert_one_error_and_nothing_written(result, tmp_path, expected)


def test_validate_checks_text_cols_against_the_data(tmp_path: Path, tiny_phi3: Path):
    cfg = tiny_run_config(tiny_phi3)
    _text(cfg).update(text_cols=["phrase", "tones"], text_template="{phrase} {tones}")
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    _assert_one_error_and_nothing_written(
        result, tmp_path, "data_configs[0].pre_process_data_config.text_cols: column 'tones' is not in the dataset"
    )


def test_run_with_a_column_missing_from_the_data_exits_2(tmp_path: Path, tiny_phi3: Path):
    """The mistake is found inside the flow; grove still prints it as one error line and exits 2."""
    cfg = tiny_run_config(tiny_phi3)
    _text(cfg).update(text_cols=["phrase", "tones"], text_template="{phrase} {tones}")
    result = grove("run", "--config", write_project(tmp_path, cfg))
    assert result.rc == 2
    assert result.errors == [
        "error: data_configs[0].pre_process_data_config.text_cols: column 'tones' is not in the dataset "
        "(columns: phrase, tone)"
    ]
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------- a real `grove` process


def _grove_exe() -> str:
    exe = shutil.which("grove", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the grove console script is not installed in this environment")
    return exe


def test_grove_validate_process_exits_2_without_traceback(tmp_path: Path, tiny_phi3: Path):
    cfg = tiny_run_config(tiny_phi3)
    cfg["passes"]["lora"]["lora_rr"] = 8
    cfg_path = write_project(tmp_path, cfg)
    proc = subprocess.run(
        [_grove_exe(), "validate", "--config", str(cfg_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: passes.lora.lora_rr: unknown key (did you mean 'lora_r'?)"]
    assert proc.stdout == ""
    assert tree(tmp_path / "outputs") == [] and tree(tmp_path / "cache") == []


# ------------------------------------------------------------------------------------------ validate


def test_validate_a_good_config(tmp_path: Path, tiny_phi3: Path):
    cfg_path = write_project(tmp_path, tiny_run_config(tiny_phi3))
    result = grove("validate", "--config", cfg_path)
    assert result.rc == 0, result.err
    assert result.out.strip().splitlines()[-1] == (
        f"{cfg_path}: valid (lora (LoRA), merge (MergeAdapterWeights), builder (ModelBuilder))"
    )
    assert tree(tmp_path / "outputs") == [] and tree(tmp_path / "cache") == []


def test_validate_print_shows_the_normalised_config_and_notes(tmp_path: Path, tiny_phi3: Path):
    cfg = nested(tiny_run_config(tiny_phi3))
    cfg["passes"]["lora"]["config"]["training_args"]["evaluation_strategy"] = "no"
    cfg["engine"]["search_strategy"] = False
    cfg_path = write_project(tmp_path, cfg)
    result = grove("validate", "--config", cfg_path, "--print", "--set", "passes.lora.training_args.max_steps=7")
    assert result.rc == 0, result.err
    lines = result.out.splitlines()
    assert "note: passes.lora.training_args.evaluation_strategy is read as eval_strategy" in lines
    assert "note: engine.search_strategy has no effect in olive-grove: every pass runs once, with its settings" in lines
    printed = json.loads(result.out[result.out.index("{") : result.out.rindex("}") + 1])
    assert printed["passes"]["lora"]["r"] == 4  # written as lora_r, printed by its current name
    assert printed["passes"]["lora"]["training_args"]["max_steps"] == 7
    assert printed["passes"]["lora"]["training_args"]["eval_strategy"] == "no"
    assert printed["input_model"]["model_path"] == str(tiny_phi3)


def test_unknown_command_is_a_usage_error(capsys):
    from olive_grove.flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- infer


def test_infer_on_a_folder_that_is_no_model(tmp_path: Path):
    result = grove("infer", tmp_path, "--prompt", "hi")
    assert result.rc == 2
    assert result.errors == [
        f"error: {tmp_path}: not an ONNX model, adapter or Hugging Face model folder "
        "(give the onnx/<precision>-<ep>, merged/ or adapter/ folder of a run's outputs)"
    ]


def test_infer_with_a_missing_prompts_file(tmp_path: Path, tiny_llama: Path):
    result = grove("infer", tiny_llama, "--prompts-file", tmp_path / "prompts.txt")
    assert (result.rc, result.errors) == (2, [f"error: {tmp_path / 'prompts.txt'}: no such file"])


def test_infer_on_a_hf_model_folder(tiny_llama: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('plain prompt\n\n"### Text: hi\\n### The tone is:\\n"\n')
    result = grove("infer", tiny_llama, "--prompts-file", prompts, "--max-new-tokens", "3")
    assert result.rc == 0, result.err
    rows = result.json_lines()
    assert [r["prompt"] for r in rows] == ["plain prompt", "### Text: hi\n### The tone is:\n"]
    assert all(isinstance(r["output"], str) for r in rows)


# ------------------------------------------------------------------------------------- init, tiny-model


def test_init_lays_out_a_project_whose_config_validates(tmp_path: Path, tiny_phi3: Path):
    root = tmp_path / "project"
    result = grove("init", root)
    assert result.rc == 0, result.err
    for folder in ("datasets", "fine-tuning", "inferences", "model-cache", "gen-model", "setup"):
        assert (root / folder).is_dir(), folder
        assert (root / folder / "README.md").is_file()
    config = root / "fine-tuning" / "olive-config.json"
    assert config.is_file() and (root / "datasets" / "dataset-classification.json").is_file()
    assert (root / "inferences" / "prompts.txt").read_text().startswith('"### Text:')
    assert str(config) in result.out.splitlines()

    # As shipped it names the hub's Phi-3; pointed at a local model it validates, data and layers included.
    valid = grove("validate", "--config", config, "--set", f"input_model.model_path={tiny_phi3}")
    assert valid.rc == 0, valid.err
    assert (
        valid.out.strip()
        .splitlines()[-1]
        .endswith("valid (lora (LoRA), merge_adapter_weights (MergeAdapterWeights), builder (ModelBuilder))")
    )


def test_init_refuses_a_non_empty_folder(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("mine")
    result = grove("init", tmp_path)
    assert result.rc == 2
    assert result.errors == [f"error: {tmp_path}: is not empty (choose a new folder)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_tiny_model_llama_is_loadable(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = grove("tiny-model", tmp_path / "m", "--arch", "llama")
    assert result.rc == 0, result.err
    assert result.out.strip() == f"tiny llama model in {tmp_path / 'm'}"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama"
    assert {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} >= set(LLAMA_MODULES)
    ids = tokenizer("### Text: We just got the keys!", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)
    assert tokenizer.decode(ids["input_ids"][0]) == "### Text: We just got the keys!"


def test_tiny_model_with_a_missing_corpus(tmp_path: Path):
    result = grove("tiny-model", tmp_path / "m", "--corpus", tmp_path / "nope.txt")
    assert (result.rc, result.errors) == (2, [f"error: {tmp_path / 'nope.txt'}: no such corpus file"])


def test_phi3_fixture_has_the_guide_target_modules(tiny_phi3: Path):
    from olive_grove.tasks.models import linear_module_names

    assert set(PHI3_MODULES) <= linear_module_names(str(tiny_phi3))
