"""The Prefect tasks: thin wrappers that add caching, retries, logging and progress to the plain steps."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.transactions import IsolationLevel, get_transaction

from olive_grove.tasks import adapters, data, data_parallel, merge, onnx_build
from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.caching import LiveHolderLockManager, StepContext, step_key
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import ModelSource, linear_module_names, resolve_model

# Bump a step's version when its code changes what it produces: old cache entries then miss.
CODE_VERSIONS = {"prepare_dataset": "2", "train_adapter": "8", "merge_adapter": "3", "build_onnx_model": "1"}


class StepCachePolicy(CachePolicy):
    """Prefect cache key = our content key, so a hit means same code, settings, inputs and libraries."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters, **kwargs) -> str:
        return cache_key(task_ctx.task, inputs)


STEP_CACHE = StepCachePolicy()


def cache_key(step: Task, inputs: dict[str, Any]) -> str | None:
    """The key a cached step's result is kept under (None for steps that are never cached)."""
    return step_key(step.name, CODE_VERSIONS[step.name], inputs) if step.name in CODE_VERSIONS else None


def configure_step(step: Task, ctx: StepContext) -> Task:
    """Give a step this run's retries, and keep its Prefect cache records in the run's cache folder.

    Two runs that need the same step wait for each other (a file lock per cache key) and the second
    reuses the first's result.
    """
    retrying = step.with_options(
        retries=ctx.retries, retry_delay_seconds=ctx.retry_delay_seconds, retry_condition_fn=_is_transient
    )
    if step.cache_policy is not STEP_CACHE:
        return retrying
    cache = Path(ctx.cache_dir)
    policy = STEP_CACHE.configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=LiveHolderLockManager(lock_files_directory=cache / "locks"),
    )
    return retrying.with_options(cache_policy=policy, result_storage=cache / "results")


def _is_transient(task: Task, task_run, state) -> bool:
    """Retry what may pass on a second try; a user mistake fails the same way every time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


def _current_key() -> str:
    """This step's cache key, as StepCachePolicy computed it for the run's transaction: it names the folder."""
    return get_transaction().key


def _timed(artifact_kind: str, path: Path, key: str, started: float, metadata: dict[str, Any]) -> Artifact:
    metadata = {**metadata, "seconds": round(time.perf_counter() - started, 2)}
    return Artifact(kind=artifact_kind, path=str(path), fingerprint=key, metadata=metadata)


@task(name="fingerprint_base_model")
def fingerprint_base_model(source: ModelSource, ctx: StepContext) -> Artifact:
    """Never cached: its whole job is to notice that the base model changed."""
    return resolve_model(source, memo=Path(ctx.cache_dir) / "file-hashes.json")


@task(name="prepare_dataset", cache_policy=STEP_CACHE, persist_result=True)
def prepare_dataset_task(
    config: data.DataConfig,
    where: str,
    model: Artifact,
    eval_dataset_size: float | None,
    seed: int | None,
    data_fingerprint: str,
    ctx: StepContext,
) -> Artifact:
    started = time.perf_counter()
    key = _current_key()
    folder = ctx.folder("prepare_dataset", key)
    staged = folder.staging()
    stats = data.prepare_dataset(config, where, model.path, eval_dataset_size, seed, staged)
    get_run_logger().info("dataset %s: %d rows -> %s samples", config.name, stats["rows"], stats["samples"])
    return _timed("dataset", folder.publish(staged), key, started, stats)


@task(name="train_adapter", cache_policy=STEP_CACHE, persist_result=True)
def train_adapter_task(
    settings: adapters.LoRASettings,
    model: Artifact,
    dataset: Artifact,
    eval_dataset: Artifact | None,
    trust_remote_code: bool,
    ctx: StepContext,
) -> Artifact:
    """Train on the dataset's train split; evaluate on `eval_dataset` (Olive's eval_data_config) or else on
    the dataset's own held-out split, if it has one."""
    started = time.perf_counter()
    logger = get_run_logger()
    key = _current_key()
    folder = ctx.folder("train_adapter", key)
    progress_id = create_progress_artifact(progress=0.0, description="adapter training: percent of steps")

    def on_progress(step: int, total: int, loss: float | None) -> None:
        update_progress_artifact(progress_id, progress=100.0 * step / max(total, 1))
        if loss is not None and step % 10 == 0:
            logger.info("step %d/%d loss %.4f", step, total, loss)

    if settings.target_modules:  # checked before the run for local and hub models; others are here now
        adapters.check_target_modules(settings, linear_module_names(model.path, trust_remote_code))
    eval_dir = Path(eval_dataset.path) / "train" if eval_dataset else Path(dataset.path) / "eval"
    eval_dir = eval_dir if eval_dir.exists() else None
    staged = folder.staging()
    metrics = data_parallel.train(
        settings,
        model.path,
        Path(dataset.path),
        folder.work / "checkpoints",
        staged,
        trust_remote_code=trust_remote_code,
        on_progress=on_progress,
        log=logger.info,
        eval_dir=eval_dir,
    )
    logger.info(
        "adapter trained: train loss %.4f%s",
        metrics.get("train_loss", math.nan),  # a NaN loss is left out of the metrics
        f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "",
    )
    metrics["base_model"] = model.path
    metrics["eval_samples"] = str(eval_dir) if eval_dir else None
    metrics["dtype"] = settings.compute_dtype if isinstance(settings, adapters.QLoRASettings) else settings.torch_dtype
    return _timed("adapter", folder.publish(staged), key, started, metrics)


@task(name="merge_adapter", cache_policy=STEP_CACHE, persist_result=True)
def merge_adapter_task(
    settings: merge.MergeSettings,
    model: Artifact,
    adapter: Artifact,
    trust_remote_code: bool,
    ctx: StepContext,
) -> Artifact:
    started = time.perf_counter()
    key = _current_key()
    folder = ctx.folder("merge_adapter", key)
    staged = folder.staging()
    dtype = settings.torch_dtype or adapter.metadata.get("dtype", "float32")
    eval_samples = adapter.metadata.get("eval_samples")
    stats = merge.merge_adapter(
        model.path, adapter.path, dtype, staged, trust_remote_code, Path(eval_samples) if eval_samples else None
    )
    if "eval_loss" in adapter.metadata:
        stats["adapter_heldout_loss"] = adapter.metadata["eval_loss"]
    get_run_logger().info("merged adapter into %s (%s)", Path(model.path).name, dtype)
    return _timed("model", folder.publish(staged), key, started, stats)


@task(name="build_onnx_model", cache_policy=STEP_CACHE, persist_result=True)
def build_onnx_model_task(
    settings: onnx_build.ModelBuilderSettings, model: Artifact, execution_provider: str, ctx: StepContext
) -> Artifact:
    started = time.perf_counter()
    key = _current_key()
    folder = ctx.folder("build_onnx_model", key)
    staged = folder.staging()
    stats = onnx_build.build_onnx_model(settings, model.path, execution_provider, staged, folder.work)
    get_run_logger().info("built %s ONNX model for %s", settings.precision, execution_provider)
    return _timed("onnx", folder.publish(staged), key, started, stats)
