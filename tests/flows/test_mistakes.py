"""Mistakes users bring that the first tests did not list: each is one error line naming the key or file,
exit code 2, no traceback, and no cache entry or output — whether found by `grove validate`, at the start of
`grove run`, or inside a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grove_helpers import LLAMA_MODULES, TONE_DATASET, grove, lora_pass, tiny_run_config, tree, write_project

from olive_grove.tasks.caching import list_cache

Edit = Callable[[dict[str, Any], Path], Any]


def nothing_written(root: Path, outputs_before: list[str] | None = None) -> None:
    assert tree(root / "outputs") == (outputs_before or []), "a failed run wrote outputs"
    cache = root / "cache"
    assert list_cache(cache) == [] and not list((cache / "steps").rglob("*.json")), "a failed run wrote a cache entry"


def one_error(result, root: Path, outputs_before: list[str] | None = None) -> str:
    assert result.rc == 2, (result.rc, result.err[-2000:])
    assert len(result.errors) == 1, result.err
    assert "Traceback" not in result.err
    nothing_written(root, outputs_before)
    return result.errors[0].removeprefix("error: ")


def _training_args(**args: Any) -> Edit:
    return lambda cfg, root: cfg["passes"]["lora"]["training_args"].update(args)


def _lora(**settings: Any) -> Edit:
    return lambda cfg, root: cfg["passes"]["lora"].update(settings)


def _engine(**keys: Any) -> Edit:
    return lambda cfg, root: cfg.update(keys)


def _epochs_only(cfg: dict[str, Any], root: Path) -> None:
    del cfg["passes"]["lora"]["training_args"]["max_steps"]
    cfg["passes"]["lora"]["training_args"]["num_train_epochs"] = 0


def _duplicate_data_config(cfg: dict[str, Any], root: Path) -> None:
    cfg["data_configs"].append(json.loads(json.dumps(cfg["data_configs"][0])))


def _model_without(*names: str) -> Edit:
    def edit(cfg: dict[str, Any], root: Path) -> None:
        import shutil

        model = root / "model"
        shutil.copytree(cfg["input_model"]["model_path"], model)
        for name in names:
            (model / name).unlink()
        cfg["input_model"]["model_path"] = "model"

    return edit


def _truncated_weights(cfg: dict[str, Any], root: Path) -> None:
    _model_without()(cfg, root)
    weights = root / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _data_file(name: str, content: bytes | None = None, **load: Any) -> Edit:
    def edit(cfg: dict[str, Any], root: Path) -> None:
        (root / "data").mkdir(exist_ok=True)
        if content is not None:
            (root / "data" / name).write_bytes(content)
        cfg["data_configs"][0]["load_dataset_config"].update(data_files=f"data/{name}", **load)

    return edit


def _output_under_a_file(cfg: dict[str, Any], root: Path) -> None:
    (root / "a-file").write_text("not a folder")
    cfg["output_dir"] = "a-file/outputs"


def _data_inside_outputs(cfg: dict[str, Any], root: Path) -> None:
    (root / "outputs" / "run" / "merged").mkdir(parents=True)
    (root / "outputs" / "run" / "merged" / "tone.json").write_bytes(TONE_DATASET.read_bytes())
    cfg["data_configs"][0]["load_dataset_config"]["data_files"] = "outputs/run/merged/tone.json"


def _storage_options_as_text(cfg: dict[str, Any], root: Path) -> None:
    cfg["data_configs"][0]["load_dataset_config"]["storage_options"] = "AccountKey=c2VjcmV0c2VjcmV0"


MISTAKES: dict[str, tuple[Edit, str]] = {
    # values that pass a type check and fail (or silently succeed) later
    "learning-rate-zero": (_training_args(learning_rate=0),
                           "passes.lora.training_args.learning_rate: must be more than 0"),
    "accumulation-zero": (_training_args(gradient_accumulation_steps=0),
                          "passes.lora.training_args.gradient_accumulation_steps: must be at least 1"),
    "batch-zero": (_training_args(per_device_train_batch_size=0),
                   "passes.lora.training_args.per_device_train_batch_size: must be at least 1"),
    "negative-max-steps": (_training_args(max_steps=-5), "passes.lora.training_args.max_steps: must be positive"),
    "no-epochs": (_epochs_only, "passes.lora.training_args.num_train_epochs: must be more than 0"),
    "rank-absurd": (_lora(r=100_000), "passes.lora.r: 100000 is more than the model's hidden size (64)"),
    "rank-a-boolean": (_lora(r=True), "passes.lora.r: Input should be a valid integer (got True)"),
    "rank-a-string": (_lora(r="8"), "passes.lora.r: Input should be a valid integer (got '8')"),
    "no-target-modules": (_lora(target_modules=[]), "passes.lora.target_modules: List should have at least 1 item"),
    "same-data-config-name": (_duplicate_data_config,
                              "data_configs[1].name: 'tone_train' names an earlier data config"),
    # locations
    "output-root": (_engine(output_dir="/"), "output_dir: / is a system folder"),
    "output-home": (_engine(output_dir=str(Path.home())), "output_dir: "),
    "output-empty": (_engine(output_dir=""), "output_dir: String should have at least 1 character"),
    "output-a-file": (_engine(output_dir="data/tone.json"), "output_dir: "),
    "output-under-a-file": (_output_under_a_file, "output_dir: "),
    "output-read-only": (_engine(output_dir="/proc/olive-grove-outputs"),
                         "output_dir: /proc/olive-grove-outputs cannot be written"),
    "cache-read-only": (_engine(cache_dir="/proc/olive-grove-cache"),
                        "cache_dir: /proc/olive-grove-cache cannot be written"),
    "output-is-cache": (_engine(output_dir="same", cache_dir="same"),
                        "output_dir: is the same folder as engine.cache_dir"),
    "data-inside-outputs": (_data_inside_outputs, "data_configs[0].load_dataset_config.data_files: "),
    # models
    "model-without-weights": (_model_without("model.safetensors"), "input_model.model_path: "),
    "model-truncated": (_truncated_weights, "input_model.model_path: "),
    "model-without-tokenizer": (_model_without("tokenizer.json"), "input_model.model_path: "),
    # data
    "data-name-unknown": (_data_file("tone.json", TONE_DATASET.read_bytes(), data_name="jsn"),
                          "data_configs[0].load_dataset_config.data_name: 'jsn' is not a file format"),
    "glob-matches-nothing": (_data_file("*.jsonl"), "data_configs[0].load_dataset_config.data_files: the pattern"),
    "csv-not-utf8": (_data_file("tone.csv", "phrase,tone\nsch\xf6n,Joy\n".encode("latin-1"), data_name="csv"),
                     "data_configs[0].load_dataset_config: could not load the dataset"),
    # secrets
    "storage-options-a-string": (_storage_options_as_text, "data_configs[0].load_dataset_config.storage_options: "),
}  # fmt: skip
WHAT_EACH_NAMES = {
    "output-home": "your home folder",
    "output-a-file": "is a file",
    "output-under-a-file": "lies under",
    "data-inside-outputs": "where this run's outputs replace it",
    "model-without-weights": "has no weights",
    "model-truncated": "is truncated",
    "model-without-tokenizer": "has no tokenizer",
}


@pytest.mark.parametrize("case", list(MISTAKES), ids=list(MISTAKES))
def test_a_mistake_is_one_line_before_any_work(case: str, tmp_path: Path, tiny_llama: Path):
    edit, expected = MISTAKES[case]
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)})
    write_project(tmp_path, cfg)  # the data first: some edits replace it
    edit(cfg, tmp_path)
    config = write_project(tmp_path, cfg)
    before = tree(tmp_path / "outputs")
    validated = grove("validate", "--config", config)
    line = one_error(validated, tmp_path, before)
    assert line.startswith(expected), line
    assert WHAT_EACH_NAMES.get(case, "") in line
    assert "c2VjcmV0" not in validated.err  # a secret is never echoed
    ran = grove("run", "--config", config)
    assert (ran.rc, ran.errors) == (2, validated.errors)  # validate is the same check as the start of a run


def test_a_mistake_found_inside_a_step_is_one_line_too(tmp_path: Path, tiny_llama: Path, caplog):
    """Holding out more samples than the data gives is only known once the data is tokenized."""
    config = write_project(
        tmp_path, tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES, eval_dataset_size=5000)})
    )
    assert grove("validate", "--config", config).rc == 0
    line = one_error(grove("run", "--config", config), tmp_path)
    assert line.startswith("passes.lora.eval_dataset_size: holds out 5000 of ")
    assert "Traceback" not in caplog.text  # the run's log holds the line, not Prefect's traceback
    assert line in caplog.text


# ------------------------------------------------------------------------------------------ config files


def _write(root: Path, name: str, data: bytes) -> Path:
    write_project(root, {})
    (root / name).write_bytes(data)
    return root / name


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("config.json", b'{"passes": {"lora": {"r": 8, "r": 9}}}', "passes.lora: 'r' is given twice"),
        ("config.yaml", b"passes:\n  lora:\n    r: 8\n    r: 9\n", "passes.lora: 'r' is given twice"),
        ("config.json", b'{"passes": {"lora": {"alpha": NaN}}}', "passes.lora.alpha: nan is not a finite number"),
        ("config.json", b'{"passes": {"lora": {"alpha": Infinity}}}', "passes.lora.alpha: inf is not a finite number"),
        ("config.yaml", b"passes:\n  lora:\n    alpha: .inf\n", "passes.lora.alpha: inf is not a finite number"),
        ("config.json", '{"passes": "caf\u00e9"}'.encode("utf-16"), "is not UTF-8 text"),
        ("config.yaml", b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
            f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n".encode()
            for i in range(8)), "holds more than 100,000 values"),
        ("config.json", b'{"x": "' + b"y" * (2 << 20) + b'"}', "bytes; a run config is at most"),
    ],
    ids=["json-duplicate", "yaml-duplicate", "json-nan", "json-infinity", "yaml-inf", "not-utf8", "yaml-alias-bomb",
         "too-big"],
)  # fmt: skip
def test_a_broken_config_file_is_one_line(tmp_path: Path, name: str, data: bytes, expected: str):
    result = grove("validate", "--config", _write(tmp_path, name, data))
    assert result.rc == 2 and "Traceback" not in result.err
    assert any(expected in line for line in result.errors), result.errors
    assert all(len(line) < 400 for line in result.errors), "an error line echoes what it should only name"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("passes.lora.target_modules=[o_proj", "--set passes.lora.target_modules: the value is not valid YAML"),
        ("passes.lora.r=!!python/object/apply:os.system [echo]", "--set passes.lora.r: the value is not valid YAML"),
        ("passes..r=5", "--set passes..r: has an empty part between dots"),
        ("passes.lora.alpha=.nan", "--set passes.lora.alpha: nan is not a finite number"),
        (f"data_configs.0.pre_process_data_config.text_template={'x' * 70000}",
         "--set data_configs.0.pre_process_data_config.text_template: is 70,000 characters long"),
        ("data_configs.0.load_dataset_config={data_name: json, storage_options: {account_key: c2VjcmV0}}",
         "--set data_configs.0.load_dataset_config: storage options may hold secrets"),
    ],
    ids=["unbalanced", "python-tag", "empty-part", "nan", "huge-template", "secret-in-a-mapping"],
)  # fmt: skip
def test_a_broken_override_is_one_line(tmp_path: Path, tiny_llama: Path, override: str, expected: str):
    config = write_project(tmp_path, tiny_run_config(tiny_llama))
    result = grove("validate", "--config", config, "--set", override)
    assert (result.rc, len(result.errors)) == (2, 1), result.err
    assert result.errors[0].removeprefix("error: ").startswith(expected), result.errors
    assert "c2VjcmV0" not in result.err and "Traceback" not in result.err


# ----------------------------------------------------------------------------------- signals and disks


def test_ctrl_c_during_training_is_one_line_and_the_rerun_resumes(tmp_path: Path, tiny_llama: Path):
    lora = lora_pass(LLAMA_MODULES)
    lora["training_args"].update(max_steps=400, save_steps=5)
    config = write_project(tmp_path, tiny_run_config(tiny_llama, {"lora": lora}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    grove_exe = Path(sys.executable).with_name("grove")
    process = subprocess.Popen([grove_exe, "run", "--config", config], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    checkpoints = tmp_path / "cache" / "steps" / "train_adapter"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("*.work/checkpoints/checkpoint-*/trainer_state.json")):
        assert time.monotonic() < deadline and process.poll() is None, "training never wrote a checkpoint"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert any(line.startswith("interrupted: run it again to go on") for line in err.splitlines()), err[-2000:]


def test_a_full_disk_is_one_line_naming_it(tmp_path: Path, tiny_llama: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        config = write_project(tmp_path, tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)}))
        result = grove("run", "--config", config)
        assert (result.rc, len(result.errors)) == (2, 1), result.err[-2000:]
        assert "no space left on the disk of" in result.errors[0]
        assert tree(tmp_path / "outputs") == []
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)  # lazily: the run may still hold a file there


# ------------------------------------------------------------------------------------------ cloud access


@pytest.mark.parametrize("name", ["azureml-lora.json", "azureml-qlora.json"])
def test_validate_without_azure_access_names_what_it_could_not_check(name: str, monkeypatch):
    from grove_helpers import SHARED_CONFIGS

    if not (SHARED_CONFIGS / name).is_file():
        pytest.skip("the guide's configs are not beside this checkout")
    for variable in ("AZURE_STORAGE_CONNECTION_STRING", "PREFECT_API_URL"):
        monkeypatch.delenv(variable, raising=False)
    validated = grove("validate", "--config", SHARED_CONFIGS / name)
    assert validated.rc == 0, validated.err
    warnings = [line for line in validated.err.splitlines() if line.startswith("warning: not checked here: ")]
    assert len(warnings) == 1 and "data_configs[0].load_dataset_config.data_files" in warnings[0], validated.err
    assert validated.out.strip().splitlines()[-1].endswith("1 not checked here (see the warnings)")


# -------------------------------------------------------------------- what is fine, and found by review


def _valid(tmp_path: Path, cfg: dict[str, Any], *args: str):
    result = grove("validate", "--config", write_project(tmp_path, cfg), *args)
    assert result.rc == 0, result.err
    return result


def test_an_execution_provider_olive_grove_does_not_build_for_is_fine_without_modelbuilder(tmp_path, tiny_llama):
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)})
    cfg["systems"]["local_system"]["accelerators"][0]["execution_providers"] = ["QNNExecutionProvider"]
    _valid(tmp_path, cfg)


def test_keys_without_effect_take_any_value(tmp_path, tiny_llama):
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)})
    cfg["systems"]["local_system"]["instance_count"] = "two"
    result = _valid(tmp_path, cfg)
    assert "note: systems.local_system.instance_count has no effect in olive-grove" in result.out


def test_evaluating_on_an_eval_data_config_during_training(tmp_path, tiny_llama):
    lora = lora_pass(LLAMA_MODULES, eval_data_config="tone_train")
    del lora["eval_dataset_size"]
    lora["training_args"].update(eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, save_steps=1)
    _valid(tmp_path, tiny_run_config(tiny_llama, {"lora": lora}))


def test_flat_engine_keys_work_in_set(tmp_path, tiny_llama):
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)})
    result = _valid(tmp_path, cfg, "--print", "--set", "cache_dir=elsewhere")
    assert json.loads(result.out[result.out.index("{") : result.out.rindex("}") + 1])["engine"]["cache_dir"] == str(
        tmp_path / "elsewhere"
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda cfg: cfg.update(passes={}), "passes: Dictionary should have at least 1 item"),
        (lambda cfg: cfg["passes"]["lora"].update(micro_batch_size=0), "passes.lora.micro_batch_size: "),
        (lambda cfg: cfg["passes"].update(b={"type": "ModelBuilder"}, c={"type": "ModelBuilder"}),
         "passes.c: writes onnx/int4-cpu, as passes.b does"),
    ],
    ids=["no-passes", "micro-batch-zero", "same-output-twice"],
)  # fmt: skip
def test_review_findings_are_errors(edit, expected: str, tmp_path: Path, tiny_llama: Path):
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES), "merge": {"type": "MergeAdapterWeights"}})
    edit(cfg)
    line = one_error(grove("validate", "--config", write_project(tmp_path, cfg)), tmp_path)
    assert line.startswith(expected), line


def test_a_model_whose_config_transformers_cannot_read_is_found_before_work(tmp_path: Path, tiny_llama: Path):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    cfg = tiny_run_config("model", {"lora": lora_pass(LLAMA_MODULES)})
    line = one_error(grove("run", "--config", write_project(tmp_path, cfg)), tmp_path)
    assert line.startswith("input_model.model_path: cannot read the model's config"), line


def test_cache_commands_on_a_folder_that_is_no_cache(tmp_path: Path):
    result = grove("cache", "ls", "--cache-dir", tmp_path / "nothing")
    assert (result.rc, result.errors) == (2, [f"error: {tmp_path / 'nothing'}: is not a step cache (it has no "
                                              "steps/ folder) (has the config run here yet?)"])  # fmt: skip
