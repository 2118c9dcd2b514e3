"""The Prefect tasks: one thin wrapper gives every plain step caching, retries, logging and progress."""

from __future__ import annotations

import errno
import functools
import re
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.transactions import get_transaction

from olive_grove.tasks.artifact import Artifact, Reporter, StepFiles, TrainingProgress
from olive_grove.tasks.caching import STEP_CACHE, cache_options
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import ModelInfo, ModelSource, resolve_model
from olive_grove.tasks.passes import Step
from olive_grove.tasks.quiet import quiet_libraries
from olive_grove.tasks.step_cache import StepContext


class RunLogReporter(Reporter):
    """A step's messages go to its Prefect run log; training progress to a progress artifact named after the
    pass (`training-<pass>`), whose description is the latest step, losses and time left."""

    def __init__(self) -> None:
        self.logger = get_run_logger()
        self.progress_id: Any = None

    def log(self, message: str) -> None:
        self.logger.info(message)

    def progress(self, update: TrainingProgress) -> None:
        description = f"adapter training: {update.line()}"
        if self.progress_id is None:
            key = "training-" + re.sub(r"[^a-z0-9-]+", "-", TaskRunContext.get().task_run.name.lower()).strip("-")
            self.progress_id = create_progress_artifact(progress=update.percent, key=key, description=description)
        else:
            update_progress_artifact(self.progress_id, progress=update.percent, description=description)


@functools.cache
def task_of(step: Step) -> Task:
    """The Prefect task of a step: its result is cached by content, its files published whole."""

    def run_step(settings: Any, inputs: dict[str, Artifact | None], ctx: StepContext) -> Artifact:
        started = time.perf_counter()
        key = get_transaction().key  # the content key StepCachePolicy computed: it names the step's folder
        folder = ctx.folder(step.name, key)
        files = StepFiles(out=folder.staging(), work=folder.work, downloads=Path(ctx.downloads))
        here = {name: _located(value, Path(ctx.cache_dir)) for name, value in inputs.items()}
        try:
            with quiet_libraries():
                info = step.run(settings, files, RunLogReporter(), **here)
        except Exception as exc:
            if not _disk_full(exc):
                raise
            raise UserError("", f"no space left on the disk of {ctx.cache_dir}",
                            "free some, or move engine.cache_dir to a bigger disk") from None  # fmt: skip
        finally:
            if "info" not in locals():  # a failed step leaves no half-written output behind
                shutil.rmtree(files.out, ignore_errors=True)
        info.seconds = round(time.perf_counter() - started, 2)
        return Artifact(path=ctx.relative(folder.publish(files.out)), fingerprint=key, info=info)

    return task(run_step, name=step.name, version=step.version, cache_policy=STEP_CACHE, persist_result=True)


def _located(value: Any, cache_dir: Path) -> Any:
    """An input with absolute paths: an Artifact, a mapping of them (the adapters by pass), or None."""
    if isinstance(value, dict):
        return {k: v.located(cache_dir) for k, v in value.items()}
    return value.located(cache_dir) if value is not None else None


def _disk_full(exc: BaseException | None) -> bool:
    """Whether a failure is a full disk, also when a library wrapped the OS error in its own (safetensors)."""
    while exc is not None:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def configured(step: Step, ctx: StepContext) -> Task:
    """The step's task with this run's retries and cache folder."""
    return task_of(step).with_options(
        retries=ctx.retries,
        retry_delay_seconds=ctx.retry_delay_seconds,
        retry_condition_fn=_is_transient,
        **cache_options(ctx),
    )


def _is_transient(task: Task, task_run, state) -> bool:
    """Retry what may pass on a second try; a user mistake fails the same way every time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


def model_fingerprint(source: ModelSource, ctx: StepContext) -> Artifact[ModelInfo]:
    """The base model, fetched if it must be, and its fingerprint (file hashes are memoized by size and mtime)."""
    return resolve_model(source, Path(ctx.downloads), memo=Path(ctx.downloads) / "file-hashes.json")


@task(name="fingerprint_base_model")
def fingerprint_base_model(source: ModelSource, ctx: StepContext) -> Artifact[ModelInfo]:
    """Never cached: its whole job is to notice that the base model changed (or fetch a new revision)."""
    return model_fingerprint(source, ctx)
