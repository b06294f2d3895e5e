"""Admission and settlement of one request against its rate limits and quota.

Called by the request lifecycle (``deployments.pipeline``) around every forwarded request: ``admit``
before (one store round trip), ``settle`` after (one more), whatever happened in between: success,
backend failure or client disconnect. Store failures at admission follow the configured policy (failOpen
admits without counting, failClosed refuses with 503); a settlement the store cannot take is queued and
retried (``arks_ray.gateway.settlement``). Concurrency leases are short and renewed, in one round trip for
all, while their requests live (``renew``), so a lease whose holder died frees within one lease period.
Every store failure is reported to the ``on_store_failure`` hook, which the ingress turns into a metric.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from arks_ray.api.endpoint import Pricing
from arks_ray.api.gateway import GatewayConfig, Grant, Quota, Token
from arks_ray.api.quota import period_end
from arks_ray.errors import BackendUnavailable, QuotaExceeded, RateLimited
from arks_ray.gateway.limits import (
    Algorithm,
    Counter,
    Usage,
    counters_for,
    format_reset,
    settled_amounts,
)
from arks_ray.gateway.ports import CounterStore, Decision, Lease, StoreUnavailable
from arks_ray.gateway.settlement import Settlement, Settlements

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

    @property
    def leases(self) -> list[Lease]:
        return [Lease(c.key, self.request_id) for c in self.counters if c.kind == "lease"] if self.counted else []


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
                 lease_ms: int = 30_000, prefix: str = "arks",
                 on_store_failure: Callable[[str], None] = lambda _op: None,
                 settlements: Settlements | None = None) -> None:
        self.store = store
        self.policy = policy
        self.algorithm = algorithm
        self.default_max_tokens = default_max_tokens
        self.lease_ms = lease_ms
        self.prefix = prefix
        self.on_store_failure = on_store_failure
        self.settlements = settlements or Settlements(store, on_failure=on_store_failure)
        self._live: dict[str, list[Lease]] = {}
        """Leases of the requests in flight on this replica, renewed until they finish."""

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
        if admission.leases:
            self._live[admission.request_id] = admission.leases
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
                                 headers=headers, reason="quota")
        if decision.retry_after_ms < 0:
            return RateLimited(f"this request needs about {counter.amount} against the {counter.label} limit of "
                               f"{counter.limit}, so it can never fit; lower max_tokens", headers=headers,
                               reason=counter.label)
        retry_s = max(1, math.ceil(decision.retry_after_ms / 1000))
        headers["Retry-After"] = str(retry_s)
        return RateLimited(f"{counter.label} limit of {counter.limit} reached; retry in {retry_s}s", headers=headers,
                           reason=counter.label)

    async def settle(self, admission: Admission, usage: Usage) -> None:
        """Charge what was used and refund the rest, exactly once per admission; never raises (a settlement
        the store cannot take now is queued and retried until it lands)."""
        self._live.pop(admission.request_id, None)
        if not admission.counted:
            return
        amounts = settled_amounts(admission.counters, usage, admission.pricing)
        await self.settlements.submit(
            Settlement(admission.counters, admission.request_id, admission.reserved_at_ms, amounts))

    def live_leases(self) -> Iterable[Lease]:
        for leases in self._live.values():
            yield from leases

    async def renew(self, now: float) -> int:
        """Extend the leases of every request still in flight here to one lease period from ``now``."""
        leases = list(self.live_leases())
        if not leases:
            return 0
        try:
            return await self.store.renew(leases, int(now * 1000) + self.lease_ms)
        except StoreUnavailable as exc:
            self.on_store_failure("renew")
            logger.warning("concurrency leases not renewed (store unavailable): %s", exc)
            return 0
