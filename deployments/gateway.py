"""The gateway's Serve application: ``deployments.gateway:build_app`` is its rendered import path.

``GatewayDeployment`` is the replica: it builds its collaborators inside the replica, never at import
time (the counter store, Redis or memory; the backends; the metrics), holds one ``Pipeline``
(``deployments.pipeline``) and serves it through the HTTP surface (``deployments.http_api``). Per-tenant
data arrives as the Serve ``user_config`` (``reconfigure``), so token and endpoint edits apply to live
replicas without a restart. Background work: backend health checks, lease renewal and the route report.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI

from arks_ray.api.gateway import GATEWAY_APP
from arks_ray.gateway.ports import CounterStore, ReportBoard, StoreUnavailable
from arks_ray.gateway.quotas import QuotaLedger
from arks_ray.gateway.reports import publish_routes
from arks_ray.gateway.series import quota_levels
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.stores.memory import MemoryStore
from deployments.backends import Backends, RoutedBackends
from deployments.gateway_metrics import build_metrics
from deployments.http_api import make_api
from deployments.pipeline import Pipeline

logger = logging.getLogger("ray.serve.arks.gateway")

DEPLOYMENT_NAME = "ArksGateway"


def make_store(settings: GatewaySettings, environ: Mapping[str, str] = os.environ) -> CounterStore:
    """The counter store; the Redis password comes from the replica's environment (a Secret, through
    ``secretKeyRef``), never from the rendered settings."""
    settings = settings.with_secrets(environ)
    if settings.redis_url:
        from arks_ray.stores.redis import RedisStore

        return RedisStore(settings.redis_url, timeout_s=settings.store_timeout_s)
    logger.info("no redis_url: rate limits and quotas are counted in this replica's memory, seen by no other "
                "replica and lost when it restarts (the rendered gateway has one replica where they exist)")
    return MemoryStore()


async def check_health(pipeline: Pipeline, prober: Backends) -> None:
    """One round of active health checks over every backend of every endpoint."""
    endpoints = pipeline.index.config.endpoints
    apps = [(e.name, b) for e in endpoints for b in e.backends if b.kind == "app"]
    https = [(e.name, b) for e in endpoints for b in e.backends if b.kind == "http"]
    app_status = await prober.probe_apps() if apps else {}
    results = await asyncio.gather(*(prober.probe_http(b) for _, b in https))
    now = pipeline.clock()
    checked = [(name, b, *app_status.get(b.name, (False, "Serve app not found"))) for name, b in apps]
    checked += [(name, b, ok, why) for (name, b), (ok, why) in zip(https, results, strict=True)]
    for name, backend, ok, why in checked:
        breaker = pipeline.router.state(name, backend.name).breaker
        before = breaker.view(now)
        pipeline.router.health_check(name, backend.name, now, ok, why)
        after = breaker.view(now)
        if (before == "closed") != (after == "closed"):  # in or out of rotation, not every probe
            log = logger.info if after == "closed" else logger.warning
            log("backend %s of %s: %s -> %s after a health check%s", backend.name, name, before, after,
                f" ({why})" if why and not ok else "")


class GatewayDeployment:
    """The Serve deployment: one ``Pipeline`` per replica, its HTTP app built inside the replica.

    Background work starts with the first ``reconfigure`` (Serve calls it right after the constructor,
    on the replica's event loop)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.backends = RoutedBackends(settings)
        self.store = make_store(settings)
        self.pipeline = Pipeline(settings, self.backends, store=self.store,
                                 metrics=build_metrics(settings))
        self.replica = uuid.uuid4().hex[:12]
        self._background: list[asyncio.Task[None]] = []

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.pipeline.reconfigure(user_config)
        if self._background:
            return
        loop = asyncio.get_running_loop()
        if self.settings.health_check_interval_s > 0:
            self._background.append(loop.create_task(self._every(
                self.settings.health_check_interval_s, lambda: check_health(self.pipeline, self.backends))))
        self._background.append(loop.create_task(self._every(self.settings.lease_seconds / 3,
                                                             self.pipeline.renew_leases)))
        self._background.append(loop.create_task(self._every(self.settings.route_report_interval_s, self._report)))

    async def _every(self, interval_s: float, work: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await work()
            except Exception:
                logger.exception("gateway background work failed; retrying in %gs", interval_s)

    async def _report(self) -> None:
        views = self.pipeline.routes()
        self.pipeline.metrics.routes(views)
        board: ReportBoard = self.store  # type: ignore[assignment]  # both stores are report boards too
        try:
            await publish_routes(board, self.pipeline.index.config.namespace, self.replica, views,
                                 ttl_s=3 * self.settings.route_report_interval_s, now=time.time())
        except StoreUnavailable as exc:
            self.pipeline.metrics.store_failure("report")
            logger.debug("route report not published: %s", exc)
        config = self.pipeline.index.config
        if config.quotas:  # quota usage as gauges, for the near-exhaustion alert and dashboards
            try:
                usage = await QuotaLedger(self.store).usage(config.namespace, config.quotas, time.time())
            except StoreUnavailable:
                self.pipeline.metrics.store_failure("quota_read")
            else:
                self.pipeline.metrics.quotas(config.namespace, quota_levels(config, usage))

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.pipeline)


def build_app(args: dict[str, Any]) -> Any:
    """Serve's entry point for the ``gateway`` application."""
    from ray import serve

    settings = GatewaySettings.model_validate(args.get("settings") or {})
    deployment = serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=1000)(serve.ingress()(GatewayDeployment))
    return deployment.bind(settings)


__all__ = ["DEPLOYMENT_NAME", "GATEWAY_APP", "GatewayDeployment", "build_app", "check_health"]
