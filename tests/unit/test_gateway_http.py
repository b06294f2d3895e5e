"""The gateway's HTTP surface (``make_api(Pipeline)``) over the mock engine port: status codes, error
envelopes, streaming, live reconfiguration, and the real ``ItemStream`` adapter turning a backend's
exceptions into failures a client may see."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from arks_ray.api.gateway import Backend, Endpoint, Token
from arks_ray.engines.protocol import Answer, Chunk, EngineRequest, EngineStream, Failure, Final
from deployments.backends import ItemStream
from deployments.http_api import make_api
from deployments.pipeline import Pipeline
from tests.support.mock_engine import MockBackends, Script, config, pipeline, token

SSE = ['data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', "data: [DONE]\n\n"]
ENDPOINTS = (Endpoint(name="m", backends=(Backend(kind="app", name="app-m", weight=1),)), Endpoint(name="x"))


class ActorDiedError(Exception):
    """Named as Ray's: ``describe_failure`` classifies by class name."""


class RaisingBackends(MockBackends):
    """Backends whose engine raises before its first item, seen through the real ``ItemStream`` adapter."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        self.requests.append((backend.name, request))
        exc = self.exc

        async def items() -> AsyncIterator[Any]:
            raise exc
            yield  # an async generator

        return ItemStream(items(), backend.name)


def build(backends: MockBackends) -> tuple[TestClient, Pipeline]:
    p = pipeline(backends, (token("t", "sk-t", "m"),), settings={"max_body_bytes": 1024}, endpoints=ENDPOINTS)
    return TestClient(make_api(p)), p


@pytest.fixture
def setup() -> tuple[TestClient, Pipeline, MockBackends]:
    backends = MockBackends()
    client, p = build(backends)
    return client, p, backends


def script(backends: MockBackends, *items: Any) -> None:
    backends.scripts["app-m"] = Script(items=list(items))


def reconfig(p: Pipeline, *tokens: Token) -> None:
    p.reconfigure(config(tokens, endpoints=ENDPOINTS))


AUTH = {"Authorization": "Bearer sk-t"}


def assert_error(resp: Any, status: int, type_: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["type"] == type_
    assert err["param"] == param
    assert err["message"]


def test_non_streaming_response_passes_through(setup: Any) -> None:
    client, _, backends = setup
    script(backends, Answer({"id": "x", "usage": {"total_tokens": 3}}))
    resp = client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH)
    assert resp.status_code == 200
    assert resp.json() == {"id": "x", "usage": {"total_tokens": 3}}
    name, request = backends.requests[0]
    assert (name, request.kind, request.body) == ("app-m", "chat", {"model": "m", "messages": []})


def test_stream_is_relayed_verbatim_and_final_is_not(setup: Any) -> None:
    client, _, backends = setup
    script(backends, Chunk(SSE[0]), Chunk(SSE[1]), Final({"total_tokens": 1}, 1))
    resp = client.post("/v1/chat/completions", json={"model": "m", "stream": True}, headers=AUTH)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text == "".join(SSE)


@pytest.mark.parametrize(("options", "wanted"), [({"include_usage": True}, True), ({"include_usage": False}, False),
                                                 (None, False)])
def test_client_usage_wish_reaches_the_engine(setup: Any, options: Any, wanted: bool) -> None:
    client, _, backends = setup
    script(backends, Chunk(SSE[1]))
    body: dict[str, Any] = {"model": "m", "stream": True}
    if options is not None:
        body["stream_options"] = options
    client.post("/v1/completions", json=body, headers=AUTH)
    assert backends.requests[-1][1].client_usage is wanted


def test_engine_refusals_keep_their_status_and_param(setup: Any) -> None:
    client, _, backends = setup
    script(backends, Failure("invalid", 400, "max_tokens too large", param="max_tokens"))
    resp = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH)
    assert_error(resp, 400, "invalid_request_error", "max_tokens")
    assert resp.json()["error"]["message"] == "max_tokens too large"
    assert "Retry-After" not in resp.headers


def test_an_error_mid_stream_is_reported_in_band(setup: Any) -> None:
    client, _, backends = setup
    script(backends, Chunk(SSE[0]), Failure("engine", 500, "the engine failed mid-stream"))
    resp = client.post("/v1/chat/completions", json={"model": "m", "stream": True}, headers=AUTH)
    assert resp.status_code == 200
    assert resp.text.startswith(SSE[0])
    assert '"the engine failed mid-stream"' in resp.text
    assert '"server_error"' in resp.text
    assert resp.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize(("failure", "status"), [
    (Failure("unavailable", 503, "backend 'app-m' has no replica ready right now"), 503),
    (Failure("timeout", 504, "backend 'app-m' timed out"), 504),
])
def test_a_transient_backend_failure_before_the_first_byte_gets_retry_after(setup: Any, failure: Failure,
                                                                            status: int) -> None:
    client, _, backends = setup
    script(backends, failure)
    resp = client.post("/v1/chat/completions", json={"model": "m"}, headers=AUTH)
    assert_error(resp, status, "server_error")
    assert resp.headers["Retry-After"] == "5"


@pytest.mark.parametrize(("exc", "status"), [
    (ActorDiedError("The actor 3f2a died at 10.1.2.3:8000: Traceback ..."), 503),
    (RuntimeError("CUDA error at /opt/vllm/worker.py:12 on 10.1.2.3"), 502),
    (TimeoutError("timed out talking to 10.1.2.3"), 504),
])
def test_a_backend_exception_becomes_5xx_without_its_text(exc: Exception, status: int) -> None:
    backends = RaisingBackends(exc)
    client, _ = build(backends)
    resp = client.post("/v1/chat/completions", json={"model": "m"}, headers=AUTH)
    assert_error(resp, status, "server_error")
    assert "10.1.2.3" not in resp.text
    assert "Traceback" not in resp.text
    assert "app-m" in resp.json()["error"]["message"]


@pytest.mark.parametrize(("headers", "body", "status", "type_", "param"), [
    ({}, {"model": "m"}, 401, "authentication_error", None),
    ({"Authorization": "Bearer wrong"}, {"model": "m"}, 401, "authentication_error", None),
    (AUTH, {"model": "nope"}, 404, "invalid_request_error", "model"),
    (AUTH, {"model": "x"}, 403, "permission_error", "model"),
    (AUTH, {"messages": []}, 400, "invalid_request_error", "model"),
    (AUTH, {"model": 3}, 400, "invalid_request_error", "model"),
    (AUTH, {"model": "m", "stream": "yes"}, 400, "invalid_request_error", "stream"),
    (AUTH, ["not", "an", "object"], 400, "invalid_request_error", None),
])
def test_client_mistakes_get_openai_errors(setup: Any, headers: dict[str, str], body: Any, status: int,
                                           type_: str, param: str | None) -> None:
    client, _, backends = setup
    resp = client.post("/v1/chat/completions", json=body, headers=headers)
    assert_error(resp, status, type_, param)
    assert backends.requests == []


def test_unknown_paths_and_methods_get_openai_errors(setup: Any) -> None:
    client, _, _ = setup
    assert_error(client.post("/v1/nope", json={"model": "m"}, headers=AUTH), 404, "invalid_request_error")
    assert_error(client.get("/v1/chat/completions", headers=AUTH), 405, "invalid_request_error")
    assert client.post("/v1/nope", json={"model": "m"}).status_code == 401  # auth comes before routing


def test_malformed_json_is_400(setup: Any) -> None:
    client, _, _ = setup
    resp = client.post("/v1/chat/completions", content=b"{nope", headers=AUTH)
    assert_error(resp, 400, "invalid_request_error")


def test_body_over_the_limit_is_413_even_without_content_length(setup: Any) -> None:
    client, _, _ = setup
    big = b'{"model": "m", "prompt": "' + b"x" * 2000 + b'"}'
    assert_error(client.post("/v1/completions", content=big, headers=AUTH), 413, "invalid_request_error")

    def chunks() -> Any:
        yield big[:600]
        yield big[600:]

    assert_error(client.post("/v1/completions", content=chunks(), headers=AUTH), 413, "invalid_request_error")


def test_models_lists_the_callers_endpoints_only(setup: Any) -> None:
    client, _, _ = setup
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]] == ["m"]
    assert client.get("/v1/models/m", headers=AUTH).json()["id"] == "m"
    assert_error(client.get("/v1/models/x", headers=AUTH), 404, "invalid_request_error", "model")
    assert client.get("/v1/models").status_code == 401


def test_reconfigure_adds_disables_and_removes_tokens_live(setup: Any) -> None:
    client, p, backends = setup
    script(backends, Answer({"ok": True}))
    new = {"Authorization": "Bearer sk-new"}
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=new).status_code == 401
    reconfig(p, token("t", "sk-t", "m"), token("new", "sk-new", "m"))
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=new).status_code == 200
    reconfig(p, token("t", "sk-t", "m"), token("new", "sk-new", "m", disabled=True))
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=new).status_code == 401
    reconfig(p, token("new", "sk-new", "m"))
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=AUTH).status_code == 401


def test_an_invalid_config_is_refused_and_the_old_one_kept(setup: Any) -> None:
    client, p, _ = setup
    with pytest.raises(ValueError, match="digest"):
        p.reconfigure({"tokens": [{"name": "bad", "digest": "plaintext"}]})
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_healthz_needs_no_token(setup: Any) -> None:
    client, _, _ = setup
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(("sent", "logged"), [
    ("bench-17.a:b_c", "bench-17.a:b_c"),
    ("x" * 65, ""),  # too long
    ('a","token":"x', ""),  # quotes and anything else outside the set
    ("a b", ""),
    (None, ""),
])
def test_the_clients_request_id_is_logged_when_well_formed_and_never_used_as_a_key(sent: str | None,
                                                                                  logged: str) -> None:
    from arks_ray.gateway.records import RequestRecord
    from deployments.gateway_metrics import NoMetrics

    seen: list[RequestRecord] = []

    class Recording(NoMetrics):
        def finished(self, record: RequestRecord) -> None:
            seen.append(record)

    backends = MockBackends()
    p = pipeline(backends, (token("t", "sk-t", "m"),), endpoints=ENDPOINTS, metrics=Recording())
    client = TestClient(make_api(p))
    headers = {**AUTH, **({"X-Request-Id": sent} if sent is not None else {})}
    script(backends, Answer({"id": "x", "usage": {"total_tokens": 3}}))
    assert client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers).status_code == 200
    # Refused before the lifecycle (a bad token), and by a check of the body: the same rule.
    assert client.post("/v1/chat/completions", json={"model": "m"},
                       headers={**headers, "Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/v1/chat/completions", content=b"{", headers=headers).status_code == 400
    assert [r.client_request_id for r in seen] == [logged] * 3
    assert all(r.request_id and r.request_id != sent for r in seen)
