"""A mock engine behind the gateway's ``Backends`` port, and a gateway built around it, for tests.

``MockBackends`` answers like vLLM does through the port: OpenAI-shaped chat/completions/embeddings bodies,
streams of one token per event with a usage-only chunk last, ``[DONE]``; or whatever a test scripts per
backend (items, a failure, a delay, a stream that hangs). It records every request and every cancel.
``gateway`` builds a ``Pipeline`` + HTTP app on it with keyed token digests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from arks_ray.api.digests import TokenKeys
from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Limit, Quota, Token
from arks_ray.engines.protocol import Answer, Chunk, EngineItem, EngineRequest, EngineStream, Failure, Final
from arks_ray.gateway.settings import GatewaySettings
from deployments.pipeline import Pipeline

KEYS = TokenKeys.from_text("test-key-" + "k" * 32)


def digest(value: str) -> str:
    return KEYS.digest(value)


def token(name: str, value: str, *endpoints: str, limits: tuple[Limit, ...] = (), quota: str | None = None,
          **kw: Any) -> Token:
    return Token(name=name, digest=digest(value),
                 grants=tuple(Grant(endpoint=e, rate_limits=limits, quota=quota) for e in endpoints), **kw)


def words(n: int) -> list[str]:
    return [f"w{i} " for i in range(n)]


def vllm_body(kind: str, request: EngineRequest, text: list[str]) -> dict[str, Any]:
    n = request.body.get("n") if isinstance(request.body.get("n"), int) else 1
    usage = {"prompt_tokens": 7, "completion_tokens": len(text) * n, "total_tokens": 7 + len(text) * n}
    if kind == "embeddings":
        return {"object": "list", "model": request.body["model"], "usage": {"prompt_tokens": 3, "total_tokens": 3},
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
    if kind == "completions":
        choices = [{"index": i, "text": "".join(text), "finish_reason": "length", "logprobs": None}
                   for i in range(n)]
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": request.body["model"],
                "choices": choices, "usage": usage}
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": "length"}
               for i in range(n)]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": request.body["model"],
            "choices": choices, "usage": usage}


def vllm_stream(request: EngineRequest, text: list[str]) -> list[EngineItem]:
    """A stream as vLLM sends it through the engine adapter: role chunk, one token per event, usage, DONE."""
    model = request.body["model"]
    chat = request.kind == "chat"

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if chat else "text_completion"
        return "data: " + json.dumps({"id": "c1", "object": obj, "created": 1, "model": model,
                                      "choices": choices, **extra}, separators=(",", ":")) + "\n\n"

    items: list[EngineItem] = []
    if chat:
        items.append(Chunk(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}])))
    for i, word in enumerate(text):
        last = "length" if i == len(text) - 1 else None
        choice = {"index": 0, "delta": {"content": word}, "finish_reason": last} if chat else \
            {"index": 0, "text": word, "finish_reason": last, "logprobs": None}
        items.append(Chunk(event([choice])))
    usage = {"prompt_tokens": 7, "completion_tokens": len(text), "total_tokens": 7 + len(text)}
    if request.client_usage:
        items.append(Chunk(event([], usage=usage)))
    items.append(Chunk("data: [DONE]\n\n"))
    items.append(Final(usage, len(text) + (1 if chat else 0)))
    return items


@dataclass
class Script:
    """What one backend does: scripted items, or vLLM-like answers of ``tokens`` words."""

    items: list[EngineItem] | None = None
    tokens: int = 4
    delay_s: float = 0.0
    """Before the first item."""
    gap_s: float = 0.0
    """Between items."""
    hang: bool = False
    """Never finish after the first item (until cancelled)."""
    raises: Exception | None = None


@dataclass
class MockBackends:
    """The ``Backends`` port over scripted engines."""

    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[tuple[str, EngineRequest]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    health: dict[str, tuple[bool, str]] = field(default_factory=dict)

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        self.requests.append((backend.name, request))
        script = self.scripts.get(backend.name, Script())
        return _Stream(self, backend.name, self._items(script, request))

    async def _items(self, script: Script, request: EngineRequest) -> AsyncIterator[EngineItem]:
        if script.delay_s:
            await asyncio.sleep(script.delay_s)
        if script.raises is not None:
            raise script.raises
        if script.items is not None:
            items = script.items
        elif request.stream:
            items = vllm_stream(request, words(script.tokens))
        else:
            items = [Answer(vllm_body(request.kind, request, words(script.tokens)))]
        for i, item in enumerate(items):
            if i and script.gap_s:
                await asyncio.sleep(script.gap_s)
            yield item
            if script.hang:
                await asyncio.Event().wait()

    def forget(self, backend: Backend) -> None:
        self.forgotten.append(backend.name)

    async def probe_apps(self) -> dict[str, tuple[bool, str]]:
        return dict(self.health)

    async def probe_http(self, backend: Backend) -> tuple[bool, str]:
        return self.health.get(backend.name, (True, ""))

    async def close(self) -> None:
        pass


class _Stream:
    def __init__(self, owner: MockBackends, name: str, items: AsyncIterator[EngineItem]) -> None:
        self.owner, self.name, self.items = owner, name, items

    def __aiter__(self) -> AsyncIterator[EngineItem]:
        return self.items

    def cancel(self) -> None:
        self.owner.cancelled.append(self.name)


def failure(kind: Any, status: int, message: str = "boom") -> list[EngineItem]:
    return [Failure(kind, status, message)]


def config(tokens: tuple[Token, ...], *, endpoints: tuple[Endpoint, ...] | None = None,
           quotas: tuple[Quota, ...] = (), namespace: str = "default") -> dict[str, Any]:
    eps = endpoints or (Endpoint(name="m", backends=(Backend(kind="app", name="app-m", weight=1),)),)
    return GatewayConfig(namespace=namespace, endpoints=eps, tokens=tokens, quotas=quotas).model_dump(mode="json")


def pipeline(backends: MockBackends, tokens: tuple[Token, ...], *, settings: dict[str, Any] | None = None,
             store: Any = None, metrics: Any = None, clock: Callable[[], float] = time.time,
             **config_kw: Any) -> Pipeline:
    p = Pipeline(GatewaySettings.model_validate({"seed": 0, **(settings or {})}), backends, store=store,
                 metrics=metrics, clock=clock, keys=KEYS)
    p.reconfigure(config(tokens, **config_kw))
    return p
