"""Route reports: what gateway replicas publish and what the operator reads back (memory store)."""

from __future__ import annotations

from arks_ray.gateway.reports import publish_routes, read_routes, routes_prefix
from arks_ray.gateway.routing import RouteView
from arks_ray.stores.memory import MemoryStore


def view(backend: str, weight: float) -> RouteView:
    return RouteView(endpoint="m", backend=backend, kind="app", weight=1, health="closed", slo_factor=1.0,
                     effective_weight=weight, in_flight=0, ttft_ms=None, tpot_ms=None, reason="")


async def test_replicas_are_averaged_and_old_reports_expire() -> None:
    store = MemoryStore()
    await publish_routes(store, "ns", "r1", [view("a", 1.0), view("b", 0.0)], ttl_s=30, now=100)
    await publish_routes(store, "ns", "r2", [view("a", 0.5)], ttl_s=30, now=110)
    await publish_routes(store, "other", "r3", [view("a", 9.0)], ttl_s=30, now=110)
    assert await read_routes(store, "ns", 120) == {("m", "a"): 0.75, ("m", "b"): 0.0}
    assert await read_routes(store, "ns", 135) == {("m", "a"): 0.5}  # r1 is gone: it stopped reporting


async def test_an_unreadable_report_is_skipped() -> None:
    store = MemoryStore()
    await store.publish(routes_prefix("ns") + "bad", "{not json", 30_000, 0)
    await publish_routes(store, "ns", "good", [view("a", 2.0)], ttl_s=30, now=0)
    assert await read_routes(store, "ns", 1) == {("m", "a"): 2.0}
