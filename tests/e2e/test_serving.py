"""End to end on real Ray Serve and real vLLM (CPU): the local demo stack driven by the openai client.

Runs on the shared e2e stack (``arks_stack``: the demo's ``tiny`` app behind the gateway). The module adds
tokens for every auth case, and the hot-reload test redeploys with only the gateway's user_config changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from arks_ray.local import runner
from tests.support.stack import DEMO_TOKEN, SharedStack

pytestmark = pytest.mark.e2e

TOKEN = DEMO_TOKEN
EXTRA = """
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: other, namespace: default}
spec: {defaultWeight: 1}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: other-only, namespace: default}
spec:
  token: sk-other-only
  qos: [{arksEndpoint: {name: other}}]
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: switched-off, namespace: default}
spec:
  token: sk-switched-off
  disabled: true
  qos: [{arksEndpoint: {name: tiny}}]
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: expired, namespace: default}
spec:
  token: sk-expired
  expiresAt: "2020-01-01T00:00:00Z"
  qos: [{arksEndpoint: {name: tiny}}]
"""


@pytest.fixture(scope="module")
def stack(arks_stack: SharedStack) -> Iterator[dict[str, Any]]:
    with arks_stack.extended(EXTRA, label="test_serving") as plan:
        yield {"port": arks_stack.port, "base": arks_stack.url, "plan": plan, "shared": arks_stack}


def client(stack: dict[str, Any], token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key=token, max_retries=0, timeout=120)


CHAT = [{"role": "user", "content": "Say hello"}]


def test_chat_non_streaming_has_usage(stack: dict[str, Any]) -> None:
    resp = client(stack).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)
    assert resp.object == "chat.completion"
    assert resp.model == "tiny"
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


def test_chat_streaming_with_usage(stack: dict[str, Any]) -> None:
    chunks = list(client(stack).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_stream_without_include_usage_has_no_usage_chunk(stack: dict[str, Any]) -> None:
    chunks = list(client(stack).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_a_long_stream_comes_in_strides_and_its_running_usage_only_when_asked(stack: dict[str, Any]) -> None:
    # After a few requests the replica knows its TPOT and vLLM hands tokens over once per stride
    # (deployments.vllm_engine): fewer content events than tokens, the usage exact, and the running usage the
    # replica asks vLLM for (to charge a stream cut short) stripped, unless the client asked for it too.
    c = client(stack)
    for _ in range(3):  # streams: a replica's TPOT comes from streams only
        list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, stream=True))
    time.sleep(1.1)  # the replica reads its median TPOT at most once a second
    ask = {"model": "tiny", "messages": CHAT, "max_tokens": 64, "stream": True, "extra_body": {"ignore_eos": True}}
    plain = list(c.chat.completions.create(**ask, stream_options={"include_usage": True}))
    content = [ch for ch in plain if ch.choices and ch.choices[0].delta.content]
    assert plain[-1].usage is not None
    assert plain[-1].usage.completion_tokens == 64
    assert all(ch.usage is None for ch in plain[:-1])
    # The rule gives 8 here (1 + 8 x 8 tokens: 9 events); 24 allows a stride of 3 on a slow machine. Without a
    # stride this machine's vLLM still merges some outputs for a late reader, so "fewer than 64" would not tell:
    # 58 came without one after a pause.
    assert len(content) <= 24, f"{len(content)} events for 64 tokens: no stride"
    running = list(c.chat.completions.create(
        **ask, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [ch.usage.completion_tokens for ch in running if ch.choices and ch.usage is not None]
    assert len(counts) == len([ch for ch in running if ch.choices])  # on every chunk
    assert counts == sorted(counts)
    assert counts[-1] == 64
    # After a pause longer than the replica's 10 s window, a new stream keeps the last pace's stride, not 1.
    time.sleep(11.2)
    after = list(c.chat.completions.create(**ask, stream_options={"include_usage": True}))
    assert after[-1].usage is not None
    assert after[-1].usage.completion_tokens == 64
    events = len([ch for ch in after if ch.choices and ch.choices[0].delta.content])
    assert events <= 24, f"{events} events for 64 tokens after a pause: no stride"


def test_completions_both_ways(stack: dict[str, Any]) -> None:
    c = client(stack)
    resp = c.completions.create(model="tiny", prompt="Once upon", max_tokens=5)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 5
    chunks = list(c.completions.create(model="tiny", prompt="Once upon", max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_sse_framing_matches_vllm(stack: dict[str, Any]) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", stack["base"] + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        raw = resp.read().decode()
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: {")
        json.loads(event[6:])


@pytest.mark.parametrize(("token", "model", "exc", "status"), [
    ("sk-nobody", "tiny", openai.AuthenticationError, 401),
    ("sk-switched-off", "tiny", openai.AuthenticationError, 401),
    ("sk-expired", "tiny", openai.AuthenticationError, 401),
    ("sk-other-only", "tiny", openai.PermissionDeniedError, 403),
    (TOKEN, "no-such-model", openai.NotFoundError, 404),
])
def test_auth_errors(stack: dict[str, Any], token: str, model: str, exc: type[Exception], status: int) -> None:
    with pytest.raises(exc) as err:
        client(stack, token).chat.completions.create(model=model, messages=CHAT, max_tokens=2)
    assert err.value.status_code == status  # type: ignore[attr-defined]
    body = err.value.body  # type: ignore[attr-defined]
    assert set(body) >= {"message", "type", "code", "param"}


def test_invalid_fields_are_400_with_param(stack: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).chat.completions.create(model="tiny", messages=CHAT, max_tokens=100000)
    assert err.value.body["param"] == "max_tokens"  # type: ignore[index]
    assert err.value.body["type"] == "invalid_request_error"  # type: ignore[index]


@pytest.mark.parametrize(("content", "status"), [(b"{not json", 400), (b'{"model": "tiny", "messages": 5}', 400),
                                                  (b'{"model": "tiny", "prompt": "' + b"x" * (5 << 20) + b'"}', 413)])
def test_raw_client_mistakes(stack: dict[str, Any], content: bytes, status: int) -> None:
    resp = httpx.post(stack["base"] + "/v1/chat/completions", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert resp.status_code == status
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_embeddings_forwarded_and_refused_by_a_generative_model(stack: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).embeddings.create(model="tiny", input="hello")
    assert "embed" in err.value.body["message"]  # type: ignore[index]


def test_models_per_token(stack: dict[str, Any]) -> None:
    assert [m.id for m in client(stack).models.list()] == ["tiny"]
    assert [m.id for m in client(stack, "sk-other-only").models.list()] == ["other"]
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-nobody").models.list()


def test_dashboard_serve_api_lists_the_applications(stack: dict[str, Any]) -> None:
    status = runner.serve_status()
    assert status["gateway"]["status"] == "RUNNING"
    assert status["tiny"]["status"] == "RUNNING"


def _gateway_replicas() -> set[str]:
    details = runner._client().get_serve_details()
    deps = details["applications"]["gateway"]["deployments"]
    return {r["replica_id"] for d in deps.values() for r in d["replicas"]}


def test_tokens_added_disabled_and_removed_while_running(stack: dict[str, Any]) -> None:
    before = _gateway_replicas()
    added = EXTRA + """
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: newcomer, namespace: default}
spec:
  token: sk-newcomer
  qos: [{arksEndpoint: {name: tiny}}]
"""
    newcomer = client(stack, "sk-newcomer")
    with pytest.raises(openai.AuthenticationError):
        newcomer.models.list()

    def apply(extra: str) -> None:
        stack["shared"].apply(extra)  # the base plus these objects; waits until every app runs

    apply(added)
    _eventually(lambda: [m.id for m in newcomer.models.list()] == ["tiny"])
    apply(added.replace("token: sk-newcomer", "token: sk-newcomer\n  disabled: true"))
    _eventually(lambda: _is_401(newcomer))
    apply(EXTRA)
    _eventually(lambda: _is_401(newcomer))
    assert client(stack).models.list().data[0].id == "tiny"
    assert _gateway_replicas() == before, "the gateway replica was restarted instead of reconfigured"


def _is_401(c: openai.OpenAI) -> bool:
    try:
        c.models.list()
    except openai.AuthenticationError:
        return True
    return False


def _eventually(check: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.5)
