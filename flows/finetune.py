"""The `finetune` flow: the only place that knows the order of steps. It walks the config's passes in order,
calling the step the pass table names for each, and hands every step the Artifacts of the ones before it."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run
from prefect.states import Failed

from olive_grove.flows.config import RunConfig
from olive_grove.flows.evaluation import evaluation_settings
from olive_grove.flows.preflight import check_before_work
from olive_grove.flows.report import StepRecord, publish_outputs, write_report
from olive_grove.flows.run_setup import RunOptions, credentials_for, deployed_run_folder, step_context
from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.data import fingerprint_data
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.evaluators import Evaluator
from olive_grove.tasks.files import hash_files
from olive_grove.tasks.passes import EVALUATE_MODEL, MEASURE_MODEL, PASS_TYPES, PREPARE_DATASET, Step
from olive_grove.tasks.quality import QualitySettings
from olive_grove.tasks.quiet import quiet_library_defaults
from olive_grove.tasks.runners import NOT_A_MODEL, why_not_runnable
from olive_grove.tasks.step_cache import StepContext
from olive_grove.tasks.steps import configured, fingerprint_base_model, model_fingerprint

# Olive's log_severity_level, 0 (verbose) to 4 (fatal), as Python's levels.
LOG_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class StepRunner:
    """Calls steps for one run: records what each did and whether it came from the cache, and moves a
    user mistake a step finds to the config key it is about."""

    def __init__(self, cfg: RunConfig, ctx: StepContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.record: list[StepRecord] = []
        self.not_measured: dict[str, str] = {}  # models this machine cannot run, and why

    def cannot_run(self, label: str, pass_name: str | None, artifact: Artifact) -> bool:
        """Whether a model of the run cannot be measured here; an unrunnable model is noted for the report,
        and so is an adapter with an evaluator that no later pass merges (a LoRA-only run)."""
        why = why_not_runnable(artifact)
        if why == NOT_A_MODEL and pass_name and self.cfg.evaluator_of(pass_name) and not self._model_after(pass_name):
            why = f"an adapter, which is evaluated merged: add a merge pass after {pass_name} to evaluate it"
        if why and why != NOT_A_MODEL:
            self.not_measured[label] = why
            get_run_logger().info("%s: not measured here: %s", label, why)
        return why is not None

    def _model_after(self, pass_name: str) -> bool:
        names = list(self.cfg.passes)
        return any(PASS_TYPES[self.cfg.passes[n].type].gives != "adapter" for n in names[names.index(pass_name) + 1 :])

    def run(self, step: Step, settings: Any, label: str, where: dict[str, str], **inputs: Artifact | None) -> Artifact:
        """Run a cached step; `where` maps the start of an error's key to its section of the config."""
        task = configured(step, self.ctx).with_options(task_run_name=lambda: label)
        return self._call(task, label, where, settings=settings, inputs=inputs, ctx=self.ctx)

    def fingerprint(self) -> Artifact:
        """The base model's fingerprint. A local folder's comes from the hash memo (file sizes and times), so
        it is taken here, without a task run; a model that must be fetched is a task, with retries."""
        source, where = self.cfg.model_source(), {"": "input_model.model_path"}
        if source.kind != "local":
            task = fingerprint_base_model.with_options(
                retries=self.ctx.retries, retry_delay_seconds=self.ctx.retry_delay_seconds, task_run_name="input_model"
            )
            return self._call(task, "input_model", where, source=source, ctx=self.ctx)
        artifact = self._record("input_model", fingerprint_base_model.name, where,
                                lambda: (model_fingerprint(source, self.ctx), False))  # fmt: skip
        get_run_logger().info("input_model: %s (fingerprint %s)", artifact.path, artifact.fingerprint[:12])
        return artifact

    def _call(self, task, label: str, where: dict[str, str], **kwargs: Any) -> Artifact:
        def run() -> tuple[Artifact, bool]:
            state = task(**kwargs, return_state=True)
            return state.result(), state.name == "Cached"

        artifact = self._record(label, task.name, where, run)
        if self.record[-1].cached:
            get_run_logger().info("%s: reused from cache (%s)", label, Path(artifact.path).name)
        return artifact

    def _record(self, label: str, task: str, where: dict[str, str], compute) -> Artifact:
        """Compute a step's Artifact (and whether it came from the cache), timed and recorded for the report;
        a user mistake it finds is moved to the config key it is about."""
        started = time.perf_counter()
        try:
            artifact, cached = compute()
        except UserError as exc:
            raise self.cfg.user_error(_relocated(exc, where)) from None
        where_now = artifact.located(Path(self.ctx.cache_dir))  # the report names files where they are
        self.record.append(StepRecord(step=label, task=task, cached=cached,
                                      seconds=round(time.perf_counter() - started, 2), artifact=where_now))  # fmt: skip
        return artifact


def _relocated(error: UserError, where: dict[str, str]) -> UserError:
    """The error under the section its key's longest `where` prefix maps to (the whole key or up to a `.`)."""
    for prefix in sorted(where, key=len, reverse=True):
        if prefix and (error.where == prefix or error.where.startswith((f"{prefix}.", f"{prefix}["))):
            return type(error)(error.where[len(prefix) :].lstrip("."), error.problem, error.hint).under(where[prefix])
    return error.under(where[""])


def run_passes(cfg: RunConfig, ctx: StepContext) -> tuple[dict[str, Artifact], StepRunner]:
    """One step per pass, in the config's order (plus the dataset steps a pass asks for), then the steps
    that measure the models; returns the outputs by their folder in engine.output_dir, and the runner that
    recorded every step."""
    steps = StepRunner(cfg, ctx)
    given = input_adapter(cfg)
    adapters: dict[str, Artifact] = {Path(cfg.input_model.adapter_path).name: given} if given else {}
    upstream: dict[str, Any] = {"model": steps.fingerprint(), "onnx": None}
    data_configs = {d.name: d for d in cfg.data_configs}
    used = {n for settings in cfg.passes.values() for n in settings.data_config_names().values()}
    fingerprints = {name: fingerprint_data(data_configs[name]) for name in used}
    folders = cfg.output_folders()
    outputs: dict[str, Artifact] = {}
    base, held_out = upstream["model"], None  # the first trained adapter with eval samples: what quality uses
    for name, settings in cfg.passes.items():
        entry = PASS_TYPES[settings.type]
        upstream.update(adapter=next(iter(adapters.values()), None), adapters=dict(adapters))
        inputs = {key: upstream[key] for key in entry.takes}
        for arg, dataset in settings.datasets(data_configs, fingerprints).items():
            where = {"data": cfg.data_where(dataset.data.name), "": f"passes.{name}"}
            label = f"{name}/{arg.replace('_', '-')}"
            inputs[arg] = steps.run(PREPARE_DATASET, dataset, label, where, model=upstream["model"])
        artifact = steps.run(entry.step, settings, name, {"": f"passes.{name}"}, **inputs)
        if entry.gives == "adapter":
            adapters[name] = artifact
            if held_out is None and isinstance(artifact.info, AdapterInfo) and artifact.info.eval_samples:
                held_out = artifact
        else:
            upstream[entry.gives] = artifact
        if entry.gives == "model":  # the adapter is in the model now
            adapters = {}
        outputs[folders[name]] = artifact
    models = {"base": (None, base)} | {folders[name]: (name, outputs[folders[name]]) for name in cfg.passes}
    runnable = {label: made for label, made in models.items() if not steps.cannot_run(label, *made)}
    if held_out is not None:
        measure_quality(steps, {label: artifact for label, (_, artifact) in runnable.items()}, held_out)
    outputs |= evaluate(steps, runnable)
    return outputs, steps


def measure_quality(steps: StepRunner, models: dict[str, Artifact], held_out: Artifact) -> None:
    """The held-out loss of the base model and of each model the run made (merged, ONNX), on the trained
    adapter's eval samples: one cached step each."""
    for label, artifact in models.items():
        steps.run(MEASURE_MODEL, QualitySettings(), f"quality/{label}", {"": "engine"}, model=artifact,
                  samples=held_out)  # fmt: skip


def evaluate(steps: StepRunner, models: dict[str, tuple[str | None, Artifact]]) -> dict[str, Artifact]:
    """Each model's evaluator (its pass's own, else the engine's; the base model's is the engine's, unless
    engine.evaluate_input_model is false): one cached step per evaluator and model. Returns the answers
    each gave, by their folder in engine.output_dir (`evaluation/<evaluator>/<model>/`)."""
    cfg, answers, prepared = steps.cfg, {}, {}
    for label, (pass_name, artifact) in models.items():
        chosen = cfg.evaluator_of(pass_name)
        if chosen is None or (pass_name is None and not cfg.engine.evaluate_input_model):
            continue
        name, evaluator = chosen
        if name not in prepared:  # its data and scripts are fingerprinted once, whatever the models it evaluates
            prepared[name] = (evaluation_settings(cfg, name, evaluator), _evaluator_sections(cfg, name, evaluator))
        settings, where = prepared[name]
        done = steps.run(EVALUATE_MODEL, settings, f"evaluate/{name}/{label}", where, model=artifact)
        if done.info.predictions:
            answers[f"evaluation/{name}/{label}"] = done
    return answers


def _evaluator_sections(cfg: RunConfig, name: str, evaluator: Evaluator) -> dict[str, str]:
    """Where an evaluation step's mistakes go: the evaluator's key, and for a metric's named data config,
    that data config's."""
    return {"": cfg.evaluator_key(name)} | {
        f"metrics[{index}].data_config": cfg.data_where(metric.data_config)
        for index, metric in enumerate(getattr(evaluator, "metrics", []))
        if isinstance(metric.data_config, str)
    }


def input_adapter(cfg: RunConfig) -> Artifact[AdapterInfo] | None:
    """The trained adapter `input_model.adapter_path` names, for a merge or build without training."""
    path = cfg.input_model.adapter_path
    return Artifact(path=path, fingerprint=hash_files(Path(path)), info=AdapterInfo()) if path else None


@contextlib.contextmanager
def log_level(olive_level: int) -> Iterator[None]:
    """The run log at the level `engine.log_severity_level` asks for, for this run."""
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(LOG_LEVELS[olive_level])
    try:
        yield
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)


@flow(name="finetune")
def finetune(
    config: dict[str, Any] | str,
    max_steps: int = 0,
    learning_rate: float = 0.0,
    output_dir: str = "",
    passes: tuple[str, ...] = (),
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Fine-tune as an Olive config says: data, adapter, merge, ONNX; every step cached by content.

    Args:
        config: The Olive run config: the config itself (an object), whose relative paths are read from
            the worker's folder, or the path of a JSON or YAML file on the worker's machine.
        max_steps: Optimizer steps of every training pass; 0 keeps the config's.
        learning_rate: Learning rate of every training pass; 0 keeps the config's.
        output_dir: Where the outputs go, instead of engine.output_dir. Left empty, a run started from a
            deployment writes to a folder of its own, engine.output_dir/runs/RUN-NAME.
        passes: Stop early: run only the config's first passes, named here (e.g. just the LoRA pass).
        overrides: More settings, as KEY=VALUE, as `grove run --set` takes them.
    """
    quiet_library_defaults()  # a deployment's worker enters here, not through the CLI
    one_line_user_errors()
    logger = get_run_logger()
    try:
        options = RunOptions.from_form(max_steps=max_steps, learning_rate=learning_rate, output_dir=output_dir,
                                       passes=passes, overrides=overrides)  # fmt: skip
        return _finetune(config, options, logger)
    except UserError as exc:
        # A mistake in the config or its inputs: the run fails with the one line as its state message.
        logger.error(exc.line())
        # The run page shows the state message on one line: several mistakes are joined, each still whole.
        one_line = "; ".join(exc.line().splitlines())
        return Failed(message=f"{one_line} [on {socket.gethostname()}]", data=exc)


def _finetune(config: str | dict[str, Any], options: RunOptions, logger) -> dict[str, Any]:
    started = time.perf_counter()
    cfg, notes = options.load(config)
    if deployment.id:  # from the UI, a schedule or grove submit
        cfg.engine.output_dir = deployed_run_folder(cfg, options, flow_run.name, flow_run.id)
    with log_level(cfg.engine.log_severity_level), credentials_for(cfg, logger.info):
        for note in notes:
            logger.info(note)
        ctx = step_context(cfg)
        check_before_work(cfg, ctx)
        outputs, steps = run_passes(cfg, ctx)
        output_dir = cfg.engine.output_dir
        published = publish_outputs(outputs, output_dir, Path(ctx.cache_dir))
        report = write_report(cfg, steps, published, output_dir, time.perf_counter() - started)
        logger.info("outputs in %s", output_dir)
    return report


class _WithoutUserErrorTracebacks(logging.Filter):
    """A user mistake a step finds is reported once, as one line, by the flow; a bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def one_line_user_errors() -> None:
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutUserErrorTracebacks) for f in logger.filters):
            logger.addFilter(_WithoutUserErrorTracebacks())
