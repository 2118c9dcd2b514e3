"""Prefect's side of the step cache (`step_cache.py`): the cache policy whose key is our content key and
which repairs or fetches an entry before Prefect looks at it, and the locks that let one run compute a
step while others wait for it."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.filesystem import FileSystemLockManager
from prefect.logging import get_run_logger
from prefect.transactions import IsolationLevel

from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.step_cache import StepContext, damage, remove_folder, step_key

# ------------------------------------------------------------------------- cache policy and repair


class StepCachePolicy(CachePolicy):
    """Prefect's cache key = our content key, so a hit means same code, settings, inputs and libraries.

    Computing the key also makes sure a hit will be good: an entry whose files are missing or damaged is
    fetched again from the shared cache or removed (a miss: the step recomputes), never served.
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters, **kwargs) -> str:
        step = task_ctx.task
        key = step_key(step.name, step.version, inputs)
        make_entry_usable(inputs["ctx"], step.name, key)
        return key


STEP_CACHE = StepCachePolicy()


def make_entry_usable(ctx: StepContext, step: str, key: str) -> None:
    """Leave the key's entry whole, or absent; shared-cache failures cost a recompute, never the run."""
    log = get_run_logger()
    record, folder, shared = ctx.record(key), ctx.folder(step, key).final, ctx.shared()
    problem = damage(folder) if folder.exists() or record.is_file() else None
    if problem is not None:
        if record.is_file():
            log.warning("%s: the cached result %s is damaged (%s): it is not used", step, key, problem)
        record.unlink(missing_ok=True)
        remove_folder(folder)
    if shared is None or record.is_file():
        return
    try:
        if shared.fetch(step, key, folder, log):
            log.info("%s: reusing the result a run elsewhere shared", step)
    except UserError as exc:
        log.warning("%s: the shared cache could not be read: %s", step, exc.line())


def cache_options(ctx: StepContext) -> dict[str, Any]:
    """Task options that keep a step's records in the run's cache folder, one computation per key at a time
    (a file lock per key: the second run waits, then reuses the first's result), shared when finished."""
    cache = Path(ctx.cache_dir)
    policy = STEP_CACHE.configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=LiveHolderLockManager(lock_files_directory=cache / "locks"),
    )
    hooks = [functools.partial(_share_finished_step, ctx)] if ctx.shared_url else []
    return {"cache_policy": policy, "result_storage": cache / "results", "on_completion": hooks}


def _share_finished_step(ctx: StepContext, task, task_run, state) -> None:
    """Upload a finished step to the shared cache; failing to share costs other machines a recompute, not
    this run its result."""
    artifact: Artifact = state.result()
    shared = ctx.shared()
    try:
        if shared and shared.share(task.name, artifact.fingerprint, ctx.folder(task.name, artifact.fingerprint).final):
            get_run_logger().info("%s: shared through %s", task.name, shared.remote.url)
    except UserError as exc:
        get_run_logger().warning("%s: not shared: %s", task.name, exc.line())


# --------------------------------------------------------------------------------------------- locks


class LiveHolderLockManager(FileSystemLockManager):
    """Prefect's file locks, except that a lock whose holder died on this machine is free.

    Prefect's own file locks never expire; after a `kill -9` mid-step the next run would wait forever.
    Each lock records its holder's host and PID, and a dead PID on this host releases it.
    """

    def _stamp(self, holder: str) -> str:
        suffix = f"|{socket.gethostname()}|{os.getpid()}"
        return holder if holder.endswith(suffix) else holder + suffix

    def acquire_lock(self, key: str, holder: str, acquire_timeout=None, hold_timeout=None) -> bool:
        return super().acquire_lock(key, self._stamp(holder), acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, self._stamp(holder))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return super().is_lock_holder(key, self._stamp(holder))

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is not None and _holder_died(info["holder"]):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)


def _holder_died(holder: str) -> bool:
    _, _, tail = holder.partition("|")
    host, _, pid = tail.partition("|")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's lock: only its own expiry can free it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
