"""The ``CounterStore`` contract, run against ``MemoryStore`` and a real ``RedisStore`` alike.

Every time is an explicit ``now_ms`` (the injected clock), so window, lease and refund arithmetic is checked
to the millisecond: windows, leases and their renewal, totals, floors and prefix deletion. The Redis-only tests
at the end cover what memory cannot fail at: a dead or hung server, script reloading after a restart, round
trips per call, and a differential run against memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from arks_ray.api.gateway import GatewayConfig, Grant, Limit, Token
from arks_ray.errors import RateLimited
from arks_ray.gateway.governor import Governor
from arks_ray.gateway.limits import Algorithm, Counter, Usage, window_counter
from arks_ray.gateway.ports import CounterStore, Decision, Lease, StoreUnavailable
from arks_ray.stores.memory import MemoryStore
from arks_ray.stores.redis import RedisStore

if TYPE_CHECKING:
    from tests.contract.conftest import RedisServer

T0 = 1_700_000_040_000
"""A UTC minute boundary, in ms: fixed windows start here, and sliding buckets are whole seconds."""
B0 = T0 // 1000
"""The 1 s sliding bucket that starts at T0."""


def rpm(limit: int, algorithm: Algorithm = "slidingWindow", prefix: str = "t") -> Counter:
    return window_counter(prefix, "rpm", limit, 1, algorithm)


def tpm(limit: int, amount: int, algorithm: Algorithm = "slidingWindow", prefix: str = "t") -> Counter:
    return window_counter(prefix, "tpm", limit, amount, algorithm)


def lease(limit: int, ttl_ms: int = 10_000, key: str = "t:concurrency") -> Counter:
    return Counter(key=key, kind="lease", limit=limit, amount=1, label="concurrency", dimension="requests",
                   ttl_ms=ttl_ms)


def total(limit: int, amount: int, key: str = "t:quota:q:total:lifetime") -> Counter:
    return Counter(key=key, kind="total", limit=limit, amount=amount, label="quota q (total)", dimension="quota")


async def admitted_count(store: CounterStore, counters: list[Counter], times: list[int]) -> int:
    results = [await store.reserve(counters, f"r{t}-{i}", t) for i, t in enumerate(times)]
    return sum(d.admitted for d in results)


# --- window counters ---------------------------------------------------------------------------------------


async def test_sliding_window_admits_the_limit_then_waits_for_the_bucket_to_leave(store: CounterStore) -> None:
    counter = rpm(5)
    now = T0 + 10_500
    b = now // 1000
    for left in (4, 3, 2, 1, 0):
        d = await store.reserve([counter], "a", now)
        assert d == Decision(True, None, 0, (left,), ((b + 61) * 1000 - now,))

    later = T0 + 30_000
    d = await store.reserve([counter], "b", later)
    assert d == Decision(False, 0, (b + 61) * 1000 - later, (0,), ((b + 61) * 1000 - later,))
    assert d.retry_after_ms == 41_000

    just_before = later + d.retry_after_ms - 1
    early = await store.reserve([counter], "c", just_before)
    assert (early.admitted, early.retry_after_ms) == (False, 1)
    again = await store.reserve([counter], "d", later + d.retry_after_ms)
    assert again.admitted
    assert again.remaining == (4,)


async def test_sliding_retry_waits_for_as_many_buckets_as_the_amount_needs(store: CounterStore) -> None:
    assert (await store.reserve([tpm(10, 4)], "a", T0 + 1_000)).admitted
    assert (await store.reserve([tpm(10, 4)], "b", T0 + 5_000)).admitted
    now = T0 + 20_000

    needs_first_gone = await store.reserve([tpm(10, 5)], "c", now)
    assert (needs_first_gone.admitted, needs_first_gone.retry_after_ms) == (False, (B0 + 1 + 61) * 1000 - now)
    needs_both_gone = await store.reserve([tpm(10, 7)], "d", now)
    assert (needs_both_gone.admitted, needs_both_gone.retry_after_ms) == (False, (B0 + 5 + 61) * 1000 - now)
    assert needs_both_gone.remaining == (2,)
    assert needs_both_gone.reset_ms == ((B0 + 5 + 61) * 1000 - now,)

    fits = await store.reserve([tpm(10, 2)], "e", now)
    assert fits.admitted
    assert fits.remaining == (0,)
    assert fits.reset_ms == ((now // 1000 + 61) * 1000 - now,)


async def test_fixed_window_refuses_until_the_utc_minute_ends(store: CounterStore) -> None:
    counter = rpm(3, "fixedWindow")
    for left in (2, 1, 0):
        d = await store.reserve([counter], "a", T0 + 1_000)
        assert d == Decision(True, None, 0, (left,), (59_000,))

    d = await store.reserve([counter], "b", T0 + 50_000)
    assert d == Decision(False, 0, 10_000, (0,), (10_000,))
    assert not (await store.reserve([counter], "c", T0 + 59_999)).admitted
    d = await store.reserve([counter], "d", T0 + 60_000)
    assert d == Decision(True, None, 0, (2,), (60_000,))


async def test_sliding_window_has_no_burst_across_a_minute_boundary(store: CounterStore) -> None:
    counter = rpm(10)
    end_of_minute = [T0 + 59_000 + 90 * i for i in range(10)]
    start_of_next = [T0 + 60_000 + 90 * i for i in range(10)]
    assert await admitted_count(store, [counter], end_of_minute) == 10
    assert await admitted_count(store, [counter], start_of_next) == 0

    first = await store.reserve([counter], "x", T0 + 60_000)
    assert first.retry_after_ms == 60_000
    # Still nothing 60 s after the first hit: a sliding window may refuse up to one bucket (W/60) early.
    assert await admitted_count(store, [counter], [T0 + 119_999]) == 0
    assert await admitted_count(store, [counter], [T0 + 120_000 + i for i in range(11)]) == 10


async def test_fixed_window_allows_the_arks_edge_burst(store: CounterStore) -> None:
    """Expected, documented behaviour: fixedWindow is Arks' algorithm, with up to 2x the limit at an edge."""
    counter = rpm(10, "fixedWindow")
    end_of_minute = [T0 + 59_000 + 90 * i for i in range(10)]
    start_of_next = [T0 + 60_000 + 90 * i for i in range(10)]
    assert await admitted_count(store, [counter], end_of_minute) == 10
    assert await admitted_count(store, [counter], start_of_next) == 10


# --- limits that can never admit ---------------------------------------------------------------------------


@pytest.mark.parametrize("counter", [rpm(0), rpm(0, "fixedWindow"), tpm(0, 1), total(0, 1)],
                         ids=["sliding", "fixed", "tokens", "total"])
async def test_a_zero_limit_refuses_everything_for_good(store: CounterStore, counter: Counter) -> None:
    for now in (T0, T0 + 3_600_000, T0 + 86_400_000 * 40):
        d = await store.reserve([counter], "a", now)
        assert (d.admitted, d.denied, d.retry_after_ms, d.remaining) == (False, 0, -1, (0,))


async def test_a_zero_concurrency_limit_refuses_everything(store: CounterStore) -> None:
    d = await store.reserve([lease(0)], "a", T0)
    assert (d.admitted, d.denied, d.remaining) == (False, 0, (0,))


async def test_a_zero_concurrency_limit_says_it_can_never_admit(store: CounterStore) -> None:
    d = await store.reserve([lease(0)], "a", T0)
    assert d.retry_after_ms == -1


@pytest.mark.parametrize("counter", [tpm(100, 101), tpm(100, 101, "fixedWindow"), total(100, 101)],
                         ids=["sliding", "fixed", "total"])
async def test_an_amount_over_the_limit_can_never_fit(store: CounterStore, counter: Counter) -> None:
    d = await store.reserve([counter], "a", T0)
    assert (d.admitted, d.denied, d.retry_after_ms, d.remaining) == (False, 0, -1, (100,))


# --- all or nothing ----------------------------------------------------------------------------------------


async def test_a_refusal_by_one_counter_reserves_nothing_on_the_others(store: CounterStore) -> None:
    requests, quota, slots = rpm(5, prefix="a"), total(100, 30), lease(3)
    tight = rpm(1, prefix="c")
    assert (await store.reserve([tight], "first", T0)).admitted

    d = await store.reserve([requests, quota, slots, tight], "second", T0 + 1_000)
    assert d == Decision(False, 3, 60_000, (5, 100, 3, 0), (0, 0, 0, 60_000))

    d = await store.reserve([requests, quota, slots], "third", T0 + 2_000)
    assert d.admitted
    assert d.remaining == (4, 70, 2)
    assert await store.read([quota.key]) == {quota.key: 30}


async def test_the_first_refusing_counter_is_the_one_reported(store: CounterStore) -> None:
    d = await store.reserve([rpm(5), total(10, 20), lease(0)], "a", T0)
    assert (d.denied, d.retry_after_ms) == (1, -1)
    assert d.remaining == (5, 10, 0)


# --- leases (concurrency) ----------------------------------------------------------------------------------


async def test_leases_hold_a_slot_until_settled(store: CounterStore) -> None:
    slots = lease(2)
    assert (await store.reserve([slots], "r1", T0)).remaining == (1,)
    assert (await store.reserve([slots], "r2", T0 + 1)).remaining == (0,)
    refused = await store.reserve([slots], "r3", T0 + 2)
    assert (refused.admitted, refused.denied, refused.retry_after_ms, refused.remaining) == (False, 0, 1000, (0,))

    await store.settle([slots], "r1", T0, [0])
    d = await store.reserve([slots], "r3", T0 + 3)
    assert (d.admitted, d.remaining) == (True, (0,))
    await store.settle([slots], "r1", T0, [0])  # settling twice frees nothing more
    assert not (await store.reserve([slots], "r4", T0 + 4)).admitted


async def test_leases_expire_after_their_ttl(store: CounterStore) -> None:
    slots = lease(2, ttl_ms=10_000)
    await store.reserve([slots], "r1", T0 + 1)
    await store.reserve([slots], "r2", T0 + 3)
    assert not (await store.reserve([slots], "r3", T0 + 10_000)).admitted
    d = await store.reserve([slots], "r3", T0 + 10_001)
    assert (d.admitted, d.remaining) == (True, (0,))
    d = await store.reserve([slots], "r4", T0 + 10_003)
    assert (d.admitted, d.remaining) == (True, (0,))
    assert not (await store.reserve([slots], "r5", T0 + 10_004)).admitted


async def test_a_renewed_lease_outlives_its_old_expiry(store: CounterStore) -> None:
    slots = lease(1, ttl_ms=10_000)
    assert (await store.reserve([slots], "r1", T0)).admitted
    assert await store.renew([Lease(slots.key, "r1")], T0 + 30_000) == 1
    assert not (await store.reserve([slots], "r2", T0 + 10_001)).admitted  # past the old expiry: still held
    assert not (await store.reserve([slots], "r2", T0 + 29_999)).admitted
    d = await store.reserve([slots], "r2", T0 + 30_000)  # held until the renewed expiry, as until its ttl
    assert (d.admitted, d.remaining) == (True, (0,))


async def test_a_settled_lease_is_not_resurrected_by_renew(store: CounterStore) -> None:
    slots = lease(1, ttl_ms=10_000)
    await store.reserve([slots], "r1", T0)
    await store.settle([slots], "r1", T0, [0])
    assert await store.renew([Lease(slots.key, "r1")], T0 + 60_000) == 0
    d = await store.reserve([slots], "r2", T0 + 1)
    assert (d.admitted, d.remaining) == (True, (0,))


async def test_renew_extends_only_the_leases_still_held_in_one_call(store: CounterStore) -> None:
    a, b = lease(2, ttl_ms=10_000, key="t:a:concurrency"), lease(1, ttl_ms=10_000, key="t:b:concurrency")
    await store.reserve([a, b], "r1", T0)
    await store.reserve([a], "r2", T0 + 1)
    await store.settle([a], "r2", T0 + 1, [0])
    held = [Lease(a.key, "r1"), Lease(b.key, "r1"), Lease(a.key, "r2"), Lease("t:never:concurrency", "r1")]
    assert await store.renew(held, T0 + 20_000) == 2
    assert await store.renew([], T0 + 20_000) == 0
    # r1 still holds a slot of a (one left) and b (none left) past its first expiry; r2 left a for good.
    assert (await store.reserve([a], "r3", T0 + 15_000)).remaining == (0,)
    assert not (await store.reserve([b], "r4", T0 + 15_000)).admitted
    assert (await store.reserve([b], "r4", T0 + 20_001)).admitted


# --- totals (quotas) ---------------------------------------------------------------------------------------


async def test_settle_refunds_and_charges_a_total(store: CounterStore) -> None:
    estimate = total(1000, 100)
    assert (await store.reserve([estimate], "a", T0)).remaining == (900,)
    await store.settle([estimate], "a", T0, [40])
    small = total(1000, 10)
    assert (await store.reserve([small], "b", T0 + 1)).remaining == (950,)
    await store.settle([small], "b", T0 + 1, [200])
    assert await store.read([small.key]) == {small.key: 240}

    d = await store.reserve([total(1000, 800)], "c", T0 + 2)
    assert (d.admitted, d.retry_after_ms, d.remaining) == (False, -1, (760,))
    d = await store.reserve([total(1000, 760)], "c", T0 + 3)
    assert (d.admitted, d.remaining) == (True, (0,))


async def test_settling_the_same_reservation_again_changes_nothing(store: CounterStore) -> None:
    """A retried settlement whose first attempt did land (its answer was lost to a timeout) is not applied
    twice: the refund is not doubled, nor the charge."""
    counters = [tpm(1000, 300), total(1000, 300), lease(1)]
    await store.reserve(counters, "a", T0)
    await store.reserve([tpm(1000, 300), total(1000, 300)], "b", T0)
    for _ in range(3):
        await store.settle(counters, "a", T0, [20, 20, 0])
    assert await store.read([counters[1].key]) == {counters[1].key: 320}
    assert (await store.reserve([tpm(1000, 1)], "c", T0 + 1)).remaining == (1000 - 320 - 1,)
    await store.settle([tpm(1000, 300), total(1000, 300)], "b", T0, [500, 500])  # another request still settles
    assert await store.read([counters[1].key]) == {counters[1].key: 520}


async def test_a_total_never_goes_below_zero(store: CounterStore) -> None:
    big = total(1000, 100)
    await store.reserve([big], "a", T0)
    assert await store.delete_prefix(big.key) == 1  # a deliberate reset while "a" is in flight
    small = total(1000, 10)
    await store.reserve([small], "b", T0 + 1)
    await store.settle([big], "a", T0, [0])  # refunds 100 from a counter that holds 10
    assert await store.read([big.key]) == {big.key: 0}
    assert (await store.reserve([small], "c", T0 + 2)).remaining == (990,)


async def test_settle_of_a_deleted_total_does_not_recreate_it(store: CounterStore) -> None:
    counter = total(1000, 100)
    await store.reserve([counter], "a", T0)
    await store.delete_prefix(counter.key)
    await store.settle([counter], "a", T0, [500])
    assert await store.read([counter.key]) == {counter.key: 0}


async def test_read_raise_floor_and_delete_prefix(store: CounterStore) -> None:
    key, other = "t:quota:q:total:2024-01", "t:quota:q:prompt:2024-01"
    assert await store.read([key, other]) == {key: 0, other: 0}
    assert await store.read([]) == {}
    assert await store.raise_floor(key, 50, 0) is True
    assert await store.raise_floor(key, 30, 0) is False
    assert await store.raise_floor(key, 50, 0) is False
    assert await store.read([key, other]) == {key: 50, other: 0}
    assert await store.raise_floor(key, 80, 60_000) is True
    assert await store.read([key]) == {key: 80}

    d = await store.reserve([total(100, 20, key=key)], "a", T0)
    assert (d.admitted, d.remaining) == (True, (0,))
    assert not (await store.reserve([total(100, 1, key=key)], "b", T0)).admitted

    assert await store.delete_prefix(key) == 1
    assert await store.delete_prefix(key) == 0
    assert await store.read([key]) == {key: 0}
    assert (await store.reserve([total(100, 1, key=key)], "c", T0)).remaining == (99,)


# --- settlement of windows ---------------------------------------------------------------------------------


async def test_settle_moves_a_window_bucket_to_the_final_amount(store: CounterStore) -> None:
    await store.reserve([tpm(1000, 300)], "a", T0 + 500)
    await store.settle([tpm(1000, 300)], "a", T0 + 500, [120])
    assert (await store.reserve([tpm(1000, 10)], "b", T0 + 2_000)).remaining == (870,)
    await store.settle([tpm(1000, 10)], "b", T0 + 2_000, [40])
    assert (await store.reserve([tpm(1000, 1)], "c", T0 + 3_000)).remaining == (839,)


async def test_settle_after_the_bucket_left_the_window_is_harmless(store: CounterStore) -> None:
    await store.reserve([tpm(100, 60)], "a", T0)
    await store.reserve([tpm(100, 60, prefix="u")], "a", T0)
    later = T0 + 200_000
    # "t": another reservation prunes the old bucket before the late settlement arrives.
    assert (await store.reserve([tpm(100, 30)], "b", later)).remaining == (70,)
    await store.settle([tpm(100, 60)], "a", T0, [500])
    await store.settle([tpm(100, 60, prefix="u")], "a", T0, [500])  # "u": the bucket is still stored
    assert (await store.reserve([tpm(100, 10)], "c", later + 1)).remaining == (60,)
    assert (await store.reserve([tpm(100, 10, prefix="u")], "c", later + 1)).remaining == (90,)


async def test_settle_of_counters_never_reserved_is_harmless(store: CounterStore) -> None:
    counters = [tpm(100, 10), lease(1), total(100, 10)]
    await store.settle(counters, "ghost", T0, [50, 0, 50])
    assert (await store.reserve(counters, "a", T0)).remaining == (90, 0, 90)


# --- concurrency safety ------------------------------------------------------------------------------------


async def test_concurrent_reservations_admit_exactly_the_limit(store: CounterStore) -> None:
    counters = [rpm(20), lease(1000)]
    decisions = await asyncio.gather(*(store.reserve(counters, f"r{i}", T0 + 7) for i in range(50)))
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 20
    assert sorted(d.remaining[0] for d in admitted) == list(range(20))
    assert all(d.denied == 0 for d in decisions if not d.admitted)
    assert (await store.reserve([lease(1000)], "probe", T0 + 8)).remaining == (1000 - 21,)


# --- Redis only --------------------------------------------------------------------------------------------

@pytest.mark.integration
async def test_a_burst_beyond_the_connection_pool_still_gets_answers(redis_store: RedisStore) -> None:
    results = await asyncio.gather(*(redis_store.reserve([rpm(20)], f"r{i}", T0) for i in range(100)),
                                   return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert sum(r.admitted for r in results if isinstance(r, Decision)) == 20


@pytest.mark.integration
async def test_a_burst_cannot_bypass_a_rate_limit_under_fail_open(redis_store: RedisStore) -> None:
    failures: list[str] = []
    governor = Governor(redis_store, policy="failOpen", on_store_failure=failures.append)
    g = Grant(endpoint="m", rate_limits=(Limit(type="rpm", value=20),))
    token = Token(name="alice", digest="0" * 64, grants=(g,))
    config = GatewayConfig(namespace="ns")

    async def one() -> bool:
        try:
            await governor.admit(config=config, token=token, grant=g, quota=None, pricing=None,
                                 estimate=Usage(1, 1), now=T0 / 1000)
        except RateLimited:
            return False
        return True

    admitted = await asyncio.gather(*(one() for _ in range(100)))
    assert (sum(admitted), failures) == (20, [])


@pytest.mark.integration
async def test_a_dead_redis_fails_fast_and_a_restarted_one_works_again(
        redis_store: RedisStore, redis_control: RedisServer) -> None:
    counters = [rpm(5), total(100, 1)]
    assert (await redis_store.reserve(counters, "a", T0)).admitted
    redis_control.kill()
    # First on the pooled connection the kill reset, then on a fresh connection that is refused.
    for attempt in ("reset", "refused"):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await redis_store.reserve(counters, f"b-{attempt}", T0 + 1)
        assert time.monotonic() - started < 2, attempt

    redis_control.start()  # empty: the counters and the loaded scripts are gone (EVALSHA answers NOSCRIPT)
    d = await redis_store.reserve(counters, "c", T0 + 2)
    assert (d.admitted, d.remaining) == (True, (4, 99))
    await redis_store.settle(counters, "c", T0 + 2, [1, 5])
    assert await redis_store.read([counters[1].key]) == {counters[1].key: 5}


@pytest.mark.integration
async def test_the_first_call_after_a_restart_succeeds_on_stale_pooled_connections(
        redis_store: RedisStore, redis_control: RedisServer) -> None:
    counters = [rpm(5)]
    # Several pooled connections, all idle when Redis restarts: each one is stale afterwards.
    await asyncio.gather(*(redis_store.reserve(counters, f"warm-{i}", T0) for i in range(8)))
    redis_control.kill()
    redis_control.start()
    # Concurrent, so that they take distinct stale connections; none may fail, and the limit holds.
    decisions = await asyncio.gather(*(redis_store.reserve(counters, f"after-{i}", T0 + 1) for i in range(8)))
    assert sum(d.admitted for d in decisions) == 5


@pytest.mark.integration
async def test_every_call_on_a_dead_redis_raises_store_unavailable(
        redis_store: RedisStore, redis_control: RedisServer) -> None:
    counters = [rpm(5), total(100, 1)]
    await redis_store.reserve(counters, "a", T0)
    redis_control.kill()
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "reserve": lambda: redis_store.reserve(counters, "b", T0),
        "settle": lambda: redis_store.settle(counters, "a", T0, [1, 1]),
        "read": lambda: redis_store.read(["k"]),
        "raise_floor": lambda: redis_store.raise_floor("k", 1, 0),
        "renew": lambda: redis_store.renew([Lease("t:concurrency", "a")], T0 + 1),
        "delete_prefix": lambda: redis_store.delete_prefix("t:"),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call()
        assert time.monotonic() - started < 2, name


@pytest.mark.integration
async def test_delete_prefix_on_a_dead_redis_raises_store_unavailable(
        redis_store: RedisStore, redis_control: RedisServer) -> None:
    redis_control.kill()
    started = time.monotonic()
    try:
        await redis_store.delete_prefix("t:")
    except StoreUnavailable:
        pass
    except Exception as exc:
        raise AssertionError(f"{type(exc).__module__}.{type(exc).__name__} is not StoreUnavailable") from exc
    else:
        raise AssertionError("no error although Redis is dead")
    assert time.monotonic() - started < 2


@pytest.mark.integration
async def test_a_hung_redis_times_out_and_the_connection_recovers(
        redis_store: RedisStore, redis_control: RedisServer) -> None:
    await redis_store.reserve([rpm(5)], "a", T0)
    redis_control.freeze()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await redis_store.reserve([rpm(5)], "b", T0 + 1)
    assert time.monotonic() - started < 2
    redis_control.thaw()
    # No stale reply of the timed-out call may answer this one (it has two counters, the lost one had one).
    d = await redis_store.reserve([rpm(5), total(10, 3)], "c", T0 + 2)
    assert d.admitted
    assert d.remaining[1] == 7
    assert d.remaining[0] in (3, 2)  # 2 if the server still ran the timed-out reservation after the thaw


def _calls(client: Any) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


SCRIPT_INTERNAL = {"get", "set", "incrby", "exists", "pexpire", "hgetall", "hincrby", "hdel", "hexists", "hset",
                   "zadd", "zrem", "zcard", "zremrangebyscore"}
"""Commands the Lua scripts run inside Redis: ``INFO commandstats`` counts them, but they are no round trips."""


@pytest.mark.integration
async def test_one_round_trip_per_reserve_and_per_settle(
        redis_store: RedisStore, redis_server: RedisServer) -> None:
    """Warm: one EVALSHA per call. Cold (first use of a script, or after a restart): EVALSHA answered NOSCRIPT,
    SCRIPT LOAD, EVALSHA again. Commands the scripts run inside Redis are no round trips and are left out."""
    counters = [rpm(1000), tpm(100_000, 50), lease(1000), total(10**6, 50)]
    n = 10

    def client_calls(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        delta = {k: after[k] - before.get(k, 0) for k in after}
        handshake = {"info", "hello", "client|setinfo"}
        return {k: v for k, v in delta.items() if v and k not in SCRIPT_INTERNAL | handshake}

    probe = redis_server.client()  # one connection, so that its own HELLO is counted before the first sample
    try:
        probe.script_flush()  # as after a restart: earlier tests loaded the scripts into this server
        samples = [_calls(probe)]
        await redis_store.reserve(counters, "cold", T0)
        samples.append(_calls(probe))
        await redis_store.settle(counters, "cold", T0, [1, 20, 0, 20])
        samples.append(_calls(probe))
        for i in range(n):
            await redis_store.reserve(counters, f"r{i}", T0 + i)
        samples.append(_calls(probe))
        for i in range(n):
            await redis_store.settle(counters, f"r{i}", T0 + i, [1, 20, 0, 20])
        samples.append(_calls(probe))
    finally:
        probe.close()

    cold_reserve, cold_settle, reserves, settles = (client_calls(a, b) for a, b in itertools.pairwise(samples))
    assert cold_reserve == {"evalsha": 2, "script|load": 1}
    assert cold_settle == {"evalsha": 2, "script|load": 1}
    assert reserves == {"evalsha": n}
    assert settles == {"evalsha": n}


async def test_delete_prefix_deletes_only_matching_keys(store: CounterStore) -> None:
    quota = "arks:ns:quota:q:"
    keep = ["arks:ns:quota:q2:total:lifetime", "arks:ns:quota:qq:total:lifetime", "arks:other:quota:q:total:lifetime",
            "x" + quota + "total:lifetime", "arks:ns:quota:q"]
    gone = [quota + "total:lifetime", quota + "prompt:2024-01-02", quota + "cost:2024-01"]
    for key in gone + keep:
        assert await store.raise_floor(key, 7, 0)
    await store.reserve([total(100, 1, key=quota + "total:lifetime"), rpm(5, prefix=quota + "x")], "a", T0)
    assert await store.delete_prefix(quota) == len(gone) + 1
    assert await store.read(gone) == dict.fromkeys(gone, 0)
    assert await store.read(keep) == dict.fromkeys(keep, 7)
    assert await store.delete_prefix("nothing:") == 0
    # The deleted window is gone too: its limit starts afresh.
    assert (await store.reserve([rpm(5, prefix=quota + "x")], "b", T0 + 1)).remaining == (4,)


async def test_delete_prefix_takes_the_prefix_literally(store: CounterStore) -> None:
    for key in ("a?b:1", "axb:1", "a[b]:1", "ab:1"):
        await store.raise_floor(key, 1, 0)
    assert await store.delete_prefix("a?b:") == 1
    assert await store.delete_prefix("a[b]:") == 1
    assert await store.read(["axb:1", "ab:1", "a?b:1", "a[b]:1"]) == {"axb:1": 1, "ab:1": 1, "a?b:1": 0,
                                                                       "a[b]:1": 0}


@pytest.mark.integration
async def test_raise_floor_sets_the_ttl_it_is_given(redis_store: RedisStore, redis_server: RedisServer) -> None:
    await redis_store.raise_floor("with-ttl", 5, 60_000)
    await redis_store.raise_floor("without", 5, 0)
    client = redis_server.client()
    try:
        assert 0 < client.pttl("with-ttl") <= 60_000
        assert client.pttl("without") == -1
    finally:
        client.close()


@pytest.mark.integration
async def test_memory_and_redis_agree_on_a_random_workload(redis_store: RedisStore) -> None:
    """A differential check: the same seeded sequence of reservations and settlements, decision by decision."""
    memory = MemoryStore()
    rng = random.Random(20240101)
    pool = [rpm(7), tpm(60, 1), rpm(4, "fixedWindow", prefix="f"), tpm(40, 1, "fixedWindow", prefix="f"),
            lease(3, ttl_ms=20_000), total(400, 1)]
    pending: list[tuple[list[Counter], str, int]] = []
    outcomes = {True: 0, False: 0}
    now = T0
    renewed = 0
    for step in range(300):
        now += rng.choice([0, 1, 250, 999, 1_000, 7_000, 30_000])
        leases = [Lease(c.key, rid) for counters, rid, _ in pending for c in counters if c.kind == "lease"]
        if leases and rng.random() < 0.15:
            results = [await s.renew(leases, now + 20_000) for s in (memory, redis_store)]
            assert results[0] == results[1], (step, leases)
            renewed += results[0]
            continue
        if pending and rng.random() < 0.4:
            counters, rid, at = pending.pop(rng.randrange(len(pending)))
            amounts = [0 if c.kind == "lease" else rng.randint(0, 2 * c.amount) for c in counters]
            for s in (memory, redis_store):
                await s.settle(counters, rid, at, amounts)
            continue
        chosen = rng.sample(pool, rng.randint(1, 3))
        counters = [dataclasses.replace(c, amount=1 if c.kind == "lease" else rng.randint(0, 12)) for c in chosen]
        mine = await memory.reserve(counters, f"s{step}", now)
        theirs = await redis_store.reserve(counters, f"s{step}", now)
        assert mine == theirs, (step, counters)
        outcomes[mine.admitted] += 1
        if mine.admitted:
            pending.append((counters, f"s{step}", now))
    assert min(outcomes.values()) >= 30, outcomes  # both paths exercised, not a vacuous agreement
    assert renewed > 0


async def test_reports_replace_each_other_and_expire(store: CounterStore) -> None:
    now = int(time.time() * 1000)
    await store.publish("t:routes:a", "one", 60_000, now)
    await store.publish("t:routes:a", "two", 60_000, now)
    await store.publish("t:routes:b", "short", 50, now)
    await store.publish("t:other:c", "elsewhere", 60_000, now)
    assert await store.collect("t:routes:", now) == {"t:routes:a": "two", "t:routes:b": "short"}
    await asyncio.sleep(0.12)
    assert await store.collect("t:routes:", int(time.time() * 1000)) == {"t:routes:a": "two"}


async def test_collect_escapes_glob_characters_in_the_prefix(store: CounterStore) -> None:
    now = int(time.time() * 1000)
    await store.publish("t:r*:x", "starred", 60_000, now)
    await store.publish("t:rX:y", "plain", 60_000, now)
    assert await store.collect("t:r*:", now) == {"t:r*:x": "starred"}
