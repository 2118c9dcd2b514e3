"""The `finetune` flow: the only place that knows the order of steps. It walks the config's passes in order."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import State
from pydantic import BaseModel, Field

from olive_grove.blocks.azure import AZURE_STORAGE_BLOCK, use_azure_storage
from olive_grove.blocks.hub import HF_TOKEN_BLOCK, use_hf_token
from olive_grove.flows.config import RunConfig, load_run_config
from olive_grove.flows.preflight import check_before_work, execution_provider
from olive_grove.flows.quiet import quiet_libraries
from olive_grove.flows.report import publish_outputs, write_report
from olive_grove.tasks import steps
from olive_grove.tasks.adapters import LoRASettings
from olive_grove.tasks.artifact import Artifact, hash_files
from olive_grove.tasks.caching import StepContext
from olive_grove.tasks.data import fingerprint_data
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.merge import MergeSettings
from olive_grove.tasks.onnx_build import ModelBuilderSettings
from olive_grove.tasks.shared_cache import SharedCache, local_copy_of
from olive_grove.tasks.storage import is_url


def _run(task, record: list[dict[str, Any]], label: str, **kwargs: Any) -> Artifact:
    """Run a task, note whether it came from the cache, and return its Artifact."""
    started = time.perf_counter()
    ctx: StepContext = kwargs["ctx"]
    key, shared = steps.cache_key(task, kwargs), ctx.shared()
    if key and shared:
        shared.fetch_record(key)  # another machine's result becomes this run's cache hit
    step = steps.configure_step(task, ctx)
    state: State = step(**kwargs, return_state=True)
    artifact: Artifact = state.result()
    cached = state.name == "Cached"
    if cached and not Path(artifact.path).is_dir():
        # The record outlived its files' old place: the cache moved, the record came from another machine
        # through the shared cache, or the files were deleted.
        here = ctx.folder(task.name, artifact.fingerprint).final
        if here.is_dir() or (shared and shared.fetch_folder(task.name, artifact.fingerprint, here)):
            artifact = artifact.model_copy(update={"path": str(here)})
        else:
            artifact, cached = step.with_options(refresh_cache=True)(**kwargs), False
    if key and shared:
        _share(shared, task.name, artifact, label)
    record.append(
        {
            "step": label,
            "task": task.name,
            "cached": cached,
            "seconds": round(time.perf_counter() - started, 2),
            "path": artifact.path,
            "metadata": artifact.metadata,
        }
    )
    if cached:
        get_run_logger().info("%s: reused from cache (%s)", label, Path(artifact.path).name)
    return artifact


def _share(shared: SharedCache, step: str, artifact: Artifact, label: str) -> None:
    """Upload a finished step to the shared cache; failing to share costs other machines a recompute, not
    this run its result."""
    try:
        if shared.share(step, artifact.fingerprint, Path(artifact.path)):
            get_run_logger().info("%s: shared through %s", label, shared.remote.url)
    except UserError as exc:
        get_run_logger().warning("%s: not shared: %s", label, exc.line())


def _prepare(record, label: str, cfg: RunConfig, data_name: str, model: Artifact, split, seed, ctx) -> Artifact:
    data_config, where = cfg.data_config(data_name)
    return _run(
        steps.prepare_dataset_task,
        record,
        label,
        config=data_config,
        where=where,
        model=model,
        eval_dataset_size=split,
        seed=seed if split else None,  # it only seeds the split
        data_fingerprint=fingerprint_data(data_config),
        ctx=ctx,
    )


def run_passes(cfg: RunConfig, ctx: StepContext) -> tuple[dict[str, Artifact], list[dict[str, Any]]]:
    """Call one task per pass, in the config's order; returns the final outputs and a record per step."""
    record: list[dict[str, Any]] = []
    source = cfg.model_source()
    trust = source.trust_remote_code
    model = _run(steps.fingerprint_base_model, record, "input_model", source=source, ctx=ctx)
    outputs: dict[str, Artifact] = {}
    adapter = None
    if cfg.input_model.adapter_path:
        adapter = Artifact(
            kind="adapter",
            path=cfg.input_model.adapter_path,
            fingerprint=hash_files(Path(cfg.input_model.adapter_path)),
        )
    for name, settings in cfg.passes.items():
        if isinstance(settings, LoRASettings):
            # Like Olive: an eval_data_config takes precedence over holding out eval_dataset_size.
            split = None if settings.eval_data_config else settings.eval_dataset_size
            dataset = _prepare(record, f"{name}/dataset", cfg, settings.train_data_config, model, split,
                               settings.seed, ctx)  # fmt: skip
            eval_dataset = None
            if settings.eval_data_config:
                eval_dataset = _prepare(record, f"{name}/eval-dataset", cfg, settings.eval_data_config, model,
                                        None, settings.seed, ctx)  # fmt: skip
            adapter = _run(
                steps.train_adapter_task,
                record,
                name,
                settings=settings,
                model=model,
                dataset=dataset,
                eval_dataset=eval_dataset,
                trust_remote_code=trust,
                ctx=ctx,
            )
            outputs["adapter"] = adapter
        elif isinstance(settings, MergeSettings):
            model = _run(
                steps.merge_adapter_task,
                record,
                name,
                settings=settings,
                model=model,
                adapter=adapter,
                trust_remote_code=trust,
                ctx=ctx,
            )
            outputs["merged"], adapter = model, None
        elif isinstance(settings, ModelBuilderSettings):
            provider = execution_provider(cfg, settings)
            onnx = _run(
                steps.build_onnx_model_task,
                record,
                name,
                settings=settings,
                model=model,
                execution_provider=provider,
                ctx=ctx,
            )
            outputs[f"onnx/{settings.precision}-{provider}"] = onnx
    return outputs, record


def use_credentials(cfg: RunConfig, log: Callable[..., None]) -> None:
    """Hand the credentials in Prefect blocks to the libraries that need them (through their own variables)."""
    if any(system.hf_token for system in cfg.systems.values()):
        if use_hf_token():
            log("hub downloads use the token in Secret block '%s'", HF_TOKEN_BLOCK)
        else:
            log("no Secret block '%s': hub downloads use HF_TOKEN or your Hugging Face login", HF_TOKEN_BLOCK)
    if cfg.uses_azure_storage() and use_azure_storage():
        log("Azure Storage is reached with the credentials in block '%s'", AZURE_STORAGE_BLOCK)


def step_context(cfg: RunConfig) -> StepContext:
    """Steps work in a local cache folder; a cache_dir URL is shared through this machine's copy of it."""
    cache_dir, shared_url = cfg.engine.cache_dir, None
    if is_url(cache_dir):
        cache_dir, shared_url = str(local_copy_of(cache_dir)), cache_dir
    return StepContext(
        cache_dir=cache_dir,
        shared_url=shared_url,
        retries=cfg.engine.retries,
        retry_delay_seconds=cfg.engine.retry_delay_seconds,
    )


class RunOptions(BaseModel):
    """What a run may change without editing the config; the Prefect UI shows these as a form."""

    max_steps: int | None = Field(None, gt=0, description="optimizer steps of every training pass")
    learning_rate: float | None = Field(None, gt=0, description="learning rate of every training pass")
    output_dir: str | None = Field(None, description="where outputs go instead of engine.output_dir")
    passes: list[str] | None = Field(
        None, description="stop early: run only the config's first passes, named here (e.g. just the LoRA pass)"
    )
    overrides: list[str] = Field(default_factory=list, description="more KEY=VALUE settings, as grove --set")

    def load(self, config: str) -> tuple[RunConfig, list[str]]:
        training = {"max_steps": self.max_steps, "learning_rate": self.learning_rate}
        training = {k: v for k, v in training.items() if v is not None}
        return load_run_config(config, self.overrides, self.passes, training, self.output_dir)


@flow(name="finetune")
def finetune(config: str, options: RunOptions | None = None) -> dict[str, Any]:
    """Fine-tune as an Olive config says: data, adapter, merge, ONNX; every step cached by content.

    `config` is the path of an Olive run config (JSON or YAML) on the machine that runs the flow.
    """
    quiet_libraries()  # a deployment's worker enters here, not through the CLI
    logger = get_run_logger()
    started = time.perf_counter()
    cfg, notes = (options or RunOptions()).load(config)
    for note in notes:
        logger.info(note)
    use_credentials(cfg, logger.info)
    check_before_work(cfg)
    ctx = step_context(cfg)
    outputs, record = run_passes(cfg, ctx)
    output_dir = cfg.engine.output_dir
    published = publish_outputs(outputs, output_dir)
    report = write_report(cfg, record, published, output_dir, time.perf_counter() - started)
    logger.info("outputs in %s", output_dir)
    return report
