"""Faults under the request lifecycle, against a real redis-server: settlements and leases survive the store.

Streams are in flight when Redis stops answering; they finish, their settlements queue, and once Redis
answers again every one lands: the concurrency slots are free and the quota holds the real usage, not
the reservation estimate. A replica that dies holding a lease frees it within one lease period.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from arks_ray.api.gateway import Limit, Quota, QuotaBudget
from arks_ray.gateway.limits import quota_key
from arks_ray.stores.redis import RedisStore
from tests.support.mock_engine import MockBackends, Script, pipeline, token

pytestmark = pytest.mark.integration

BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "stream": True, "max_tokens": 500}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _read(stream: Any, n: int | None = None) -> list[str]:
    out = []
    async for text in stream:
        out.append(text)
        if n is not None and len(out) >= n:
            break
    return out


async def test_streams_in_flight_when_redis_stops_settle_once_it_answers(redis_control: Any,
                                                                         redis_store: RedisStore) -> None:
    backends = MockBackends({"app-m": Script(tokens=6, gap_s=0.05)})
    quota = Quota(name="q", budgets=(QuotaBudget(type="total", value=100_000),))
    p = pipeline(backends, (token("t", "sk-fault-0001", "m", limits=(Limit(type="concurrency", value=2),),
                                  quota="q"),),
                 store=redis_store, settings={"store_timeout_s": 0.2}, quotas=(quota,))
    tok = p.index.config.tokens[0]
    replies = [await p.serve("chat", tok, dict(BODY), {}) for _ in range(2)]
    assert [r.status for r in replies] == [200, 200]
    lease_key = "arks:default:rl:t:m:concurrency"
    assert redis_control.client().zcard(lease_key) == 2
    used_key = quota_key("default", "q", "total", "lifetime", p.clock())
    reserved = int(redis_control.client().get(used_key))
    assert reserved > 500  # the estimate: prompt + max_tokens, twice

    redis_control.freeze()
    try:
        texts = await asyncio.gather(*(_read(r.stream) for r in replies))
        assert all("[DONE]" in "".join(t) for t in texts)
        await asyncio.sleep(1.5)  # the first attempts time out (2 x store_timeout_s) and queue
        assert p.governor.settlements.pending >= 1, "a settlement claimed to land while Redis was frozen"
    finally:
        redis_control.thaw()
    await asyncio.wait_for(p.drain(), 30)
    assert p.governor.settlements.pending == 0
    assert redis_control.client().zcard(lease_key) == 0, "a concurrency slot stayed taken"
    # The real usage (7 prompt + 6 completion tokens per stream, as the engine reported), not the estimate.
    assert int(redis_control.client().get(used_key)) == 2 * (7 + 6)
    await p.close()


async def test_a_dead_holders_lease_frees_within_one_period_and_a_live_one_is_renewed(
        redis_store: RedisStore) -> None:
    clock = Clock()
    backends = MockBackends({"app-m": Script(tokens=3)})
    p = pipeline(backends, (token("t", "sk-fault-0002", "m", limits=(Limit(type="concurrency", value=1),)),),
                 store=redis_store, settings={"lease_seconds": 30}, clock=clock)
    tok = p.index.config.tokens[0]
    life = p.lifecycle("chat", tok, dict(BODY), {})
    await life.before_inference()  # admitted, then its replica "dies": never settled, never renewed again
    p.governor._live.clear()

    refused = await p.serve("chat", tok, dict(BODY), {})
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"
    clock.now += 31
    admitted = await p.serve("chat", tok, dict(BODY), {})
    assert admitted.status == 200, admitted.body
    held = p.lifecycle("chat", tok, dict(BODY), {})
    await _read(admitted.stream)  # finishes: its slot is free again
    await p.drain()

    await held.before_inference()  # a live request, renewed every third of the period
    for _ in range(4):
        clock.now += 10
        assert await p.renew_leases() == 1
    again = await p.serve("chat", tok, dict(BODY), {})
    assert again.status == 429, "a live request's renewed lease expired under it"
    held.on_inference_complete("ok", 200)
    await p.drain()
    assert (await p.serve("chat", tok, {**BODY, "stream": False}, {})).status == 200
    await p.drain()
    await p.close()
