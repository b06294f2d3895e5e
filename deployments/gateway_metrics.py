"""Gateway metrics: the ``Metrics`` port, a no-op for tests, and ``ServeMetrics`` on ``ray.serve.metrics``.

Used by ``deployments.gateway``. Ray's metrics agent exports them with a ``ray_`` prefix.
"""

from __future__ import annotations

from typing import Protocol

from arks_ray.gateway.limits import Usage
from arks_ray.gateway.routing import RouteView

HEALTH_VALUE = {"closed": 1.0, "half_open": 0.5, "open": 0.0}


class Metrics(Protocol):
    def request(self, model: str, status: int) -> None: ...
    def tokens(self, model: str, usage: Usage) -> None: ...
    def limited(self, model: str, kind: str) -> None: ...
    def store_failure(self, operation: str) -> None: ...
    def retried(self, model: str, backend: str) -> None: ...
    def routes(self, views: list[RouteView]) -> None: ...


class NoMetrics(Metrics):
    """Records nothing (tests, and callers that pass no metrics)."""


class ServeMetrics:
    """Gateway metrics through ``ray.serve.metrics``."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter("arks_gateway_requests", "Requests by model and status.",
                                         tag_keys=("model", "status"))
        self._tokens = metrics.Counter("arks_gateway_tokens", "Tokens by model and type.", tag_keys=("model", "type"))
        self._limited = metrics.Counter("arks_gateway_limited", "Requests refused by limits.",
                                        tag_keys=("model", "kind"))
        self._store = metrics.Counter("arks_gateway_store_failures", "Counter store failures by operation.",
                                      tag_keys=("operation",))
        self._retried = metrics.Counter("arks_gateway_retries", "Requests retried on another backend.",
                                        tag_keys=("model", "backend"))
        tags = ("model", "backend")
        self._weight = metrics.Gauge("arks_gateway_backend_effective_weight",
                                     "Configured weight x health factor x SLO factor.", tag_keys=tags)
        self._slo = metrics.Gauge("arks_gateway_backend_slo_factor", "SLO factor of a backend (0-1].", tag_keys=tags)
        self._health = metrics.Gauge("arks_gateway_backend_health",
                                     "Circuit breaker: 1 closed, 0.5 half-open, 0 open.", tag_keys=tags)
        self._ttft = metrics.Gauge("arks_gateway_backend_ttft_ms", "EWMA of time to first token.", tag_keys=tags)
        self._tpot = metrics.Gauge("arks_gateway_backend_tpot_ms", "EWMA of time per output token.", tag_keys=tags)

    def request(self, model: str, status: int) -> None:
        self._requests.inc(tags={"model": model, "status": str(status)})

    def tokens(self, model: str, usage: Usage) -> None:
        if usage.prompt_tokens:
            self._tokens.inc(usage.prompt_tokens, tags={"model": model, "type": "prompt"})
        if usage.completion_tokens:
            self._tokens.inc(usage.completion_tokens, tags={"model": model, "type": "completion"})

    def limited(self, model: str, kind: str) -> None:
        self._limited.inc(tags={"model": model, "kind": kind})

    def store_failure(self, operation: str) -> None:
        self._store.inc(tags={"operation": operation})

    def retried(self, model: str, backend: str) -> None:
        self._retried.inc(tags={"model": model, "backend": backend})

    def routes(self, views: list[RouteView]) -> None:
        for v in views:
            tags = {"model": v.endpoint, "backend": v.backend}
            self._weight.set(v.effective_weight, tags=tags)
            self._slo.set(v.slo_factor, tags=tags)
            self._health.set(HEALTH_VALUE[v.health], tags=tags)
            if v.ttft_ms is not None:
                self._ttft.set(v.ttft_ms, tags=tags)
            if v.tpot_ms is not None:
                self._tpot.set(v.tpot_ms, tags=tags)
