"""The stride: how many tokens vLLM gathers per stream before handing them to its OpenAI layer in the engine
replica (``arks_ray.engines.cadence.token_stride``, applied by ``ArksLLMServer`` on vLLM's output processor), and
what a stream cut short is charged when its events carry several tokens (``StreamMeter``, ``Chunk.tokens``).

The server is the real subclass of Ray's ``LLMServer`` with a stand-in output processor; the vLLM code the stride
relies on is held here as text, so that a vLLM that changes it fails these tests. A real vLLM engine is driven by
``tests/contract/test_engine_core_start.py``."""

from __future__ import annotations

import asyncio
import inspect
import time
from types import SimpleNamespace
from typing import Any

import pytest

from arks_ray.autoscaling.replica import ReplicaStats
from arks_ray.engines import cadence
from arks_ray.engines.protocol import Chunk, EngineRequest, Final, wants_running_usage, with_usage
from arks_ray.engines.sse import StreamMeter
from deployments.engine_stream import engine_items
from deployments.lora import AdapterTable
from deployments.vllm_engine import _llm_server_class, output_processor

ROLE = 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'


def event(text: str) -> str:
    return f'data: {{"choices":[{{"index":0,"delta":{{"content":"{text}"}}}}]}}\n\n'


@pytest.mark.parametrize(("interval", "tpot", "cap", "stride"), [
    (100, 10, 8, 8),     # 10 tokens per interval, capped
    (100, 12.5, 8, 8),
    (100, 30, 8, 3),     # a slow model: 3 tokens per interval
    (200, 15, 16, 13),
    (100, 150, 8, 1),    # slower than the interval: every token
    (100, None, 8, 1),   # no TPOT yet
    (0, 10, 8, 1),       # no coalescing: every token
    (100, 10, 1, 1),     # turned off
])
def test_the_stride_is_one_intervals_tokens_at_the_recent_tpot(interval: float, tpot: float | None, cap: int,
                                                               stride: int) -> None:
    assert cadence.token_stride(interval, tpot, cap) == stride


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_a_stride_cap_that_is_not_a_positive_integer_is_refused_by_name(bad: Any) -> None:
    with pytest.raises(ValueError, match="stream_stride_max_tokens"):
        cadence.user_stride({cadence.STRIDE_KEY: bad})
    assert cadence.user_stride({}) is None
    assert cadence.user_stride({cadence.STRIDE_KEY: 1}) == 1


def test_the_typical_tpot_is_the_windows_median_recomputed_at_most_every_second() -> None:
    stats = ReplicaStats()
    assert stats.typical_tpot_ms(0.0) is None
    for tpot in (10, 12, 30):
        timer = stats.start(0.0)
        stats.first_output(timer, 0.0)
        stats.finish(timer, 11, tpot / 100)  # 10 more tokens in tpot*10 ms
    assert stats.typical_tpot_ms(0.5) is None  # the None of t=0 holds for a second
    assert stats.typical_tpot_ms(1.0) == pytest.approx(12.0)
    # After a pause longer than the window: none, unless the last median is wanted (a burst's stride).
    assert stats.typical_tpot_ms(30.0) is None
    assert stats.typical_tpot_ms(30.0, remembered=True) == pytest.approx(12.0)
    assert ReplicaStats().typical_tpot_ms(0.0, remembered=True) is None  # never had one


class Outputs:
    stream_interval = 1


def server(engine_kwargs: dict[str, Any] | None = None, outputs: Any = None) -> Any:
    cls = type("StrideServer", (_llm_server_class(),), {"__del__": lambda self: None})
    srv = cls.__new__(cls)
    srv._llm_config = SimpleNamespace(experimental_configs={"stream_batching_interval_ms": 100.0},
                                      engine_kwargs=engine_kwargs or {})
    srv._arks_adapters = AdapterTable()
    srv._arks_stats, srv._arks_interval_max_ms = ReplicaStats(), cadence.MAX_MS
    srv._arks_stride_max = cadence.STRIDE_MAX_TOKENS
    pinned = (engine_kwargs or {}).get("stream_interval")
    srv._arks_stride_pinned = None if pinned is None else int(pinned)
    srv._arks_outputs = outputs
    return srv


def finished(stats: ReplicaStats, tpot_ms: float) -> None:
    # On the clock the server reads (time.monotonic), finishing now; in flight again as before.
    now = time.monotonic()
    timer = stats.start(now - tpot_ms / 100)
    stats.first_output(timer, now - tpot_ms / 100)
    stats.finish(timer, 11, now)


def test_the_server_sets_the_stride_on_vllms_output_processor_from_its_load_and_tpot() -> None:
    outputs = Outputs()
    srv = server(outputs=outputs)
    assert srv._arks_stride() == 1
    assert outputs.stream_interval == 1
    finished(srv._arks_stats, 30.0)
    srv._arks_stats._typical_tpot = (float("-inf"), None)  # as a second later
    assert srv._arks_stride() == 3
    assert outputs.stream_interval == 3
    srv._arks_stats.in_flight = 128  # the interval grows to 200 ms under load
    assert srv._arks_stride() == 6
    srv._arks_stats._tpot = type(srv._arks_stats._tpot)(10.0)  # a pause: the window is empty
    srv._arks_stats._typical_tpot = (float("-inf"), None)
    assert srv._arks_stride() == 6  # the burst after it gets the last pace's stride, not 1
    srv.reconfigure({cadence.STRIDE_KEY: 1})  # live: every token again
    assert srv._arks_stride() == 1
    assert outputs.stream_interval == 1
    with pytest.raises(ValueError, match="stream_stride_max_tokens"):
        srv.reconfigure({cadence.STRIDE_KEY: 0, "stream_interval_ms": 5})
    assert srv._llm_config.experimental_configs["stream_batching_interval_ms"] == 100.0  # nothing applied


def test_engine_args_that_pin_vllms_stream_interval_keep_it() -> None:
    outputs = Outputs()
    outputs.stream_interval = 4
    srv = server({"stream_interval": 4}, outputs)
    finished(srv._arks_stats, 10.0)
    assert srv._arks_stride() == 4
    assert outputs.stream_interval == 4


def test_without_an_output_processor_that_takes_a_stride_every_token_is_handed_over() -> None:
    assert server()._arks_stride() == 1
    assert output_processor(SimpleNamespace(_engine_client=SimpleNamespace(output_processor=object()))) is None
    outputs = Outputs()
    assert output_processor(SimpleNamespace(_engine_client=SimpleNamespace(output_processor=outputs))) is outputs


def running(text: str, tokens: int, index: int = 0) -> str:
    """A vLLM chunk with its running usage (continuous_usage_stats), usage last as vLLM dumps it."""
    return (f'data: {{"choices":[{{"index":{index},"delta":{{"content":"{text}"}}}}],'
            f'"usage":{{"prompt_tokens":7,"completion_tokens":{tokens},"total_tokens":{7 + tokens}}}}}\n\n')


ROLE_RUNNING = ('data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],'
                '"usage":{"prompt_tokens":7,"completion_tokens":0,"total_tokens":7}}\n\n')
USAGE = 'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":17,"total_tokens":24}}\n\n'


def test_a_running_meter_counts_the_engines_tokens_whatever_an_event_carries_and_strips_them() -> None:
    meter = StreamMeter(client_usage=False, running=True)
    out = meter.filter(ROLE_RUNNING + running("a", 1))
    assert meter.completion_tokens == 1
    assert '"usage"' not in out
    assert out.count("data: {") == 2
    meter.filter(running("bcdefghi", 9))  # one event, 8 tokens (a stride, or outputs merged for a slow reader)
    meter.filter(running("j", 12))  # 3 tokens, one event: some were held back by vLLM's parsers
    assert meter.completion_tokens == 12
    assert meter.filter(USAGE) == ""  # the usage chunk: kept for the final, not relayed
    assert meter.final().usage == {"prompt_tokens": 7, "completion_tokens": 17, "total_tokens": 24}


def test_a_running_meter_sums_the_choices_and_keeps_the_usages_a_client_asked_for() -> None:
    meter = StreamMeter(client_usage=True, running=True, client_running=True)
    out = meter.filter(running("a", 1, 0) + running("b", 1, 1) + running("cd", 3, 0) + running("ef", 4, 1))
    assert meter.completion_tokens == 7  # choice 0 at 3, choice 1 at 4
    assert out.count('"usage"') == 4


def test_without_running_usage_each_event_counts_one_token() -> None:
    plain = StreamMeter(client_usage=False)
    plain.filter(ROLE + event("a") + event("b"))
    assert plain.completion_tokens == 3  # one per event, the role chunk included, as before


def test_the_backend_gets_the_usage_its_meter_needs_and_never_the_clients_stride() -> None:
    body = {"model": "m", "stream": True, "stream_interval": 1000, "stream_options": {"include_usage": False}}
    assert with_usage(body) == {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    assert with_usage(body, running=True)["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert not wants_running_usage(body)
    assert wants_running_usage({"stream_options": {"continuous_usage_stats": True}})


def test_streams_ask_for_running_usage_wherever_an_event_may_carry_several_tokens() -> None:
    assert server(outputs=Outputs())._arks_running()  # the stride is on
    off = server(outputs=Outputs())
    off.reconfigure({cadence.STRIDE_KEY: 1})
    assert not off._arks_running()  # every token its own event: counted one per event
    assert not server()._arks_running()  # no stride without vLLM's output processor
    assert server({"stream_interval": 4})._arks_running()  # vLLM strides itself, as the engine args say
    assert not server({"stream_interval": 1}, Outputs())._arks_running()


def test_each_chunk_carries_the_tokens_the_meter_counted() -> None:
    seen: list[Any] = []

    class Scripted:
        async def chat(self, request: Any) -> Any:
            seen.append(request)

            async def stream() -> Any:
                yield [ROLE_RUNNING, running("a", 1)]
                yield [running("bcde", 5), running("fghi", 9)]
                yield [USAGE]
            return stream()

    request = EngineRequest(kind="chat", body={"model": "m", "stream": True, "stream_interval": 64,
                                               "messages": [{"role": "user", "content": "hi"}]})

    async def run() -> list[Any]:
        return [item async for item in engine_items(Scripted(), request, meter=StreamMeter(False, running=True))]

    got = asyncio.run(run())
    chunks = [item for item in got if isinstance(item, Chunk)]
    assert [c.tokens for c in chunks[:2]] == [1, 8]
    assert [c.counted() for c in chunks[2:]] == [0]  # the [DONE] this scripted stream lacked
    assert isinstance(got[-1], Final)
    assert got[-1].usage["completion_tokens"] == 17
    assert seen[0].stream_options.continuous_usage_stats is True
    assert getattr(seen[0], "stream_interval", None) is None  # the client's stride never reaches vLLM
    assert Chunk(ROLE + event("a")).counted() == 2  # no count from the engine: one per event


def test_vllms_output_processor_gives_each_new_request_its_stride_and_hands_over_every_stride_tokens() -> None:
    from vllm.v1.engine import output_processor as vllm_outputs

    add = inspect.getsource(vllm_outputs.OutputProcessor.add_request)
    assert "stream_interval=self.stream_interval" in add
    assert "self.stream_interval = stream_interval" in inspect.getsource(vllm_outputs.OutputProcessor.__init__)
    make = inspect.getsource(vllm_outputs.RequestState.make_request_output)
    assert "if self.stream_interval > 1:" in make
    assert "or self.sent_tokens_offset == 0" in make  # the first token at once
    assert "finished" in make.split("if not (", 1)[1].split(")", 1)[0]  # and the end
