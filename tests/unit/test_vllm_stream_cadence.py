"""How ``ArksLLMServer`` coalesces a vLLM stream: the first output leaves at once (with the role-only chunk
in the same item), the rest is coalesced at the interval Serve's ``user_config`` sets live.

Runs the real subclass of Ray's ``LLMServer`` (and Ray's own ``Batcher``) on a scripted chunk stream; no
engine is started."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.lora import AdapterTable
from deployments.vllm_engine import _llm_server_class, carries_output

ROLE = 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'


def token(i: int) -> str:
    return f'data: {{"choices":[{{"index":0,"delta":{{"content":"t{i}"}}}}]}}\n\n'


async def chunks(n: int) -> AsyncIterator[str]:
    yield ROLE
    for i in range(n):
        await asyncio.sleep(0)
        yield token(i)


def server(interval_ms: float | None = None) -> Any:
    # No engine: only the stream shaping is exercised (and LLMServer's async __del__ has nothing to stop).
    cls = type("ScriptedServer", (_llm_server_class(),), {"__del__": lambda self: None})
    srv = cls.__new__(cls)
    srv._llm_config = SimpleNamespace(experimental_configs={})
    srv._arks_adapters = AdapterTable()  # what _init_multiplex_loader sets up; reconfigure updates it too
    if interval_ms is not None:
        srv._llm_config.experimental_configs["stream_batching_interval_ms"] = interval_ms
    return srv


async def items(srv: Any, n: int) -> list[list[str]]:
    return [batch async for batch in srv._batch_output_stream(chunks(n))]


def test_role_chunk_and_first_token_leave_together() -> None:
    got = asyncio.run(items(server(10_000), 20))
    assert got[0] == [ROLE, token(0)]
    # with a long interval the rest is one coalesced item, in order
    assert got[1:] == [[token(i) for i in range(1, 20)]]


def test_interval_zero_sends_every_chunk_alone() -> None:
    got = asyncio.run(items(server(0), 5))
    assert got == [[ROLE, token(0)], *[[token(i)] for i in range(1, 5)]]


def test_user_config_sets_the_interval_live_and_a_config_without_it_keeps_it() -> None:
    srv = server()
    srv.reconfigure({"stream_interval_ms": 0})
    assert asyncio.run(items(srv, 3)) == [[ROLE, token(0)], [token(1)], [token(2)]]
    srv.reconfigure({})
    srv.reconfigure(None)
    assert srv._llm_config.experimental_configs == {"stream_batching_interval_ms": 0.0}


@pytest.mark.parametrize(("item", "output"), [
    (ROLE, False), (token(0), True), ('data: {"choices":[{"text":"x"}]}\n\n', True), ({"a": 1}, True)])
def test_what_carries_output(item: Any, output: bool) -> None:
    assert carries_output(item) is output


def test_a_stream_without_output_still_ends() -> None:
    async def only_role() -> AsyncIterator[str]:
        yield ROLE

    async def run() -> list[list[str]]:
        return [b async for b in server(50)._batch_output_stream(only_role())]

    assert asyncio.run(run()) == [[ROLE]]
