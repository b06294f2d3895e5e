"""The gateway across several backends: retry before the first byte, breakers, health checks, headers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Token
from arks_ray.engines import protocol
from arks_ray.gateway.settings import GatewaySettings
from deployments.gateway import Gateway, make_api

AUTH = {"Authorization": "Bearer sk-t"}
SSE = ['data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', "data: [DONE]\n\n"]
OK = [protocol.response({"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})]


class ScriptedBackends:
    """Per backend name: a scripted stream, or an exception raised before the first item."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Any]] = {}
        self.fail: dict[str, Exception] = {}
        self.calls: list[tuple[str, str | None]] = []
        self.forgotten: list[str] = []

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool,
             session: str | None = None) -> AsyncIterator[Any]:
        self.calls.append((backend.name, session))
        script, fail = list(self.scripts.get(backend.name, OK)), self.fail.get(backend.name)

        async def gen() -> AsyncIterator[Any]:
            if fail is not None:
                raise fail
            for item in script:
                if isinstance(item, Exception):
                    raise item
                yield item

        return gen()

    def forget(self, backend: Backend) -> None:
        self.forgotten.append(backend.name)


def make(*backends: Backend, **settings: Any) -> tuple[TestClient, Gateway, ScriptedBackends]:
    fake = ScriptedBackends()
    gateway = Gateway(GatewaySettings(seed=0, **settings), fake)
    digest = hashlib.sha256(b"sk-t").hexdigest()
    gateway.reconfigure(GatewayConfig(
        endpoints=(Endpoint(name="m", backends=backends),),
        tokens=(Token(name="t", digest=digest, grants=(Grant(endpoint="m"),)),)).model_dump(mode="json"))
    return TestClient(make_api(gateway)), gateway, fake


def app(name: str, weight: int = 1, **kw: Any) -> Backend:
    return Backend(kind="app", name=name, weight=weight, **kw)


def post(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "m", "messages": [], **body}, headers=AUTH)


def test_a_failure_before_the_first_byte_is_retried_once_on_another_backend() -> None:
    client, _, fake = make(app("a"), app("b"))
    fake.fail["a"] = RuntimeError("actor died")
    for _ in range(10):
        assert post(client).status_code == 200
    assert sum(name == "a" for name, _ in fake.calls) == 3  # the breaker's threshold, then out of rotation
    assert "a" in fake.forgotten  # its handle is rebuilt next time


def test_a_5xx_answer_is_retried_but_a_client_error_is_not() -> None:
    client1, _, fake1 = make(app("a"), app("b"))
    fake1.scripts["a"] = [protocol.error(503, "engine overloaded", "server_error")]
    assert all(post(client1).status_code == 200 for _ in range(6))
    assert [name for name, _ in fake1.calls].count("b") == 6
    client, _, fake = make(app("a"), app("b", 0), app("c", 0))
    fake.scripts["a"] = [protocol.error(503, "engine overloaded", "server_error")]
    client2, _, fake2 = make(app("a"), app("b"))
    fake2.scripts = {"a": [protocol.error(400, "bad max_tokens", param="max_tokens")],
                     "b": [protocol.error(400, "bad max_tokens", param="max_tokens")]}
    assert post(client2).status_code == 400
    assert len(fake2.calls) == 1
    # b and c are drained (weight 0): nothing to retry on, so the engine's own answer comes back.
    resp = post(client)
    assert resp.status_code == 503
    assert resp.json()["error"]["message"] == "engine overloaded"


def test_two_failures_give_503_naming_the_backend() -> None:
    client, _, fake = make(app("a"), app("b"))
    fake.fail = {"a": RuntimeError("down"), "b": RuntimeError("down too")}
    resp = post(client)
    assert resp.status_code == 503
    assert resp.json()["error"]["type"] == "server_error"
    assert len(fake.calls) == 2  # one retry, not more


def test_no_retry_when_it_is_switched_off() -> None:
    client, _, fake = make(app("a"), app("b"), retry_before_first_byte=False)
    fake.fail = {"a": RuntimeError("down"), "b": RuntimeError("down")}
    assert post(client).status_code == 503
    assert len(fake.calls) == 1


def test_a_stream_is_never_retried_after_its_first_byte() -> None:
    client, _, fake = make(app("a"), app("b", 0))
    fake.scripts["a"] = [SSE[0], RuntimeError("connection lost")]
    resp = post(client, stream=True)
    assert resp.status_code == 200
    assert resp.text.startswith(SSE[0])
    assert '"server_error"' in resp.text
    assert resp.text.endswith("data: [DONE]\n\n")
    assert len(fake.calls) == 1


def test_repeated_failures_take_a_backend_out_of_rotation() -> None:
    client, gateway, fake = make(app("a"), app("b"), breaker_failures=2)
    fake.fail["a"] = RuntimeError("down")
    for _ in range(20):
        assert post(client).status_code == 200
    tried_a = sum(1 for name, _ in fake.calls if name == "a")
    assert tried_a == 2  # then its breaker is open and it is no longer chosen
    view = {v.backend: v for v in gateway.routes()}
    assert (view["a"].health, view["a"].effective_weight) == ("open", 0.0)
    assert "RuntimeError: down" in view["a"].reason


def test_the_session_header_of_a_consistent_hash_app_reaches_the_backend() -> None:
    client, _, fake = make(app("a", session_header="x-session-id"))
    client.post("/v1/chat/completions", json={"model": "m"}, headers={**AUTH, "X-Session-Id": "user-42"})
    post(client)
    assert fake.calls == [("a", "user-42"), ("a", None)]


def test_the_backend_header_is_opt_in() -> None:
    client, _, _ = make(app("a"))
    assert "x-arks-backend" not in post(client).headers
    client, _, _ = make(app("a"), backend_header=True)
    assert post(client).headers["x-arks-backend"] == "a"
    assert post(client, stream=True).headers["x-arks-backend"] == "a"


class FakeProber:
    def __init__(self, apps: dict[str, tuple[bool, str]], http: dict[str, tuple[bool, str]]) -> None:
        self.apps, self.http = apps, http

    async def probe_apps(self) -> dict[str, tuple[bool, str]]:
        return self.apps

    async def probe_http(self, backend: Backend) -> tuple[bool, str]:
        return self.http[backend.name]


def test_health_checks_move_backends_out_of_and_back_into_rotation() -> None:
    now = [100.0]
    fake = ScriptedBackends()
    gateway = Gateway(GatewaySettings(seed=0), fake, clock=lambda: now[0])
    ext = Backend(kind="http", name="ext", weight=1, url="http://ext")
    gateway.reconfigure(GatewayConfig(endpoints=(Endpoint(name="m", backends=(app("a"), app("gone"), ext)),))
                        .model_dump(mode="json"))
    prober = FakeProber({"a": (True, "")}, {"ext": (False, "health check answered HTTP 503")})
    asyncio.run(gateway.check_health(prober))
    view = {v.backend: v for v in gateway.routes()}
    assert (view["a"].health, view["gone"].health, view["ext"].health) == ("closed", "open", "open")
    assert view["gone"].reason == "Serve app not found"
    prober.http["ext"] = (True, "")
    now[0] += 1
    asyncio.run(gateway.check_health(prober))
    assert {v.backend: v.health for v in gateway.routes()}["ext"] == "closed"


@pytest.mark.parametrize("stream", [False, True])
def test_latency_is_measured_only_where_it_means_something(stream: bool) -> None:
    client, gateway, fake = make(app("a"))
    fake.scripts["a"] = [*SSE, protocol.usage({"completion_tokens": 3}, 3)] if stream else OK
    post(client, stream=stream)
    view = gateway.routes()[0]
    assert (view.ttft_ms is not None) == stream
    assert view.in_flight == 0
