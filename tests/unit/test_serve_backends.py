"""``ServeBackends`` / ``RoutedBackends`` without Ray: the fast 503 for an app with no running replica, and Ray's
exceptions turned into failures a client may see (no exception text)."""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from arks_ray.api.gateway import Backend
from arks_ray.engines.protocol import Answer, EngineRequest, Failure
from arks_ray.gateway.settings import GatewaySettings
from deployments.backends import ItemStream, RoutedBackends, describe_failure


@dataclass
class _Deployment:
    replica_states: dict[Any, int] = field(default_factory=dict)


@dataclass
class _App:
    status: str
    deployments: dict[str, _Deployment]


class _Gen:
    """A Serve response generator: its first item comes when ``release`` is set."""

    def __init__(self, release: asyncio.Event) -> None:
        self.release, self.cancelled = release, False

    def __aiter__(self) -> _Gen:
        return self

    async def __anext__(self) -> Any:
        if self.cancelled:
            raise StopAsyncIteration
        await self.release.wait()
        self.cancelled = True  # one item, then the end
        return Answer({"ok": True})

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.gens: list[_Gen] = []
        self.refuse = True

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, request: EngineRequest) -> Any:
        self.calls += 1
        if self.refuse:
            raise AssertionError("a request reached a handle of an app that has no replica")
        self.gens.append(_Gen(self.release))
        return self.gens[-1]


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
        "app-replica-restarting": _App("UNHEALTHY", {"d": _Deployment({"STARTING": 1})}),
        "app-running-while-replacing": _App("RUNNING", {"d": _Deployment({"STARTING": 1})}),
    }
    backends = RoutedBackends(GatewaySettings())
    status = await backends.probe_apps()
    assert status["app-up"] == (True, "")
    assert status["app-restarting"][0] is False
    # A RUNNING app is never refused here (at zero replicas a request scales it up).
    assert backends.serve.down == {"app-restarting": "DEPLOYING", "app-replica-restarting": "UNHEALTHY"}
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


async def test_a_request_waiting_for_a_replica_gets_503_when_its_app_goes_down(fake_serve: dict[str, Any]) -> None:
    fake_serve["apps"] = {"app": _App("RUNNING", {"d": _Deployment({"RUNNING": 1})})}
    handle = fake_serve["handle"]
    handle.refuse = False
    backends = RoutedBackends(GatewaySettings())
    await backends.probe_apps()
    request = EngineRequest("chat", {"model": "m", "messages": []})
    stream = backends.open(Backend(kind="app", name="app", weight=1), request)
    pending = asyncio.ensure_future(anext(aiter(stream)))
    await asyncio.sleep(0.05)
    assert not pending.done()  # queued on the handle, as Serve does while a replica comes back
    fake_serve["apps"] = {"app": _App("UNHEALTHY", {"d": _Deployment({"STARTING": 1})})}
    await backends.probe_apps()
    item = await asyncio.wait_for(pending, 1)
    assert item == Failure("unavailable", 503, "backend 'app' has no replica ready right now")
    assert handle.gens[0].cancelled


async def test_a_down_app_is_served_as_soon_as_serve_says_it_runs(fake_serve: dict[str, Any]) -> None:
    fake_serve["apps"] = {"app": _App("DEPLOYING", {"d": _Deployment({"STARTING": 1})})}
    handle = fake_serve["handle"]
    handle.refuse = False
    handle.release.set()
    now = [0.0]
    backends = RoutedBackends(GatewaySettings())
    backends.serve._clock = lambda: now[0]
    await backends.probe_apps()
    request = EngineRequest("chat", {"model": "m", "messages": []})
    app = Backend(kind="app", name="app", weight=1)
    (item,) = [i async for i in backends.open(app, request)]
    assert item == Failure("unavailable", 503, "backend 'app' has no replica ready right now")
    fake_serve["apps"] = {"app": _App("RUNNING", {"d": _Deployment({"RUNNING": 1})})}
    (item,) = [i async for i in backends.open(app, request)]  # not re-read within a second
    assert isinstance(item, Failure)
    now[0] += 1.0
    assert [i async for i in backends.open(app, request)] == [Answer({"ok": True})]  # re-read, not waited for


def test_the_gateway_store_takes_the_redis_password_from_its_environment() -> None:
    from deployments.gateway import make_store

    settings = GatewaySettings(redis_url="redis://redis.arks-system:6379/0")
    assert settings.redis_password_env
    store = make_store(settings, {settings.redis_password_env: "s3cret/pw"})
    kwargs = store._redis.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    assert kwargs["password"] == "s3cret/pw"
    assert "s3cret" not in settings.model_dump_json()
