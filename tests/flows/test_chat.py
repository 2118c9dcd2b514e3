"""The chat example as a user runs it: messages rows rendered with the model's chat template, the loss on
the assistant's answers only (examples/tone/tiny-chat.json), through `grove run`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from grove_helpers import grove, read_report, step

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tone"


def _chat_project(tmp_path: Path, model: Path, all_passes: bool = False, **text) -> Path:
    shutil.copytree(EXAMPLE / "dataset", tmp_path / "dataset")
    cfg = json.loads((EXAMPLE / "tiny-chat.json").read_text())
    cfg["input_model"]["model_path"] = str(model)
    if not all_passes:
        cfg["passes"] = {"lora": cfg["passes"]["lora"]}
    cfg["passes"]["lora"]["training_args"].update(max_steps=3, eval_steps=3, save_steps=3)
    cfg["data_configs"][0]["pre_process_data_config"].update(text)
    path = tmp_path / "tiny-chat.json"
    path.write_text(json.dumps(cfg))
    return path


def test_the_chat_example_trains_on_the_assistants_answers(tmp_path, tiny_phi3):
    config = _chat_project(tmp_path / "answers", tiny_phi3)
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    answers = step(read_report(config), "lora/dataset")["info"]
    whole = _chat_project(tmp_path / "whole", tiny_phi3, train_on_inputs=True)  # the prompt learned too
    assert grove("run", "--config", whole).rc == 0
    everything = step(read_report(whole), "lora/dataset")["info"]
    # Same rows, same samples; the answers are a small part of the tokens.
    assert answers["rows"] == everything["rows"] == 288
    assert answers["samples"] == everything["samples"]
    assert 0 < answers["tokens"] < everything["tokens"] / 5
    assert step(read_report(config), "lora")["info"]["train_loss"] > 0


def test_the_chat_example_evaluates_the_assistants_answers_on_held_out_rows(tmp_path, tiny_phi3):
    config = _chat_project(tmp_path, tiny_phi3, all_passes=True)
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    report = read_report(config)
    table = report["evaluation"]["tone_answers"]
    assert list(table) == ["tone-exact_match", "tone-perplexity", "speed-avg"]
    assert all(list(row) == ["base", "merged", "onnx/int4-cpu"] for row in table.values())
    assert all(0 <= v <= 1 for v in table["tone-exact_match"].values())
    assert table["speed-avg"]["onnx/int4-cpu"] > 0  # generated tokens per second
    folder = Path(step(report, "evaluate/tone_answers/onnx/int4-cpu")["path"])
    answers = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (EXAMPLE / "dataset" / "tone-chat.jsonl").read_text().splitlines()][288:]
    assert [a["expected"] for a in answers] == [r["messages"][-1]["content"] for r in rows]
    # The prompt is the conversation before the answer, ending where the assistant's turn begins.
    assert rows[0]["messages"][1]["content"] in answers[0]["prompt"]
    assert answers[0]["prompt"].rstrip().endswith("<|assistant|>")


def test_a_tokenizer_without_a_chat_template_is_one_line(tmp_path, tiny_phi3):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_phi3, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    result = grove("run", "--config", _chat_project(tmp_path, model))
    assert result.rc == 2
    assert result.errors[0].startswith(
        "error: data_configs[0].pre_process_data_config.chat_template: is true but the model's tokenizer has no chat "
        "template"
    ), result.errors
