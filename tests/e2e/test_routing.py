"""Endpoint routing end to end: two real vLLM apps on Serve and a raw ``vllm serve`` behind one endpoint.

The endpoint ``tiny`` has three backends: the app ``tiny`` (weight 3 through a ``kind: ArksApplication``
route), the app ``tiny-b`` (``defaultWeight`` 1) and a static backend, a second OpenAI-compatible server
(``vllm serve`` on the same model) at weight 2. The gateway names the backend that answered in
``x-arks-backend`` (a setting, on here). Checked on the real stack:

- the observed split over N requests is within a stated tolerance of 3:1:2;
- a streamed answer through the static backend is relayed with its usage;
- when ``tiny-b`` is stopped, every request that had not started succeeds on the others (the retry
  before the first byte, then the circuit breaker and the health check take it out of rotation);
- when the static server dies, the apps take its share.

Runs on the shared e2e stack (``arks_stack``, whose gateway settings name the backend and check health
every second): the module adds ``tiny-b``, the static backend and its routes; the shared ``tiny`` endpoint
is back to the ``tiny`` app alone, and ``tiny-b`` gone, when the module ends.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from arks_ray.local import runner
from tests.support.redis_server import free_port
from tests.support.stack import DEMO_TOKEN, TINY_ENGINE, SharedStack
from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.e2e

MODEL_PATH = "/tmp/arks-ray/models/tiny-qwen2"
N = 600
TOLERANCE = 0.06  # absolute, per share: > 3 binomial standard deviations at N = 600 for every share


def objects(static_url: str) -> str:
    return f"""
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: tiny-b, namespace: default}}
spec:
  servedModelName: tiny
{TINY_ENGINE}---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: tiny, namespace: default}}
spec:
  defaultWeight: 1
  routeConfigs:
    - {{kind: ArksApplication, name: tiny, weight: 3}}
    - {{name: "{static_url}", weight: 2}}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: static-only, namespace: default}}
spec:
  routeConfigs: [{{name: "{static_url}", weight: 1}}]
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: static, namespace: default}}
spec:
  token: sk-static
  qos: [{{arksEndpoint: {{name: static-only}}}}]
"""


@pytest.fixture(scope="module")
def stack(arks_stack: SharedStack) -> Iterator[dict[str, Any]]:
    settings = arks_stack.plan.serve_config["applications"][0]["args"]["settings"] if arks_stack.plan else {}
    assert (settings["backend_header"], settings["health_check_interval_s"]) == (True, 1), settings
    static_port = free_port()
    # The raw server loads while Serve starts tiny-b; both need the tiny model, which the shared stack generated.
    static = VllmServer(MODEL_PATH, "tiny", static_port, Path("/tmp/arks-ray/e2e-static-vllm.log"))
    try:
        with arks_stack.extended(objects(static.url), label="test_routing") as plan:
            static.wait_healthy(300)
            yield {"base": arks_stack.url, "plan": plan, "static": static}
    finally:
        static.stop()


async def fire(base: str, n: int, concurrency: int, token: str = DEMO_TOKEN, **body: Any) -> list[httpx.Response]:
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **body}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
        async def one() -> httpx.Response:
            async with sem:
                return await c.post("/v1/chat/completions", json=payload)

        return await asyncio.gather(*(one() for _ in range(n)))


def assert_all_ok(responses: list[httpx.Response], n: int) -> None:
    """All ``n`` answered 200; otherwise the failures' status, backend and body (a flake must say why)."""
    failed = [(r.status_code, r.headers.get("x-arks-backend"), r.headers.get("retry-after"), r.text[:300])
              for r in responses if r.status_code != 200]
    assert (len(responses), failed) == (n, []), failed


def shares(responses: list[httpx.Response]) -> dict[str, float]:
    counts = collections.Counter(r.headers["x-arks-backend"] for r in responses)
    return {k: v / len(responses) for k, v in counts.items()}


def test_the_observed_split_follows_the_weights(stack: dict[str, Any]) -> None:
    responses = asyncio.run(fire(stack["base"], N, concurrency=6))
    assert_all_ok(responses, N)
    static = stack["static"].url
    observed = shares(responses)
    expected = {"tiny": 3 / 6, "tiny-b": 1 / 6, static: 2 / 6}
    print(f"split over {N} requests: observed {observed}, expected {expected}")
    assert set(observed) == set(expected)
    for name, share in expected.items():
        assert abs(observed[name] - share) <= TOLERANCE, (name, observed, expected)


def test_a_stream_through_the_static_backend_keeps_its_usage(stack: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=stack["base"] + "/v1", api_key="sk-static", max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError):  # the raw server serves 'tiny' only: its 404 comes through
        client.chat.completions.create(model="static-only", messages=[{"role": "user", "content": "hi"}])
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}
    for _ in range(40):  # until the weighted choice lands on the static backend (p = 1/3 each time)
        with httpx.stream("POST", stack["base"] + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120) as resp:
            raw = resp.read().decode()
        if resp.headers["x-arks-backend"] == stack["static"].url:
            break
    else:
        pytest.fail("the static backend never answered")
    assert raw.endswith("data: [DONE]\n\n")
    assert '"completion_tokens":5' in raw.replace(" ", "")


def test_requests_succeed_on_the_others_when_an_app_is_stopped(stack: dict[str, Any]) -> None:
    config = stack["plan"].serve_config
    without_b = {**config, "applications": [a for a in config["applications"] if a["name"] != "tiny-b"]}
    runner.deploy(without_b)  # the gateway is not told: tiny-b is still one of its backends
    deadline = time.monotonic() + 60
    while "tiny-b" in runner.serve_status() and time.monotonic() < deadline:
        time.sleep(0.5)
    responses = asyncio.run(fire(stack["base"], 60, concurrency=6))
    assert_all_ok(responses, 60)
    assert "tiny-b" not in shares(responses)
    time.sleep(2)  # a health check later it is out of rotation: no request even tries it
    again = asyncio.run(fire(stack["base"], 30, concurrency=3))
    assert_all_ok(again, 30)


def test_the_apps_take_the_share_of_a_dead_static_backend(stack: dict[str, Any]) -> None:
    stack["static"].stop()
    responses = asyncio.run(fire(stack["base"], 30, concurrency=3))
    assert_all_ok(responses, 30)
    assert set(shares(responses)) == {"tiny"}
