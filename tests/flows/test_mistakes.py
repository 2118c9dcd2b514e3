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
import torch
from grove_helpers import LLAMA_MODULES, TONE_DATASET, grove, lora_pass, tiny_run_config, tree, write_project

from olive_grove.tasks.step_cache import list_cache

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
    "offload-without-checkpointing": (_lora(offload_checkpoints=True),
                                      "passes.lora.offload_checkpoints: keeps the inputs of checkpointed layers on "
                                      "the host, and gradient checkpointing is off (set "
                                      "training_args.gradient_checkpointing: true too)"),
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


def test_training_that_diverges_is_one_line_and_nothing_is_published(tmp_path: Path, tiny_llama: Path):
    """A fourth prober's find: learning_rate 1e300 left NaN in every trained weight while the logged loss
    looked fine, and the adapter was cached and published as a good result."""
    lora = lora_pass(LLAMA_MODULES)
    lora["training_args"]["learning_rate"] = 1e300
    config = write_project(tmp_path, tiny_run_config(tiny_llama, {"lora": lora}))
    result = grove("run", "--config", config)
    assert result.rc == 2 and len(result.errors) == 1 and "Traceback" not in result.err, result.err[-2000:]
    assert result.errors[0].startswith("error: passes.lora.training_args.learning_rate: training diverged: the "
                                       "trained weight ")  # fmt: skip
    assert not (tmp_path / "outputs").exists()
    assert [e.step for e in list_cache(tmp_path / "cache")] == ["prepare_dataset"]  # the data was fine


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),  # the config file's text, pasted where a path was expected: read as the config
        ('{"input_model": ', "config: is JSON text that does not parse (Expecting value at line 1 column 17)"),
    ],
)
def test_a_config_given_as_json_text_is_the_config(tmp_path: Path, tiny_llama: Path, text, expected):
    """A fourth prober's find: JSON text in the run form's config was read as a file name, and the state
    message quoted the whole config twice."""
    from olive_grove.flows.run_setup import RunOptions
    from olive_grove.tasks.errors import UserError

    config = write_project(tmp_path, tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)}))
    if expected is None:
        cfg, _ = RunOptions().load(config.read_text())
        assert list(cfg.passes) == ["lora"]
    else:
        with pytest.raises(UserError) as caught:
            RunOptions().load(text)
        assert caught.value.line().startswith(expected), caught.value.line()


def test_several_mistakes_are_one_state_message_line(tmp_path: Path):
    """A prober's find: `config: {}` from the run form failed with two lines joined by a newline as the state
    message, and the worker's host named on the last one only."""
    import socket

    from olive_grove.flows.finetune import finetune

    state = finetune(config={}, return_state=True)
    assert state.is_failed()
    assert state.message == f"input_model: is required; passes: is required [on {socket.gethostname()}]"


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


@pytest.mark.slow
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
    assert len(warnings) == 2, validated.err  # the datastore, and the hub model (this machine is offline)
    assert "data_configs[0].load_dataset_config.data_files" in warnings[0] and "hf_config.model_name" in warnings[1]
    assert validated.out.strip().splitlines()[-1].endswith("2 not checked here (see the warnings)")


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


# ------------------------------------------------------------------------ found by a second engineer


def _model_with(change: Callable[[Path], Any]) -> Edit:
    def edit(cfg: dict[str, Any], root: Path) -> None:
        _model_without()(cfg, root)
        change(root / "model")

    return edit


def _write_json(name: str, value: Any) -> Callable[[Path], Any]:
    return lambda model: (model / name).write_text(json.dumps(value))


def _sharded(weight_map: Any) -> Callable[[Path], Any]:
    def change(model: Path) -> None:
        (model / "model.safetensors").rename(model / "model-00001.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return change


def _header(header: Any) -> Callable[[Path], Any]:
    def change(model: Path) -> None:
        text = json.dumps(header).encode()
        (model / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 64)

    return change


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"


def _lfs(name: str, drop: str | None = None) -> Callable[[Path], Any]:
    def change(model: Path) -> None:
        (model / name).write_bytes(LFS_POINTER)
        if drop:
            (model / drop).unlink()

    return change


def _text(**settings: Any) -> Edit:
    return lambda cfg, root: cfg["data_configs"][0]["pre_process_data_config"].update(settings)


def _given_adapter(folder: str, peft_type: str, passes: dict[str, Any] | None) -> Edit:
    """An adapter folder of that kind as input_model.adapter_path (and, if given, these passes instead)."""

    def edit(cfg: dict[str, Any], root: Path) -> None:
        from safetensors.torch import save_file

        adapter = root / "given" / folder
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 4}))
        save_file({"w": torch.zeros(1)}, str(adapter / "adapter_model.safetensors"))
        cfg["input_model"]["adapter_path"] = str(adapter)
        if passes is not None:
            cfg["passes"] = passes

    return edit


def _loha(**settings: Any) -> Edit:
    return lambda cfg, root: cfg["passes"]["lora"].update(type="LoHa", **settings)


def _builder(**settings: Any) -> Edit:
    return lambda cfg, root: cfg["passes"].update(builder={"type": "ModelBuilder", "precision": "int4", **settings})


def _extracting(more: dict[str, Any], extract: dict[str, Any] | None = None, **builder: Any) -> Edit:
    """LoRA -> ModelBuilder (with `builder` settings) -> ExtractAdapters (with `extract`) -> `more` passes."""
    return lambda cfg, root: cfg["passes"].update(
        builder={"type": "ModelBuilder", "precision": "fp32", **builder},
        extract={"type": "ExtractAdapters", **(extract or {})},
        **more,
    )


FOUND: dict[str, tuple[Edit, str]] = {
    "empty-data-file": (_data_file("empty.json", b""), "data_configs[0].load_dataset_config: could not load"),
    "no-files-in-a-split": (lambda cfg, root: cfg["data_configs"][0]["load_dataset_config"].update(
        data_files={"train": []}), "data_configs[0].load_dataset_config"),
    "json-without-files": (lambda cfg, root: cfg["data_configs"][0]["load_dataset_config"].pop("data_files"),
                           "data_configs[0].load_dataset_config.data_files: is needed to read json files"),
    "index-of-numbers": (_model_with(_sharded({"a": 1})), "input_model.model_path: "),
    "index-a-list": (_model_with(lambda m: (m / "model.safetensors.index.json").write_text("[1]")),
                     "input_model.model_path: "),
    "header-a-list": (_model_with(_header([1, 2])), "input_model.model_path: "),
    "header-without-offsets": (_model_with(_header({"w": {"dtype": "F32", "shape": [1]}})),
                               "input_model.model_path: "),
    "hidden-size-text": (_model_with(lambda m: (m / "config.json").write_text(json.dumps(
        {**json.loads((m / "config.json").read_text()), "hidden_size": "64"}))), "input_model.model_path: "),
    "tokenizer-an-lfs-pointer": (_model_with(_lfs("tokenizer.model", drop="tokenizer.json")),
                                 "input_model.model_path: "),
    "tokenizer-empty": (_model_with(_write_json("tokenizer.json", {})), "input_model.model_path: "),
    "weights-an-lfs-pointer": (_model_with(lambda m: ((m / "model.safetensors").unlink(),
                                                      (m / "pytorch_model.bin").write_bytes(LFS_POINTER))),
                               "input_model.model_path: "),
    "max-seq-len-astronomic": (_text(max_seq_len=2**64), "data_configs[0].pre_process_data_config.max_seq_len: "),
    "max-seq-len-past-the-model": (_text(max_seq_len=100_000),
                                   "data_configs[0].pre_process_data_config.max_seq_len: 100000 is more than"),
    "jinja-template": (_text(text_template="### Text: {{ phrase }}"), "data_configs[0].pre_process_data_config."
                       "text_template: has no {column} placeholder"),
    "no-text-cols": (_text(text_cols=[], text_template=None), "data_configs[0].pre_process_data_config.text_cols: "),
    "cache-in-published-outputs": (_engine(cache_dir="outputs/run/adapter"), "cache_dir: "),
    "outputs-in-the-cache": (_engine(cache_dir="cache", output_dir="cache/steps"), "output_dir: "),
    "old-and-new-name": (_lora(lora_r=8), "passes.lora.lora_r: is r by its older name, and r is set too"),
    "warmup-ratio-above-one": (_training_args(warmup_ratio=5), "passes.lora.training_args.warmup_ratio: "),
    # the third prober (issue 20's passes)
    "warmup-by-both-names": (_training_args(warmup_ratio=0.1, warmup_steps=5),
                             "passes.lora.training_args.warmup_ratio: is given beside warmup_steps"),
    "eval-strategy-by-both-names": (_training_args(evaluation_strategy="steps", eval_strategy="no"),
                                    "passes.lora.training_args.evaluation_strategy: is given beside eval_strategy"),
    "pass-name-a-path": (lambda cfg, root: cfg.update(passes={"../../evil": cfg["passes"]["lora"]}),
                         "passes.'../../evil': is not a usable pass name"),
    "pass-name-empty": (lambda cfg, root: cfg.update(passes={"": cfg["passes"]["lora"]}),
                        "passes.'': is not a usable pass name"),
    "whole-layers-extracted": (lambda cfg, root: cfg.update(passes={
        "a": lora_pass(LLAMA_MODULES, modules_to_save=["lm_head"]), "b": lora_pass(LLAMA_MODULES),
        "builder": {"type": "ModelBuilder", "precision": "fp32"}, "extract": {"type": "ExtractAdapters"}}),
        "passes.a.modules_to_save: trains whole layers, which cannot be swapped as an ONNX adapter"),
    "algo-unknown": (_builder(int4_algo_config="bogus"), "passes.builder.int4_algo_config: Input should be"),
    "qdq-with-gather": (_builder(use_qdq=True, int4_op_types_to_quantize=["MatMul", "Gather"]),
                        "passes.builder.int4_op_types_to_quantize: Gather is quantized in the QOperator format only"),
    "block-size-in-extra-options": (_builder(extra_options={"block_size": 48}),
                                    "passes.builder.extra_options.block_size: must be 16, 32, 64, 128 or 256"),
    "op-type-unknown": (_builder(int4_op_types_to_quantize=["Conv2D"]),
                        "passes.builder.int4_op_types_to_quantize[0]: Input should be 'MatMul' or 'Gather'"),
    "search-typo": (_builder(search={"max_lenght": 100}), "passes.builder.search.max_lenght: unknown key"),
    "search-wrong-type": (_builder(search={"max_length": "long"}), "passes.builder.search.max_length: "),
    "extract-twice": (_extracting({"extract2": {"type": "ExtractAdapters"}}),
                      "passes.extract2: extracts the adapters passes.extract extracted"),
    "extract-after-metadata-only": (_extracting({}, metadata_only=True),
                                    "passes.extract: has no model graph to take the LoRA layers from"),
    "fixed-lora-rank": (_extracting({}, extract={"dynamic_lora_r": False}), "passes.extract.dynamic_lora_r: "),
    "pass-without-type": (lambda cfg, root: cfg["passes"]["lora"].pop("type"), "passes.lora.type: is required"),
    "siblings-on-other-layers": (lambda cfg, root: cfg.update(passes={
        "lora": lora_pass(["q_proj"]), "other": lora_pass(["v_proj"]),
        "builder": {"type": "ModelBuilder", "precision": "fp32"}, "extract": {"type": "ExtractAdapters"}}),
        "passes.other.target_modules: adapts v_proj, and passes.lora adapts q_proj"),
    "loha-layer-past-the-model": (_loha(layers_to_transform=[99]),
                                  "passes.lora.layers_to_transform: layer 99 is not one of the model's 2 layers"),
    "loha-negative-rank-pattern": (_loha(rank_pattern={"q_proj": -4}), "passes.lora.rank_pattern.q_proj: "),
    "loha-excluding-every-target": (_loha(exclude_modules=LLAMA_MODULES),
                                    "passes.lora.exclude_modules: leaves none of target_modules to adapt"),
    "dora-by-setting-built-unmerged": (lambda cfg, root: cfg["passes"].update(
        lora=lora_pass(LLAMA_MODULES, use_dora=True), builder={"type": "ModelBuilder"}),
        "passes.builder: builds LoRA adapters unmerged, and passes.lora is a DoRA (use_dora) adapter"),
    "given-lokr-adapter-built-unmerged": (_given_adapter("adapter", "LOKR", {"builder": {"type": "ModelBuilder"}}),
        "input_model.adapter_path: is a LOKR adapter, and passes.builder builds LoRA adapters unmerged"),
    "given-adapter-named-as-a-pass": (_given_adapter("lora", "LORA", None),
                                      "input_model.adapter_path: is named 'lora' by its folder, as passes.lora is"),
}  # fmt: skip


def test_merging_each_adapter_in_turn_publishes_every_merge(tmp_path: Path, tiny_llama: Path):
    """The merge error's own hint, followed: the last merge is merged/, the ones before merged-<pass>/."""
    from olive_grove.flows.config import load_run_config

    cfg = tiny_run_config(tiny_llama, {"a": lora_pass(LLAMA_MODULES), "m1": {"type": "MergeAdapterWeights"},
                                       "b": lora_pass(LLAMA_MODULES), "m2": {"type": "MergeAdapterWeights"},
                                       "builder": {"type": "ModelBuilder"}})  # fmt: skip
    run, _ = load_run_config(write_project(tmp_path, cfg))
    assert run.output_folders() == {"a": "adapters/a", "m1": "merged-m1", "b": "adapters/b", "m2": "merged",
                                    "builder": "onnx/int4-cpu"}  # fmt: skip


FOUND_NAMES = {"index-of-numbers": "is not a weight index", "index-a-list": "is not a weight index",
               "header-a-list": "damaged safetensors header", "header-without-offsets": "damaged safetensors header",
               "hidden-size-text": "cannot read the model's config", "tokenizer-an-lfs-pointer": "git-lfs pointer",
               "tokenizer-empty": "is not a tokenizer", "weights-an-lfs-pointer": "git-lfs pointer",
               "cache-in-published-outputs": "a folder this run's outputs replace",
               "outputs-in-the-cache": "inside engine.cache_dir"}  # fmt: skip


@pytest.mark.parametrize("case", list(FOUND), ids=list(FOUND))
def test_what_a_second_engineer_found_is_one_line(case: str, tmp_path: Path, tiny_llama: Path):
    edit, expected = FOUND[case]
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)})
    write_project(tmp_path, cfg)
    edit(cfg, tmp_path)
    line = one_error(grove("validate", "--config", write_project(tmp_path, cfg)), tmp_path)
    assert line.startswith(expected), line
    assert FOUND_NAMES.get(case, "") in line, line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["cache", "prune", "--cache-dir", ".", "--older-than", "nan"], "expected a number of days, 0 or more"),
        (["cache", "prune", "--cache-dir", ".", "--older-than", "-1"], "expected a number of days, 0 or more"),
        (["infer", ".", "--prompts-file", "{empty}"], "holds no prompt"),
        (["infer", ".", "--prompts-file", "{latin1}"], "is not UTF-8 text"),
        (["init", "{file}"], "is a file"),
        (["init", "/proc/olive-grove-project"], "cannot be made here"),
        (["validate", "--config", "."], "is a folder, not a config file"),
    ],
    ids=["prune-nan", "prune-negative", "infer-no-prompts", "infer-not-utf8", "init-a-file", "init-unwritable",
         "config-a-folder"],
)  # fmt: skip
def test_odd_command_lines_are_one_line(argv: list[str], expected: str, tmp_path: Path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("sch\xf6n\n".encode("latin-1"))
    (tmp_path / "a-file").write_text("x")
    names = {"{empty}": tmp_path / "empty.txt", "{latin1}": tmp_path / "latin1.txt", "{file}": tmp_path / "a-file"}
    argv = [str(names.get(a, tmp_path if a == "." else a)) for a in argv]
    result = grove(*argv)
    assert result.rc == 2 and expected in result.err and "Traceback" not in result.err, result.err


def test_an_override_into_a_value_in_a_list_is_one_line(tmp_path: Path, tiny_llama: Path):
    config = write_project(tmp_path, tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)}))
    result = grove("validate", "--config", config, "--set", "passes.lora.target_modules.0.x=1")
    assert result.errors == ["error: --set passes.lora.target_modules.0.x: '0' is a value, not a section"]


def test_yaml_merge_keys_and_aliases_work_as_yaml_says(tmp_path: Path, tiny_llama: Path):
    import yaml

    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)})
    text = yaml.safe_dump(cfg, sort_keys=False).replace("  lora:\n", "  lora:\n    <<: {r: 16, use_dora: true}\n", 1)
    write_project(tmp_path, {})
    (tmp_path / "config.yaml").write_text(text)
    result = grove("validate", "--config", tmp_path / "config.yaml", "--print")
    assert result.rc == 0, result.err
    printed = json.loads(result.out[result.out.index("{") : result.out.rindex("}") + 1])
    assert (printed["passes"]["lora"]["r"], printed["passes"]["lora"]["use_dora"]) == (4, True)  # its own r wins


def test_paths_expand_home_and_variables_and_read_beside_a_linked_config(tmp_path: Path, tiny_llama: Path,
                                                                         monkeypatch):  # fmt: skip
    monkeypatch.setenv("GROVE_TEST_OUT", str(tmp_path / "elsewhere"))
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)}, output_dir="$GROVE_TEST_OUT/run",
                          cache_dir="~/.cache/grove-test-cache")  # fmt: skip
    real = write_project(tmp_path / "real", cfg)
    (tmp_path / "linked").mkdir()
    write_project(tmp_path / "linked", {}, "unused.json")  # the link's folder has its own data/
    (tmp_path / "linked" / "config.json").symlink_to(real)
    result = grove("validate", "--config", tmp_path / "linked" / "config.json", "--print")
    printed = json.loads(result.out[result.out.index("{") : result.out.rindex("}") + 1])
    assert printed["engine"]["output_dir"] == str(tmp_path / "elsewhere" / "run")
    assert printed["engine"]["cache_dir"] == str(Path.home() / ".cache" / "grove-test-cache")
    files = printed["data_configs"][0]["load_dataset_config"]["data_files"]
    assert files == str(tmp_path / "linked" / "data" / "tone.json")


def test_a_bom_at_the_start_of_a_json_config_is_fine(tmp_path: Path, tiny_llama: Path):
    config = write_project(tmp_path, tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)}))
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    assert grove("validate", "--config", config).rc == 0


def test_a_data_file_datasets_cannot_parse_is_exactly_one_line(tmp_path: Path, tiny_llama: Path):
    """datasets logs its own ERROR line for it: a real process shows whether that reaches the terminal."""
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES)})
    write_project(tmp_path, cfg)
    (tmp_path / "data" / "bad.json").write_bytes(bytes(range(256)) * 8)
    cfg["data_configs"][0]["load_dataset_config"].update(data_files="data/bad.json")
    config = write_project(tmp_path, cfg)
    grove_exe = Path(sys.executable).with_name("grove")
    process = subprocess.run([grove_exe, "validate", "--config", config], capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert [line for line in process.stderr.splitlines() if line.strip()] == [
        line for line in process.stderr.splitlines() if line.startswith("error: ")
    ] and len(process.stderr.strip().splitlines()) == 1, process.stderr


def test_olives_nested_pass_keys_are_read(tmp_path: Path, tiny_llama: Path):
    """Olive's RunPassConfig beside a nested `config`: host and clean_run_cache are noted, not refused."""
    lora = lora_pass(LLAMA_MODULES)
    nested = {"type": lora.pop("type"), "config": lora, "host": "local_system", "clean_run_cache": True}
    done = grove("validate", "--config", write_project(tmp_path, tiny_run_config(tiny_llama, {"lora": nested})))
    assert done.rc == 0, done.err
    assert "note: passes.lora.clean_run_cache has no effect in olive-grove" in done.out
