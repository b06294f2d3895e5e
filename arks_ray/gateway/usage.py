"""Usage against limits, per token and per quota, read from the counter store: ``arks-ray usage``.

Called by the CLI with a ``CounterStore`` (Redis) and the namespace's ``GatewayConfig`` rendered from
the manifests. Rate-limit windows are read with a zero-amount reservation: the store's own atomic check
over the same counters the gateway reserves, adding nothing, so the figures are exactly what the next
request would be judged against. Concurrency leases are not readable that way and show as ``-``.
Quotas are read with ``QuotaLedger.usage``. No I/O of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from arks_ray.api.gateway import GatewayConfig
from arks_ray.gateway.limits import Algorithm, Usage, counters_for, format_reset
from arks_ray.gateway.ports import CounterStore
from arks_ray.gateway.quotas import QuotaLedger
from arks_ray.gateway.series import QuotaLevel, quota_levels


@dataclass(frozen=True)
class LimitUse:
    """One rate limit of one token on one endpoint, in its current window."""

    token: str
    endpoint: str
    limit: str
    """rpm, tpm, ..., concurrency; empty for a grant without rate limits."""
    value: int
    used: int | None
    """None where the store cannot say (concurrency)."""
    reset_ms: int
    quota: str | None


async def token_usage(store: CounterStore, config: GatewayConfig, now: float,
                      algorithm: Algorithm = "slidingWindow") -> list[LimitUse]:
    """Every token's rate limits per endpoint, with the current window's use (one store call per grant)."""
    rows: list[LimitUse] = []
    for token in config.tokens:
        for grant in token.grants:
            counters = counters_for(namespace=config.namespace, token=token, grant=grant, quota=None, pricing=None,
                                    estimate=Usage(0, 0), now=now, algorithm=algorithm)
            windows = [replace(c, amount=0) for c in counters if c.kind == "window"]
            used: dict[str, tuple[int, int]] = {}
            if windows:
                decision = await store.reserve(windows, f"arks-usage-{uuid.uuid4().hex}", int(now * 1000))
                used = {c.label: (c.limit - left, reset) for c, left, reset in
                        zip(windows, decision.remaining, decision.reset_ms, strict=True)}
            if not grant.rate_limits:
                rows.append(LimitUse(token.name, grant.endpoint, "", 0, None, 0, grant.quota))
            for limit in grant.rate_limits:
                now_used, reset = used.get(limit.type, (None, 0))
                rows.append(LimitUse(token.name, grant.endpoint, limit.type, limit.value, now_used, reset,
                                     grant.quota))
    return rows


async def quota_usage(store: CounterStore, config: GatewayConfig, now: float) -> list[QuotaLevel]:
    """Every quota budget with its use in the current period."""
    return quota_levels(config, await QuotaLedger(store).usage(config.namespace, config.quotas, now))


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def format_usage(namespace: str, limits: list[LimitUse], quotas: list[QuotaLevel],
                 periods: dict[str, str]) -> str:
    """The ``arks-ray usage`` report of one namespace."""
    lines = [f"namespace {namespace}", "tokens (rate limits in the current window):"]
    token_rows = []
    for u in limits:
        if not u.limit:
            token_rows.append((u.token, u.endpoint, "-", "no rate limits", "", "", u.quota or "-"))
            continue
        used = "-" if u.used is None else str(u.used)
        left = "-" if u.used is None else str(max(0, u.value - u.used))
        reset = format_reset(u.reset_ms) if u.reset_ms else "-"
        token_rows.append((u.token, u.endpoint, u.limit, f"{used}/{u.value}", left, reset, u.quota or "-"))
    lines += _table(("TOKEN", "ENDPOINT", "LIMIT", "USED/LIMIT", "LEFT", "RESETS IN", "QUOTA"), token_rows) \
        if token_rows else ["  (no tokens)"]
    lines.append("quotas (current period):")
    quota_rows = [(q.quota, q.type, periods.get(q.quota, "lifetime"), f"{q.used}/{q.limit}",
                   f"{100 * q.used / q.limit:.1f}%" if q.limit else "-") for q in quotas]
    lines += _table(("QUOTA", "TYPE", "PERIOD", "USED/LIMIT", "USED"), quota_rows) if quota_rows \
        else ["  (no quotas)"]
    return "\n".join(lines)
