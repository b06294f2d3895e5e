"""The ports the gateway's policy needs from a store: ``CounterStore`` and ``ReportBoard``, with their types.

The gateway policy (``governor``, ``quotas``, ``settlement``, ``reports``) is written against these
Protocols and never imports an implementation; ``arks_ray.stores`` implements them (``MemoryStore``,
the embedded default for one ingress replica, and ``RedisStore``, shared by every replica), and the
import-linter contract ``stores-below-policy`` keeps it that way. Every ``CounterStore`` must make
``reserve`` atomic and all-or-nothing across all its counters: either every counter takes its amount or
none does. One contract suite (``tests/contract``) runs against every implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from arks_ray.gateway.limits import Counter

SETTLED_TTL_MS = 600_000
"""How long a store remembers a settled request id, so that a retry of its settlement is not applied twice
(the settlement outbox retries within seconds of the store answering again)."""


class StoreUnavailable(Exception):
    """The store could not answer in time (connection refused, timeout, script error)."""


@dataclass(frozen=True)
class Decision:
    """The outcome of one reservation."""

    admitted: bool
    denied: int | None
    """Index of the first counter that refused (None when admitted)."""
    retry_after_ms: int
    """When the refusing counter could admit this request; -1 if it never can (e.g. amount > limit)."""
    remaining: tuple[int, ...]
    """Per counter: what is left after this request (or now, if refused)."""
    reset_ms: tuple[int, ...]
    """Per counter: time until it is back to its initial state (windows only; 0 otherwise)."""


@dataclass(frozen=True)
class Lease:
    """One held concurrency slot: the lease counter's key and the request holding it."""

    key: str
    request_id: str


class CounterStore(Protocol):
    """Atomic counters for rate limits and quotas."""

    async def reserve(self, counters: Sequence[Counter], request_id: str, now_ms: int) -> Decision:
        """Check every counter and, only if all admit, add every amount. One round trip."""

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        """Replace each reserved amount with the final one; release leases. One round trip.

        Idempotent per ``request_id`` (for at least ``SETTLED_TTL_MS``): a settlement retried after a
        timeout whose first attempt did land changes nothing more."""

    async def renew(self, leases: Sequence[Lease], until_ms: int) -> int:
        """Push the expiry of leases still held to ``until_ms`` (released ones stay released). One round
        trip for all; returns how many were renewed."""

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        """Current values of total (quota) counters; missing keys read as 0."""

    async def raise_floor(self, key: str, value: int, ttl_ms: int) -> bool:
        """Set a total counter to ``value`` if it is lower (restore after data loss); True if raised."""

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every counter whose key starts with ``prefix`` (a deliberate reset); returns how many."""

    async def close(self) -> None:
        """Release connections."""


class ReportBoard(Protocol):
    """Short-lived reports (one gateway replica's effective weights), read back by the operator."""

    async def publish(self, key: str, value: str, ttl_ms: int, now_ms: int) -> None:
        """Store a report, replacing the last one under ``key``."""

    async def collect(self, prefix: str, now_ms: int) -> dict[str, str]:
        """Every report under ``prefix`` that has not expired."""
