"""The OpenAI surface on real Serve + vLLM (CPU), through the official ``openai`` client: embeddings from a
pooling model, ``/v1/responses``, LoRA adapters per tenant, and every endpoint's shapes against the SDK's
own types.

Runs on the shared e2e stack (``arks_stack``), adding two engines: ``embed`` (the tiny embedding model,
``--runner pooling``) and ``lora`` (the tiny chat model with ``spec.lora``, adapter ``a``; the module adds
``b`` and removes ``a`` while it runs). Both models and the adapter are generated offline
(``arks_ray.local.tinyfamily``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from arks_ray.api.digests import TOKEN_KEY_ENV
from arks_ray.local import runner
from arks_ray.local.tinyfamily import EMBEDDING_DIM
from tests.support.stack import TINY_ENGINE, SharedStack

pytestmark = pytest.mark.e2e

TENANT = "sk-tenant-lora"
EMBED_METERED, EMBED_TPM = "sk-tenant-embed-tpm", 100
ENGINE_ARGS = "[--dtype bfloat16, --max-model-len 2048, --gpu-memory-utilization 0.1, --enforce-eager]"
ENV = 'env: [{name: VLLM_CPU_KVCACHE_SPACE, value: "1"}, {name: HF_HUB_OFFLINE, value: "1"}]'


def objects(adapters: tuple[str, ...]) -> str:
    listed = ", ".join(f"{{name: {a}, model: {{name: tiny-lora}}}}" for a in adapters)
    grants = "".join(f"\n    - {{arksEndpoint: {{name: 'lora:{a}'}}, rateLimits: [{{type: rpm, value: 3}}]}}"
                     for a in adapters)
    return f"""
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {{name: tiny-embed, namespace: default}}
spec:
  model: arks-ray/tiny-qwen2-embed
  source: {{local: {{path: /tmp/arks-ray/models/tiny-qwen2-embed}}}}
---
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {{name: tiny-lora, namespace: default}}
spec:
  model: arks-ray/tiny-qwen2-lora
  source: {{local: {{path: /tmp/arks-ray/models/tiny-qwen2-lora}}}}
---
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: embed, namespace: default}}
spec:
  servedModelName: embed
  model: {{name: tiny-embed}}
  runtimeCommonArgs: [--runner pooling, --dtype bfloat16, --max-model-len 2048, --gpu-memory-utilization 0.1,
                      --enforce-eager]
  instanceSpec:
    {ENV}
---
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: lora, namespace: default}}
spec:
  servedModelName: lora
{TINY_ENGINE}  lora:
    adapters: [{listed}]
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: embed, namespace: default}}
spec: {{defaultWeight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: lora, namespace: default}}
spec: {{defaultWeight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: tenant, namespace: default}}
spec:
  token: {TENANT}
  qos:
    - {{arksEndpoint: {{name: tiny}}}}
    - {{arksEndpoint: {{name: embed}}}}
    - {{arksEndpoint: {{name: lora}}}}{grants}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: embed-metered, namespace: default}}
spec:
  token: {EMBED_METERED}
  qos:
    - {{arksEndpoint: {{name: embed}}, rateLimits: [{{type: tpm, value: {EMBED_TPM}}}]}}
"""


@pytest.fixture(scope="module")
def stack(arks_stack: SharedStack) -> Iterator[SharedStack]:
    with arks_stack.extended(objects(("a",)), label="test_openai_surface"):
        yield arks_stack


def client(stack: SharedStack, token: str = TENANT) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=token, max_retries=0, timeout=120)


CHAT = [{"role": "user", "content": "Say hello"}]


def raw_json(resp: Any) -> dict[str, Any]:
    data: dict[str, Any] = resp.http_response.json()
    return data


def sse_data(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_models_list_and_retrieve(stack: SharedStack) -> None:
    c = client(stack)
    listed = c.models.with_raw_response.list()
    ids = [Model.model_validate(m).id for m in raw_json(listed)["data"]]
    assert sorted(ids) == ["embed", "lora", "lora:a", "tiny"]
    got = c.models.with_raw_response.retrieve("lora:a")
    assert Model.model_validate(raw_json(got)).id == "lora:a"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("lora:zzz")


def test_chat_and_completions_match_the_sdk_types(stack: SharedStack) -> None:
    c = client(stack)
    # ignore_eos (vLLM's): the random tiny model may sample its end token early, and the counts are the point.
    chat = ChatCompletion.model_validate(raw_json(c.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=5, extra_body={"ignore_eos": True})))  # type: ignore[arg-type]
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 5
    done = Completion.model_validate(raw_json(c.completions.with_raw_response.create(
        model="tiny", prompt="Once upon", max_tokens=4, extra_body={"ignore_eos": True})))
    assert done.usage is not None
    assert done.usage.completion_tokens == 4
    for kind, kwargs, model in (("chat", {"messages": CHAT}, ChatCompletionChunk),
                                ("completions", {"prompt": "Once upon"}, Completion)):
        with httpx.stream("POST", f"{stack.url}/v1/{'chat/completions' if kind == 'chat' else kind}", timeout=120,
                          headers={"Authorization": f"Bearer {TENANT}"},
                          json={"model": "tiny", "max_tokens": 4, "stream": True, "ignore_eos": True,
                                "stream_options": {"include_usage": True}, **kwargs}) as resp:
            text = resp.read().decode()
        assert text.endswith("data: [DONE]\n\n")
        data = sse_data(text)
        # The SDK types a completion chunk as a Completion, whose finish_reason may not be null, though
        # every chunk but the last has a null one (OpenAI's too): those are checked for their keys only.
        assert all({"id", "object", "created", "model", "choices"} <= set(d) for d in data)
        chunks = [model.model_validate(d) for d in data
                  if model is ChatCompletionChunk or all(c.get("finish_reason") for c in d["choices"])]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 4


def test_embeddings_return_vectors_and_are_metered(stack: SharedStack) -> None:
    c = client(stack)
    raw = c.embeddings.with_raw_response.create(model="embed", input=["hello world", "the cat sat"],
                                                encoding_format="float")
    resp = CreateEmbeddingResponse.model_validate(raw_json(raw))
    assert [len(d.embedding) for d in resp.data] == [EMBEDDING_DIM, EMBEDDING_DIM]
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens > 0
    # The SDK's default (base64) decodes to the same vectors.
    again = c.embeddings.create(model="embed", input=["hello world"])
    assert again.data[0].embedding == pytest.approx(resp.data[0].embedding, abs=1e-3)
    with pytest.raises(openai.BadRequestError):  # a generative model refuses, with a clear message
        c.embeddings.create(model="tiny", input="hello")


def test_embeddings_count_their_real_prompt_tokens_against_a_tpm_limit(stack: SharedStack) -> None:
    """The tiny tokenizer reads a digit or a space as a token, so this input's real count (the engine's
    usage) is about 4x the gateway's admission estimate (4 characters a token): the limit must refuse
    once the real tokens are spent, not after 4x as many requests."""
    c = client(stack, EMBED_METERED)
    text = " ".join(str(i) for i in range(12))
    estimate = -(-len(text) // 4)
    spent: list[int] = []
    for _ in range(EMBED_TPM // estimate + 1):
        try:
            spent.append(c.embeddings.create(model="embed", input=text).usage.prompt_tokens)
        except openai.RateLimitError:
            break
    else:
        pytest.fail(f"no 429 within {len(spent)} requests: {spent} prompt tokens were not counted")
    assert min(spent) > 2 * estimate  # the input is what the docstring says
    # Each admitted request fit the tokens left (by its estimate); the refused one did not.
    assert sum(spent[:-1]) + estimate <= EMBED_TPM < sum(spent) + estimate


def test_responses_non_streaming_and_streaming(stack: SharedStack) -> None:
    c = client(stack)
    raw = c.responses.with_raw_response.create(model="tiny", input="Say hello", max_output_tokens=6)
    resp = Response.model_validate(raw_json(raw))
    assert resp.usage is not None
    assert 0 < resp.usage.output_tokens <= 6
    if resp.usage.output_tokens == 6:  # max_output_tokens reached: OpenAI calls that incomplete, and says why
        assert resp.status == "incomplete"
        assert resp.incomplete_details is not None
        assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text
    events = list(c.responses.create(model="tiny", input="Say hello", max_output_tokens=6, stream=True))
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event.model_dump())
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.usage is not None  # type: ignore[union-attr]
    assert any(e.type == "response.output_text.delta" for e in events)


@pytest.mark.parametrize(("field", "value"), [("previous_response_id", "resp_123"), ("store", True)])
def test_responses_needing_state_are_refused(stack: SharedStack, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).responses.create(model="tiny", input="hi", **{field: value})
    assert err.value.body["param"] == field  # type: ignore[index]


def _greedy(stack: SharedStack, model: str) -> str:
    resp = client(stack).chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    assert resp.usage is not None
    assert resp.usage.completion_tokens > 0
    return resp.choices[0].message.content or ""


def _replicas(app: str) -> set[str]:
    details = runner._client().get_serve_details()
    deps = details["applications"][app]["deployments"]
    return {r["replica_id"] for d in deps.values() for r in d["replicas"]}


def test_lora_adapter_per_tenant_live(stack: SharedStack, monkeypatch: pytest.MonkeyPatch) -> None:
    # The running gateway digests tokens with this machine's local key (Ray started outside any test);
    # renders inside a test must use it too, not the test key the autouse fixture sets.
    monkeypatch.delenv(TOKEN_KEY_ENV, raising=False)
    base, adapted = _greedy(stack, "lora"), _greedy(stack, "lora:a")
    assert base != adapted, "the adapter did not change the greedy answer: it was not applied"
    assert _greedy(stack, "lora") == base
    # The demo token is granted the base model only.
    with pytest.raises(openai.PermissionDeniedError):
        client(stack, stack.token).chat.completions.create(model="lora:a", messages=CHAT, max_tokens=2)
    # Limits count per adapter: rpm 3 on lora:a (one used above), none on the base.
    _greedy(stack, "lora:a")
    _greedy(stack, "lora:a")
    with pytest.raises(openai.RateLimitError):
        _greedy(stack, "lora:a")
    assert _greedy(stack, "lora") == base

    before = _replicas("lora")
    stack.apply(objects(("a", "b")))
    _eventually(lambda: "lora:b" in [m.id for m in client(stack).models.list()])
    assert _greedy(stack, "lora:b") == adapted  # the same weights under another name
    stack.apply(objects(("b",)))
    _eventually(lambda: "lora:a" not in [m.id for m in client(stack).models.list()])
    with pytest.raises(openai.NotFoundError):
        client(stack).chat.completions.create(model="lora:a", messages=CHAT, max_tokens=2)
    assert _greedy(stack, "lora:b") == adapted
    assert _replicas("lora") == before, "the engine was restarted to add or remove an adapter"


def _eventually(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.5)
