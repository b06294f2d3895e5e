"""``ServeBackends`` / ``RoutedBackends`` without Ray: the fast 503 for an app with no running replica, and Ray's
exceptions turned into failures a client may see (no exception text)."""

from __future__ import annotations

import asyncio
import logging
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
    deployment_name = "arks-engine:m"

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
    handle = fake_serve["handle"]
    handle.refuse = False
    backends = RoutedBackends(GatewaySettings())
    status = await backends.probe_apps()
    assert status["app-up"] == (True, "")
    assert status["app-restarting"][0] is False
    # A RUNNING app is never refused here (at zero replicas a request scales it up).
    assert backends.serve.down == {"app-restarting": "DEPLOYING", "app-replica-restarting": "UNHEALTHY"}
    request = EngineRequest("chat", {"model": "m", "messages": []})
    # A request to a known-down app asks for a fresh read itself: its 503 does not wait for a health check.
    items = await asyncio.wait_for(
        _items(backends.open(Backend(kind="app", name="app-restarting", weight=1), request)), 1)
    assert items == [Failure("unavailable", 503, "backend 'app-restarting' has no replica ready right now")]
    assert handle.gens[0].cancelled  # its place in Serve's queue is given up
    fake_serve["apps"]["app-restarting"] = _App("RUNNING", {"d": _Deployment({"RUNNING": 1})})
    fake_serve["apps"]["app-replica-restarting"] = _App("RUNNING", {"d": _Deployment({"RUNNING": 1})})
    await backends.probe_apps()
    assert backends.serve.down == {}
    await backends.close()


async def _items(stream: Any) -> list[Any]:
    return [i async for i in stream]


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
    backends = RoutedBackends(GatewaySettings())
    await backends.probe_apps()
    assert "app" in backends.serve.down
    # Serve has the app running again before the gateway's next health check: the request's own read
    # sees it, and the request is served, not refused on the health check's older news.
    fake_serve["apps"] = {"app": _App("RUNNING", {"d": _Deployment({"RUNNING": 1})})}
    request = EngineRequest("chat", {"model": "m", "messages": []})
    pending = asyncio.ensure_future(_items(backends.open(Backend(kind="app", name="app", weight=1), request)))
    await asyncio.sleep(0.05)
    assert backends.serve.down == {}
    handle.release.set()
    assert await asyncio.wait_for(pending, 1) == [Answer({"ok": True})]
    await backends.close()


async def test_a_read_that_began_before_a_request_never_refuses_it(fake_serve: dict[str, Any]) -> None:
    """A slow status read (Serve's controller busy) that says "down" is older news than the request."""
    started, finish = asyncio.Event(), asyncio.Event()
    apps = {"app": _App("DEPLOYING", {"d": _Deployment({"STARTING": 1})})}

    def slow_status() -> Any:
        started.set()
        asyncio.run_coroutine_threadsafe(finish.wait(), loop).result()
        return types.SimpleNamespace(applications=apps)

    loop = asyncio.get_running_loop()
    sys.modules["ray"].serve.status = slow_status  # type: ignore[attr-defined]
    handle = fake_serve["handle"]
    handle.refuse = False
    backends = RoutedBackends(GatewaySettings())
    read = asyncio.ensure_future(backends.probe_apps())  # a health check, begun while the app deploys
    await started.wait()
    request = EngineRequest("chat", {"model": "m", "messages": []})
    pending = asyncio.ensure_future(_items(backends.open(Backend(kind="app", name="app", weight=1), request)))
    await asyncio.sleep(0.05)
    finish.set()
    await read
    assert "app" in backends.serve.down
    await asyncio.sleep(0.05)
    assert not pending.done()  # still waiting on Serve, not refused on the old read
    handle.release.set()
    assert await asyncio.wait_for(pending, 1) == [Answer({"ok": True})]
    await backends.close()


def test_the_gateway_store_takes_the_redis_password_from_its_environment() -> None:
    from deployments.gateway import make_store

    settings = GatewaySettings(redis_url="redis://redis.arks-system:6379/0")
    assert settings.redis_password_env
    store = make_store(settings, {settings.redis_password_env: "s3cret/pw"})
    kwargs = store._redis.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    assert kwargs["password"] == "s3cret/pw"
    assert "s3cret" not in settings.model_dump_json()


def test_a_gateway_without_redis_says_its_counters_are_its_own(caplog: pytest.LogCaptureFixture) -> None:
    from arks_ray.stores.memory import MemoryStore
    from deployments.gateway import make_store

    with caplog.at_level(logging.INFO, logger="ray.serve.arks.gateway"):
        assert isinstance(make_store(GatewaySettings(), {}), MemoryStore)
    assert "counted in this replica's memory, seen by no other replica" in caplog.text


async def test_an_engine_apps_placeholder_ingress_does_not_count_as_serving(fake_serve: dict[str, Any]) -> None:
    """Under HAProxy an engine with a custom router sits behind ``EngineFront``: its running replica is not the
    engine's, so an app whose engine has none is down."""
    from arks_ray.engines.protocol import FRONT_DEPLOYMENT

    fake_serve["apps"] = {"app": _App("DEPLOYING", {FRONT_DEPLOYMENT: _Deployment({"RUNNING": 1}),
                                                   "arks-engine:m": _Deployment({"STARTING": 1})})}
    backends = RoutedBackends(GatewaySettings())
    assert (await backends.serve.probe())["app"][0] is False
    fake_serve["apps"]["app"].deployments["arks-engine:m"] = _Deployment({"RUNNING": 1})
    assert (await backends.serve.probe())["app"] == (True, "")
    await backends.close()


async def test_behind_a_placeholder_ingress_the_engine_deployment_is_called(fake_serve: dict[str, Any],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The placeholder is asked once for the engine's deployment; every request then goes to the engine's handle
    (through its own router), none through the placeholder."""
    from arks_ray.engines.protocol import FRONT_DEPLOYMENT

    engine = fake_serve["handle"]
    engine.refuse = False
    asked: list[tuple[str, str]] = []

    class Front:
        deployment_name = FRONT_DEPLOYMENT

        def options(self, method_name: str = "", **_: Any) -> Any:
            assert method_name == "engine_deployment", "a request reached the placeholder"
            return types.SimpleNamespace(remote=self.remote)

        async def remote(self) -> str:
            asked.append(("front", "engine_deployment"))
            return "arks-engine:m"

    def deployment_handle(name: str, app_name: str) -> Any:
        asked.append((app_name, name))
        return engine

    serve = sys.modules["ray.serve"]
    monkeypatch.setattr(serve, "get_app_handle", lambda name: Front(), raising=False)
    monkeypatch.setattr(serve, "get_deployment_handle", deployment_handle, raising=False)
    fake_serve["apps"] = {"app": _App("RUNNING", {FRONT_DEPLOYMENT: _Deployment({"RUNNING": 1}),
                                                 "arks-engine:m": _Deployment({"RUNNING": 1})})}
    backends = RoutedBackends(GatewaySettings())
    engine.release.set()
    for _ in range(2):
        request = EngineRequest("chat", {"model": "m", "messages": []})
        assert await _items(backends.open(Backend(kind="app", name="app", weight=1), request)) == [Answer({"ok": True})]
    assert asked == [("front", "engine_deployment"), ("app", "arks-engine:m")]
    assert engine.calls == 2
    await backends.close()
