"""Gateway metrics and access log: the ``Metrics`` port, a no-op, ``ServeMetrics`` and ``AccessLog``.

The request lifecycle calls ``finished(record)`` exactly once per request; the replica's background
work calls ``routes`` (effective weights) and ``quotas`` (quota usage); the governor calls
``store_failure``; the router's retry calls ``retried``. ``build_metrics`` makes what a replica uses:
``ServeMetrics`` (exported by Ray's metrics agent with a ``ray_`` prefix) and, unless turned off in the
settings, the ``AccessLog`` on stdout. What a record becomes as samples, and the label bounds, are in
``arks_ray.gateway.series``; the log line is ``arks_ray.gateway.access_log``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

from arks_ray.gateway import access_log
from arks_ray.gateway.records import RequestRecord
from arks_ray.gateway.routing import RouteView
from arks_ray.gateway.series import (
    LATENCY_BUCKETS_S,
    OVERHEAD_BUCKETS_S,
    TENANT_LABELS,
    TPOT_BUCKETS_S,
    QuotaLevel,
    TokenNames,
    samples,
)
from arks_ray.gateway.settings import GatewaySettings

HEALTH_VALUE = {"closed": 1.0, "half_open": 0.5, "open": 0.0}
# Every operation a store failure is reported for (the governor, the settlement queue, the replica's reports).
STORE_OPERATIONS = ("reserve", "renew", "settle", "settle_dropped", "report", "quota_read")


class Metrics(Protocol):
    def finished(self, record: RequestRecord) -> None: ...
    def store_failure(self, operation: str) -> None: ...
    def retried(self, endpoint: str, backend: str) -> None: ...
    def routes(self, views: list[RouteView]) -> None: ...
    def quotas(self, namespace: str, levels: Sequence[QuotaLevel]) -> None: ...


class NoMetrics:
    """Records nothing (tests, and callers that pass no metrics); the base of the others."""

    def finished(self, record: RequestRecord) -> None:
        return None

    def store_failure(self, operation: str) -> None:
        return None

    def retried(self, endpoint: str, backend: str) -> None:
        return None

    def routes(self, views: list[RouteView]) -> None:
        return None

    def quotas(self, namespace: str, levels: Sequence[QuotaLevel]) -> None:
        return None


class Fanout(NoMetrics):
    """Hands every call to each of several ``Metrics`` (Serve metrics and the access log)."""

    def __init__(self, *sinks: Metrics) -> None:
        self.sinks = sinks

    def finished(self, record: RequestRecord) -> None:
        for s in self.sinks:
            s.finished(record)

    def store_failure(self, operation: str) -> None:
        for s in self.sinks:
            s.store_failure(operation)

    def retried(self, endpoint: str, backend: str) -> None:
        for s in self.sinks:
            s.retried(endpoint, backend)

    def routes(self, views: list[RouteView]) -> None:
        for s in self.sinks:
            s.routes(views)

    def quotas(self, namespace: str, levels: Sequence[QuotaLevel]) -> None:
        for s in self.sinks:
            s.quotas(namespace, levels)


class AccessLog(NoMetrics):
    """One JSON line per finished request, written to ``stream`` (stdout: the replica's log)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def finished(self, record: RequestRecord) -> None:
        out = self.stream or sys.stdout  # looked up late: Ray redirects stdout after import
        out.write(access_log.line(record) + "\n")
        out.flush()


class ServeMetrics(NoMetrics):
    """Gateway metrics through ``ray.serve.metrics`` (Serve adds application/deployment/replica tags)."""

    def __init__(self, max_token_names: int = 100, metrics_module: Any = None) -> None:
        if metrics_module is None:
            from ray.serve import metrics as metrics_module
        m = metrics_module
        self.token_names = TokenNames(max_token_names)
        tenant = TENANT_LABELS
        self._requests = m.Counter("arks_gateway_requests_total", "Finished requests per tenant, by outcome and "
                                   "status code.", tag_keys=(*tenant, "outcome", "code"))
        self._tokens = m.Counter("arks_gateway_tokens_total", "Tokens per tenant: prompt or completion.",
                                 tag_keys=(*tenant, "type"))
        self._cost = m.Counter("arks_gateway_cost_total", "Cost per tenant at the endpoint's prices.",
                               tag_keys=tenant)
        self._refused = m.Counter("arks_gateway_refused_total", "Requests refused with 429, by the limit that "
                                  "refused them.", tag_keys=(*tenant, "reason"))
        self._ttft = m.Histogram("arks_gateway_ttft_seconds", "Time to first byte from the backend.",
                                 list(LATENCY_BUCKETS_S), tag_keys=tenant)
        self._tpot = m.Histogram("arks_gateway_tpot_seconds", "Time per output token after the first (streams).",
                                 list(TPOT_BUCKETS_S), tag_keys=tenant)
        self._e2e = m.Histogram("arks_gateway_request_duration_seconds", "Time from taking a request to its "
                                "last byte.", list(LATENCY_BUCKETS_S), tag_keys=tenant)
        self._overhead = m.Histogram("arks_gateway_overhead_seconds", "Time in the gateway before the backend "
                                     "was asked (auth, parsing, admission, routing).", list(OVERHEAD_BUCKETS_S),
                                     tag_keys=tenant)
        self._store = m.Counter("arks_gateway_store_failures_total", "Counter store failures by operation.",
                                tag_keys=("operation",))
        # Each operation's series exists at 0 before its first failure: a counter born at its first failures
        # shows no rate() when they all fall between two scrapes (a short Redis outage), so the
        # ArksStoreFailures alert would miss it. Ray's Counter.inc refuses 0; _record is what it calls, after
        # Serve's Counter fills the route tag (empty outside a request). Best effort: never fail a replica.
        for operation in STORE_OPERATIONS:
            zero = {"operation": operation}
            if "route" in (getattr(self._store, "_tag_keys", None) or ()):
                zero["route"] = ""
            try:
                self._store._record(0, tags=zero)
            except Exception:  # a Ray without _record: the series appears at its first failure instead
                break
        self._retried = m.Counter("arks_gateway_retries_total", "Requests retried on another backend.",
                                  tag_keys=("endpoint", "backend"))
        tags = ("endpoint", "backend")
        self._weight = m.Gauge("arks_gateway_backend_effective_weight",
                               "Configured weight x health factor x SLO factor.", tag_keys=tags)
        self._slo = m.Gauge("arks_gateway_backend_slo_factor", "SLO factor of a backend (0-1].", tag_keys=tags)
        self._health = m.Gauge("arks_gateway_backend_health",
                               "Circuit breaker: 1 closed, 0.5 half-open, 0 open.", tag_keys=tags)
        self._in_flight = m.Gauge("arks_gateway_backend_in_flight", "Requests in flight to a backend from this "
                                  "replica.", tag_keys=tags)
        self._ttft_ewma = m.Gauge("arks_gateway_backend_ttft_ms", "EWMA of time to first token.", tag_keys=tags)
        self._tpot_ewma = m.Gauge("arks_gateway_backend_tpot_ms", "EWMA of time per output token.", tag_keys=tags)
        self._quota_used = m.Gauge("arks_quota_used", "Quota usage in the current period.",
                                   tag_keys=("namespace", "quota", "type"))
        self._quota_limit = m.Gauge("arks_quota_limit", "Quota budget per period.",
                                    tag_keys=("namespace", "quota", "type"))

    def finished(self, record: RequestRecord) -> None:
        s = samples(record, self.token_names)
        t = s.tenant
        self._requests.inc(tags={**t, "outcome": s.outcome, "code": s.code})
        if s.prompt_tokens:
            self._tokens.inc(s.prompt_tokens, tags={**t, "type": "prompt"})
        if s.completion_tokens:
            self._tokens.inc(s.completion_tokens, tags={**t, "type": "completion"})
        if s.cost > 0:
            self._cost.inc(s.cost, tags=t)
        if s.refused is not None:
            self._refused.inc(tags={**t, "reason": s.refused})
        for histogram, value in ((self._ttft, s.ttft_s), (self._tpot, s.tpot_s), (self._e2e, s.duration_s),
                                 (self._overhead, s.gateway_s)):
            if value is not None:
                histogram.observe(value, tags=t)

    def store_failure(self, operation: str) -> None:
        self._store.inc(tags={"operation": operation})

    def retried(self, endpoint: str, backend: str) -> None:
        self._retried.inc(tags={"endpoint": endpoint, "backend": backend})

    def routes(self, views: list[RouteView]) -> None:
        for v in views:
            tags = {"endpoint": v.endpoint, "backend": v.backend}
            self._weight.set(v.effective_weight, tags=tags)
            self._slo.set(v.slo_factor, tags=tags)
            self._health.set(HEALTH_VALUE[v.health], tags=tags)
            self._in_flight.set(v.in_flight, tags=tags)
            if v.ttft_ms is not None:
                self._ttft_ewma.set(v.ttft_ms, tags=tags)
            if v.tpot_ms is not None:
                self._tpot_ewma.set(v.tpot_ms, tags=tags)

    def quotas(self, namespace: str, levels: Sequence[QuotaLevel]) -> None:
        for q in levels:
            tags = {"namespace": namespace, "quota": q.quota, "type": q.type}
            self._quota_used.set(q.used, tags=tags)
            self._quota_limit.set(q.limit, tags=tags)


def build_metrics(settings: GatewaySettings) -> Metrics:
    """What a gateway replica records to: Serve metrics and the access log, each unless turned off."""
    sinks: list[Metrics] = []
    if settings.metrics:
        sinks.append(ServeMetrics(settings.metrics_max_token_names))
    if settings.access_log:
        sinks.append(AccessLog())
    if len(sinks) == 1:
        return sinks[0]
    return Fanout(*sinks) if sinks else NoMetrics()
