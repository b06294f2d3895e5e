"""``reconcile_namespace``: read one namespace, plan (pure), write only what differs. Level-triggered.

Called by the scheduler (``controller.scheduling``) for every event, the drift and status ticks and the
operator's start: all of them are the same call, so there is no create/update/resume distinction to
get wrong. It is idempotent: run twice on an unchanged namespace, the second run writes nothing.

Reads happen in two concurrent rounds (the Arks objects and the RayService; then the Secrets, PVCs,
Jobs and quota usage those objects point at); then ``controller.plans`` decides; then the writes run
phase by phase.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from arks_ray.api import load_documents
from arks_ray.api.endpoint import ArksEndpoint
from arks_ray.api.gateway import GatewayConfig, Quota
from arks_ray.gateway.ports import StoreUnavailable
from arks_ray.gateway.quotas import Floor
from arks_ray.render.names import RAYSERVICE_NAME
from arks_ray.render.network_policy import NETWORK_POLICY_NAME
from arks_ray.render.options import GATEWAY_SECRET
from controller import errors
from controller.kube import ARKS_KINDS, KubeClient
from controller.meta import MANAGED_BY, name_of
from controller.metrics import Metrics
from controller.plans import Observed, Plan, plan_namespace
from controller.progress import download_logs
from controller.settings import ControllerSettings
from controller.snapshot import Snapshot, take
from controller.writes import Write

logger = logging.getLogger("controller.reconcile")


class UsageReader(Protocol):
    """Quota usage per quota and type, and its restore (``arks_ray.gateway.quotas.QuotaLedger`` is one)."""

    async def usage(self, namespace: str, quotas: Sequence[Quota], now: float) -> dict[str, dict[str, int]]: ...
    async def restore(self, namespace: str, quotas: Sequence[Quota], floors: Iterable[Floor], now: float) -> int: ...


class RoutesReader(Protocol):
    """The gateway replicas' effective weights, by (endpoint, backend) (``arks_ray.gateway.reports``)."""

    async def routes(self, namespace: str, now: float) -> dict[tuple[str, str], float]: ...


@dataclass
class Outcome:
    """What one reconcile did."""

    namespace: str
    writes: list[Write] = field(default_factory=list)
    requeue_after: float | None = None
    empty: bool = False
    errors: int = 0
    warnings: int = 0
    secrets: set[str] = field(default_factory=set)
    """Secrets the namespace's tokens read (the Secret watch filters on them)."""
    plan: Plan | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent reading, planning (pure CPU) and writing."""


async def _secrets(kube: KubeClient, ns: str, names: set[str]) -> list[dict[str, Any]]:
    if not names:
        return []
    # One list instead of a get per token; the values are dropped right away, except those referenced.
    return [s for s in await kube.list("Secret", ns) if name_of(s) in names]


async def _pvc(kube: KubeClient, ns: str, name: str) -> tuple[str, dict[str, Any] | None]:
    return name, await kube.get("PersistentVolumeClaim", ns, name)


async def _usage(reader: UsageReader | None, config: GatewayConfig | None, floors: Sequence[Floor], now: float,
                 metrics: Metrics | None) -> dict[str, dict[str, int]] | None:
    """Usage to mirror into the statuses. A counter reading lower than its status recorded (the store lost
    its data) is raised back to it first: the store holds usage, the status is its durable copy."""
    if reader is None or config is None:
        return None
    try:
        usage = await reader.usage(config.namespace, config.quotas, now)
        lost = [f for f in floors if usage.get(f.quota, {}).get(f.type, 0) < f.value]
        if lost and await reader.restore(config.namespace, config.quotas, lost, now):
            logger.warning("restored %d quota counter(s) in %s from ArksQuota status", len(lost), config.namespace)
            usage = await reader.usage(config.namespace, config.quotas, now)
        return usage
    except StoreUnavailable as exc:
        # Status keeps its last values; the next status tick tries again.
        logger.warning("quota usage not mirrored in %s: %s", config.namespace, exc)
        if metrics is not None:
            metrics.store_failures.inc()
        return None


async def _routes(reader: RoutesReader | None, ns: str, wanted: bool, now: float,
                  metrics: Metrics | None) -> dict[tuple[str, str], float] | None:
    if reader is None or not wanted:
        return None
    try:
        return await reader.routes(ns, now)
    except StoreUnavailable as exc:
        logger.warning("effective weights not mirrored in %s: %s", ns, exc)
        if metrics is not None:
            metrics.store_failures.inc()
        return None


async def observe(kube: KubeClient, ns: str, reader: UsageReader | None, now: float,
                  metrics: Metrics | None = None, routes: RoutesReader | None = None,
                  gateway_secret: str = GATEWAY_SECRET, policy_wanted: bool = True) -> tuple[Snapshot, Observed]:
    """Both rounds of reads."""
    lists, rayservice, secret, policy = await asyncio.gather(
        asyncio.gather(*(kube.list(kind, ns) for kind in ARKS_KINDS)),
        kube.get("RayService", ns, RAYSERVICE_NAME), kube.get("Secret", ns, gateway_secret),
        _network_policy(kube, ns, policy_wanted))
    snap = take(ns, [o for items in lists for o in items])
    secrets, pvcs, jobs, usage, weights, daemonsets = await asyncio.gather(
        _secrets(kube, ns, snap.secret_names()),
        asyncio.gather(*(_pvc(kube, ns, n) for n in sorted(snap.pvc_names()))),
        kube.list("Job", ns, MANAGED_BY) if snap.downloads() else _nothing(),
        _usage(reader, snap.quota_config(), snap.quota_floors(), now, metrics),
        _routes(routes, ns, any(isinstance(o, ArksEndpoint) for o in snap.loaded.objects), now, metrics),
        # Node-cache preloads, also of models that no longer want one (to delete them).
        kube.list("DaemonSet", ns, MANAGED_BY) if snap.models() else _nothing())
    logs = await download_logs(kube, ns, jobs)
    if secrets:
        found = load_documents(secrets, ns)
        snap.loaded.secrets.extend(found.secrets)
    # Only the gateway Secret's metadata is kept: its values are never read back.
    secret_meta = {"metadata": secret.get("metadata") or {}} if secret else None
    return snap, Observed(rayservice, dict(pvcs), jobs, usage, weights, gateway_secret=secret_meta,
                          download_logs=logs, daemonsets=daemonsets, network_policy=policy)


async def _network_policy(kube: KubeClient, ns: str, wanted: bool) -> dict[str, Any] | None:
    """The live ``arks-ray-cluster`` policy. An operator that writes none may lack the RBAC to read it (its rule
    taken out with the setting turned off): that is not a reason to stop reconciling."""
    try:
        return await kube.get("NetworkPolicy", ns, NETWORK_POLICY_NAME)
    except errors.Forbidden:
        if wanted:
            raise
        logger.debug("NetworkPolicy %s/%s not readable (forbidden); network policies are off", ns,
                     NETWORK_POLICY_NAME)
        return None


async def _nothing() -> list[dict[str, Any]]:
    return []


async def _write(kube: KubeClient, w: Write) -> bool:
    """One write; False when there was nothing to do after all (someone else got there first)."""
    body = dict(w.body or {})
    try:
        if w.verb == "apply":
            await kube.apply(body)
        elif w.verb == "create":
            await kube.create(body)
        elif w.verb == "delete":
            return await kube.delete(w.kind, w.namespace, w.name)
        else:
            await kube.patch(w.kind, w.namespace, w.name, body, status=w.verb == "status")
    except errors.Conflict:
        if w.verb != "create":
            raise
        # Created meanwhile (a PVC made by hand, a second operator during a rollout): the next
        # reconcile reads it and goes on.
        logger.info("%s: already exists", w)
        return False
    except errors.NotFound:
        if w.verb not in ("status", "patch"):
            raise
        logger.info("%s: the object is gone", w)  # deleted between the read and the write
        return False
    logger.info("%s", w)
    return True


async def execute(kube: KubeClient, plan: Plan) -> list[Write]:
    """Run the phases in order, each phase's writes concurrently; fail after the phase that failed."""
    done: list[Write] = []
    for phase in plan.phases:
        results = await asyncio.gather(*(_write(kube, w) for w in phase), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        done += [w for w, r in zip(phase, results, strict=True) if r is True]
        if failures:
            # Later phases depend on this one (e.g. a finalizer is released only after the RayService
            # without the app was applied), so stop here and let the scheduler retry the whole plan.
            raise failures[0]
    return done


async def reconcile_namespace(kube: KubeClient, namespace: str, settings: ControllerSettings, *,
                              usage: UsageReader | None = None, now: float | None = None,
                              metrics: Metrics | None = None, routes: RoutesReader | None = None) -> Outcome:
    """Bring one namespace to the state its Arks objects describe; return what was written."""
    now = time.time() if now is None else now
    started = time.perf_counter()
    snap, seen = await observe(kube, namespace, usage, now, metrics, routes, settings.render.gateway_secret,
                               settings.render.network_access is not None)
    read = time.perf_counter()
    plan = plan_namespace(snap, seen, options=settings.render, now=now, finalizer=settings.finalizer,
                          download_backoff=settings.timing.download_backoff,
                          redis_password=settings.gateway_redis_password)
    planned = time.perf_counter()
    written = await execute(kube, plan)
    timings = {"read": read - started, "plan": planned - read, "write": time.perf_counter() - planned}
    for warning in plan.warnings:
        logger.warning("%s: %s", namespace, warning)
    problems = [p for found in snap.problems.values() for p in found]
    outcome = Outcome(namespace, written, plan.requeue_after, plan.empty,
                      errors=sum(p.severity == "error" for p in problems),
                      warnings=sum(p.severity != "error" for p in problems),
                      secrets=snap.secret_names(), plan=plan, timings=timings)
    if metrics is not None:
        for w in written:
            metrics.writes.labels(w.kind, w.verb).inc()
        metrics.problems.labels(namespace, "error").set(outcome.errors)
        metrics.problems.labels(namespace, "warning").set(outcome.warnings)
    return outcome

