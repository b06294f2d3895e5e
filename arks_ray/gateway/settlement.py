"""Settlements that survive the store: tried at once, and kept and retried in order while it is down.

Used by the governor (``arks_ray.gateway.governor``) for the second of the two round trips of every
counted request. A settlement that cannot reach the store is queued (bounded: past ``max_pending`` the
oldest is dropped, logged and counted) and retried with exponential backoff, oldest first, until it lands.
While anything is queued, new settlements queue behind it, so they land in the order they were made.
Concurrency leases are not held hostage meanwhile: the governor stops renewing a finished request's
lease, so it expires within one lease period even if its settlement never lands.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from arks_ray.gateway.limits import Counter
from arks_ray.gateway.ports import CounterStore, StoreUnavailable

logger = logging.getLogger("arks_ray.gateway")


@dataclass(frozen=True)
class Settlement:
    """One reservation's final amounts."""

    counters: Sequence[Counter]
    request_id: str
    reserved_at_ms: int
    amounts: Sequence[int]


class Settlements:
    """The settlement outbox of one gateway replica."""

    def __init__(self, store: CounterStore, *, max_pending: int = 10_000, first_delay_s: float = 0.1,
                 max_delay_s: float = 5.0, on_failure: Callable[[str], None] = lambda _op: None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.max_pending = max_pending
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.on_failure = on_failure
        self._sleep = sleep
        self._pending: deque[Settlement] = deque()
        self._worker: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def submit(self, item: Settlement) -> bool:
        """Settle now if nothing is queued and the store answers; else queue it. True if it landed now."""
        if not self._pending:
            try:
                await self._send(item)
                return True
            except StoreUnavailable as exc:
                self.on_failure("settle")
                logger.warning("settlement of %s queued (store unavailable): %s", item.request_id, exc)
        self._queue(item)
        return False

    async def _send(self, item: Settlement) -> None:
        await self.store.settle(item.counters, item.request_id, item.reserved_at_ms, item.amounts)

    def _queue(self, item: Settlement) -> None:
        if len(self._pending) >= self.max_pending:
            lost = self._pending.popleft()
            self.dropped += 1
            self.on_failure("settle_dropped")
            logger.error("settlement backlog full (%d): dropped the settlement of %s", self.max_pending,
                         lost.request_id)
        self._pending.append(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        delay = self.first_delay_s
        while self._pending:
            try:
                await self._send(self._pending[0])
            except StoreUnavailable:
                self.on_failure("settle")
                await self._sleep(delay)
                delay = min(delay * 2, self.max_delay_s)
                continue
            self._pending.popleft()
            delay = self.first_delay_s
            if not self._pending:
                logger.info("settlement backlog cleared")

    async def drain(self) -> None:
        """Wait until the backlog is empty (tests, shutdown)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
