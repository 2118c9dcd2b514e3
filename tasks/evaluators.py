"""Olive's evaluators, as its configs write them (`evaluators`, and `evaluator` on the engine or a pass), run
on the models of a run: the base model, the merged model and each ONNX model, one cached step each.

A metric's data config gives rows; each row is a question and the answer the model should give — a chat
row's last assistant turn, or the text of a `text_template` from its last placeholder on. Accuracy compares
the model's greedy answer with it (as Olive's exact_match: case and runs of spaces do not count, `a|b` is
either); perplexity scores the rows as training tokenizes them; latency and throughput time the prompt and
the generation on the device the model runs on; size_on_disk is the model folder's bytes. `custom` hands the
answers to the user's `metric_func(model_output, targets)`, Olive's signature. `LMEvaluator` runs
lm-eval-harness tasks (tasks/lm_harness.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from olive_grove.tasks.artifact import Artifact, Reporter, Settings, StepFiles, StepInfo, no_effect
from olive_grove.tasks.data import DataConfig, DatasetSettings, load_rows, row_samples, sample_rows
from olive_grove.tasks.errors import UserError, each_once, first_line, located, nearest
from olive_grove.tasks.quality import perplexity, scored_tokens
from olive_grove.tasks.runners import Runner, open_runner

PREDICTIONS = "predictions.jsonl"
ACCURACY = ("accuracy_score", "exact_match", "f1_score", "precision", "recall", "perplexity")
TIMING = ("avg", "max", "min", "p50", "p75", "p90", "p95", "p99", "p999")
DEFAULT_SUB_TYPES = {"accuracy": "accuracy_score", "latency": "avg", "throughput": "avg", "size_on_disk": "bytes"}
TIMED_NEW_TOKENS = 32  # latency and throughput: tokens generated per timed run, unless max_new_tokens says
ANSWER_SLACK = 8  # accuracy: tokens generated beyond the longest answer, so a longer reply is seen as wrong
RANKED = "olive-grove runs no search: every metric is reported, none ranks models"


class TimingConfig(Settings):
    """Olive's latency and throughput `metric_config`."""

    warmup_num: int = Field(10, ge=0, le=10_000, description="untimed runs first")
    repeat_test_num: int = Field(20, gt=0, le=10_000, description="timed runs")
    sleep_num: float = Field(0, ge=0, le=60, description="seconds between timed runs")


class SubMetric(Settings):
    name: str = Field(min_length=1)
    metric_config: dict[str, Any] | None = None
    priority: Any = no_effect(RANKED)
    higher_is_better: Any = no_effect(RANKED)
    goal: Any = no_effect(RANKED)


class MetricUserConfig(Settings):
    user_script: str | None = Field(None, description="the Python file metric_func is in")
    script_dir: str | None = Field(None, description="a folder user_script imports from")
    metric_func: str | None = Field(None, description="custom: metric_func(model_output, targets) -> number "
                                    "or {sub_type: number}; model_output.preds are the generated answers")  # fmt: skip
    metric_func_kwargs: dict[str, Any] = Field(default_factory=dict)
    evaluate_func: str | None = None
    evaluate_func_kwargs: Any = no_effect()
    inference_settings: Any = no_effect("ONNX models run on the execution provider they were built for")
    io_bind: Any = no_effect()
    shared_kv_buffer: Any = no_effect()
    run_kwargs: Any = no_effect("max_new_tokens on the metric sets how much is generated")

    @model_validator(mode="after")
    def _olive_handlers_only(self) -> MetricUserConfig:
        if self.evaluate_func:
            raise UserError("evaluate_func", "is handed an Olive model handler, which olive-grove has not",
                            "write metric_func(model_output, targets): it gets the generated answers and the "
                            "expected ones")  # fmt: skip
        return self


class Metric(Settings):
    name: str = Field(min_length=1)
    type: Literal["accuracy", "latency", "throughput", "size_on_disk", "custom"]
    sub_types: list[SubMetric] = Field(default_factory=list)
    data_config: str | DataConfig | None = Field(None, description="a data_configs name, or one in place")
    user_config: MetricUserConfig = Field(default_factory=MetricUserConfig)
    max_new_tokens: int | None = Field(None, gt=0, description="olive-grove: tokens generated per row; default: "
                                       f"the longest answer + {ANSWER_SLACK} (accuracy), {TIMED_NEW_TOKENS} "
                                       "(latency, throughput)")  # fmt: skip
    backend: Any = no_effect("answers are compared as text")
    sample_log_num: Any = no_effect(f"every answer is kept in the evaluation's {PREDICTIONS}")
    sample_log_dir: Any = no_effect(f"every answer is kept in the evaluation's {PREDICTIONS}")

    @model_validator(mode="after")
    def _check(self) -> Metric:
        if not self.sub_types and self.type in DEFAULT_SUB_TYPES:
            self.sub_types = [SubMetric(name=DEFAULT_SUB_TYPES[self.type])]
        allowed = {"accuracy": ACCURACY, "latency": TIMING, "throughput": TIMING, "size_on_disk": ("bytes",)}
        for sub in self.sub_types:
            if sub.name == "accuracy":
                sub.name = "accuracy_score"  # some Olive configs spell it so
        each_once([sub.name for sub in self.sub_types], "sub_types", "is an earlier sub type too", "list it once")
        for index, sub in enumerate(self.sub_types):
            if self.type in allowed and sub.name not in allowed[self.type]:
                raise UserError(f"sub_types[{index}].name", f"olive-grove does not measure {sub.name!r} for "
                                f"{self.type}", nearest(sub.name, allowed[self.type]))  # fmt: skip
            if sub.metric_config and self.type in ("latency", "throughput"):
                with _under(f"sub_types[{index}].metric_config"):
                    TimingConfig.model_validate(sub.metric_config)
            elif sub.metric_config:
                raise UserError(f"sub_types[{index}].metric_config", f"has no effect on {self.type} here",
                                "leave it out; answers are compared as text")  # fmt: skip
        if self.type == "custom" and not (self.sub_types and self.user_config.metric_func):
            raise UserError("user_config.metric_func", "a custom metric needs metric_func, user_script and the "
                            "names it returns as sub_types", "see Olive's custom metric")  # fmt: skip
        if self.type != "size_on_disk" and self.data_config is None:
            article = "an" if self.type[0] in "aeiou" else "a"
            raise UserError("data_config", f"is required: {article} {self.type} metric runs the model on rows",
                            "name one of data_configs")  # fmt: skip
        return self

    def timing(self) -> TimingConfig:
        """Olive reads the timing settings from any sub type's metric_config; the first one given."""
        given = next((s.metric_config for s in self.sub_types if s.metric_config), {})
        return TimingConfig.model_validate(given)

    def result_keys(self) -> list[str]:
        """Its results as Olive names them: `<metric>-<sub type>`."""
        return [f"{self.name}-{sub.name}" for sub in self.sub_types]


class EvaluatorSettings(Settings):
    """What both kinds share: Olive's type names, in any case (as pass types)."""

    @field_validator("type", mode="before", check_fields=False)
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        known = _known_type(value)
        if known is None:
            raise UserError("", f"unknown evaluator type {value!r}", nearest(str(value), EVALUATOR_TYPES))
        return known


class MetricsEvaluator(EvaluatorSettings):
    type: Literal["OliveEvaluator"] = "OliveEvaluator"
    metrics: list[Metric] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> MetricsEvaluator:
        each_once([m.name for m in self.metrics], "metrics", "names an earlier metric too",
                  "give each metric its own name")  # fmt: skip
        return self

    def data_names(self) -> list[str]:
        return [m.data_config for m in self.metrics if isinstance(m.data_config, str)]


class LMEvaluatorSettings(EvaluatorSettings):
    """Olive's LMEvaluator: lm-eval-harness tasks, scored through our own model runners (HF and ONNX)."""

    type: Literal["LMEvaluator"]
    tasks: list[str] = Field(min_length=1)
    include_path: str | None = Field(None, description="olive-grove: a folder of lm-eval task YAMLs (local tasks)")
    limit: int | float | None = Field(None, gt=0, description="rows per task: a count, or a fraction below 1")
    num_fewshot: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, gt=0, description="tokens per scored sequence; default: the model's")
    bootstrap_iters: int = Field(100000, ge=0)
    apply_chat_template: bool | str = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False
    batch_size: Any = no_effect("rows are scored one at a time")
    device: Any = no_effect("a model runs on the device it is for")
    model_class: Any = no_effect("olive-grove scores the run's models itself")
    execution_provider: Any = no_effect("ONNX models run on the execution provider they were built for")
    provider_options: Any = no_effect()
    model_args: Any = no_effect()
    sample_log_num: Any = no_effect()
    sample_log_dir: Any = no_effect()

    def data_names(self) -> list[str]:
        return []

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, limit: int | float | None) -> int | float | None:
        if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
            raise UserError("", f"is {limit}", "a count of rows, or a fraction below 1")
        return int(limit) if isinstance(limit, float) and limit >= 1 else limit

    @field_validator("apply_chat_template")
    @classmethod
    def _the_tokenizers_template(cls, value: bool | str) -> bool | str:
        if isinstance(value, str):
            raise UserError("", f"names a chat template ({value!r}); olive-grove applies the tokenizer's own",
                            "true or false")  # fmt: skip
        return value


EVALUATOR_TYPES = ("OliveEvaluator", "LMEvaluator")


def _known_type(given: Any) -> str | None:
    """An evaluator type as Olive spells it, whatever its case (None: neither)."""
    return next((t for t in EVALUATOR_TYPES if str(given).lower() == t.lower()), None)


def _evaluator_type(value: Any) -> str | None:
    """The type of an evaluator (raw or validated); a missing one is Olive's metrics evaluator."""
    given = value.get("type", EVALUATOR_TYPES[0]) if isinstance(value, dict) else getattr(value, "type", None)
    return _known_type(given)


Evaluator = Annotated[
    Union[Annotated[MetricsEvaluator, Tag("OliveEvaluator")], Annotated[LMEvaluatorSettings, Tag("LMEvaluator")]],  # noqa: UP007
    Discriminator(lambda v: _evaluator_type(v) or "OliveEvaluator"),  # an unknown type: said by its `type`
]


@contextlib.contextmanager
def _under(prefix: str):
    """A pydantic failure inside, as a UserError at its key under `prefix`."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{prefix}.{key}", first["msg"]) from None


class EvaluationSettings(Settings):
    """One evaluator, as its step sees it: the metrics' data with the files' fingerprints, the user scripts'
    fingerprints, and the hardware that timings come from (a timing cached on another machine is not this
    one's)."""

    name: str = Field(description="the evaluator's name, for the log")
    evaluator: Evaluator
    data: dict[str, DatasetSettings] = Field(default_factory=dict, description="each metric's data, by its index")
    scripts: dict[str, str] = Field(default_factory=dict, description="user_script fingerprints, by metric index")
    hardware: str | None = None

    def cache_view(self) -> dict[str, Any]:
        view = self.model_dump(mode="json", exclude={"name", "data"})
        return view | {"data": {k: v.cache_view() for k, v in self.data.items()}}


class EvaluationInfo(StepInfo):
    evaluator: str
    metrics: dict[str, float]
    predictions: str | None = Field(None, description=f"the answers, row by row ({PREDICTIONS})")

    def summary(self) -> str:
        return ", ".join(f"{key} {_shown(value)}" for key, value in self.metrics.items())


def _shown(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ModelOutput(NamedTuple):
    """What Olive hands a metric_func: `preds` (here the generated answers) and `logits` (here none)."""

    preds: list[str]
    logits: Any = None


def evaluate_model(
    settings: EvaluationSettings, files: StepFiles, report: Reporter, *, model: Artifact
) -> EvaluationInfo:
    """Every metric of one evaluator on one model."""
    if isinstance(settings.evaluator, LMEvaluatorSettings):
        from olive_grove.tasks.lm_harness import run_lm_eval

        results = run_lm_eval(settings.evaluator, open_runner(model))
        return EvaluationInfo(evaluator=settings.name, metrics=results)
    runner: Runner | None = None
    results, answers = {}, []
    for index, metric in enumerate(settings.evaluator.metrics):
        with located(f"metrics[{index}]"):
            if metric.type == "size_on_disk":
                results[metric.result_keys()[0]] = float(model_bytes(Path(model.path)))
                continue
            runner = runner or open_runner(model)
            with located("data_config"):
                rows = load_rows(settings.data[str(index)].data, files.downloads)
            measured, kept = _measure(metric, runner, rows, settings.data[str(index)].data)
        results |= {key: measured[key] for key in metric.result_keys()}  # in the order the config lists them
        answers += [{"metric": metric.name, **row} for row in kept]
    if answers:
        (files.out / PREDICTIONS).write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    shown = ", ".join(f"{k} {_shown(v)}" for k, v in results.items())
    report.log(f"{settings.name}: {shown}")
    return EvaluationInfo(evaluator=settings.name, metrics=results, predictions=PREDICTIONS if answers else None)


def model_bytes(folder: Path) -> int:
    """The model's files, without the stamps olive-grove keeps beside them (.olive-grove-*)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".olive-grove"))


def _measure(metric: Metric, runner: Runner, rows, data: DataConfig):
    """(results by key, rows to keep in predictions.jsonl) for one metric that runs the model on rows."""
    text = data.pre_process_data_config
    if metric.type in ("latency", "throughput"):
        with located("data_config"):
            pairs = sample_rows(rows, text, runner.tokenizer, answers=False)
        return _timed(metric, runner, [runner.encode(p) for p, _ in pairs]), []
    results, kept = {}, []
    wanted = {s.name for s in metric.sub_types}
    if "perplexity" in wanted:
        with located("data_config"):
            results[f"{metric.name}-perplexity"] = _perplexity(runner, rows, text)
    if metric.type == "custom" or wanted - {"perplexity"}:
        with located("data_config"):
            pairs = _answered(sample_rows(rows, text, runner.tokenizer, answers=True))
        expected = [answer for _, answer in pairs]
        generated = _answers(metric, runner, pairs)
        kept = [{"prompt": p, "expected": e, "answer": g} for (p, e), g in zip(pairs, generated)]
        if metric.type == "custom":
            results |= _custom(metric, generated, expected)
        else:
            results |= {f"{metric.name}-{name}": value for name, value in _compared(generated, expected).items()
                        if name in wanted}  # fmt: skip
    return results, kept


def _perplexity(runner: Runner, rows, text) -> float:
    """Perplexity of the labelled tokens of the rows, tokenized as training would (no held-out split)."""
    import datasets

    loss, scored = scored_tokens(datasets.Dataset.from_dict(row_samples(rows, text, runner.tokenizer)), runner)
    if not scored:
        raise UserError("pre_process_data_config", "leaves no labelled token to score perplexity on",
                        "rows with text (with train_on_inputs false, an answer after the prompt)")  # fmt: skip
    return perplexity(loss)


def _answered(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rows, each with an answer to compare with: an empty one would count any empty reply right."""
    empty = [index for index, (_, answer) in enumerate(pairs) if not answer]
    if empty:
        raise UserError("", f"{len(empty)} of the {len(pairs)} rows evaluated on have an empty answer (the first "
                        f"is row {empty[0]})", "leave them out of the data, or fill in their answers")  # fmt: skip
    return pairs


def _answers(metric: Metric, runner: Runner, pairs: list[tuple[str, str]]) -> list[str]:
    """The model's greedy reply to each prompt, cut to as many lines as the expected answer has."""
    longest = max((len(runner.encode(answer)) for _, answer in pairs), default=1)
    budget = _fits(metric.max_new_tokens, runner) or longest + ANSWER_SLACK
    replies = []
    for prompt, answer in pairs:
        reply = runner.decode(runner.generate(runner.encode(prompt), budget))
        replies.append("\n".join(reply.strip().split("\n")[: answer.strip().count("\n") + 1]))
    return replies


def _fits(max_new_tokens: int | None, runner: Runner) -> int | None:
    """max_new_tokens, if the model's context holds that many new tokens."""
    context = runner.context_length
    if max_new_tokens and context and max_new_tokens >= context:
        raise UserError("max_new_tokens", f"is {max_new_tokens}, and the model holds {context} tokens in all",
                        f"fewer than {context}, leaving room for the prompt")  # fmt: skip
    return max_new_tokens


def normalized(text: str) -> str:
    """Olive's exact_match: case and runs of white space do not count."""
    return " ".join(text.strip().lower().split())


def _matches(reply: str, expected: str) -> bool:
    return any(normalized(reply) == normalized(option) for option in expected.split("|"))


def _label(expected: str) -> str:
    """An expected answer as a class: its options (`a|b`), normalized and in order."""
    return "|".join(sorted({normalized(option) for option in expected.split("|")}))


def _compared(replies: list[str], expected: list[str]) -> dict[str, float]:
    """Accuracy of the replies, and precision, recall and F1 averaged over the expected answers as classes.
    A reply that matches its own row's answer gives that row's class, else the first class it matches."""
    right = [_matches(r, e) for r, e in zip(replies, expected)]
    scores = {"accuracy_score": sum(right) / len(right), "exact_match": sum(right) / len(right)}
    actual = [_label(e) for e in expected]
    classes = sorted(set(actual))
    chosen = [own if hit else next((c for c in classes if _matches(r, c)), None)
              for r, own, hit in zip(replies, actual, right)]  # fmt: skip
    precision, recall = [], []
    for label in classes:
        predicted = [c == label for c in chosen]
        actual_here = [a == label for a in actual]
        hits = sum(p and a for p, a in zip(predicted, actual_here))
        precision.append(hits / sum(predicted) if any(predicted) else 0.0)
        recall.append(hits / sum(actual_here))
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    return scores | {"precision": statistics.fmean(precision), "recall": statistics.fmean(recall),
                     "f1_score": statistics.fmean(f1)}  # fmt: skip


def _timed(metric: Metric, runner: Runner, prompts: list[list[int]]) -> dict[str, float]:
    """Latency in milliseconds per run (the prompt and max_new_tokens generated tokens), or throughput in
    generated tokens per second; runs go round the rows."""
    timing, budget = metric.timing(), _fits(metric.max_new_tokens, runner) or TIMED_NEW_TOKENS
    for i in range(timing.warmup_num):
        runner.timed_generate(prompts[i % len(prompts)], budget)
    runs = []
    for i in range(timing.repeat_test_num):
        runs.append(runner.timed_generate(prompts[i % len(prompts)], budget))
        time.sleep(timing.sleep_num)
    values = [s * 1000 for s, _ in runs] if metric.type == "latency" else [n / s for s, n in runs]
    return {f"{metric.name}-{sub.name}": _statistic(values, sub.name) for sub in metric.sub_types}


def _statistic(values: list[float], name: str) -> float:
    import numpy as np

    if name in ("avg", "max", "min"):
        return float({"avg": np.mean, "max": np.max, "min": np.min}[name](values))
    return float(np.percentile(values, float(name[1:]) / (10 if name == "p999" else 1)))


def _custom(metric: Metric, replies: list[str], expected: list[str]) -> dict[str, float]:
    config = metric.user_config
    function = load_user_function(config.user_script, config.metric_func, config.script_dir)
    try:
        value = function(ModelOutput(preds=replies), expected, **config.metric_func_kwargs)
    except (Exception, SystemExit) as exc:  # the user's own code: its failure is theirs, said in one line
        raise UserError("user_config.metric_func", f"{config.metric_func} raised {type(exc).__name__}: "
                        f"{first_line(exc, 200)}", f"fix it in {config.user_script}") from None  # fmt: skip
    names = [s.name for s in metric.sub_types]
    if not isinstance(value, dict) and _number(value) is not None and len(names) == 1:
        value = {names[0]: value}
    if not isinstance(value, dict):
        raise UserError("user_config.metric_func", f"returned {type(value).__name__}",
                        "a number (one sub type) or a dict of numbers by sub type name")  # fmt: skip
    results = {}
    for index, name in enumerate(names):
        number = _number(value.get(name))
        if number is None:
            got = repr(value[name]) if name in value else f"nothing; it returned {', '.join(map(str, value)) or 'none'}"
            raise UserError(f"sub_types[{index}].name", f"{config.metric_func} returned no finite number "
                            f"'{name}' ({got[:80]})", "return a number for each sub type")  # fmt: skip
        results[f"{metric.name}-{name}"] = number
    return results


def _number(value: Any) -> float | None:
    """A metric value as a float: any finite number (a numpy or torch scalar too), not a bool or text."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    try:
        number = float(value)
    except Exception:  # the user's object: a failing __float__, an int too large for a float
        return None
    return number if math.isfinite(number) else None


def load_user_function(script: str | None, name: str | None, script_dir: str | None):
    """The function `name` of the Python file `script` (folders in `script_dir` importable from it)."""
    if not script or not Path(script).is_file():
        raise UserError("user_config.user_script", f"no Python file at {script}" if script else "is required",
                        "the file that defines metric_func")  # fmt: skip
    if script_dir and script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    if script_dir:  # its modules afresh, as a new process would import them (a worker runs many evaluations)
        inside = os.path.join(os.path.abspath(script_dir), "")  # as the import system names files found there
        for module, loaded in list(sys.modules.items()):
            if (getattr(loaded, "__file__", None) or "").startswith(inside):
                del sys.modules[module]
    spec = importlib.util.spec_from_file_location(f"olive_grove_user_{Path(script).stem}", script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        raise UserError("user_config.user_script", f"{script} fails to import: {type(exc).__name__}: "
                        f"{first_line(exc, 200)}") from None  # fmt: skip
    function = getattr(module, name or "", None)
    if not callable(function):
        found = [n for n in vars(module) if callable(vars(module)[n]) and not n.startswith("_")]
        raise UserError("user_config.metric_func", f"{script} has no function {name!r}", nearest(name or "", found))
    return function
