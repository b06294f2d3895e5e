"""End to end: Dynamo sidecars behind the gateway, on real Ray Serve, with Dynamo's CPU ``mocker`` engine.

One Ray for the module, with two apps rendered from Arks objects: ``dyn`` (an ArksApplication with
``runtime: dynamo``, whose replica runs ``dynamo.frontend`` and ``dynamo.mocker``) and ``dyn-pd`` (an
ArksDisaggregatedApplication: a frontend replica plus prefill and decode mocker workers, each in its own
deployment). Both are served through the gateway with token auth and usage accounting; the sidecars are
killed and must come back. Needs ``.venv-dynamo`` (``make dynamo-venv``).

Runs on the shared e2e stack (``arks_stack``): the module adds the two apps (on one more local raylet,
their pods being a worker group of their own), their endpoints and tokens, and removes them when it ends.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from deployments.dynamo_engine import REPO_PYTHON
from tests.support.stack import SharedStack

pytestmark = pytest.mark.e2e

TPM = 100000
EXTRA = f"""
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: dyn, namespace: default}}
spec:
  runtime: dynamo
  servedModelName: dyn
  model: {{name: tiny-qwen2}}
  dynamo: {{engine: mocker, args: ["--max-model-len 2048"]}}
  instanceSpec: {{}}
---
apiVersion: arks.ai/v1
kind: ArksDisaggregatedApplication
metadata: {{name: dyn-pd, namespace: default}}
spec:
  runtime: dynamo
  servedModelName: dyn-pd
  model: {{name: tiny-qwen2}}
  dynamo: {{engine: mocker}}
  router: {{replicas: 1}}
  prefill: {{replicas: 1, runtimeCommonArgs: ["--tp 1"]}}
  decode: {{replicas: 1}}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: dyn, namespace: default}}
spec: {{defaultWeight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: dyn-pd, namespace: default}}
spec: {{defaultWeight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: dyn-user, namespace: default}}
spec:
  token: sk-dyn-user
  qos:
    - arksEndpoint: {{name: dyn}}
      rateLimits: [{{type: tpm, value: {TPM}}}]
    - arksEndpoint: {{name: dyn-pd}}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: pd-only, namespace: default}}
spec:
  token: sk-pd-only
  qos: [{{arksEndpoint: {{name: dyn-pd}}}}]
"""
CHAT = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def stack(arks_stack: SharedStack) -> Iterator[dict[str, Any]]:
    if not (os.environ.get("ARKS_DYNAMO_PYTHON") or REPO_PYTHON.exists()):
        pytest.fail(f"Dynamo's virtualenv is missing: run `make dynamo-venv` (expected {REPO_PYTHON})")
    started = time.monotonic()
    with arks_stack.extended(EXTRA, label="test_dynamo"):
        print(f"dynamo apps ready {time.monotonic() - started:.1f}s after they were deployed")
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address="auto", log_to_driver=False)
        try:
            yield {"base": arks_stack.url}
        finally:
            ray.shutdown()


def client(stack: dict[str, Any], token: str = "sk-dyn-user") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key=token, max_retries=0, timeout=60)


def app_status(app: str) -> dict[str, Any]:
    from ray import serve

    status: dict[str, Any] = serve.get_app_handle(app).status.remote().result(timeout_s=30)
    return status


def test_chat_through_the_gateway_has_usage(stack: dict[str, Any]) -> None:
    resp = client(stack).chat.completions.create(model="dyn", messages=CHAT, max_tokens=6)
    assert resp.object == "chat.completion"
    assert resp.model == "dyn"
    assert resp.choices[0].message.content
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6


def test_stream_strips_usage_unless_asked_and_is_always_metered(stack: dict[str, Any]) -> None:
    c = client(stack)
    body: dict[str, Any] = {"model": "dyn", "messages": CHAT, "max_tokens": 5}
    first = c.chat.completions.with_raw_response.create(**body)
    used_first = first.parse().usage.total_tokens
    asked = list(c.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    usage = [ch.usage for ch in asked if ch.usage is not None]
    assert len(usage) == 1
    assert usage[0].completion_tokens == 5
    assert "".join(ch.choices[0].delta.content or "" for ch in asked if ch.choices)
    silent = list(c.chat.completions.create(**body, stream=True))
    assert all(ch.usage is None for ch in silent)
    assert sum(bool(ch.choices and ch.choices[0].delta.content) for ch in silent) == 5
    time.sleep(0.5)  # settlement runs just after each response
    probe = c.chat.completions.with_raw_response.create(**body)
    # Both probes carry the same estimate, so the difference in remaining tokens is what was settled in between:
    # the unasked-for stream was charged its real usage too, the same as the stream that showed it.
    charged = used_first + 2 * usage[0].total_tokens
    first_remaining = int(first.headers["x-ratelimit-remaining-tokens"])
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) == first_remaining - charged


def test_auth_is_enforced_in_front_of_dynamo(stack: dict[str, Any]) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-wrong").chat.completions.create(model="dyn", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        client(stack, "sk-pd-only").chat.completions.create(model="dyn", messages=CHAT, max_tokens=2)


def test_completions_and_bad_requests(stack: dict[str, Any]) -> None:
    resp = client(stack).completions.create(model="dyn", prompt="hello", max_tokens=3)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 3
    bad = httpx.post(stack["base"] + "/v1/chat/completions", timeout=30,
                     headers={"Authorization": "Bearer sk-dyn-user"},
                     json={"model": "dyn", "messages": 3})
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["type"] == "invalid_request_error"


def recover(stack: dict[str, Any], model: str, timeout_s: float = 90) -> float:
    """Seconds until a chat through the gateway succeeds again."""
    started = time.monotonic()
    while True:
        try:
            client(stack).chat.completions.create(model=model, messages=CHAT, max_tokens=2)
            return time.monotonic() - started
        except openai.APIError:
            assert time.monotonic() - started < timeout_s, f"{model} did not recover within {timeout_s}s"
            time.sleep(0.5)


@pytest.mark.parametrize("role", ["worker", "frontend"])
def test_a_killed_sidecar_is_restarted_and_serves_again(stack: dict[str, Any], role: str) -> None:
    before = {s["role"]: s for s in app_status("dyn")["sidecars"]}
    pid = before[role]["pid"]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    took = recover(stack, "dyn")
    print(f"{role} killed: serving again after {took:.1f}s")
    after = {s["role"]: s for s in app_status("dyn")["sidecars"]}
    assert after[role]["restarts"] == before[role]["restarts"] + 1
    assert after[role]["pid"] not in (None, pid)
    assert after[role]["state"] == "running"
    assert after[role]["last_exit"] == -signal.SIGKILL


def test_pd_request_runs_on_prefill_and_decode_workers(stack: dict[str, Any]) -> None:
    resp = client(stack).chat.completions.create(model="dyn-pd", messages=CHAT, max_tokens=4)
    assert resp.model == "dyn-pd"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 4
    status = app_status("dyn-pd")
    modes = sorted(w["mode"] for w in status["workers"])
    assert modes == ["decode", "prefill"]
    for worker in status["workers"]:
        (sidecar,) = worker["sidecars"]
        assert sidecar["state"] == "running"
        assert "--disaggregation-mode" in sidecar["command"]
    # The frontend logs which prefill and which decode worker served each request.
    (frontend,) = status["sidecars"]
    with open(frontend["log"], errors="replace") as f:
        assert "prefill_worker_id" in f.read()
