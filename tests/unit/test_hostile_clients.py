"""A hostile client against the gateway: never a 5xx for a client's mistake, always an OpenAI error body.

Property-based (hypothesis) over every endpoint, method, body and header shape, through the real HTTP
surface (``make_api(Pipeline)``) on the mock engine port, plus the known-bad cases that once got through,
and the engine adapter's classification of what vLLM raises (``deployments.engine_stream``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arks_ray.engines.protocol import EngineRequest, Failure
from arks_ray.gateway.records import RequestRecord
from deployments.engine_stream import engine_failure, engine_items
from deployments.gateway_metrics import NoMetrics
from deployments.http_api import make_api
from tests.support.mock_engine import MockBackends, pipeline, token

TOKEN = "sk-hostile-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
PATHS = [*POSTS, "/v1/models", "/v1/models/m", "/v1/models/%00", "/v1/../v1/models", "/healthz", "/", "/v2/x",
         "/v1/chat/completions/extra", "/v1//models"]
FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "n", "max_tokens",
          "max_completion_tokens", "temperature", "top_logprobs", "logprobs", "tool_choice", "tools", "stop",
          "user", "seed", "response_format", "logit_bias", "role", "content"]

json_leaf = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4),
                          max_leaves=20)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=6).map(lambda d: {"model": "m", **d}) | \
    st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=6) | json_value


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    backends = MockBackends()
    p = pipeline(backends, (token("mallory", TOKEN, "m"),))
    with TestClient(make_api(p)) as c:
        yield c


def assert_openai(resp: Any) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "code", "param"}, err
        assert isinstance(err["message"], str)
        assert err["message"]
        for leak in ("Traceback", "RayTaskError", "File \"", "/work/", "127.0.0.1"):
            assert leak not in err["message"], err["message"]


HYPO = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPO
@given(path=st.sampled_from(POSTS), body=bodies)
def test_any_json_body_on_any_endpoint(client: TestClient, path: str, body: Any) -> None:
    assert_openai(client.post(path, content=json.dumps(body), headers=AUTH))


@HYPO
@given(path=st.sampled_from(POSTS), raw=st.binary(max_size=200))
def test_any_bytes_on_any_endpoint(client: TestClient, path: str, raw: bytes) -> None:
    assert_openai(client.post(path, content=raw, headers=AUTH))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(PATHS), auth=st.sampled_from([AUTH, {}, {"Authorization": "Bearer"},
                                                          {"Authorization": "Basic abc"},
                                                          {"Authorization": f"bearer {TOKEN}"},
                                                          {"Authorization": "Bearer " + "x" * 5000}]))
def test_any_method_path_and_auth(client: TestClient, method: str, path: str, auth: dict[str, str]) -> None:
    resp = client.request(method, path, headers=auth, content=b"{}")
    assert resp.status_code < 500, (method, path, resp.status_code)
    if resp.status_code >= 400 and method != "HEAD":
        assert set(resp.json()["error"]) == {"message", "type", "code", "param"}


@pytest.mark.parametrize(("raw", "why"), [
    (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
    (b'{"model":"m","messages":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"model":"m","messages":[{"role":"user","content":"a\\ud800b"}]}', "surrogate"),
    (b'{"model":"m","prompt":"x","n":16384}', "'n'"),
    (b'{"model":"m","prompt":"x","n":true}', "'n'"),
    (b'{"model":"m","messages":[],"stream":false,"stream_options":{"include_usage":true}}', "stream_options"),
    (b'{"model":"m","prompt":' + json.dumps(["p"] * 5000).encode() + b"}", "at most"),
    (b'{"model":"m","prompt":"x","max_tokens":1' + b"0" * 5000 + b"}", "not valid JSON"),
])
def test_known_hostile_bodies_are_400(client: TestClient, raw: bytes, why: str) -> None:
    path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
    resp = client.post(path, content=raw, headers=AUTH)
    assert resp.status_code == 400, resp.text[:300]
    assert why in resp.json()["error"]["message"]


class _Server:
    """Stands in for Ray's LLMServer: ``chat`` fails the way vLLM does, before or after output."""

    def __init__(self, exc: Exception, after: int = 0) -> None:
        self.exc, self.after = exc, after

    async def chat(self, request: Any) -> AsyncIterator[str]:
        async def gen() -> AsyncIterator[str]:
            for i in range(self.after):
                yield f'data: {{"choices":[{{"delta":{{"content":"{i}"}}}}]}}\n\n'
            raise self.exc

        return gen()


class VLLMClientError(Exception):
    """Named as vLLM's (``vllm.exceptions``): the adapter recognises the hierarchy by name."""


class VLLMValidationError(VLLMClientError):
    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@pytest.mark.parametrize(("exc", "kind", "status"), [
    (VLLMValidationError("tool_choice must be a string or object (value=5)", parameter="tool_choice"), "invalid", 400),
    (ValueError("tool_choice must be one of none, auto, required"), "invalid", 400),
    (TypeError("'int' object is not iterable"), "invalid", 400),
    (UnicodeEncodeError("utf-8", "a\ud800b", 1, 2, "surrogates not allowed"), "invalid", 400),
    (OverflowError("int too large"), "invalid", 400),
    (RuntimeError("EngineDeadError: the engine core died at /work/x.py:1"), "engine", 500),
])
async def test_engine_exceptions_are_classified_at_the_boundary(exc: Exception, kind: str, status: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    items = [i async for i in engine_items(_Server(exc), EngineRequest("chat", body))]
    (last,) = [i for i in items if isinstance(i, Failure)]
    assert (last.kind, last.status) == (kind, status)
    assert "/work/" not in last.message
    assert "Traceback" not in last.message


async def test_an_engine_that_breaks_mid_stream_is_the_engines_fault() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    items = [i async for i in engine_items(_Server(ValueError("bad state"), after=2), EngineRequest("chat", body))]
    assert isinstance(items[-1], Failure)
    assert items[-1].kind == "engine"


class _Recorder(NoMetrics):
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def finished(self, record: RequestRecord) -> None:
        self.records.append(record)


def test_requests_refused_before_their_lifecycle_are_recorded_too() -> None:
    metrics = _Recorder()
    p = pipeline(MockBackends(), (token("mallory", TOKEN, "m"),), metrics=metrics)
    with TestClient(make_api(p)) as c:
        assert c.post("/v1/chat/completions", json={"model": "m"}, headers={"Authorization": "Bearer no"}).status_code \
            == 401
        assert c.post("/v1/completions", content=b"{", headers=AUTH).status_code == 400
        assert c.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH).status_code == 200
    got = [(r.kind, r.outcome, r.status, r.token) for r in metrics.records]
    assert got == [("chat", "unauthorized", 401, ""), ("completions", "client_error", 400, "mallory"),
                   ("completions", "ok", 200, "mallory")]


@pytest.mark.parametrize(("code", "kind", "status"), [
    (400, "invalid", 400), (404, "invalid", 404), (429, "unavailable", 503), (503, "unavailable", 503),
    (500, "engine", 500),
])
def test_engine_error_responses_are_classified(code: int, kind: str, status: int) -> None:
    info = type("ErrorInfo", (), {"code": code, "message": "m", "param": None})()
    part = type("ErrorResponse", (), {"error": info})()
    failure = engine_failure(part)
    assert (failure.kind, failure.status) == (kind, status)
