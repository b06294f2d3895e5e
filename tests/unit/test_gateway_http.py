"""The gateway's HTTP surface with fake backends: status codes, error envelopes, streaming, reload."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Token
from arks_ray.engines import protocol
from arks_ray.gateway.settings import GatewaySettings
from deployments.gateway import Gateway, make_api

SSE = ['data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', "data: [DONE]\n\n"]


class FakeBackends:
    """Records calls; plays back a scripted protocol stream, or raises before the first item."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any], bool]] = []
        self.script: list[Any] = []
        self.fail: Exception | None = None

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool,
             session: str | None = None) -> AsyncIterator[Any]:
        self.calls.append((backend.name, kind, body, client_usage))
        script, fail = list(self.script), self.fail

        async def gen() -> AsyncIterator[Any]:
            if fail is not None:
                raise fail
            for item in script:
                yield item

        return gen()


def config(*tokens: Token) -> dict[str, Any]:
    return GatewayConfig(
        endpoints=(Endpoint(name="m", backends=(Backend(kind="app", name="app-m", weight=1),)), Endpoint(name="x")),
        tokens=tokens,
    ).model_dump(mode="json")


def token(name: str, value: str, *endpoints: str, **kw: Any) -> Token:
    return Token(name=name, digest=hashlib.sha256(value.encode()).hexdigest(),
                 grants=tuple(Grant(endpoint=e) for e in endpoints), **kw)


@pytest.fixture
def setup() -> tuple[TestClient, Gateway, FakeBackends]:
    backends = FakeBackends()
    gateway = Gateway(GatewaySettings(max_body_bytes=1024, seed=0), backends)
    gateway.reconfigure(config(token("t", "sk-t", "m")))
    return TestClient(make_api(gateway)), gateway, backends


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
    backends.script = [protocol.response({"id": "x", "usage": {"total_tokens": 3}})]
    resp = client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH)
    assert resp.status_code == 200
    assert resp.json() == {"id": "x", "usage": {"total_tokens": 3}}
    assert backends.calls[0][:2] == ("app-m", "chat")


def test_stream_is_relayed_verbatim_and_control_items_are_not(setup: Any) -> None:
    client, _, backends = setup
    backends.script = [SSE[0], SSE[1], protocol.usage({"total_tokens": 1}, 1)]
    resp = client.post("/v1/chat/completions", json={"model": "m", "stream": True}, headers=AUTH)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text == "".join(SSE)


def test_client_usage_wish_reaches_the_engine(setup: Any) -> None:
    client, _, backends = setup
    backends.script = [SSE[1]]
    client.post("/v1/completions", json={"model": "m", "stream": True,
                                         "stream_options": {"include_usage": True}}, headers=AUTH)
    assert backends.calls[-1][3] is True


def test_engine_errors_keep_their_status(setup: Any) -> None:
    client, _, backends = setup
    backends.script = [protocol.error(400, "max_tokens too large", param="max_tokens")]
    resp = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH)
    assert_error(resp, 400, "invalid_request_error", "max_tokens")


def test_an_error_mid_stream_is_reported_in_band(setup: Any) -> None:
    client, _, backends = setup
    backends.script = [SSE[0], protocol.error(500, "engine died", "server_error")]
    resp = client.post("/v1/chat/completions", json={"model": "m", "stream": True}, headers=AUTH)
    assert resp.status_code == 200
    assert '"engine died"' in resp.text
    assert resp.text.endswith("data: [DONE]\n\n")


def test_backend_failure_before_first_byte_is_503_not_500(setup: Any) -> None:
    client, _, backends = setup
    backends.fail = RuntimeError("actor died")
    resp = client.post("/v1/chat/completions", json={"model": "m"}, headers=AUTH)
    assert_error(resp, 503, "server_error")


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
    assert backends.calls == []


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
    assert client.get("/v1/models").status_code == 401


def test_reconfigure_adds_disables_and_removes_tokens_live(setup: Any) -> None:
    client, gateway, backends = setup
    backends.script = [protocol.response({"ok": True})]
    new = {"Authorization": "Bearer sk-new"}
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=new).status_code == 401
    gateway.reconfigure(config(token("t", "sk-t", "m"), token("new", "sk-new", "m")))
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=new).status_code == 200
    gateway.reconfigure(config(token("t", "sk-t", "m"), token("new", "sk-new", "m", disabled=True)))
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=new).status_code == 401
    gateway.reconfigure(config(token("new", "sk-new", "m")))
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=AUTH).status_code == 401


def test_an_invalid_config_is_refused_and_the_old_one_kept(setup: Any) -> None:
    client, gateway, _ = setup
    with pytest.raises(ValueError, match="digest"):
        gateway.reconfigure({"tokens": [{"name": "bad", "digest": "plaintext"}]})
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_healthz(setup: Any) -> None:
    client, _, _ = setup
    assert client.get("/healthz").json() == {"status": "ok"}
