"""Admission and settlement of one request against its rate limits and quota.

Called by the ingress around every forwarded request: ``admit`` before (one store round trip), ``settle``
after (one more), whatever happened in between: success, backend failure or client disconnect. Store
failures follow the configured policy (failOpen admits without counting, failClosed refuses with 503);
each one is reported to the ``on_store_failure`` hook, which the ingress turns into a metric.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from arks_ray.api.endpoint import Pricing
from arks_ray.api.gateway import GatewayConfig, Grant, Quota, Token
from arks_ray.api.quota import period_end, period_id
from arks_ray.errors import BackendUnavailable, QuotaExceeded, RateLimited
from arks_ray.gateway.limits import (
    Algorithm,
    Counter,
    Usage,
    counters_for,
    format_reset,
    quota_key,
    settled_amounts,
)
from arks_ray.stores.base import CounterStore, Decision, StoreUnavailable

logger = logging.getLogger("arks_ray.gateway")

FailurePolicy = Literal["failOpen", "failClosed"]


@dataclass
class Admission:
    """A request let in: what to settle later, and the headers to send."""

    request_id: str
    reserved_at_ms: int
    counters: list[Counter]
    pricing: Pricing | None
    estimate: Usage
    headers: dict[str, str] = field(default_factory=dict)
    counted: bool = True
    """False when the store was down and the request was admitted under failOpen."""


def ratelimit_headers(counters: Sequence[Counter], decision: Decision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for requests and tokens, from the tightest window of each."""
    headers: dict[str, str] = {}
    for dim in ("requests", "tokens"):
        best: int | None = None
        for i, c in enumerate(counters):
            if c.kind == "window" and c.dimension == dim and (
                    best is None or decision.remaining[i] < decision.remaining[best]):
                best = i
        if best is not None:
            headers[f"x-ratelimit-limit-{dim}"] = str(counters[best].limit)
            headers[f"x-ratelimit-remaining-{dim}"] = str(decision.remaining[best])
            headers[f"x-ratelimit-reset-{dim}"] = format_reset(decision.reset_ms[best])
    return headers


class Governor:
    """Rate limits and quotas for one gateway replica, over a shared ``CounterStore``."""

    def __init__(self, store: CounterStore, *, policy: FailurePolicy = "failOpen",
                 algorithm: Algorithm = "slidingWindow", default_max_tokens: int = 256,
                 lease_ms: int = 900_000, prefix: str = "arks",
                 on_store_failure: Callable[[str], None] = lambda _op: None) -> None:
        self.store = store
        self.policy = policy
        self.algorithm = algorithm
        self.default_max_tokens = default_max_tokens
        self.lease_ms = lease_ms
        self.prefix = prefix
        self.on_store_failure = on_store_failure

    async def admit(self, *, config: GatewayConfig, token: Token, grant: Grant, quota: Quota | None,
                    pricing: Pricing | None, estimate: Usage, now: float) -> Admission:
        counters = counters_for(namespace=config.namespace, token=token, grant=grant, quota=quota, pricing=pricing,
                                estimate=estimate, now=now, algorithm=self.algorithm, lease_ms=self.lease_ms,
                                prefix=self.prefix)
        admission = Admission(uuid.uuid4().hex, int(now * 1000), counters, pricing, estimate)
        if not counters:
            admission.counted = False
            return admission
        try:
            decision = await self.store.reserve(counters, admission.request_id, admission.reserved_at_ms)
        except StoreUnavailable as exc:
            self.on_store_failure("reserve")
            if self.policy == "failClosed":
                logger.warning("counter store unavailable, refusing (failClosed): %s", exc)
                raise BackendUnavailable("rate limits cannot be checked right now; retry shortly",
                                         headers={"Retry-After": "1"}) from None
            logger.warning("counter store unavailable, admitting uncounted (failOpen): %s", exc)
            admission.counted = False
            return admission
        admission.headers = ratelimit_headers(counters, decision)
        if not decision.admitted:
            assert decision.denied is not None
            raise self._refusal(counters[decision.denied], decision, admission, quota, now)
        return admission

    def _refusal(self, counter: Counter, decision: Decision, admission: Admission, quota: Quota | None,
                 now: float) -> RateLimited | QuotaExceeded:
        headers = dict(admission.headers)
        if counter.kind == "total":
            end = period_end(quota.period, now) if quota else None
            if end is not None:
                headers["Retry-After"] = str(max(1, math.ceil(end - now)))
            return QuotaExceeded(f"{counter.label} is used up: this request needs {counter.amount}, "
                                 f"{decision.remaining[decision.denied or 0]} of {counter.limit} left",
                                 headers=headers)
        if decision.retry_after_ms < 0:
            return RateLimited(f"this request needs about {counter.amount} against the {counter.label} limit of "
                               f"{counter.limit}, so it can never fit; lower max_tokens", headers=headers)
        retry_s = max(1, math.ceil(decision.retry_after_ms / 1000))
        headers["Retry-After"] = str(retry_s)
        return RateLimited(f"{counter.label} limit of {counter.limit} reached; retry in {retry_s}s", headers=headers)

    async def settle(self, admission: Admission, usage: Usage) -> None:
        """Charge what was used and refund the rest; never raises (a lost settlement is logged)."""
        if not admission.counted:
            return
        amounts = settled_amounts(admission.counters, usage, admission.pricing)
        try:
            await self.store.settle(admission.counters, admission.request_id, admission.reserved_at_ms, amounts)
        except StoreUnavailable as exc:
            self.on_store_failure("settle")
            logger.warning("settlement of %s lost (store unavailable): %s", admission.request_id, exc)

    async def restore_floors(self, config: GatewayConfig, now: float) -> int:
        """Raise quota counters to the usage ArksQuota status recorded (after Redis lost data).

        Stops at the first store failure; ``restore_floors_until_done`` retries."""
        raised, _ = await self._restore(config, now)
        return raised

    async def restore_floors_until_done(self, config: GatewayConfig, clock: Callable[[], float],
                                        attempts: int = 10, delay_s: float = 1.0) -> int:
        """``restore_floors`` until one pass completes: Redis is often just back when this is needed."""
        total = 0
        for _ in range(attempts):
            raised, complete = await self._restore(config, clock())
            total += raised
            if complete:
                return total
            await asyncio.sleep(delay_s)
        logger.error("quota usage from ArksQuota status could not be restored after %d attempts", attempts)
        return total

    async def _restore(self, config: GatewayConfig, now: float) -> tuple[int, bool]:
        raised = 0
        for quota in config.quotas:
            end = period_end(quota.period, now)
            ttl = 0 if end is None else int((end - now) * 1000) + 86_400_000
            for floor in quota.used:
                if floor.period != period_id(quota.period, now):
                    continue
                key = quota_key(config.namespace, quota.name, floor.type, quota.period, now, self.prefix)
                try:
                    raised += int(await self.store.raise_floor(key, floor.value, ttl))
                except StoreUnavailable:
                    self.on_store_failure("restore")
                    return raised, False
        return raised, True

    async def usage(self, config: GatewayConfig, now: float) -> dict[str, dict[str, int]]:
        """Current usage per quota and type (for ArksQuota status and ``arks-ray quota``)."""
        keys = {(q.name, b.type): quota_key(config.namespace, q.name, b.type, q.period, now, self.prefix)
                for q in config.quotas for b in q.budgets}
        values = await self.store.read(list(keys.values()))
        out: dict[str, dict[str, int]] = {}
        for (name, kind), key in keys.items():
            out.setdefault(name, {})[kind] = values[key]
        return out
