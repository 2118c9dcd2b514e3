"""The locks that let one run compute a step while others wait for it, then reuse its result.

On one machine they are files in the cache folder; machines that share a cache URL share Prefect's Redis
locks (prefect-redis) when the RedisDatabase block 'olive-grove-locks' is saved (blocks/locks.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager
from prefect_redis.locking import RedisLockManager
from redis.exceptions import LockError, RedisError

from olive_grove.tasks.errors import UserError

# A Redis lock expires this long after its holder stopped renewing it (a killed worker's lock frees itself).
REDIS_HOLD_SECONDS = 120
REDIS_RENEW_SECONDS = 30
LOCKS_BLOCK = "olive-grove-locks"  # the RedisDatabase block they are read from (blocks/locks.py)


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


class RenewedRedisLockManager(RedisLockManager):
    """Prefect's Redis locks with an expiry that a live holder keeps pushing back, so a lock outlives a
    long training step but not a machine that died holding it (Prefect asks for locks without expiry).

    Redis going away while a step holds its lock costs the lock, not the step: letting go of a lock Redis
    no longer has is a warning, as the lock expires by itself there."""

    block = LOCKS_BLOCK  # the RedisDatabase block it was made from, named when Redis does not answer

    def acquire_lock(self, key: str, holder: str, acquire_timeout=None, hold_timeout=None) -> bool:
        try:
            acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or REDIS_HOLD_SECONDS)
        except RedisError as exc:
            raise self._unreachable(exc) from None
        if acquired:
            name = self._lock_name_for_key(key)
            threading.Thread(target=self._renew, args=(name, self._locks[name]), daemon=True,
                             name=f"renew {name}").start()  # fmt: skip
        return acquired

    def check_answers(self) -> None:
        try:
            self.client.ping()
        except RedisError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: RedisError) -> UserError:
        return UserError(f"block {self.block}", f"Redis at {self.host}:{self.port} does not answer ({exc})",
                         "start it, or save the block with its address: grove blocks set-locks URL")  # fmt: skip

    def release_lock(self, key: str, holder: str) -> None:
        try:
            super().release_lock(key, holder)
        except RedisError as exc:
            self._locks.pop(self._lock_name_for_key(key), None)
            logging.getLogger("prefect.task_runs").warning(
                "the step lock in Redis at %s:%s could not be let go (%s): it expires in %d s", self.host,
                self.port, exc, REDIS_HOLD_SECONDS)  # fmt: skip

    def is_locked(self, key: str) -> bool:
        try:
            return super().is_locked(key)
        except RedisError:
            return False  # nobody can hold a lock in a Redis that is gone

    def _renew(self, name: str, lock) -> None:
        while True:
            time.sleep(REDIS_RENEW_SECONDS)
            if self._locks.get(name) is not lock:  # released
                return
            try:
                lock.reacquire()
            except (LockError, RedisError):
                return


class LockHooks(LockManager):
    """Another lock manager's locks, with a call after a lock is got and one before it is let go (while the
    holder still has the step to itself)."""

    def __init__(self, inner: LockManager, after_acquire: Callable[[str], None],
                 before_release: Callable[[str], None]) -> None:  # fmt: skip
        self.inner, self.after_acquire, self.before_release = inner, after_acquire, before_release

    def acquire_lock(self, key: str, holder: str, acquire_timeout=None, hold_timeout=None) -> bool:
        acquired = self.inner.acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self.after_acquire(key)
        return acquired

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout=None, hold_timeout=None) -> bool:
        acquired = await self.inner.aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self.after_acquire(key)
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        try:
            self.before_release(key)
        finally:
            self.inner.release_lock(key, holder)

    def is_locked(self, key: str) -> bool:
        return self.inner.is_locked(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self.inner.is_lock_holder(key, holder)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.inner.wait_for_lock(key, timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await self.inner.await_for_lock(key, timeout)
