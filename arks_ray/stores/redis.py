"""``RedisStore``: counters shared by every gateway replica, reserved and settled by Lua scripts.

It implements the ``CounterStore`` and ``ReportBoard`` ports of ``arks_ray.gateway.ports``.

Used by the ingress when a Redis URL is configured. Each ``reserve`` and ``settle`` is one EVALSHA (the
scripts in ``lua/`` are loaded once and reloaded automatically after a Redis restart). Every call is
bounded by a timeout; any failure surfaces as ``StoreUnavailable`` for the caller's failure policy.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from arks_ray.gateway.limits import Counter
from arks_ray.gateway.ports import SETTLED_TTL_MS, Decision, Lease, StoreUnavailable

_KIND = {"window": 1, "lease": 2, "total": 3}


def _script(name: str) -> str:
    return resources.files("arks_ray.stores").joinpath("lua", name).read_text()


def _glob(prefix: str) -> str:
    """A SCAN pattern matching keys that start with ``prefix`` (its glob characters escaped)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Counters in Redis (7+), one round trip per reservation and per settlement."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, max_connections: int = 64) -> None:
        self.timeout_s = timeout_s
        # A blocking pool: a burst beyond max_connections waits for a connection (within the timeout)
        # instead of failing, which under failOpen would admit requests uncounted.
        # After a Redis restart every pooled connection is stale: retry once on a fresh connection, so
        # the first call after a restart does not fail (the overall bound is still timeout_s * 2). The
        # retry must be the pool's: redis-py ignores a client's retry settings when given a pool.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=max_connections,
            timeout=timeout_s, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        self._reserve = self._redis.register_script(_script("reserve.lua"))
        self._settle = self._redis.register_script(_script("settle.lua"))
        self._floor = self._redis.register_script(_script("floor.lua"))
        self._renew = self._redis.register_script(_script("renew.lua"))

    async def _call(self, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, self.timeout_s * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def reserve(self, counters: Sequence[Counter], request_id: str, now_ms: int) -> Decision:
        args: list[Any] = [now_ms, request_id]
        for c in counters:
            args += [_KIND[c.kind], c.limit, c.amount, c.bucket_ms or 1, c.span, c.ttl_ms]
        raw = await self._call(self._reserve(keys=[c.key for c in counters], args=args))
        n = len(counters)
        values = [int(v) for v in raw]
        admitted, denied, retry = values[0] == 1, values[1], values[2]
        return Decision(admitted, None if admitted else denied - 1, retry,
                        tuple(values[3:3 + n]), tuple(values[3 + n:3 + 2 * n]))

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        if not counters:
            return
        args: list[Any] = [request_id, reserved_at_ms, SETTLED_TTL_MS]
        for c, final in zip(counters, amounts, strict=True):
            args += [_KIND[c.kind], c.bucket_ms or 1, c.amount, final]
        # The marker that makes a retried settlement a no-op, under the counters' own key prefix.
        marker = f"{counters[0].key.split(':', 1)[0]}:settled:{request_id}"
        await self._call(self._settle(keys=[*(c.key for c in counters), marker], args=args))

    async def renew(self, leases: Sequence[Lease], until_ms: int) -> int:
        if not leases:
            return 0
        args: list[Any] = [until_ms, *(lease.request_id for lease in leases)]
        return int(await self._call(self._renew(keys=[lease.key for lease in leases], args=args)))

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        if not keys:
            return {}
        values = await self._call(self._redis.mget(list(keys)))
        return {k: int(v) if v is not None else 0 for k, v in zip(keys, values, strict=True)}

    async def raise_floor(self, key: str, value: int, ttl_ms: int) -> bool:
        return bool(await self._call(self._floor(keys=[key], args=[value, ttl_ms])))

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (a deliberate reset); returns how many."""
        pattern = _glob(prefix)

        async def scan_and_delete() -> int:
            keys = [k async for k in self._redis.scan_iter(match=pattern, count=500)]
            if keys:
                await self._redis.delete(*keys)
            return len(keys)

        count: int = await self._call(scan_and_delete())
        return count

    async def publish(self, key: str, value: str, ttl_ms: int, now_ms: int) -> None:
        await self._call(self._redis.set(key, value, px=max(1, ttl_ms)))

    async def collect(self, prefix: str, now_ms: int) -> dict[str, str]:
        async def scan_and_get() -> dict[str, str]:
            keys = [k async for k in self._redis.scan_iter(match=_glob(prefix), count=500)]
            values = await self._redis.mget(keys) if keys else []
            return {_text(k): _text(v) for k, v in zip(keys, values, strict=True) if v is not None}

        found: dict[str, str] = await self._call(scan_and_get())
        return found

    async def close(self) -> None:
        await self._redis.aclose()
