"""End to end: an app with vLLM's own OpenAI server as its frontend (``spec.engineFrontend: vllmServer``).

Runs on the shared e2e stack next to its ``tiny`` app (Ray's ``LLMServer`` frontend), with the same model and
engine arguments on real vLLM (CPU), so the two frontends answer the same requests side by side. The server
runs as a child process of the Serve replica (``deployments.vllm_server``); these tests also kill it, and
the replica, and look for anything they left behind in the process table.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.stack import DEMO_TOKEN, SharedStack

pytestmark = pytest.mark.e2e

APP = "tiny-srv"
EXTRA = f"""
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: {APP}, namespace: default}}
spec:
  replicas: 1
  runtime: vllm
  servedModelName: {APP}
  model: {{name: tiny-qwen2}}
  engineFrontend: vllmServer
  runtimeCommonArgs: ["--dtype bfloat16", "--max-model-len 2048", "--gpu-memory-utilization 0.1", "--enforce-eager"]
  instanceSpec:
    env: [{{name: VLLM_CPU_KVCACHE_SPACE, value: "1"}}, {{name: HF_HUB_OFFLINE, value: "1"}}]
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: {APP}, namespace: default}}
spec: {{defaultWeight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: demo, namespace: default}}
spec:
  token: {DEMO_TOKEN}
  qos: [{{arksEndpoint: {{name: tiny}}}}, {{arksEndpoint: {{name: {APP}}}}}]
"""
AUTH = {"Authorization": f"Bearer {DEMO_TOKEN}"}
MSG = [{"role": "user", "content": "Count to ten"}]


@pytest.fixture(scope="module")
def stack(arks_stack: SharedStack) -> Iterator[SharedStack]:
    with arks_stack.extended(EXTRA, label="test_vllm_server_frontend"):
        yield arks_stack


@pytest.fixture
def http(stack: SharedStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers=AUTH, timeout=120) as c:
        yield c


def chat(http: httpx.Client, model: str, **extra: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 12,
                                                   "temperature": 0, **extra})


def events(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]


def test_greedy_answers_match_ray_llm_frontend(http: httpx.Client) -> None:
    ours, theirs = chat(http, APP), chat(http, "tiny")
    assert ours.status_code == theirs.status_code == 200, ours.text[:300]
    a, b = ours.json(), theirs.json()
    assert a["model"] == APP
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [a["usage"][k] for k in counts] == [b["usage"][k] for k in counts]
    assert a["usage"]["completion_tokens"] == 12
    body = {"model": APP, "prompt": "one two three", "max_tokens": 5, "temperature": 0}
    ours = http.post("/v1/completions", json=body)
    theirs = http.post("/v1/completions", json={**body, "model": "tiny"})
    assert ours.status_code == 200, ours.text[:300]
    assert ours.json()["choices"][0]["text"] == theirs.json()["choices"][0]["text"]


def test_a_stream_arrives_whole_and_metered(http: httpx.Client) -> None:
    import json

    whole = chat(http, APP).json()["choices"][0]["message"]["content"]
    plain = chat(http, APP, stream=True)
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("text/event-stream")
    data = events(plain)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == whole
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # not asked for: the gateway's alone
    asked = events(chat(http, APP, stream=True, stream_options={"include_usage": True}))
    usage = [json.loads(d)["usage"] for d in asked[:-1] if json.loads(d).get("usage")]
    assert usage[-1]["completion_tokens"] == 12


def test_the_servers_own_refusal_is_the_clients_400(http: httpx.Client) -> None:
    resp = chat(http, APP, max_tokens=100_000)  # beyond --max-model-len 2048: vLLM's server refuses it
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert "2048" in error["message"]
    assert "127.0.0.1" not in resp.text


def test_autoscaling_stats_come_from_the_requests_and_the_servers_metrics(stack: SharedStack) -> None:
    import threading

    from arks_ray.autoscaling.replica import IN_FLIGHT, KV_CACHE, RUNNING, TTFT_SAMPLES

    with ray_connected():
        from ray import serve

        handle = serve.get_deployment_handle(f"arks-engine:{APP}", app_name=APP)
        handle.record_autoscaling_stats.remote().result()  # the handle is ready before the load starts
        # Long requests in flight (1500 tokens: seconds each on this model), one after another in 3 streams
        # until a look at the stats finds them counted (each look reads the scheduler's gauges off the
        # server's /metrics, and a look through the handle is slow while the engine takes both cores).
        answers: list[int] = []
        done = threading.Event()

        def long_requests() -> None:
            with httpx.Client(base_url=stack.url, headers=AUTH, timeout=120) as c:
                while not done.is_set():
                    answers.append(chat(c, APP, max_tokens=1500, ignore_eos=True).status_code)

        load = [threading.Thread(target=long_requests) for _ in range(3)]
        for t in load:
            t.start()
        seen: list[dict[str, float]] = []
        deadline = time.monotonic() + 90
        try:
            while time.monotonic() < deadline and not [s for s in seen if s.get(RUNNING, 0) >= 1]:
                seen.append(handle.record_autoscaling_stats.remote().result())
                time.sleep(0.2)
        finally:
            done.set()
            for t in load:
                t.join()
    assert set(answers) == {200}
    busy = [s for s in seen if s.get(RUNNING, 0) >= 1]
    assert busy, f"the scheduler's gauges never counted a running request: {seen}"
    assert busy[0][IN_FLIGHT] >= 1
    assert 0 < busy[0][KV_CACHE] <= 1
    assert max(s[TTFT_SAMPLES] for s in seen) >= 1, seen  # timed by the replica as they streamed


def test_a_killed_server_is_restarted_and_leaves_nothing_behind(stack: SharedStack, http: httpx.Client) -> None:
    server = the_server()
    group = process_group(server)
    assert len(group) >= 2, f"the server and its EngineCore, in one group: {group}"
    replica = replica_of(server)
    os.kill(server, signal.SIGKILL)
    wait_until_served(http, 300)
    assert not [pid for pid in group if alive(pid)], "processes of the killed server are still running"
    assert the_server() != server
    # Restarted by its replica, which lived on: a health check that killed the server while it was still
    # starting would have restarted it until the replica failed and Serve replaced it.
    assert replica_of(the_server()) == replica


def test_a_killed_replica_leaves_nothing_behind(stack: SharedStack, http: httpx.Client) -> None:
    group = process_group(the_server())
    with ray_connected() as ray:
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(f"SERVE_REPLICA::{APP}#")]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 30
    while [pid for pid in group if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in group if alive(pid)], "the server outlived its replica"
    wait_until_served(http, 400)


# ------------------------------------------------------------------------------------------------ helpers


class ray_connected:
    def __enter__(self) -> Any:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # Once (in 1 of 2 runs of this module), Ray was found connected here already after the earlier test's
        # shutdown: its handle's background work connecting again, we think. Then that connection is used.
        ray.init(address="auto", log_to_driver=False, logging_level="ERROR", ignore_reinit_error=True)
        return ray

    def __exit__(self, *exc: object) -> None:
        import ray

        ray.shutdown()


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def the_server() -> int:
    """The pid of the app's vLLM server (the command the replica's shim started)."""
    found = [int(p) for p in os.listdir("/proc") if p.isdigit()
             and "vllm.entrypoints.openai.api_server" in cmdline(int(p)) and APP in cmdline(int(p))
             and "-c" not in cmdline(int(p))[:2]]
    assert len(found) == 1, f"expected one vLLM server of {APP}: {found}"
    return found[0]


def stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_group(pid: int) -> list[int]:
    """Every process in ``pid``'s process group (the shim, the server, EngineCore, its workers)."""
    pgrp = stat(pid)[2]
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and stat(int(p))[2:3] == [pgrp]]


def replica_of(server: int) -> int:
    """The replica process that started ``server``: the parent of its shim, which leads its process group."""
    return int(stat(int(stat(server)[2]))[1])


def alive(pid: int) -> bool:
    fields = stat(pid)
    return bool(fields) and fields[0] != "Z"


def wait_until_served(http: httpx.Client, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        resp = chat(http, APP, max_tokens=2)
        if resp.status_code == 200:
            return time.monotonic() - t0
        assert resp.status_code in (502, 503), resp.text[:300]
        assert "127.0.0.1" not in resp.text
        time.sleep(1)
    raise AssertionError(f"{APP} did not serve again within {timeout_s}s")
