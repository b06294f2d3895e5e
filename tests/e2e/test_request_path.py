"""The request path against a real vLLM engine: a client's mistakes are the client's, on the real system.

Runs on the shared e2e stack (``arks_stack``: the demo's ``tiny`` app on vLLM CPU behind two gateway
replicas). Bodies that vLLM itself refuses (found by trying them on it, not by reading its code) must come
back as 400 with an OpenAI error body naming no Ray internals, and must not take the app out of rotation:
the endpoint ``tiny`` splits traffic 100:1 between the app and a static OpenAI server started here; after a
barrage of bad requests, good ones still reach ``tiny`` (the SLO weighting may take ``tiny``'s factor down
to 0.05 against the faster static server, which still leaves it 5:1; only a breaker opened by the client's
mistakes would send them all to the static server). And when the engine replica dies, requests get a fast
503 while Serve brings a new one up, instead of waiting for it.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.support.redis_server import free_port
from tests.support.stack import DEMO_TOKEN, SharedStack

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {DEMO_TOKEN}"}
MSG = [{"role": "user", "content": "hi"}]
# What vLLM refuses (each once answered 503 with a Ray trace, and counted against the app).
REFUSED_BY_VLLM: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "tool_choice": 5}),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "logprobs": True, "top_logprobs": -1}),
    ("/v1/chat/completions", {"model": "tiny", "messages": 5}),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": -3}),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**9}),
    ("/v1/completions", {"model": "tiny", "prompt": [[10**9]], "max_tokens": 2}),
]
# What the gateway refuses before any engine sees it.
REFUSED_BY_GATEWAY: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"a\\ud800b"}]}'),
    ("/v1/chat/completions", b'{"model":"tiny","messages":[],"stream":false,"stream_options":{"include_usage":true}}'),
    ("/v1/completions", b'{"model":"tiny","prompt":' + json.dumps(["p"] * 5000).encode() + b"}"),
    ("/v1/completions", b'{"model":"tiny","prompt":"x","n":16384}'),
    ("/v1/chat/completions", b"[" * 10_000 + b"]" * 10_000),
]


class _Static(BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible server: refuses the bad requests as vLLM would, answers the rest."""

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if not isinstance(body.get("messages"), list) or "tool_choice" in body or "top_logprobs" in body \
                or body.get("max_tokens", 1) < 1:
            self._send(400, {"error": {"message": "invalid request", "type": "BadRequestError", "code": 400}})
            return
        self._send(200, {"id": "s", "object": "chat.completion", "created": 1, "model": "tiny",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture(scope="module")
def stack(arks_stack: SharedStack) -> Iterator[dict[str, Any]]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Static)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"base": arks_stack.url, "static": f"http://127.0.0.1:{server.server_address[1]}",
               "shared": arks_stack}
    finally:
        server.shutdown()


def _assert_clean_400(resp: httpx.Response) -> None:
    assert resp.status_code == 400, (resp.status_code, resp.text[:500])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    for leak in ("Ray", "pid=", "ip=", "actor", "Traceback", "File \"", "127.0.0.1"):
        assert leak not in err["message"], err["message"]


@pytest.mark.parametrize(("path", "body"), REFUSED_BY_VLLM, ids=[json.dumps(b)[:60] for _, b in REFUSED_BY_VLLM])
def test_what_vllm_refuses_is_a_clean_400(stack: dict[str, Any], path: str, body: dict[str, Any]) -> None:
    _assert_clean_400(httpx.post(stack["base"] + path, json=body, headers=AUTH, timeout=120))


@pytest.mark.parametrize(("path", "raw"), REFUSED_BY_GATEWAY, ids=[r[:40].decode() for _, r in REFUSED_BY_GATEWAY])
def test_what_the_gateway_refuses_is_a_clean_400(stack: dict[str, Any], path: str, raw: bytes) -> None:
    _assert_clean_400(httpx.post(stack["base"] + path, content=raw, headers=AUTH, timeout=120))


def test_a_tenants_bad_requests_do_not_take_the_app_out_of_rotation(stack: dict[str, Any]) -> None:
    # The endpoint tiny (an app serves the endpoint of its servedModelName) with a static route beside the app.
    routes = f"""
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: tiny, namespace: default}}
spec:
  routeConfigs:
    - {{kind: ArksApplication, name: tiny, weight: 100}}
    - {{name: "{stack['static']}", weight: 1}}
"""
    with stack["shared"].extended(routes, label="test_request_path rotation"), \
            httpx.Client(base_url=stack["base"], headers=AUTH, timeout=120) as c:
        for _ in range(4):
            for _, body in REFUSED_BY_VLLM[:4]:
                _assert_clean_400(c.post("/v1/chat/completions", json=body))
        answers = [c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 1})
                   for _ in range(20)]
    assert {r.status_code for r in answers} == {200}
    served = collections.Counter(r.headers["x-arks-backend"] for r in answers)
    assert served["tiny"] >= 5, f"the app left rotation after the client's mistakes: {served}"


def _replicas_of(app: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def test_while_the_engine_replica_restarts_requests_get_a_fast_503(stack: dict[str, Any]) -> None:
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    try:
        (name,) = _replicas_of("tiny")
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        body = {"model": "tiny", "messages": MSG, "max_tokens": 1}
        fast: list[float] = []
        deadline = time.monotonic() + 400
        with httpx.Client(base_url=stack["base"], headers=AUTH, timeout=120) as c:
            while True:
                assert time.monotonic() < deadline, "the engine replica did not come back within 400s"
                t0 = time.monotonic()
                resp = c.post("/v1/chat/completions", json=body)
                took = time.monotonic() - t0
                if resp.status_code == 200:
                    break
                assert resp.status_code in (502, 503), resp.text[:300]
                assert "Retry-After" in resp.headers or resp.status_code == 502
                for leak in ("pid=", "ip=", "actor_id", "Traceback"):
                    assert leak not in resp.text
                if resp.status_code == 503:
                    fast.append(took)
                time.sleep(0.5)
        # Once the gateway's health check (every second here) sees the app without a running replica, each
        # request is answered at once instead of waiting on the handle for the replica to come back.
        assert len(fast) >= 5, f"too few fast 503s while the replica restarted: {fast}"
        assert sorted(fast)[len(fast) // 2] < 1.0, f"503s were not fast: {fast}"
    finally:
        ray.shutdown()


def test_after_serves_proxy_is_replaced_requests_with_a_body_are_served_again(stack: dict[str, Any]) -> None:
    """Serve's proxy sends the gateway only a request's headers; the gateway fetches the body from that proxy by
    name. A proxy that dies is replaced by a new actor of the same name, and the gateway must get bodies from it
    (a cached handle to the dead one would fail every request)."""
    import os

    import ray

    if stack["shared"].ingress != "serve":
        pytest.skip("behind HAProxy the body comes with the request")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    body = {"model": "tiny", "messages": MSG, "max_tokens": 1}
    try:
        with httpx.Client(base_url=stack["base"], headers=AUTH, timeout=120) as c:
            assert c.post("/v1/chat/completions", json=body).status_code == 200  # the gateway holds the handle
            (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].startswith("SERVE_PROXY_ACTOR")]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            deadline = time.monotonic() + 180
            served = 0
            while served < 5:  # five in a row, each with a body fetched from the new proxy
                assert time.monotonic() < deadline, "requests were not served within 180s of the proxy's restart"
                try:
                    status = c.post("/v1/chat/completions", json=body).status_code
                except httpx.TransportError:  # nothing listens while the new proxy starts
                    status = 0
                served = served + 1 if status == 200 else 0
                if status != 200:
                    time.sleep(0.5)
    finally:
        ray.shutdown()
