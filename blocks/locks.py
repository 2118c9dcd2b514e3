"""Step locks that every machine sharing a cache sees: a prefect-redis RedisDatabase block, by name."""

from __future__ import annotations

from olive_grove.tasks.errors import UserError
from olive_grove.tasks.locks import LOCKS_BLOCK, RenewedRedisLockManager


def redis_locks(block_name: str = LOCKS_BLOCK):
    """Redis step locks from the RedisDatabase block of that name; None when no such block is saved."""
    from prefect_redis import RedisDatabase

    try:
        block = RedisDatabase.load(block_name)
    except ValueError:  # Prefect's answer for a block that does not exist
        return None
    params = block.as_connection_params()  # a loaded block's also carries its document ids: not for the client
    manager = RenewedRedisLockManager(**{k: params.get(k) for k in ("host", "port", "db", "username", "password")},
                                      ssl=bool(params.get("ssl")))  # fmt: skip
    manager.block = block_name
    manager.check_answers()
    return manager


def save_redis_locks(url: str, block_name: str = LOCKS_BLOCK) -> None:
    from prefect_redis import RedisDatabase

    if not url.startswith(("redis://", "rediss://")):
        raise UserError("URL", f"{url!r} is not a Redis URL", "redis://HOST:6379/0 (rediss:// for TLS)")
    RedisDatabase.from_connection_string(url).save(block_name, overwrite=True)
