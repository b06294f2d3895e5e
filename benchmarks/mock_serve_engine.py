"""A stand-in engine Serve app, to measure the Serve path alone: proxy -> gateway -> handle -> replica.

It answers the gateway's ``generate`` calls the way ``deployments.vllm_engine`` does (typed items of
``arks_ray.engines.protocol``: SSE text chunks, then ``Final`` with the usage) at a GPU engine's pace, with
no engine behind it: the first token after ``ttft_ms``, one token every ``tpot_ms``, coalesced into one
chunk every ``interval_ms`` (the engine app's ``stream_interval_ms``), then the usage event and ``[DONE]``.
So a load through it costs the machine only what the platform's own hops cost, which is what the GPU runs
found to be the ceiling (``benchmarks/gpu_side_by_side.py``, README Performance). Used by that script's
``ray --mock-engine`` phase; its Serve app takes the engine app's place in the rendered config.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from arks_ray.engines.protocol import DONE, Chunk, EngineItem, EngineRequest, Final


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@serve.deployment(max_ongoing_requests=100_000)
class MockEngine:
    def __init__(self, ttft_ms: float = 50.0, tpot_ms: float = 10.0, interval_ms: float = 100.0) -> None:
        self.ttft_s, self.tpot_s, self.interval_s = ttft_ms / 1000, tpot_ms / 1000, interval_ms / 1000

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]:
        body = request.body
        n = int(body.get("max_tokens") or 16)
        base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "mock")}

        def token(i: int) -> str:
            return _event({**base, "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "logprobs": None,
                                                "finish_reason": "length" if i == n - 1 else None}]})

        start = time.monotonic()
        await asyncio.sleep(self.ttft_s)
        role = _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        yield Chunk(role + token(0))  # the first token leaves at once, as the engine app sends it
        sent = 1
        while sent < n:
            await asyncio.sleep(self.interval_s)
            due = min(n, 1 + int((time.monotonic() - start - self.ttft_s) / self.tpot_s))
            if due > sent:
                yield Chunk("".join(token(i) for i in range(sent, due)))
                sent = due
        usage = {"prompt_tokens": 20, "completion_tokens": n, "total_tokens": 20 + n}
        yield Chunk(_event({**base, "choices": [], "usage": usage}) + DONE)
        yield Final(usage, n)


def build_app(args: dict[str, Any]) -> Any:
    return MockEngine.bind(**(args or {}))
