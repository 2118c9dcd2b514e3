"""Olive's evaluators as a user runs them with `grove run`: the tone example's metrics on the base, merged and
int4 models side by side, a custom metric_func, lm-eval tasks, and the mistakes each can hold."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from grove_helpers import TONE_DATASET, grove, read_report, tiny_run_config, write_project

from olive_grove.tasks.evaluators import _compared

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tone"
MODELS = ["base", "merged", "onnx/int4-cpu"]


def _tone_example(folder: Path, model: Path, **changes) -> Path:
    """examples/tone/tiny-cpu.json as shipped (its evaluator included), 4 training steps."""
    shutil.copytree(EXAMPLE / "dataset", folder / "dataset", dirs_exist_ok=True)
    cfg = json.loads((EXAMPLE / "tiny-cpu.json").read_text())
    cfg["input_model"]["model_path"] = str(model)
    cfg["passes"]["lora"]["training_args"].update(max_steps=4, eval_steps=4, save_steps=4)
    cfg.update(changes)
    path = folder / "tiny-cpu.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def test_the_tone_example_reports_base_merged_and_int4_side_by_side(tmp_path, tiny_phi3):
    config = _tone_example(tmp_path, tiny_phi3)
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    report = read_report(config)
    table = report["evaluation"]["tone_quality"]
    # Olive's names, in the config's order, each with a column per model.
    assert list(table) == ["tone-accuracy_score", "tone-f1_score", "tone-perplexity", "latency-avg", "latency-p90",
                           "size-bytes"]  # fmt: skip
    assert all(list(row) == MODELS for row in table.values())
    for model in MODELS:
        assert 0 <= table["tone-accuracy_score"][model] <= 1
        assert 0 < table["latency-avg"][model] <= table["latency-p90"][model] * 1.0001
    # Perplexity on the held-out rows: training lowered it, and int4 kept it close.
    assert table["tone-perplexity"]["merged"] < table["tone-perplexity"]["base"]
    assert table["tone-perplexity"]["onnx/int4-cpu"] == pytest.approx(table["tone-perplexity"]["merged"], rel=0.1)
    outputs = Path(report["outputs"]["merged"]).parent
    on_disk = sum(p.stat().st_size for p in (outputs / "onnx" / "int4-cpu").rglob("*")
                  if p.is_file() and not p.name.startswith(".olive-grove"))  # its files, not our stamp  # fmt: skip
    assert table["size-bytes"]["onnx/int4-cpu"] == on_disk
    # Every answer is kept, beside the outputs: the 32 held-out rows, each with its prompt, the expected tone
    # and the model's.
    published = outputs / "evaluation" / "tone_quality" / "merged" / "predictions.jsonl"
    assert report["outputs"]["evaluation/tone_quality/merged"] == str(published.parent)
    answers = [json.loads(line) for line in published.read_text().splitlines()]
    held_out = [json.loads(line) for line in TONE_DATASET.read_text().splitlines()][288:]
    assert [a["expected"] for a in answers] == [row["tone"] for row in held_out]
    assert answers[0]["prompt"].endswith(f"### Text: {held_out[0]['phrase']}\n### The tone is:\n")
    right = sum(a["answer"].strip().lower() == a["expected"].lower() for a in answers) / len(answers)
    assert table["tone-accuracy_score"]["merged"] == pytest.approx(right)
    markdown = (outputs / "report.md").read_text()
    assert "## Evaluation: tone_quality" in markdown
    assert "| metric | base | merged | onnx/int4-cpu |" in markdown

    # An evaluator added to the finished config evaluates; nothing is trained or built again.
    cfg = json.loads(config.read_text())
    cfg["evaluators"]["size_only"] = {"metrics": [{"name": "size", "type": "size_on_disk"}]}
    cfg["passes"]["builder"]["evaluator"] = "size_only"
    config.write_text(json.dumps(cfg))
    assert grove("run", "--config", config).rc == 0
    again = read_report(config)
    computed = [s["step"] for s in again["steps"] if s["step"] not in again["cached_steps"]]
    assert computed == ["input_model", "evaluate/size_only/onnx/int4-cpu"]
    assert again["evaluation"]["size_only"] == {"size-bytes": {"onnx/int4-cpu": on_disk}}
    assert list(again["evaluation"]["tone_quality"]["size-bytes"]) == ["base", "merged"]


def test_answers_compare_as_olive_exact_match_and_f1_averages_the_answers():
    replies = ["joy", "Sad ", "Fear", "fear", "calm"]
    expected = ["Joy", "sad", "Fear|Terror", "Sad", "Joy"]
    scores = _compared(replies, expected)
    assert scores["accuracy_score"] == scores["exact_match"] == pytest.approx(3 / 5)
    # The answers are the classes: joy (1 of its 2 rows found; 1 of 1 reply right), sad (1 of 2; 1 of 1),
    # fear|terror (1 of 1; 1 of 2 replies right). "calm" is no answer: a miss for its row, no class's reply.
    assert scores["recall"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert scores["precision"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    f1 = [2 * p * r / (p + r) for p, r in ((1, 1 / 2), (1, 1 / 2), (1 / 2, 1))]
    assert scores["f1_score"] == pytest.approx(sum(f1) / 3)
    # A reply right for its own row counts for that row's answer, though another answer lists it too.
    overlapping = _compared(["happy", "happy"], ["Joy|Happy", "Happy"])
    assert overlapping == {"accuracy_score": 1, "exact_match": 1, "precision": 1, "recall": 1, "f1_score": 1}


def _flat_project(tmp_path: Path, model: Path, evaluators: dict, **engine) -> Path:
    passes = tiny_run_config(model)["passes"]
    passes["lora"]["training_args"]["max_steps"] = 1
    cfg = tiny_run_config(model, {"lora": passes["lora"], "merge": passes["merge"]},
                          evaluators=evaluators, evaluator="main", **engine)  # fmt: skip
    return write_project(tmp_path, cfg)


def _accuracy(**metric) -> dict:
    return {"main": {"metrics": [{"name": "tone", "type": "accuracy", "data_config": "tone_train"} | metric]}}


def test_a_custom_metric_func_gets_the_answers_and_the_expected_ones(tmp_path, tiny_phi3):
    (tmp_path / "metrics.py").write_text(
        "import numpy\n"
        "def tone_stats(model_output, targets, unit=1):\n"
        "    answered = sum(bool(p.strip()) for p in model_output.preds)\n"
        "    return {'answered': answered * unit / len(targets), 'rows': numpy.int64(len(targets))}\n"
    )
    custom = {"name": "stats", "type": "custom", "data_config": "tone_train",
              "sub_types": [{"name": "answered"}, {"name": "rows"}],
              "user_config": {"user_script": "metrics.py", "metric_func": "tone_stats",
                              "metric_func_kwargs": {"unit": 100}}}  # fmt: skip
    config = _flat_project(tmp_path, tiny_phi3, {"main": {"metrics": [custom]}})
    tone = json.loads(config.read_text())
    tone["data_configs"][0]["pre_process_data_config"]["max_samples"] = 5
    config.write_text(json.dumps(tone))
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    table = read_report(config)["evaluation"]["main"]
    assert table["stats-rows"] == {"base": 5, "merged": 5}
    assert 0 <= table["stats-answered"]["merged"] <= 100

    # The function's own failure is the user's, said in one line.
    (tmp_path / "metrics.py").write_text("def tone_stats(model_output, targets, unit=1):\n    return 1 / 0\n")
    result = grove("run", "--config", config)
    assert result.rc == 2
    assert result.errors == [
        "error: evaluators.main.metrics[0].user_config.metric_func: tone_stats raised "
        "ZeroDivisionError: division by zero (fix it in " + str(tmp_path / "metrics.py") + ")"
    ]
    assert "Traceback" not in result.err
    # report.json stays JSON: no NaN; and a script's exit is its failure too.
    for body, line in [("return {'answered': float('nan'), 'rows': 5}",
                        "sub_types[0].name: tone_stats returned no finite number 'answered' (nan) (return a number "
                        "for each sub type)"),
                       ("return {'answered': 10**400, 'rows': 5}",
                        "sub_types[0].name: tone_stats returned no finite number 'answered' (1000000000000000000000"),
                       ("raise SystemExit(3)", "user_config.metric_func: tone_stats raised SystemExit: 3 (fix it in "
                        f"{tmp_path / 'metrics.py'})")]:  # fmt: skip
        (tmp_path / "metrics.py").write_text(f"def tone_stats(model_output, targets, unit=1):\n    {body}\n")
        result = grove("run", "--config", config)
        assert result.rc == 2 and len(result.errors) == 1, result.err[-2000:]
        assert result.errors[0].startswith(f"error: evaluators.main.metrics[0].{line}")

    # What the script imports from script_dir is part of what the evaluation's cache key sees.
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "share.py").write_text("ANSWERED = 0.75\n")
    (tmp_path / "metrics.py").write_text("import share\ndef tone_stats(model_output, targets, unit=1):\n"
                                         "    return {'answered': share.ANSWERED, 'rows': 1}\n")  # fmt: skip
    tone["evaluators"]["main"]["metrics"][0]["user_config"]["script_dir"] = "lib"
    config.write_text(json.dumps(tone))
    assert grove("run", "--config", config).rc == 0
    (tmp_path / "lib" / "share.py").write_text("ANSWERED = 0.5\n")
    assert grove("run", "--config", config).rc == 0
    assert read_report(config)["evaluation"]["main"]["stats-answered"] == {"base": 0.5, "merged": 0.5}


MISTAKES = [
    (
        {"evaluator": "mian"},
        "error: evaluator: no evaluators entry named 'mian' (did you mean 'main'?)",  # where the flat form has it
    ),
    (
        {"evaluators": {"../../victim": _accuracy()["main"]}, "evaluator": "../../victim"},  # names output folders
        "error: evaluators.'../../victim': is not a usable evaluator name (letters, digits, '_', '-' and '.', "
        "starting with a letter or digit)",
    ),
    (
        {"evaluators": _accuracy(data_config="tone_tran")},
        "error: evaluators.main.metrics[0].data_config: no data config named 'tone_tran' (did you mean 'tone_train'?)",
    ),
    (
        {"evaluators": _accuracy(sub_types=[{"name": "auroc"}])},
        "error: evaluators.main.metrics[0].sub_types[0].name: olive-grove does not measure 'auroc' for accuracy "
        "(valid: accuracy_score, exact_match, f1_score, perplexity, precision, recall)",
    ),
    (
        {"evaluators": _accuracy(user_config={"evaluate_func": "run"})},
        "error: evaluators.main.metrics[0].user_config.evaluate_func: is handed an Olive model handler, which "
        "olive-grove has not (write metric_func(model_output, targets): it gets the generated answers and the "
        "expected ones)",
    ),
    (
        {"evaluators": {"main": {"metrics": [{"name": "lat", "type": "latency", "data_config": "tone_train",
                                              "sub_types": [{"name": "avg", "metric_config": {"warmup": 1}}]}]}}},
        "error: evaluators.main.metrics[0].sub_types[0].metric_config.warmup: Extra inputs are not permitted",
    ),
    (
        {"evaluator": _accuracy(data_config="tone_tran")["main"]},  # in place: its errors are where it is written
        "error: evaluator.metrics[0].data_config: no data config named 'tone_tran' (did you mean 'tone_train'?)",
    ),
    (
        {"evaluators": {"main": _accuracy()["main"] | {"type": "OliveEvaluatorX"}}},
        "error: evaluators.main.type: unknown evaluator type 'OliveEvaluatorX' (did you mean 'OliveEvaluator'?)",
    ),
    (
        {"evaluators": {"main": {"type": "LMEvaluator", "tasks": ["t"], "limit": 1.5}}},
        "error: evaluators.main.limit: is 1.5 (a count of rows, or a fraction below 1)",
    ),
    (
        {"evaluators": {"main": {"type": "LMEvaluator", "tasks": ["t"], "apply_chat_template": "tool_use"}}},
        "error: evaluators.main.apply_chat_template: names a chat template ('tool_use'); olive-grove applies the "
        "tokenizer's own (true or false)",
    ),
    (
        {"evaluators": {"main": {"metrics": [{"name": "lat", "type": "latency", "data_config": "tone_train",
                                              "sub_types": [{"name": "avg", "metric_config": {"sleep_num": 1e9}}]}]}}},
        "error: evaluators.main.metrics[0].sub_types[0].metric_config.sleep_num: Input should be less than or equal "
        "to 60",
    ),
    (
        {"engine": {"evaluator": "main"}},
        "error: evaluator: is given both at the top level and as engine.evaluator (give it once)",
    ),
    (
        {"evaluators": _accuracy(sub_types=[{"name": "f1_score"}, {"name": "f1_score"}])},
        "error: evaluators.main.metrics[0].sub_types[1].name: 'f1_score' is an earlier sub type too (list it once)",
    ),
    (
        {"evaluators": {"main": {"metrics": [*_accuracy()["main"]["metrics"], *_accuracy()["main"]["metrics"]]}}},
        "error: evaluators.main.metrics[1].name: 'tone' names an earlier metric too (give each metric its own name)",
    ),
    (
        {"evaluators": _accuracy(name="")},
        "error: evaluators.main.metrics[0].name: String should have at least 1 character (got '')",
    ),
    (
        {"evaluators": {"main": {"metrics": [{"name": "acc", "type": "accuracy"}]}}},
        "error: evaluators.main.metrics[0].data_config: is required: an accuracy metric runs the model on rows "
        "(name one of data_configs)",
    ),
    (
        {"evaluators": {"main": {"type": "LMEvaluator", "tasks": []}}},
        "error: evaluators.main.tasks: List should have at least 1 item after validation, not 0 (got [])",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("change", "expected"), MISTAKES, ids=[m[1].split(":")[1].strip() for m in MISTAKES])
def test_evaluator_mistakes_are_one_line_before_work(tmp_path, tiny_phi3, change, expected):
    cfg = json.loads(_flat_project(tmp_path, tiny_phi3, _accuracy()).read_text())
    cfg.update(copy.deepcopy(change))
    config = write_project(tmp_path, cfg)
    result = grove("validate", "--config", config)
    assert result.rc == 2
    assert result.errors == [expected], result.err
    assert not (tmp_path / "cache").exists()


def test_rows_without_an_answer_to_compare_are_one_line_before_work(tmp_path, tiny_phi3):
    cfg = json.loads(_flat_project(tmp_path, tiny_phi3, _accuracy()).read_text())
    cfg["data_configs"][0]["pre_process_data_config"].pop("text_template")
    result = grove("run", "--config", write_project(tmp_path, cfg))
    assert result.rc == 2
    assert result.errors[0].startswith(
        "error: evaluators.main.metrics[0].data_config: the accuracy metric compares the model's answer with each "
        "row's, and its rows have no answer to tell apart"
    ), result.errors
    assert not (tmp_path / "outputs").exists()


def _lm_task(tmp_path: Path) -> Path:
    """A local lm-eval task: the tone rows as a four-way choice, read from a JSON Lines file."""
    rows = tmp_path / "tone-choice.jsonl"
    rows.write_text("\n".join(TONE_DATASET.read_text().splitlines()[:24]))
    folder = tmp_path / "lm-tasks"
    folder.mkdir()
    (folder / "tone.yaml").write_text(
        "task: tone_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rows}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "### Text: {{phrase}}\\n### The tone is:\\n"\n'
        'doc_to_choice: ["Joy", "Sad", "Fear", "Surprise"]\n'
        'doc_to_target: "{{tone}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.mark.slow
def test_lm_evaluator_scores_lm_eval_tasks_on_every_model(tmp_path, tiny_phi3):
    pytest.importorskip("lm_eval")
    tasks = _lm_task(tmp_path)
    lm = {"main": {"type": "LMEvaluator", "tasks": ["tone_choice"], "include_path": str(tasks), "limit": 12}}
    config = _flat_project(tmp_path, tiny_phi3, lm)
    cfg = json.loads(config.read_text())
    cfg["passes"]["builder"] = {"type": "ModelBuilder", "precision": "int4"}
    config.write_text(json.dumps(cfg))
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    row = read_report(config)["evaluation"]["main"]["tone_choice-acc"]
    assert list(row) == MODELS
    assert all(score * 12 == round(score * 12) and 0 <= score <= 1 for score in row.values())

    lm["main"].update(tasks=["tone_choise"], type="lmevaluator")  # a type in any case, as pass types
    config = _flat_project(tmp_path / "typo", tiny_phi3, lm)
    result = grove("validate", "--config", config)
    assert result.rc == 2
    assert result.errors == ["error: evaluators.main.tasks[0]: lm-eval has no task 'tone_choise' (did you mean "
                             "'tone_choice'?)"]  # fmt: skip

    (tasks / "broken.yaml").write_text("task: broken\n  dataset_path: [unclosed\n")
    lm["main"]["tasks"] = ["broken"]
    result = grove("validate", "--config", _flat_project(tmp_path / "broken", tiny_phi3, lm))
    assert result.rc == 2
    assert result.errors[0].startswith(f"error: evaluators.main.include_path: {tasks / 'broken.yaml'} does not load: ")
    (tasks / "broken.yaml").unlink()

    lm["main"].update(tasks=["tone_choice"], num_fewshot=24)  # as many as the task's rows: none left to ask
    result = grove("validate", "--config", _flat_project(tmp_path / "shots", tiny_phi3, lm))
    assert result.rc == 2
    assert result.errors == [
        "error: evaluators.main.num_fewshot: is 24, and lm-eval task 'tone_choice' has 24 rows to draw examples "
        "from (at most 23: the row asked about is not its own example)"
    ]


def test_lm_eval_requests_longer_than_max_length_keep_their_last_tokens(tiny_phi3):
    pytest.importorskip("lm_eval")
    from grove_helpers import model_artifact

    from olive_grove.tasks.lm_harness import _runner_lm_class
    from olive_grove.tasks.runners import open_runner

    runner = open_runner(model_artifact(tiny_phi3))
    ids = runner.encode("### Text: what a day\n### The tone is:\nJoy and more joy")
    whole = _runner_lm_class()(runner, len(ids) + 1)._scored(ids[:2], ids[2:])
    cut = _runner_lm_class()(runner, 4)._scored(ids[:2], ids[2:])  # the continuation alone is longer than 4
    alone = _runner_lm_class()(runner, 4)._scored(ids[-5:-4], ids[-4:])
    assert cut == pytest.approx(alone)  # its last 4 tokens, after the one before them
    assert whole[0] < cut[0] < 0


def test_lm_evaluator_without_lm_eval_installed_is_one_line(tmp_path, tiny_phi3, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what Python does for a package that is not there
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    config = _flat_project(tmp_path, tiny_phi3, {"main": {"type": "LMEvaluator", "tasks": ["arc_easy"]}})
    result = grove("run", "--config", config)
    assert result.rc == 2
    assert result.errors == ["error: evaluators.main.type: LMEvaluator runs lm-eval-harness tasks, and the lm-eval "
                             "package is not installed here (pip install lm-eval)"]  # fmt: skip
    assert not (tmp_path / "outputs").exists()


def _held_out_project(tmp_path: Path, model: Path, rows: list[dict], **metric) -> Path:
    """The flat project, its evaluator on a second data config of its own rows (data/held.json), so a change
    to them or to the metric evaluates again without training again."""
    cfg = json.loads(_flat_project(tmp_path, model, _accuracy(data_config="held", **metric)).read_text())
    held = copy.deepcopy(cfg["data_configs"][0])
    held.update(name="held")
    held["load_dataset_config"]["data_files"] = "data/held.json"
    cfg["data_configs"].append(held)
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "held.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_project(tmp_path, cfg)


def test_mistakes_found_while_evaluating_are_one_line_at_their_key(tmp_path, tiny_phi3):
    rows = [{"phrase": "what a day", "tone": "Joy"}, {"phrase": "oh no", "tone": None}, {"phrase": "hm", "tone": ""}]
    result = grove("run", "--config", _held_out_project(tmp_path, tiny_phi3, rows))
    # A null or empty answer would count an empty reply right: the data config that holds the rows says so.
    assert result.rc == 2
    assert result.errors == ["error: data_configs[1]: 2 of the 3 rows evaluated on have an empty answer (the first "
                             "is row 1) (leave them out of the data, or fill in their answers)"]  # fmt: skip
    assert "Traceback" not in result.err
    assert not (tmp_path / "outputs").exists()

    rows = rows[:1]
    result = grove("run", "--config", _held_out_project(tmp_path, tiny_phi3, rows, max_new_tokens=10**6))
    assert result.rc == 2
    assert result.errors == ["error: evaluators.main.metrics[0].max_new_tokens: is 1000000, and the model holds 4096 "
                             "tokens in all (fewer than 4096, leaving room for the prompt)"]  # fmt: skip

    config = _held_out_project(tmp_path, tiny_phi3, rows, sub_types=[{"name": "perplexity"}])
    cfg = json.loads(config.read_text())
    cfg["data_configs"][1]["pre_process_data_config"].update(text_template="{phrase}{tone}", train_on_inputs=False)
    (tmp_path / "data" / "held.json").write_text(json.dumps({"phrase": "oh no", "tone": None}))
    result = grove("run", "--config", write_project(tmp_path, cfg))
    assert result.rc == 2
    assert result.errors == ["error: data_configs[1].pre_process_data_config: leaves no labelled token to score "
                             "perplexity on (rows with text (with train_on_inputs false, an answer after the "
                             "prompt))"]  # fmt: skip


def test_chat_rows_to_evaluate_on_are_checked_at_their_data_config(tmp_path, tiny_phi3):
    chat = {"name": "chat", "type": "accuracy", "data_config": {
        "name": "chat_rows", "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": "data/chat.json", "split": "train"},
        "pre_process_data_config": {"chat_template": True, "message_col": "messages", "max_seq_len": 64}}}  # fmt: skip
    config = _flat_project(tmp_path, tiny_phi3, {"main": {"metrics": [chat]}})
    turns = [{"role": "user", "content": "what a day"}, {"role": "assistant", "content": "Joy"}]
    (tmp_path / "data" / "chat.json").write_text(json.dumps({"messages": [*turns, turns[0]]}))
    result = grove("run", "--config", config)
    assert result.rc == 2
    assert result.errors == ["error: evaluators.main.metrics[0].data_config.pre_process_data_config.message_col: a "
                             "row to evaluate on ends with the assistant's answer, and one ends with a user "
                             "message (end each row with the assistant turn the model should give)"]  # fmt: skip


def test_an_adapter_no_pass_merges_is_reported_as_not_evaluated(tmp_path, tiny_phi3):
    passes = tiny_run_config(tiny_phi3)["passes"]
    passes["lora"]["training_args"]["max_steps"] = 1
    cfg = tiny_run_config(tiny_phi3, {"lora": passes["lora"]}, evaluators=_accuracy(max_new_tokens=2),
                          evaluator="main")  # fmt: skip
    cfg["data_configs"][0]["pre_process_data_config"]["max_samples"] = 2
    config = write_project(tmp_path, cfg)
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    report = read_report(config)
    assert list(report["evaluation"]["main"]["tone-accuracy_score"]) == ["base"]
    assert report["not_measured"] == {
        "adapter": "an adapter, which is evaluated merged: add a merge pass after lora to evaluate it"
    }
    assert "add a merge pass after lora" in (config.parent / "outputs" / "run" / "report.md").read_text()
