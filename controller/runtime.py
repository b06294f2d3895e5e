"""The operator's assembly: clients, scheduler, kopf settings, and ``run``.

``controller.__main__`` builds a ``Runtime`` from settings and calls ``run``; the integration tests do
exactly the same with a client configuration pointing at the Kubernetes emulator, so the code under
test is the code that ships.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import kopf
import kubernetes.client

from controller.handlers import register
from controller.kube import KubeClient, OfficialKubeClient
from controller.metrics import Metrics
from controller.reconcile import Outcome, RoutesReader, UsageReader, reconcile_namespace
from controller.scheduling import Scheduler
from controller.settings import ControllerSettings

logger = logging.getLogger("controller")


@dataclasses.dataclass
class Runtime:
    """Everything the handlers share; one per operator."""

    settings: ControllerSettings
    configuration: kubernetes.client.Configuration
    kube: KubeClient
    metrics: Metrics
    usage: UsageReader | None = None
    routes: RoutesReader | None = None
    scheduler: Scheduler = dataclasses.field(init=False)
    closers: list[Callable[[], Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.reconcile, self.settings.timing, self.metrics,
                                   mirror_quotas=self.usage is not None)

    async def reconcile(self, namespace: str) -> Outcome:
        return await reconcile_namespace(self.kube, namespace, self.settings, usage=self.usage, metrics=self.metrics,
                                        routes=self.routes)

    async def close(self) -> None:
        await self.scheduler.close()
        await self.kube.close()
        for closer in self.closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await result


@dataclasses.dataclass
class StoreRoutes:
    """``RoutesReader`` over the counter store the gateway replicas publish their route reports to."""

    store: Any

    async def routes(self, namespace: str, now: float) -> dict[tuple[str, str], float]:
        from arks_ray.gateway.reports import read_routes

        return await read_routes(self.store, namespace, now)


def build_runtime(settings: ControllerSettings, configuration: kubernetes.client.Configuration,
                  metrics: Metrics | None = None) -> Runtime:
    """Clients for ``settings``: the official Kubernetes client, and Redis when quotas are mirrored."""
    net = settings.networking
    kube = OfficialKubeClient(configuration, field_manager=settings.field_manager,
                              timeout=(net.connect_timeout, net.request_timeout))
    runtime = Runtime(settings, configuration, kube, metrics or Metrics())
    if settings.redis_url:
        from arks_ray.gateway.quotas import QuotaLedger
        from arks_ray.stores.redis import RedisStore

        store = RedisStore(settings.redis_url)
        runtime.usage = QuotaLedger(store)
        runtime.routes = StoreRoutes(store)
        runtime.scheduler.mirror_quotas = True
        runtime.closers.append(store.close)
    return runtime


def operator_settings(settings: ControllerSettings) -> kopf.OperatorSettings:
    """kopf's settings: explicit timeouts, ``arks.ai`` storage prefixes, server-side label selectors."""
    s = kopf.OperatorSettings()
    net = settings.networking
    s.networking.request_timeout = net.request_timeout
    s.networking.connect_timeout = net.connect_timeout
    s.watching.server_timeout = net.watch_server_timeout
    s.watching.client_timeout = net.watch_client_timeout
    s.watching.connect_timeout = net.connect_timeout
    # No handler of ours stores progress or a diff-base (all are event handlers), but if one ever does,
    # it lands in arks.ai annotations, which the CRDs' structural schemas do not prune.
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="arks.ai")
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="arks.ai",
                                                                     key="last-handled-configuration")
    s.persistence.finalizer = "arks.ai/kopf"
    s.scanning.disabled = not settings.dynamic_scanning
    s.posting.level = logging.WARNING
    selector = "app.kubernetes.io/managed-by=arks-ray"
    for res in (("ray.io", "v1", "rayservices"), ("batch", "v1", "jobs"), ("", "v1", "persistentvolumeclaims")):
        s.watching.label_selectors[res] = selector
    return s


Flag = asyncio.Event | threading.Event


async def run(runtime: Runtime, *, stop_flag: Flag | None = None, ready_flag: Flag | None = None,
              liveness_endpoint: str | None = None) -> None:
    """Run the operator until ``stop_flag`` is set (or forever)."""
    registry = kopf.OperatorRegistry()
    register(registry, runtime)
    settings = runtime.settings
    await kopf.operator(
        registry=registry,
        settings=operator_settings(settings),
        standalone=settings.standalone,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
