"""Quota usage in the counter store: read it, restore it after a data loss, reset it. The key layout of
quota counters lives here and in ``limits.quota_key``, nowhere else.

Used by the operator (``controller``), which mirrors usage into ``ArksQuota.status`` and, when the store
reads lower than the status recorded (Redis lost its data), raises the store back to the recorded usage;
and by ``arks-ray quota`` / ``arks-ray usage``. The gateway itself never restores: its config carries no
usage, so usage changes never touch the RayService.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from arks_ray.api.gateway import Quota
from arks_ray.api.quota import period_end, period_id
from arks_ray.gateway.limits import quota_key
from arks_ray.gateway.ports import CounterStore

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Floor:
    """Usage recorded for one quota budget in one period (``ArksQuota.status``)."""

    quota: str
    type: str
    value: int
    period: str
    """Period id: 'lifetime', 'YYYY-MM-DD' or 'YYYY-MM'."""


def quota_prefix(namespace: str, quota: str, prefix: str = "arks") -> str:
    """The key prefix of every counter of one quota (all types, all periods)."""
    return f"{prefix}:{namespace}:quota:{quota}:"


class QuotaLedger:
    """Quota counters of one namespace's quotas over a ``CounterStore``."""

    def __init__(self, store: CounterStore, prefix: str = "arks") -> None:
        self.store = store
        self.prefix = prefix

    async def usage(self, namespace: str, quotas: Sequence[Quota], now: float) -> dict[str, dict[str, int]]:
        """Current-period usage per quota and budget type."""
        keys = {(q.name, b.type): quota_key(namespace, q.name, b.type, q.period, now, self.prefix)
                for q in quotas for b in q.budgets}
        values = await self.store.read(list(keys.values()))
        out: dict[str, dict[str, int]] = {}
        for (name, kind), key in keys.items():
            out.setdefault(name, {})[kind] = values[key]
        return out

    async def restore(self, namespace: str, quotas: Sequence[Quota], floors: Iterable[Floor], now: float) -> int:
        """Raise counters that read lower than their recorded floor in the current period; how many were."""
        by_name = {q.name: q for q in quotas}
        raised = 0
        for floor in floors:
            quota = by_name.get(floor.quota)
            if quota is None or floor.value <= 0 or floor.period != period_id(quota.period, now):
                continue
            end = period_end(quota.period, now)
            ttl = 0 if end is None else int((end - now) * 1000) + DAY_MS
            key = quota_key(namespace, quota.name, floor.type, quota.period, now, self.prefix)
            raised += int(await self.store.raise_floor(key, floor.value, ttl))
        return raised

    async def reset(self, namespace: str, quota: str) -> int:
        """Delete every counter of one quota: usage starts again from zero. How many were deleted."""
        return await self.store.delete_prefix(quota_prefix(namespace, quota, self.prefix))
