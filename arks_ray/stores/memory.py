"""``MemoryStore``: the embedded default counter store, correct for a single ingress replica only.

Used when no Redis URL is configured, and as the unit-test double. It implements the same contract as
``RedisStore`` (the shared contract suite runs against both): its methods never await between reading
and writing, so on one event loop a reservation is atomic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from arks_ray.gateway.limits import Counter, window_reset_ms, window_retry_after_ms, window_used
from arks_ray.gateway.ports import Decision, Lease

SETTLED_KEPT = 100_000
"""Settled request ids remembered (oldest forgotten first), so that a repeated settlement is not applied twice."""

logger = logging.getLogger("arks_ray.stores")


@dataclass
class _Entry:
    buckets: dict[int, int] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)
    total: int = 0
    expires_ms: int = 0


class MemoryStore:
    """In-process counters with the RedisStore contract."""

    _warned = False

    def __init__(self) -> None:
        self._data: dict[str, _Entry] = {}
        self._reports: dict[str, tuple[str, int]] = {}
        self._settled: dict[str, None] = {}  # insertion-ordered: the oldest first
        if not MemoryStore._warned:
            MemoryStore._warned = True
            logger.warning("arks-ray: no Redis configured; rate limits and quotas are kept in memory, which is "
                           "correct for a single gateway replica only and lost on restart")

    def _entry(self, key: str, now_ms: int) -> _Entry:
        entry = self._data.get(key)
        if entry is None or (entry.expires_ms and entry.expires_ms <= now_ms):
            entry = self._data[key] = _Entry()
        return entry

    async def reserve(self, counters: Sequence[Counter], request_id: str, now_ms: int) -> Decision:
        remaining: list[int] = []
        resets: list[int] = []
        for i, c in enumerate(counters):
            entry = self._entry(c.key, now_ms)
            if c.kind == "window":
                used = window_used(entry.buckets, now_ms, c.bucket_ms, c.span)
                if used + c.amount > c.limit:
                    retry = window_retry_after_ms(entry.buckets, now_ms, c.bucket_ms, c.span, c.limit, c.amount)
                    return self._refused(i, retry, counters, now_ms)
            elif c.kind == "lease":
                entry.leases = {k: v for k, v in entry.leases.items() if v > now_ms}
                if len(entry.leases) + 1 > c.limit:
                    return self._refused(i, 1000 if c.limit > 0 else -1, counters, now_ms)
            elif entry.total + c.amount > c.limit:
                return self._refused(i, -1, counters, now_ms)
        for c in counters:
            entry = self._entry(c.key, now_ms)
            if c.kind == "window":
                idx = now_ms // c.bucket_ms
                entry.buckets = {k: v for k, v in entry.buckets.items() if k >= idx - c.span}
                entry.buckets[idx] = entry.buckets.get(idx, 0) + c.amount
                entry.expires_ms = now_ms + c.ttl_ms
                used = window_used(entry.buckets, now_ms, c.bucket_ms, c.span)
                remaining.append(max(0, c.limit - used))
                resets.append(window_reset_ms(entry.buckets, now_ms, c.bucket_ms, c.span))
            elif c.kind == "lease":
                entry.leases[request_id] = now_ms + c.ttl_ms
                entry.expires_ms = now_ms + c.ttl_ms
                remaining.append(max(0, c.limit - len(entry.leases)))
                resets.append(0)
            else:
                entry.total += c.amount
                if c.ttl_ms:
                    entry.expires_ms = now_ms + c.ttl_ms
                remaining.append(max(0, c.limit - entry.total))
                resets.append(0)
        return Decision(True, None, 0, tuple(remaining), tuple(resets))

    def _refused(self, index: int, retry_ms: int, counters: Sequence[Counter], now_ms: int) -> Decision:
        remaining, resets = [], []
        for c in counters:
            entry = self._entry(c.key, now_ms)
            if c.kind == "window":
                remaining.append(max(0, c.limit - window_used(entry.buckets, now_ms, c.bucket_ms, c.span)))
                resets.append(window_reset_ms(entry.buckets, now_ms, c.bucket_ms, c.span))
            elif c.kind == "lease":
                remaining.append(max(0, c.limit - sum(1 for v in entry.leases.values() if v > now_ms)))
                resets.append(0)
            else:
                remaining.append(max(0, c.limit - entry.total))
                resets.append(0)
        return Decision(False, index, retry_ms, tuple(remaining), tuple(resets))

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        if request_id in self._settled:
            return
        self._settled[request_id] = None
        if len(self._settled) > SETTLED_KEPT:
            del self._settled[next(iter(self._settled))]
        for c, final in zip(counters, amounts, strict=True):
            entry = self._data.get(c.key)
            if entry is None:
                continue
            if c.kind == "window":
                idx = reserved_at_ms // c.bucket_ms
                if idx in entry.buckets:
                    entry.buckets[idx] = max(0, entry.buckets[idx] + final - c.amount)
            elif c.kind == "lease":
                entry.leases.pop(request_id, None)
            else:
                entry.total = max(0, entry.total + final - c.amount)

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        return {k: (self._data[k].total if k in self._data else 0) for k in keys}

    async def raise_floor(self, key: str, value: int, ttl_ms: int) -> bool:
        entry = self._data.setdefault(key, _Entry())
        if entry.total >= value:
            return False
        entry.total = value
        return True

    async def renew(self, leases: Sequence[Lease], until_ms: int) -> int:
        renewed = 0
        for lease in leases:
            entry = self._data.get(lease.key)
            if entry is not None and lease.request_id in entry.leases:
                entry.leases[lease.request_id] = until_ms
                entry.expires_ms = max(entry.expires_ms, until_ms)
                renewed += 1
        return renewed

    async def delete_prefix(self, prefix: str) -> int:
        doomed = [k for k in self._data if k.startswith(prefix)]
        for k in doomed:
            del self._data[k]
        return len(doomed)

    async def publish(self, key: str, value: str, ttl_ms: int, now_ms: int) -> None:
        self._reports[key] = (value, now_ms + ttl_ms)

    async def collect(self, prefix: str, now_ms: int) -> dict[str, str]:
        self._reports = {k: v for k, v in self._reports.items() if v[1] > now_ms}
        return {k: v for k, (v, _) in self._reports.items() if k.startswith(prefix)}

    async def close(self) -> None:
        self._data.clear()
        self._reports.clear()
        self._settled.clear()
