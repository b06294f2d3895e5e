"""``deployments.responses`` to the engine boundary: vLLM's Responses events become forwarded SSE events
and a metered ``Final``; errors and models without Responses become the port's failures. The vLLM
handler is a stand-in here (its request model is vLLM's own); the real one runs in
``tests/e2e/test_openai_surface.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from arks_ray.engines.protocol import Chunk, EngineRequest, Failure, Final
from deployments.responses import responses_items


class Event:
    def __init__(self, type_: str, **fields: Any) -> None:
        self.type, self.fields = type_, fields
        self.response = SimpleNamespace(**fields.get("response_ns", {}))

    def model_dump_json(self, **_: Any) -> str:
        return json.dumps({"type": self.type, **{k: v for k, v in self.fields.items() if k != "response_ns"}})


class Handler:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.requests: list[Any] = []

    async def create_responses(self, request: Any, raw: Any) -> Any:
        self.requests.append(request)
        return self.result


def server(handler: Handler | None) -> Any:
    return SimpleNamespace(engine=SimpleNamespace(_app_state=SimpleNamespace(openai_serving_responses=handler)))


def run(srv: Any, body: dict[str, Any]) -> list[Any]:
    resolved: list[bool] = []

    async def resolve() -> None:
        resolved.append(True)

    async def collect() -> list[Any]:
        return [i async for i in responses_items(srv, EngineRequest("responses", body), lambda: None, resolve)]

    items = asyncio.run(collect())
    assert resolved or isinstance(items[0], Failure)
    return items


async def events() -> AsyncIterator[Event]:
    yield Event("response.created")
    yield Event("response.output_text.delta", delta="hi")
    yield Event("response.output_text.delta", delta=" there")
    usage = SimpleNamespace(input_tokens=5, output_tokens=2)
    yield Event("response.completed", response_ns={"usage": usage})


def test_a_stream_is_forwarded_as_named_events_and_metered() -> None:
    handler = Handler(events())
    items = run(server(handler), {"model": "m", "input": "hi", "stream": True, "store": True})
    assert handler.requests[0].store is False  # nothing is stored on the engine either
    chunks = [i.text for i in items if isinstance(i, Chunk)]
    assert chunks[1] == 'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", ' \
                        '"delta": "hi"}\n\n'
    assert items[-1] == Final({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}, 2)


def test_a_model_without_responses_is_404() -> None:
    (item,) = run(server(None), {"model": "m", "input": "hi"})
    assert isinstance(item, Failure)
    assert (item.kind, item.status) == ("invalid", 404)


def test_an_invalid_body_is_the_clients_400() -> None:
    (item,) = run(server(Handler(None)), {"model": "m", "input": "hi", "temperature": "hot"})
    assert isinstance(item, Failure)
    assert (item.kind, item.status) == ("invalid", 400)


@pytest.mark.parametrize(("code", "kind"), [(400, "invalid"), (500, "engine")])
def test_engine_errors_are_classified(code: int, kind: str) -> None:
    error = SimpleNamespace(error=SimpleNamespace(code=code, message="nope", param=None))
    (item,) = run(server(Handler(error)), {"model": "m", "input": "hi"})
    assert isinstance(item, Failure)
    assert item.kind == kind
