"""Whole runs of the finetune flow through `grove run`: real tiny models, real Prefect flow runs, real files.

Each pipeline runs once per module and several tests read what it left; runs that depend on an earlier
one (a re-run, an edited data file, one more pass) are fixtures built on that run's fixture.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grove_helpers import (
    LLAMA_MODULES,
    GroveResult,
    grove,
    lora_pass,
    read_report,
    step,
    tiny_run_config,
    write_project,
)

pytestmark = pytest.mark.slow

PROMPT = "### Text: The storm knocked out our power all night.\n### The tone is:\n"
# The passes' steps, then the held-out quality of the base model and of each model the run made.
ALL_STEPS = ["input_model", "lora/dataset", "lora", "merge", "builder", "quality/base", "quality/merged",
             "quality/onnx/int4-cpu"]  # fmt: skip


@dataclass
class Run:
    config: Path
    result: GroveResult
    report: dict[str, Any]

    @property
    def output_dir(self) -> Path:
        return Path(self.config.parent / json.loads(self.config.read_text())["output_dir"])


def run(config: Path) -> Run:
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    return Run(config, result, read_report(config))


# ------------------------------------------------------------------- LoRA -> merge -> ModelBuilder on phi3


@pytest.fixture(scope="module")
def phi3_project(tmp_path_factory, tiny_phi3: Path) -> Path:
    return write_project(tmp_path_factory.mktemp("phi3-project"), tiny_run_config(tiny_phi3))


@pytest.fixture(scope="module")
def first_run(phi3_project: Path) -> Run:
    return run(phi3_project)


@pytest.fixture(scope="module")
def second_run(first_run: Run) -> Run:
    return run(first_run.config)


@pytest.fixture(scope="module")
def edited_run(second_run: Run) -> Run:
    data = second_run.config.parent / "data" / "tone.json"
    with data.open("a") as f:
        f.write(json.dumps({"phrase": "The ferry left without us and the last bus is gone.", "tone": "Sad"}) + "\n")
    return run(second_run.config)


def test_run_prints_its_outputs(first_run: Run):
    lines = first_run.result.out.strip().splitlines()
    assert lines[0].startswith("done in ") and lines[0].endswith("s; 0 of 8 steps from cache")
    out = first_run.output_dir
    assert lines[1:] == [f"  adapter: {out / 'adapter'}", f"  merged: {out / 'merged'}",
                         f"  onnx/int4-cpu: {out / 'onnx' / 'int4-cpu'}"]  # fmt: skip
    assert first_run.result.errors == []


def test_output_dir_has_adapter_merged_and_onnx(first_run: Run):
    out = first_run.output_dir
    adapter = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= adapter
    merged = {p.name for p in (out / "merged").iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= merged
    assert any(n.endswith(".safetensors") for n in merged)
    onnx = {p.name for p in (out / "onnx" / "int4-cpu").iterdir()}
    assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= onnx
    assert {p.name for p in out.iterdir()} == {"adapter", "merged", "onnx", "report.json", "report.md", "loss.svg"}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"o_proj", "qkv_proj"} and config["r"] == 4


def test_report_json_has_rows_samples_and_losses(first_run: Run, tiny_phi3: Path):
    report = first_run.report
    assert report["input_model"] == str(tiny_phi3)
    assert report["passes"] == ["lora (LoRA)", "merge (MergeAdapterWeights)", "builder (ModelBuilder)"]
    assert [s["step"] for s in report["steps"]] == ALL_STEPS
    assert report["cached_steps"] == []
    dataset = step(report, "lora/dataset")["info"]
    assert dataset["rows"] == 320
    assert dataset["samples"]["train"] > 0 and dataset["samples"]["eval"] > 0
    assert dataset["tokens"] == 64 * (dataset["samples"]["train"] + dataset["samples"]["eval"])
    lora = step(report, "lora")["info"]
    assert lora["steps"] == 3
    assert [p["step"] for p in lora["loss_curve"]] == [1, 2, 3]
    assert lora["train_loss"] > 0 and lora["eval_loss"] > 0
    merge = step(report, "merge")["info"]
    assert merge["dtype"] == "float32"  # the base model's own dtype
    assert merge["merged_heldout_loss"] == pytest.approx(lora["eval_loss"], rel=1e-3)
    builder = step(report, "builder")["info"]
    assert (builder["precision"], builder["execution_provider"]) == ("int4", "cpu")
    # What fine-tuning bought and what int4 cost, on the same held-out samples as the eval loss.
    quality = report["quality"]
    assert list(quality) == ["base", "merged", "onnx/int4-cpu"]
    assert quality["merged"]["heldout_loss"] == pytest.approx(merge["merged_heldout_loss"], rel=1e-3)
    assert quality["merged"]["tokens"] == quality["base"]["tokens"] == quality["onnx/int4-cpu"]["tokens"] > 0
    assert quality["onnx/int4-cpu"]["heldout_loss"] == pytest.approx(quality["merged"]["heldout_loss"], rel=0.1)
    assert 0.5 < quality["onnx/int4-cpu"]["agrees_with_merged"] <= 1
    assert "agrees_with_merged" not in quality["merged"]
    assert report["outputs"] == {
        "adapter": str(first_run.output_dir / "adapter"),
        "merged": str(first_run.output_dir / "merged"),
        "onnx/int4-cpu": str(first_run.output_dir / "onnx" / "int4-cpu"),
    }


def test_training_progress_is_a_named_artifact_with_step_and_losses(first_run: Run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        # This run's card: other tests' runs update the same key (one that diverged shows no loss).
        run_id = first_run.report["flow_run"]["id"]
        mine = ArtifactFilter(key=ArtifactFilterKey(any_=["training-lora"]),
                              flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))  # fmt: skip
        [latest] = client.read_artifacts(artifact_filter=mine)
    assert latest.type == "progress" and latest.data == 100.0
    assert latest.description.startswith("adapter training: step 3/3, loss ")


def test_the_report_has_the_loss_curve_as_a_picture(first_run: Run):
    import xml.etree.ElementTree as ElementTree

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    md = (first_run.output_dir / "report.md").read_text()
    assert "![train and eval loss by step](loss.svg)" in md
    svg = ElementTree.parse(first_run.output_dir / "loss.svg").getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2  # train and eval loss
    assert len(lines[0].get("points").split()) == 3  # one point per logged step (logging_steps 1, 3 steps)
    run_id = json.loads((first_run.output_dir / "report.json").read_text())["flow_run"]["id"]
    with get_client(sync_client=True) as client:  # this run's own report on its page, with the picture inline
        [report] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(any_=["markdown"])
            )
        )
    assert report.key is None  # a key would open every run's reports under it, not this run's
    assert "![train and eval loss by step](data:image/svg+xml;base64," in report.data


def test_report_md_is_readable(first_run: Run):
    md = (first_run.output_dir / "report.md").read_text()
    assert md.startswith("# olive-grove run report")
    assert "| lora/dataset | prepare_dataset | no |" in md
    assert "rows 320" in md
    assert "| lora | train_adapter | no |" in md and "train_loss " in md and "eval_loss " in md
    assert "## Training loss" in md
    assert md.count("\n| 1 | ") + md.count("\n| 2 | ") + md.count("\n| 3 | ") == 3
    assert f"- `onnx/int4-cpu`: `{first_run.output_dir / 'onnx' / 'int4-cpu'}`" in md
    assert "## Quality on held-out samples" in md and "| onnx/int4-cpu | " in md


def test_infer_on_the_onnx_output(first_run: Run, tmp_path: Path):
    onnx = first_run.output_dir / "onnx" / "int4-cpu"
    one = grove("infer", onnx, "--prompt", PROMPT, "--max-new-tokens", "4")
    assert one.rc == 0, one.err
    [row] = one.json_lines()
    assert row["prompt"] == PROMPT and isinstance(row["output"], str)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(json.dumps(PROMPT) + "\nplain words\n")
    many = grove("infer", onnx, "--prompts-file", prompts, "--max-new-tokens", "4")
    assert many.rc == 0, many.err
    assert [r["prompt"] for r in many.json_lines()] == [PROMPT, "plain words"]


@pytest.mark.parametrize("folder", ["merged", "adapter"])
def test_infer_on_the_merged_and_adapter_outputs(first_run: Run, folder: str):
    result = grove("infer", first_run.output_dir / folder, "--prompt", PROMPT, "--max-new-tokens", "4")
    assert result.rc == 0, result.err
    [row] = result.json_lines()
    assert set(row) == {"prompt", "output"}


def test_cache_ls_lists_every_step_result(first_run: Run):
    result = grove("cache", "ls", "--config", first_run.config)
    assert result.rc == 0, result.err
    steps = [line.split()[0] for line in result.out.strip().splitlines()[:-1]]
    assert sorted(steps) == ["build_onnx_model", "measure_model", "measure_model", "measure_model", "merge_adapter",
                             "prepare_dataset", "train_adapter"]  # fmt: skip
    assert result.out.strip().splitlines()[-1].startswith("7 entries, ")
    dry = grove("cache", "prune", "--config", first_run.config, "--only-config", "--dry-run")
    assert dry.rc == 0 and dry.out.count("would remove ") == 7
    assert len(grove("cache", "ls", "--config", first_run.config).out.strip().splitlines()) == 8  # still there


def test_identical_rerun_comes_from_cache_and_is_fast(first_run: Run, second_run: Run):
    report = second_run.report
    assert report["cached_steps"] == ALL_STEPS[1:]  # the base model is always re-fingerprinted
    assert second_run.result.out.startswith("done in ")
    assert "7 of 8 steps from cache" in second_run.result.out.splitlines()[0]
    assert report["total_seconds"] < first_run.report["total_seconds"] / 2
    for label in ALL_STEPS[1:]:
        assert step(report, label)["path"] == step(first_run.report, label)["path"]
    assert "| lora | train_adapter | yes |" in (second_run.output_dir / "report.md").read_text()
    assert (second_run.output_dir / "onnx" / "int4-cpu" / "model.onnx").is_file()


def test_editing_the_data_file_retrains(second_run: Run, edited_run: Run):
    report = edited_run.report
    assert report["cached_steps"] == []  # dataset, adapter and everything after them
    assert step(report, "lora/dataset")["info"]["rows"] == 321
    assert step(report, "lora")["path"] != step(second_run.report, "lora")["path"]
    assert (edited_run.output_dir / "adapter" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------- pass subsets on a llama project


def llama_passes(*names: str, precision: str = "int4") -> dict[str, Any]:
    known = {
        "lora": lora_pass(LLAMA_MODULES),
        "merge": {"type": "MergeAdapterWeights"},
        "builder": {"type": "ModelBuilder", "precision": precision},
    }
    return {name: known[name] for name in names}


@pytest.fixture(scope="module")
def llama_project(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llama-project")


@pytest.fixture(scope="module")
def lora_only_run(llama_project: Path, tiny_llama: Path, tmp_path_factory) -> tuple[Run, Path]:
    config = write_project(llama_project, tiny_run_config(tiny_llama, llama_passes("lora")))
    done = run(config)
    kept = tmp_path_factory.mktemp("kept") / "adapter"
    shutil.copytree(done.output_dir / "adapter", kept)  # an adapter trained elsewhere, for later runs
    return done, kept


@pytest.fixture(scope="module")
def lora_merge_run(lora_only_run, llama_project: Path, tiny_llama: Path) -> Run:
    return run(write_project(llama_project, tiny_run_config(tiny_llama, llama_passes("lora", "merge"))))


@pytest.fixture(scope="module")
def lora_merge_builder_run(lora_merge_run, llama_project: Path, tiny_llama: Path) -> Run:
    return run(write_project(llama_project, tiny_run_config(tiny_llama, llama_passes("lora", "merge", "builder"))))


def test_lora_alone_publishes_only_the_adapter(lora_only_run):
    done, _ = lora_only_run
    assert sorted(p.name for p in done.output_dir.iterdir()) == ["adapter", "loss.svg", "report.json", "report.md"]
    assert list(done.report["outputs"]) == ["adapter"]
    # The base model is measured on the adapter's held-out samples: the number the fine-tune must beat.
    assert [s["step"] for s in done.report["steps"]] == ["input_model", "lora/dataset", "lora", "quality/base"]
    assert set(json.loads((done.output_dir / "adapter" / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj",
        "v_proj",
    }


def test_adding_merge_reuses_the_trained_adapter(lora_merge_run: Run):
    assert lora_merge_run.report["cached_steps"] == ["lora/dataset", "lora", "quality/base"]
    assert (lora_merge_run.output_dir / "merged" / "config.json").is_file()


def test_adding_modelbuilder_reuses_lora_and_merge(lora_merge_builder_run: Run):
    # Only the new build is measured: the base and merged models' quality comes from the cache.
    assert lora_merge_builder_run.report["cached_steps"] == ["lora/dataset", "lora", "merge", "quality/base",
                                                             "quality/merged"]  # fmt: skip
    assert not step(lora_merge_builder_run.report, "builder")["cached"]
    assert (lora_merge_builder_run.output_dir / "onnx" / "int4-cpu" / "model.onnx").is_file()


def test_merge_and_modelbuilder_on_an_existing_adapter(lora_only_run, tiny_llama: Path, tmp_path: Path):
    _, adapter = lora_only_run
    cfg = tiny_run_config(tiny_llama, llama_passes("merge", "builder"))
    cfg["input_model"]["adapter_path"] = str(adapter)
    done = run(write_project(tmp_path, cfg))
    assert [s["step"] for s in done.report["steps"]] == ["input_model", "merge", "builder"]
    assert list(done.report["outputs"]) == ["merged", "onnx/int4-cpu"]
    assert (done.output_dir / "merged" / "model.safetensors").is_file()
    assert (done.output_dir / "onnx" / "int4-cpu" / "model.onnx").is_file()
    assert not (done.output_dir / "adapter").exists()


def _builder_only(root: Path, model: str) -> Path:
    cfg = tiny_run_config(model, llama_passes("builder", precision="fp32"))
    del cfg["data_configs"]
    return write_project(root, cfg)


def test_modelbuilder_alone_on_a_hf_model(tiny_llama: Path, tmp_path: Path):
    done = run(_builder_only(tmp_path, str(tiny_llama)))
    assert [s["step"] for s in done.report["steps"]] == ["input_model", "builder"]
    onnx = done.output_dir / "onnx" / "fp32-cpu"
    assert list(done.report["outputs"]) == ["onnx/fp32-cpu"]
    assert {"model.onnx", "genai_config.json"} <= {p.name for p in onnx.iterdir()}
    result = grove("infer", onnx, "--prompt", PROMPT, "--max-new-tokens", "3")
    assert result.rc == 0 and len(result.json_lines()) == 1


# ------------------------------------------------------------------------ known bugs: moving a project


def test_a_moved_project_reuses_its_cache(tiny_llama: Path, tmp_path: Path):
    shutil.copytree(tiny_llama, tmp_path / "before" / "model")
    run(_builder_only(tmp_path / "before", "model"))
    shutil.move(tmp_path / "before", tmp_path / "after")
    result = grove("run", "--config", tmp_path / "after" / "config.json")
    assert result.rc == 0, result.err[-2000:]
    assert read_report(tmp_path / "after" / "config.json")["cached_steps"] == ["builder"]


def test_same_data_in_another_folder_reuses_the_trained_adapter(lora_merge_builder_run, tiny_llama, tmp_path):
    shutil.copytree(lora_merge_builder_run.config.parent, tmp_path / "copy")
    copied = run(tmp_path / "copy" / "config.json")
    assert "lora" in copied.report["cached_steps"]


def test_eval_data_config_gives_the_evaluation_samples(tiny_llama: Path, tmp_path: Path):
    cfg = tiny_run_config(tiny_llama, {"lora": lora_pass(LLAMA_MODULES, eval_data_config="tone_eval")})
    held_out = json.loads(json.dumps(cfg["data_configs"][0]))
    held_out.update(name="tone_eval")
    held_out["load_dataset_config"]["data_files"] = "data/eval.json"
    cfg["data_configs"].append(held_out)
    config = write_project(tmp_path, cfg)
    first_rows = (tmp_path / "data" / "tone.json").read_text().splitlines()[:30]
    (tmp_path / "data" / "eval.json").write_text("\n".join(first_rows) + "\n")
    report = run(config).report
    assert step(report, "lora/dataset")["info"]["samples"].keys() == {"train"}  # no held-out split taken
    evaluation = step(report, "lora/eval-dataset")["info"]
    assert evaluation["rows"] == 30
    assert step(report, "lora")["info"]["eval_loss"] > 0


def test_a_merge_after_the_cache_moved_finds_the_adapters_eval_samples(tiny_llama: Path, tmp_path: Path):
    """Cached results name their files relative to the cache: nothing points into the old folder."""
    lora = lora_pass(LLAMA_MODULES, eval_dataset_size=0.1)
    run(write_project(tmp_path / "before", tiny_run_config(tiny_llama, {"lora": lora})))
    shutil.move(tmp_path / "before", tmp_path / "after")
    merged = run(
        write_project(tmp_path / "after", tiny_run_config(tiny_llama, {"lora": lora, **llama_passes("merge")}))
    )
    assert merged.report["cached_steps"] == ["lora/dataset", "lora", "quality/base"]
    trained, merge = step(merged.report, "lora")["info"], step(merged.report, "merge")["info"]
    assert merge["merged_heldout_loss"] == pytest.approx(trained["eval_loss"], rel=1e-3)
    assert not (tmp_path / "before").exists()


@pytest.mark.parametrize(
    ("harm", "why"),
    [
        (lambda folder: (folder / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda folder: (folder / "adapter_model.safetensors").write_bytes(
            os.urandom((folder / "adapter_model.safetensors").stat().st_size)), "changed since it was cached"),
    ],
    ids=["deleted", "overwritten"],
)  # fmt: skip
def test_a_damaged_cache_entry_is_computed_again_not_published(tiny_llama: Path, tmp_path: Path, harm, why, caplog):
    config = write_project(tmp_path, tiny_run_config(tiny_llama, llama_passes("lora")))
    first = run(config)
    published = (first.output_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    [cached] = [p for p in (tmp_path / "cache" / "steps" / "train_adapter").iterdir() if not p.name.endswith(".work")]
    harm(cached)
    again = grove("run", "--config", config)
    assert again.rc == 0, again.err[-2000:]
    # Trained again, the same seed gives the same adapter: its base-model measurement is still good.
    assert read_report(config)["cached_steps"] == ["lora/dataset", "quality/base"]
    assert why in caplog.text and "is damaged" in caplog.text  # the run log says why it trained again
    assert (first.output_dir / "adapter" / "adapter_model.safetensors").read_bytes() == published


def _entry(root: Path, step: str) -> Path:
    [folder] = [p for p in (root / "cache" / "steps" / step).iterdir() if not p.name.endswith(".work")]
    return folder


def test_a_damaged_folder_whose_record_is_gone_is_not_published(tiny_llama: Path, tmp_path: Path):
    config = write_project(tmp_path, tiny_run_config(tiny_llama, llama_passes("lora", "merge")))
    first = run(config)
    merged = _entry(tmp_path, "merge_adapter")
    (tmp_path / "cache" / "results" / merged.name).unlink()
    (merged / "model.safetensors").write_bytes(b"\0" * 1000)
    shutil.rmtree(first.output_dir)
    again = run(config)
    assert "merge" not in again.report["cached_steps"]
    weights = again.output_dir / "merged" / "model.safetensors"
    assert weights.stat().st_size > 1000 and grove("infer", weights.parent, "--prompt", "hi").rc == 0


def test_a_file_where_a_step_folder_should_be_is_replaced(tiny_llama: Path, tmp_path: Path):
    config = write_project(tmp_path, tiny_run_config(tiny_llama, llama_passes("lora", "merge")))
    run(config)
    merged = _entry(tmp_path, "merge_adapter")
    shutil.rmtree(merged)
    merged.write_text("junk")
    for _ in range(2):  # the first re-run repairs the entry, the second reuses it
        done = run(config)
    assert done.report["cached_steps"] == ["lora/dataset", "lora", "merge", "quality/base", "quality/merged"]
    assert _entry(tmp_path, "merge_adapter").is_dir()


def test_two_modelbuilder_passes_build_the_same_model_twice(tiny_llama: Path, tmp_path: Path):
    passes = {**llama_passes("lora", "merge"), "int4": {"type": "ModelBuilder", "precision": "int4"},
              "fp32": {"type": "ModelBuilder", "precision": "fp32"}}  # fmt: skip
    done = run(write_project(tmp_path, tiny_run_config(tiny_llama, passes)))
    assert list(done.report["outputs"]) == ["adapter", "merged", "onnx/int4-cpu", "onnx/fp32-cpu"]
    for folder in ("int4-cpu", "fp32-cpu"):
        assert (done.output_dir / "onnx" / folder / "model.onnx").is_file()
    # The report names every step's files where they are.
    assert all(Path(s["path"]).is_absolute() and Path(s["path"]).exists() for s in done.report["steps"])
