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

from arks_ray.autoscaling.replica import ReplicaStats
from arks_ray.engines import cadence
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
    srv._arks_stats, srv._arks_interval_max_ms = ReplicaStats(), cadence.MAX_MS  # what _init_shared sets up
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


def test_the_interval_grows_with_the_streams_in_flight_and_user_config_bounds_it() -> None:
    srv = server()
    srv._llm_config.experimental_configs["stream_batching_interval_ms"] = 100.0
    for streams, expected in ((1, 100.0), (64, 100.0), (96, 150.0), (128, 200.0), (500, 200.0)):
        srv._arks_stats.in_flight = streams
        assert srv._get_batch_interval_ms() == expected
    assert srv._get_batch_interval_ms(stream=False) is None  # whole answers are not batched
    srv.reconfigure({"stream_interval_max_ms": 100})  # ceiling = base: a fixed interval
    assert srv._get_batch_interval_ms() == 100.0
    srv.reconfigure({"stream_interval_ms": 0, "stream_interval_max_ms": 400})  # 0: no coalescing at any load
    assert srv._get_batch_interval_ms() == 0.0


def test_a_stream_under_load_is_coalesced_at_the_longer_interval() -> None:
    async def paced(n: int) -> AsyncIterator[str]:
        yield ROLE
        for i in range(n):
            await asyncio.sleep(0.01)
            yield token(i)

    async def run(streams: int) -> list[list[str]]:
        srv = server(40)
        srv._arks_stats.in_flight = streams
        return [b async for b in srv._batch_output_stream(paced(30))]

    light, heavy = asyncio.run(run(1)), asyncio.run(run(200))  # 40 ms, then 80 ms (the ceiling is 200)
    assert [c for b in light for c in b] == [c for b in heavy for c in b]  # same chunks, in order
    assert len(heavy) < len(light)


@pytest.mark.parametrize("bad", [-1, "100", float("nan"), float("inf"), True, [1]])
def test_a_bad_interval_in_user_config_is_refused_by_name(bad: Any) -> None:
    for key in ("stream_interval_ms", "stream_interval_max_ms"):
        srv = server(100)
        with pytest.raises(ValueError, match=key):
            srv.reconfigure({"adapters": {"a": "/x"}, "stream_interval_ms": 7, "stream_interval_max_ms": 300, key: bad})
        # nothing of the refused config was applied
        assert srv._arks_adapters.paths == {}
        assert srv._llm_config.experimental_configs["stream_batching_interval_ms"] == 100
        assert srv._arks_interval_max_ms == cadence.MAX_MS
