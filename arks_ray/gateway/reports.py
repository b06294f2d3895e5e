"""Route reports: each gateway replica publishes its effective weights; the operator reads them back.

Written by the gateway deployment every ``route_report_interval_s`` (``publish_routes``) into the
counter store, under one short-lived key per replica; read by the controller (``read_routes``) into
``ArksEndpoint.status.routes[].effectiveWeight``, averaged over the replicas that reported recently.
With the in-memory store (no Redis) nothing leaves the replica, and the status shows what the operator
can see by itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from arks_ray.gateway.ports import ReportBoard
from arks_ray.gateway.routing import RouteView

logger = logging.getLogger("arks_ray.gateway")


def routes_prefix(namespace: str, prefix: str = "arks") -> str:
    return f"{prefix}:{namespace}:routes:"


def encode(views: Sequence[RouteView]) -> str:
    return json.dumps([{"endpoint": v.endpoint, "backend": v.backend, "effective_weight": v.effective_weight,
                        "health": v.health, "slo_factor": v.slo_factor, "reason": v.reason} for v in views],
                      separators=(",", ":"), sort_keys=True)


async def publish_routes(store: ReportBoard, namespace: str, replica: str, views: Sequence[RouteView],
                         ttl_s: float, now: float) -> None:
    await store.publish(routes_prefix(namespace) + replica, encode(views), int(ttl_s * 1000), int(now * 1000))


def merge(reports: Sequence[str]) -> dict[tuple[str, str], float]:
    """(endpoint, backend) -> the mean effective weight over the replicas that reported it."""
    sums: dict[tuple[str, str], list[float]] = {}
    for raw in reports:
        try:
            rows = json.loads(raw)
            for row in rows:
                sums.setdefault((str(row["endpoint"]), str(row["backend"])), []).append(
                    float(row["effective_weight"]))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring an unreadable route report: %s", exc)
    return {key: round(sum(values) / len(values), 4) for key, values in sums.items()}


async def read_routes(store: ReportBoard, namespace: str, now: float) -> dict[tuple[str, str], float]:
    found = await store.collect(routes_prefix(namespace), int(now * 1000))
    return merge(list(found.values()))
