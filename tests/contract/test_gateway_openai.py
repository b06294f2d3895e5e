"""The gateway's HTTP surface through the official ``openai`` client, against the mock engine port.

A real uvicorn server on loopback serves ``make_api(Pipeline)`` over ``tests.support.mock_engine``;
responses are parsed by the SDK into its own types, so a shape the SDK cannot read fails here.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from arks_ray.api.gateway import Backend, Endpoint, Limit
from deployments.http_api import make_api
from tests.support.mock_engine import MockBackends, Script, failure, pipeline, token

TOKEN = "sk-contract-0001"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self) -> None:
        self.backends = MockBackends()
        endpoints = (
            Endpoint(name="m", backends=(Backend(kind="app", name="app-a", weight=1),
                                         Backend(kind="app", name="app-b", weight=0))),
            Endpoint(name="pair", backends=(Backend(kind="app", name="app-x", weight=1),
                                            Backend(kind="app", name="app-y", weight=1))),
            Endpoint(name="limited", backends=(Backend(kind="app", name="app-a", weight=1),)),
        )
        self.pipeline = pipeline(self.backends, (
            token("alice", TOKEN, "m", "pair"),
            token("carol", "sk-contract-0003", "limited", limits=(Limit(type="tpm", value=100),)),
        ), endpoints=endpoints)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(make_api(self.pipeline), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = TOKEN) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served()
    s.thread.start()
    deadline = time.monotonic() + 10
    while not s.server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield s
    s.server.should_exit = True
    s.thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _reset(served: Served) -> None:
    served.backends.scripts.clear()
    served.backends.requests.clear()
    served.backends.cancelled.clear()


def test_chat_whole_and_streamed(served: Served) -> None:
    c = served.client()
    whole = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert isinstance(whole, ChatCompletion)
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 4
    chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True}))
    assert all(isinstance(ch, ChatCompletionChunk) for ch in chunks)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "w0 w1 w2 w3 "


def test_stream_without_include_usage_has_no_usage_and_is_still_metered(served: Served) -> None:
    chunks = list(served.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(ch.usage is None for ch in chunks)
    (_, request), = served.backends.requests
    assert request.client_usage is False


def test_completions_both_ways(served: Served) -> None:
    c = served.client()
    whole = c.completions.create(model="m", prompt="once upon", max_tokens=4)
    assert isinstance(whole, Completion)
    assert whole.choices[0].text == "w0 w1 w2 w3 "
    streamed = list(c.completions.create(model="m", prompt="once upon", max_tokens=4, stream=True))
    assert all(isinstance(ch, Completion) for ch in streamed)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == "w0 w1 w2 w3 "


def test_embeddings_return_vectors(served: Served) -> None:
    out = served.client().embeddings.create(model="m", input="hello")
    assert isinstance(out, CreateEmbeddingResponse)
    assert len(out.data[0].embedding) == 3


def test_models_list_and_retrieve(served: Served) -> None:
    c = served.client()
    assert [m.id for m in c.models.list()] == ["m", "pair"]
    got = c.models.retrieve("pair")
    assert isinstance(got, Model)
    assert got.id == "pair"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("limited")  # exists, but not for this token: indistinguishable from absent
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_engine_refusal_is_the_clients_400_and_costs_the_backend_nothing(served: Served) -> None:
    served.backends.scripts["app-x"] = Script(items=failure("invalid", 400, "top_logprobs: must be >= 0"))
    served.backends.scripts["app-y"] = Script(items=failure("invalid", 400, "top_logprobs: must be >= 0"))
    c = served.client()
    for _ in range(6):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="pair", messages=[{"role": "user", "content": "x"}], top_logprobs=-1)
        assert "top_logprobs" in str(err.value)
    assert len(served.backends.requests) == 6, "a client's mistake was retried on another backend"
    views = {v.backend: v for v in served.pipeline.routes() if v.endpoint == "pair"}
    assert {v.health for v in views.values()} == {"closed"}, views


def test_backend_failure_is_retried_once_elsewhere_and_hides_internals(served: Served) -> None:
    served.backends.scripts["app-x"] = Script(items=failure("engine", 502, "backend 'app-x' failed"))
    served.backends.scripts["app-y"] = Script(items=failure("unavailable", 503, "backend 'app-y' has no replica"))
    with pytest.raises(openai.APIStatusError) as err:
        served.client().chat.completions.create(model="pair", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code in (502, 503)
    assert {name for name, _ in served.backends.requests} == {"app-x", "app-y"}
    body = err.value.response.text
    assert "Traceback" not in body
    assert "http://" not in body
    assert "127.0.0.1" not in body


def test_token_limits_count_n(served: Served) -> None:
    c = served.client("sk-contract-0003")
    with pytest.raises(openai.RateLimitError) as err:  # 16 choices x 16 tokens can never fit in 100 tpm
        c.chat.completions.create(model="limited", messages=[{"role": "user", "content": "x"}], n=16, max_tokens=16)
    assert "never fit" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="limited", messages=[{"role": "user", "content": "x"}], n=129)


def _raw_status(served: Served, authorization: bytes) -> int:
    """GET /v1/models with a header no HTTP client library would send, over a plain socket."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization +
                     b"\r\nConnection: close\r\n\r\n")
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("suffix", [b"\xc2\xa0", b"\xa0", b"x", b"\xe2\x80\x8b"])
def test_auth_is_exact(served: Served, suffix: bytes) -> None:
    # A non-breaking or zero-width space (UTF-8 or Latin-1) after the token is not trimmed away.
    assert _raw_status(served, b"Bearer " + TOKEN.encode() + suffix) == 401
    assert _raw_status(served, b"Bearer " + TOKEN.encode() + b" \t") == 200  # HTTP's own whitespace is
    resp = httpx.get(served.base + "/v1/models", headers={"Authorization": "Bearer sk-nope"})
    assert resp.json()["error"]["type"] == "authentication_error"


def test_unknown_token(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        served.client("sk-nope").chat.completions.create(model="m", messages=[])


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
    ("POST", "/v1/models/m", 405),
])
def test_unknown_paths_and_methods_are_openai_errors(served: Served, method: str, path: str, status: int) -> None:
    resp = httpx.request(method, served.base + path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == status
    assert set(resp.json()["error"]) == {"message", "type", "code", "param"}


def test_client_leaving_mid_stream_cancels_the_engine_and_settles(served: Served) -> None:
    served.backends.scripts["app-a"] = Script(tokens=50, gap_s=0.05)
    with served.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                  stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    deadline = time.monotonic() + 5
    while "app-a" not in served.backends.cancelled:
        assert time.monotonic() < deadline, "the engine was not cancelled after the client left"
        time.sleep(0.02)
    views = {v.backend: v for v in served.pipeline.routes() if v.endpoint == "m"}
    assert views["app-a"].health == "closed"
