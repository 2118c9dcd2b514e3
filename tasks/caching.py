"""Prefect's side of the step cache (`step_cache.py`): the cache policy whose key is our content key and
which repairs or fetches an entry before Prefect looks at it, and which locks (`locks.py`) a run's steps
take so that one run computes a step while others wait for it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.logging import get_run_logger
from prefect.transactions import IsolationLevel

from olive_grove.blocks.locks import LOCKS_BLOCK, redis_locks
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.locks import LiveHolderLockManager, LockHooks
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
    (the second run waits, then reuses the first's result), shared when finished."""
    policy = STEP_CACHE.configure(isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=step_locks(ctx))
    return {"cache_policy": policy, "result_storage": Path(ctx.cache_dir) / "results"}


def step_locks(ctx: StepContext) -> LockManager:
    """File locks in the cache folder. With a shared cache: the Redis locks every machine sees (when the
    block is saved); a second look at the shared cache once a lock is got, as its last holder may have
    shared the step meanwhile; and the step shared while its lock is still held, so nobody misses it."""
    local = LiveHolderLockManager(lock_files_directory=Path(ctx.cache_dir) / "locks")
    if not ctx.shared_url:
        return local

    def step_of(key: str) -> str:
        return key.rsplit("-", 1)[0]  # step_key() is "<step>-<hash>"

    return LockHooks(_machine_wide_locks() or local,
                     after_acquire=lambda key: make_entry_usable(ctx, step_of(key), key),
                     before_release=lambda key: _share_finished_step(ctx, step_of(key), key))  # fmt: skip


@functools.cache
def _machine_wide_locks() -> LockManager | None:
    """The Redis locks of block 'olive-grove-locks', read once per process; None (with a warning) without it."""
    locks = redis_locks(LOCKS_BLOCK)
    if locks is None:
        get_run_logger().warning(
            "the cache is shared but its locks are this machine's: two machines may compute one step at once "
            "(save the Redis block '%s': grove blocks set-locks redis://HOST:6379/0)", LOCKS_BLOCK)  # fmt: skip
    return locks


def _share_finished_step(ctx: StepContext, step: str, key: str) -> None:
    """Upload a finished step (one with a record) to the shared cache; failing to share costs other
    machines a recompute, not this run its result."""
    shared = ctx.shared()
    try:
        if shared and shared.share(step, key, ctx.folder(step, key).final):
            get_run_logger().info("%s: shared through %s", step, shared.remote.url)
    except UserError as exc:
        get_run_logger().warning("%s: not shared: %s", step, exc.line())
