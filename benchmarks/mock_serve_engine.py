"""A stand-in engine Serve app, to measure the Serve path alone: proxy -> gateway -> handle -> replica.

It answers the gateway's ``generate`` calls with the tests' vLLM-shaped stream
(``tests.support.mock_engine.vllm_stream``: typed items of ``arks_ray.engines.protocol``, SSE chunks then
``Final`` with the usage) at a GPU engine's pace, with no engine behind it: the first token after
``ttft_ms``, one token every ``tpot_ms``, coalesced into one chunk every ``interval_ms`` (the engine app's
``stream_interval_ms``), then the usage event and ``[DONE]``. So a load through it costs the machine only
what the platform's own hops cost, which is what the GPU runs found to be the ceiling
(``benchmarks/gpu_side_by_side.py``, README Performance). Used by that script's ``ray --mock-engine``
phase; its Serve app takes the engine app's place in the rendered config.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from arks_ray.engines.protocol import Chunk, EngineItem, EngineRequest
from tests.support.mock_engine import vllm_stream, words


@serve.deployment(max_ongoing_requests=100_000)
class MockEngine:
    def __init__(self, ttft_ms: float = 50.0, tpot_ms: float = 10.0, interval_ms: float = 100.0) -> None:
        self.ttft_s, self.tpot_s, self.interval_s = ttft_ms / 1000, tpot_ms / 1000, interval_ms / 1000

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]:
        n = max(1, int(request.body.get("max_tokens") or 16))
        items = vllm_stream(request, words(n))
        texts = [item.text for item in items if isinstance(item, Chunk)]
        head = 1 if request.kind == "chat" else 0  # the role event
        tokens, tail = texts[head:head + n], texts[head + n:]
        start = time.monotonic()
        await asyncio.sleep(self.ttft_s)
        yield Chunk("".join(texts[:head]) + tokens[0])  # the first token leaves at once, as the engine app sends it
        sent = 1
        while sent < n:
            await asyncio.sleep(self.interval_s)
            due = min(n, 1 + int((time.monotonic() - start - self.ttft_s) / self.tpot_s))
            if due > sent:
                yield Chunk("".join(tokens[sent:due]))
                sent = due
        yield Chunk("".join(tail))  # the usage event, if the client asked, and [DONE]
        yield items[-1]  # Final


def build_app(args: dict[str, Any]) -> Any:
    return MockEngine.bind(**(args or {}))
