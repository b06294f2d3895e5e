"""The ``CounterStore`` port and its result types.

Used by the ingress (reserve at admission, settle at the end), the quota mirror (read usage, restore it
after a data loss) and ``arks-ray quota reset``. Every implementation must make ``reserve`` atomic and
all-or-nothing across all its counters: either every counter takes its amount or none does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from arks_ray.gateway.limits import Counter


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


class CounterStore(Protocol):
    """Atomic counters for rate limits and quotas."""

    async def reserve(self, counters: Sequence[Counter], request_id: str, now_ms: int) -> Decision:
        """Check every counter and, only if all admit, add every amount. One round trip."""

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        """Replace each reserved amount with the final one; release leases. One round trip."""

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        """Current values of total (quota) counters; missing keys read as 0."""

    async def raise_floor(self, key: str, value: int, ttl_ms: int) -> bool:
        """Set a total counter to ``value`` if it is lower (restore after data loss); True if raised."""

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove counters (deliberate reset)."""

    async def publish(self, key: str, value: str, ttl_ms: int, now_ms: int) -> None:
        """Store a short-lived report (one gateway replica's effective weights), replacing the last one."""

    async def collect(self, prefix: str, now_ms: int) -> dict[str, str]:
        """Every report under ``prefix`` that has not expired."""

    async def close(self) -> None:
        """Release connections."""
