"""The gateway across several backends: retry before the first byte, breakers, health checks, headers.

Backends fail the way the ``Backends`` port reports it (``Failure`` items, classified at the boundary); a
client's mistake (``invalid``) is never retried and never held against the backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient

from arks_ray.api.gateway import Backend, Endpoint
from arks_ray.engines.protocol import Answer, Chunk, Failure, Final
from deployments.gateway import check_health
from deployments.http_api import make_api
from deployments.pipeline import Pipeline
from tests.support.mock_engine import MockBackends, Script, pipeline, token

AUTH = {"Authorization": "Bearer sk-t"}
SSE = ['data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', "data: [DONE]\n\n"]
OK = Answer({"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def down(name: str, status: int = 503) -> Script:
    kind = "unavailable" if status == 503 else "engine"
    return Script(items=[Failure(kind, status, f"backend {name!r} cannot take more requests right now")])


def make(*backends: Backend, clock: Any = None, **settings: Any) -> tuple[TestClient, Pipeline, MockBackends]:
    fake = MockBackends()
    for b in backends:
        fake.scripts[b.name] = Script(items=[OK])
    kw = {"clock": clock} if clock else {}
    p = pipeline(fake, (token("t", "sk-t", "m"),), settings=settings,
                 endpoints=(Endpoint(name="m", backends=backends),), **kw)
    return TestClient(make_api(p)), p, fake


def app(name: str, weight: int = 1, **kw: Any) -> Backend:
    return Backend(kind="app", name=name, weight=weight, **kw)


def post(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "m", "messages": [], **body}, headers=AUTH)


def tried(fake: MockBackends) -> list[str]:
    return [name for name, _ in fake.requests]


def test_a_failure_before_the_first_byte_is_retried_once_on_another_backend() -> None:
    client, _, fake = make(app("a"), app("b"))
    fake.scripts["a"] = down("a", 502)
    for _ in range(10):
        assert post(client).status_code == 200
    assert tried(fake).count("a") == 3  # the breaker's threshold, then out of rotation
    assert tried(fake).count("b") == 10
    assert "a" in fake.forgotten  # its handle is rebuilt next time


def test_a_5xx_answer_is_retried_but_a_client_error_is_not() -> None:
    client1, _, fake1 = make(app("a"), app("b"))
    fake1.scripts["a"] = down("a")
    assert all(post(client1).status_code == 200 for _ in range(6))
    assert tried(fake1).count("b") == 6

    client2, p2, fake2 = make(app("a"), app("b"))
    refusal = Script(items=[Failure("invalid", 400, "max_tokens is too large", param="max_tokens")])
    fake2.scripts = {"a": refusal, "b": refusal}
    for _ in range(8):
        resp = post(client2)
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "max_tokens"
    assert len(fake2.requests) == 8  # never retried
    assert fake2.forgotten == []
    # and never held against a backend: 8 refusals over 2 backends would have opened a breaker of 3
    assert {v.backend: v.health for v in p2.routes()} == {"a": "closed", "b": "closed"}

    # b and c are drained (weight 0): nothing to retry on, so the backend's own failure comes back.
    client, _, fake = make(app("a"), app("b", 0), app("c", 0))
    fake.scripts["a"] = Script(items=[Failure("unavailable", 503, "engine overloaded")])
    resp = post(client)
    assert resp.status_code == 503
    assert resp.json()["error"]["message"] == "engine overloaded"
    assert resp.headers["Retry-After"] == "5"
    assert tried(fake) == ["a"]


def test_two_failures_give_the_last_failure_and_no_more_tries() -> None:
    client, _, fake = make(app("a"), app("b"), app("c"))
    fake.scripts = {"a": down("a"), "b": down("b"), "c": down("c")}
    resp = post(client)
    assert resp.status_code == 503
    assert resp.json()["error"]["type"] == "server_error"
    assert len(fake.requests) == 2  # one retry, not more
    assert repr(tried(fake)[-1]) in resp.json()["error"]["message"]


def test_no_retry_when_it_is_switched_off() -> None:
    client, _, fake = make(app("a"), app("b"), retry_before_first_byte=False)
    fake.scripts = {"a": down("a"), "b": down("b")}
    assert post(client).status_code == 503
    assert len(fake.requests) == 1


def test_a_backend_silent_past_the_first_byte_timeout_is_cancelled_and_retried() -> None:
    client, _, fake = make(app("a"), app("b"), first_byte_timeout_s=0.05)
    fake.scripts["a"] = Script(items=[OK], delay_s=5)
    fake.scripts["b"] = Script(items=[OK], delay_s=5)
    resp = post(client)
    assert resp.status_code == 504
    assert "0.05s" in resp.json()["error"]["message"]
    assert sorted(tried(fake)) == ["a", "b"]
    assert sorted(fake.cancelled) == ["a", "b"]  # neither keeps working for nobody
    fake.scripts["b"] = Script(items=[OK])
    assert post(client).status_code == 200


def test_a_stream_is_never_retried_after_its_first_byte() -> None:
    client, _, fake = make(app("a"), app("b"))
    fake.scripts["a"] = Script(items=[Chunk(SSE[0]), Failure("engine", 502, "backend 'a' failed")])
    fake.scripts["b"] = fake.scripts["a"]
    resp = post(client, stream=True)
    assert resp.status_code == 200
    assert resp.text.startswith(SSE[0])
    assert '"server_error"' in resp.text
    assert resp.text.endswith("data: [DONE]\n\n")
    assert len(fake.requests) == 1


def test_repeated_failures_take_a_backend_out_of_rotation() -> None:
    client, p, fake = make(app("a"), app("b"), breaker_failures=2)
    fake.scripts["a"] = down("a")
    for _ in range(20):
        assert post(client).status_code == 200
    assert tried(fake).count("a") == 2  # then its breaker is open and it is no longer chosen
    view = {v.backend: v for v in p.routes()}
    assert (view["a"].health, view["a"].effective_weight) == ("open", 0.0)
    assert "cannot take more requests" in view["a"].reason


def test_the_session_header_of_a_consistent_hash_app_reaches_the_backend() -> None:
    client, _, fake = make(app("a", session_header="x-session-id"))
    client.post("/v1/chat/completions", json={"model": "m"}, headers={**AUTH, "X-Session-Id": "user-42"})
    post(client)
    assert [(name, r.session) for name, r in fake.requests] == [("a", "user-42"), ("a", None)]


def test_the_backend_header_is_opt_in() -> None:
    client, _, fake = make(app("a"))
    assert "x-arks-backend" not in post(client).headers
    client, _, fake = make(app("a"), backend_header=True)
    assert post(client).headers["x-arks-backend"] == "a"
    fake.scripts["a"] = Script()  # vLLM-like: streams when asked to
    assert post(client, stream=True).headers["x-arks-backend"] == "a"


def test_health_checks_move_backends_out_of_and_back_into_rotation() -> None:
    now = [100.0]
    ext = Backend(kind="http", name="ext", weight=1, url="http://ext")
    _, p, fake = make(app("a"), app("gone"), ext, clock=lambda: now[0])
    fake.health = {"a": (True, ""), "ext": (False, "health check answered HTTP 503")}
    asyncio.run(check_health(p, fake))
    view = {v.backend: v for v in p.routes()}
    assert (view["a"].health, view["gone"].health, view["ext"].health) == ("closed", "open", "open")
    assert view["gone"].reason == "Serve app not found"
    assert view["ext"].reason == "health check answered HTTP 503"
    fake.health["ext"] = (True, "")
    now[0] += 1
    asyncio.run(check_health(p, fake))
    assert {v.backend: v.health for v in p.routes()}["ext"] == "closed"


@pytest.mark.parametrize("stream", [False, True])
def test_latency_is_measured_only_where_it_means_something(stream: bool) -> None:
    client, p, fake = make(app("a"))
    fake.scripts["a"] = Script(items=[*(Chunk(s) for s in SSE), Final({"completion_tokens": 3}, 3)]) if stream \
        else Script(items=[OK])
    post(client, stream=stream)
    view = p.routes()[0]
    assert (view.ttft_ms is not None) == stream
    assert (view.tpot_ms is not None) == stream
    assert view.in_flight == 0
