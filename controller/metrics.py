"""Prometheus metrics of the operator: reconciles, writes, errors, duration, problems.

Created once per operator by ``controller.__main__`` (served on ``settings.metrics_port``) or by a test
(each with its own registry, so several operators in one process do not collide); updated by the
scheduler and the reconciler. Labels are bounded: kinds, verbs, outcomes and namespaces, never object
names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """The operator's metrics, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("arks_controller_reconciles", "Namespace reconciles, by outcome (ok, error).",
                                  ["outcome"], registry=r)
        self.writes = Counter("arks_controller_writes", "API writes, by kind and verb (apply, create, delete, "
                              "patch, status).", ["kind", "verb"], registry=r)
        self.errors = Counter("arks_controller_errors", "Failed reconciles, by error type.", ["type"], registry=r)
        self.duration = Histogram("arks_controller_reconcile_duration_seconds", "Time to reconcile one namespace.",
                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.problems = Gauge("arks_controller_problems", "Problems found in Arks objects at the last reconcile.",
                              ["namespace", "severity"], registry=r)
        self.pending = Gauge("arks_controller_pending_namespaces", "Namespaces waiting to be reconciled.",
                             registry=r)
        self.store_failures = Counter("arks_controller_store_failures",
                                      "Quota usage reads that failed (the counter store did not answer).", registry=r)

    def serve(self, port: int) -> None:
        """Expose ``/metrics`` on ``port`` (a daemon thread, as prometheus_client does)."""
        start_http_server(port, registry=self.registry)
