"""``ServeBackends`` / ``RoutedBackends`` without Ray: the fast 503 for an app with no running replica, and Ray's
exceptions turned into failures a client may see (no exception text)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from arks_ray.api.gateway import Backend
from arks_ray.engines.protocol import EngineRequest, Failure
from arks_ray.gateway.settings import GatewaySettings
from deployments.backends import ItemStream, RoutedBackends, describe_failure


@dataclass
class _Deployment:
    replica_states: dict[Any, int] = field(default_factory=dict)


@dataclass
class _App:
    status: str
    deployments: dict[str, _Deployment]


class _Handle:
    def __init__(self) -> None:
        self.calls = 0

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, request: EngineRequest) -> Any:
        self.calls += 1
        raise AssertionError("a request reached a handle of an app that has no replica")


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    state: dict[str, Any] = {"apps": {}, "handle": _Handle()}
    serve = types.SimpleNamespace(
        status=lambda: types.SimpleNamespace(applications=state["apps"]),
        get_app_handle=lambda name: state["handle"])
    ray = types.ModuleType("ray")
    ray.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", serve)  # type: ignore[arg-type]
    return state


async def test_an_app_without_a_running_replica_is_answered_503_at_once(fake_serve: dict[str, Any]) -> None:
    fake_serve["apps"] = {
        "app-up": _App("RUNNING", {"d": _Deployment({"RUNNING": 1})}),
        "app-restarting": _App("DEPLOYING", {"d": _Deployment({"STARTING": 1})}),
        "app-scaled-to-zero": _App("RUNNING", {"d": _Deployment({})}),
        "app-replica-restarting": _App("RUNNING", {"d": _Deployment({"RECOVERING": 1})}),
    }
    backends = RoutedBackends(GatewaySettings())
    status = await backends.probe_apps()
    assert status["app-up"] == (True, "")
    assert status["app-restarting"][0] is False
    # A RUNNING app at zero replicas still scales up on a request; one whose replica is coming back does not.
    assert backends.serve.down == {"app-restarting": "DEPLOYING", "app-replica-restarting": "RUNNING"}
    request = EngineRequest("chat", {"model": "m", "messages": []})
    items = [i async for i in backends.open(Backend(kind="app", name="app-restarting", weight=1), request)]
    assert items == [Failure("unavailable", 503, "backend 'app-restarting' has no replica ready right now")]
    assert fake_serve["handle"].calls == 0
    fake_serve["apps"]["app-restarting"] = _App("RUNNING", {"d": _Deployment({"RUNNING": 1})})
    fake_serve["apps"]["app-replica-restarting"] = _App("RUNNING", {"d": _Deployment({"RUNNING": 1})})
    await backends.probe_apps()
    assert backends.serve.down == {}


class RayActorError(Exception):
    pass


class BackPressureError(Exception):
    pass


@pytest.mark.parametrize(("exc", "kind", "status"), [
    (RayActorError("The actor died unexpectedly: pid=123, ip=10.0.0.5, actor_id=abc"), "unavailable", 503),
    (BackPressureError("queue full at 10.0.0.5"), "unavailable", 503),
    (TimeoutError("10.0.0.5:8000"), "timeout", 504),
    (RuntimeError("RayTaskError(ValueError): File /work/x.py line 3"), "engine", 502),
])
async def test_ray_exceptions_become_failures_without_their_text(exc: Exception, kind: str, status: int) -> None:
    assert (describe_failure("app-m", exc).kind, describe_failure("app-m", exc).status) == (kind, status)

    async def source() -> Any:
        raise exc
        yield  # pragma: no cover

    (item,) = [i async for i in ItemStream(source(), "app-m")]
    assert isinstance(item, Failure)
    for leak in ("10.0.0.5", "pid=", "/work/", "actor_id"):
        assert leak not in item.message
