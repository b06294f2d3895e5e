"""How long an engine replica coalesces a stream's chunks into one item, given how many streams it serves, and
how many tokens vLLM gathers per stream before it hands them to the replica (the stride).

Used by the engine deployments (``deployments.vllm_engine``, ``vllm_server``, ``dynamo_engine``) for every new
stream. Every item costs
CPU in each Serve hop behind the engine (the engine replica, the gateway, the proxy), so under many
streams fewer, larger items leave more of the machine to the engine. On an H200 at 128 streams, 200 ms
gave 1.07x the tokens/s of the better of two 100 ms loads and a TTFT p50 55 ms lower; at 32 streams
the two were alike
(benchmarks/results/gpu_h200_b.json). So the interval stays at its base up to ``KNEE_STREAMS`` streams per
replica and grows with the streams beyond that, up to a ceiling: bursts stay short while the replica has
CPU to spare. The first output of a stream is never held back (the deployment sends it at once).

Coalescing acts after vLLM's OpenAI layer in the replica has made one SSE event per token. The stride acts before
it: vLLM hands a stream's tokens over every ``stride`` tokens (its ``stream_interval``), the first at once and the
last when the stream ends, so that layer does its per-event work once per stride. The stride is the number of
tokens the stream makes in one coalescing interval at the replica's recent TPOT, so the client's cadence stays
the interval's; it is capped (``STRIDE_MAX_TOKENS``, ``user_config.stream_stride_max_tokens``) and is 1 (every
token) without a TPOT yet or without coalescing. On an H200 at 128 streams a stride of 8 took the engine
replica from 0.70-0.80 to 0.50-0.57 cores behind Serve's proxy (benchmarks/results/gpu_h200_i.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BASE_MS = 100.0
"""The interval up to ``KNEE_STREAMS`` streams (Ray's own default is 50 ms)."""
MAX_MS = 200.0
"""The ceiling, reached at twice ``KNEE_STREAMS`` streams with the default base."""
KNEE_STREAMS = 64
"""Streams in flight on one replica above which the interval grows in proportion."""


def interval_ms(base_ms: float, max_ms: float, streams: int, knee: int = KNEE_STREAMS) -> float:
    """The coalescing interval for a stream that starts while ``streams`` are in flight (itself included).

    ``base_ms`` 0 means no coalescing, whatever the load. A ceiling at or below the base keeps the base
    (a fixed interval)."""
    if base_ms <= 0 or max_ms <= base_ms or streams <= knee:
        return base_ms
    return min(max_ms, base_ms * streams / knee)


INTERVAL_KEY, CEILING_KEY = "stream_interval_ms", "stream_interval_max_ms"
"""The engine deployment's ``user_config`` keys for the base and the ceiling, applied live."""


def milliseconds(config: Mapping[str, Any] | None, key: str) -> float | None:
    """A ``user_config`` duration in ms: absent is None; anything but a number >= 0 is refused, naming it."""
    value = (config or {}).get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ValueError(f"user_config.{key} must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


def user_intervals(config: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """``user_config``'s base and ceiling (``INTERVAL_KEY``, ``CEILING_KEY``); None where it sets none."""
    return milliseconds(config, INTERVAL_KEY), milliseconds(config, CEILING_KEY)


STRIDE_MAX_TOKENS = 8
"""The largest stride: the one measured on the H200 (8 tokens, 70-120 ms at its TPOT of 9-15 ms)."""
STRIDE_KEY = "stream_stride_max_tokens"
"""The engine deployment's ``user_config`` key for the largest stride, applied live; 1 hands over every token."""


def token_stride(interval: float, tpot_ms: float | None, max_tokens: int) -> int:
    """How many tokens vLLM gathers per stream before handing them over: those of one coalescing ``interval``
    (ms) at ``tpot_ms`` per token, at least 1 and at most ``max_tokens``. 1 without a TPOT or an interval."""
    if not tpot_ms or tpot_ms <= 0 or interval <= 0 or max_tokens <= 1:
        return 1
    return max(1, min(max_tokens, int(interval // tpot_ms)))


def user_stride(config: Mapping[str, Any] | None) -> int | None:
    """``user_config``'s largest stride (``STRIDE_KEY``): absent is None; anything but an integer >= 1 is refused."""
    value = (config or {}).get(STRIDE_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"user_config.{STRIDE_KEY} must be an integer >= 1 (1: every token), got {value!r}")
    return value
