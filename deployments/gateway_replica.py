"""The gateway's Serve replica: one ``Gateway`` per replica, plus its background work.

Built by ``deployments.gateway.build_app`` (the rendered import path), which wraps ``GatewayDeployment``
in ``serve.deployment`` / ``serve.ingress``. Collaborators are built here, inside the replica, never at
import time: the counter store (Redis or memory), the backends, the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from arks_ray.gateway.reports import publish_routes
from arks_ray.gateway.series import quota_levels
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.stores.base import CounterStore, StoreUnavailable
from arks_ray.stores.memory import MemoryStore
from deployments.backends import RoutedBackends
from deployments.gateway import Gateway, make_api
from deployments.gateway_metrics import build_metrics

logger = logging.getLogger("ray.serve.arks.gateway")


def make_store(settings: GatewaySettings) -> CounterStore:
    if settings.redis_url:
        from arks_ray.stores.redis import RedisStore

        return RedisStore(settings.redis_url, timeout_s=settings.store_timeout_s)
    return MemoryStore()


class GatewayDeployment:
    """The Serve deployment: one ``Gateway`` per replica, its HTTP app built inside the replica.

    Background work starts with the first ``reconfigure`` (Serve calls it right after the constructor,
    on the replica's event loop): the quota-usage restore, the backend health checks, and the route
    report (metrics, and the store for ``ArksEndpoint.status``)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.backends = RoutedBackends(settings)
        self.gateway = Gateway(settings, self.backends, store=make_store(settings), metrics=build_metrics(settings))
        self.replica = uuid.uuid4().hex[:12]
        self._restoring: asyncio.Task[int] | None = None
        self._background: list[asyncio.Task[None]] = []

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.gateway.reconfigure(user_config)
        loop = asyncio.get_running_loop()
        # In the background: a restore may have to wait for Redis, and reconfigure must not block.
        self._restoring = loop.create_task(self.gateway.restore_quota_usage())
        if not self._background:
            if self.settings.health_check_interval_s > 0:
                self._background.append(loop.create_task(self._every(
                    self.settings.health_check_interval_s, lambda: self.gateway.check_health(self.backends))))
            self._background.append(loop.create_task(self._every(self.settings.route_report_interval_s,
                                                                 self._report)))

    async def _every(self, interval_s: float, work: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await work()
            except Exception:
                logger.exception("gateway background work failed; retrying in %gs", interval_s)

    async def _report(self) -> None:
        views = self.gateway.routes()
        self.gateway.metrics.routes(views)
        try:
            await publish_routes(self.gateway.governor.store, self.gateway.index.config.namespace, self.replica,
                                 views, ttl_s=3 * self.settings.route_report_interval_s, now=time.time())
        except StoreUnavailable as exc:
            self.gateway.metrics.store_failure("report")
            logger.debug("route report not published: %s", exc)
        config = self.gateway.index.config
        if config.quotas:  # quota usage as gauges, for the near-exhaustion alert and dashboards
            try:
                usage = await self.gateway.governor.usage(config, time.time())
            except StoreUnavailable:
                self.gateway.metrics.store_failure("quota_read")
            else:
                self.gateway.metrics.quotas(config.namespace, quota_levels(config, usage))

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.gateway)
