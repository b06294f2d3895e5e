"""``Governor``: admission and settlement over a ``MemoryStore`` and over a store that fails, with an injected
clock; the errors it raises (429 rate limit / quota, 503 under failClosed), their headers, settlements
that outlive a store outage, concurrency lease renewal; and ``QuotaLedger`` (usage reports, floors
restored after the store lost data)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from arks_ray.api.endpoint import Pricing
from arks_ray.api.gateway import GatewayConfig, Grant, Limit, Quota, QuotaBudget, Token
from arks_ray.api.quota import period_end
from arks_ray.errors import BackendUnavailable, QuotaExceeded, RateLimited
from arks_ray.gateway.governor import Governor
from arks_ray.gateway.limits import Counter, Usage
from arks_ray.gateway.ports import Decision, Lease, StoreUnavailable
from arks_ray.gateway.quotas import Floor, QuotaLedger
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.gateway.settlement import Settlements
from arks_ray.stores.memory import MemoryStore

NOW = 1_700_000_040.0
"""A UTC minute boundary (2023-11-14T22:14:00Z)."""
ESTIMATE = Usage(prompt_tokens=10, completion_tokens=90)


class FailingStore:
    """A ``CounterStore`` whose every call fails as a dead Redis would; counts the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _fail(self, op: str) -> StoreUnavailable:
        self.calls.append(op)
        return StoreUnavailable("ConnectionError: connection refused")

    async def reserve(self, counters: Sequence[Counter], request_id: str, now_ms: int) -> Decision:
        raise self._fail("reserve")

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        raise self._fail("settle")

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        raise self._fail("read")

    async def raise_floor(self, key: str, value: int, ttl_ms: int) -> bool:
        raise self._fail("raise_floor")

    async def renew(self, leases: Sequence[Lease], until_ms: int) -> int:
        raise self._fail("renew")

    async def delete_prefix(self, prefix: str) -> int:
        raise self._fail("delete_prefix")

    async def close(self) -> None:
        pass


class SettleFails(MemoryStore):
    """A ``MemoryStore`` whose settlements fail while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        if self.down:
            raise StoreUnavailable("TimeoutError")
        await super().settle(counters, request_id, reserved_at_ms, amounts)


def grant(*limits: tuple[str, int], quota: str | None = None) -> Grant:
    return Grant(endpoint="m", rate_limits=tuple(Limit(type=t, value=v) for t, v in limits),
                 quota=quota)


def token_for(g: Grant, name: str = "alice") -> Token:
    return Token(name=name, digest="0" * 64, grants=(g,))


async def admit(gov: Governor, g: Grant, quota: Quota | None = None, now: float = NOW,
                estimate: Usage = ESTIMATE, pricing: Pricing | None = None, name: str = "alice") -> Any:
    config = GatewayConfig(namespace="ns", quotas=(quota,) if quota else ())
    return await gov.admit(config=config, token=token_for(g, name), grant=g, quota=quota, pricing=pricing,
                           estimate=estimate, now=now)


# --- admission and its headers -----------------------------------------------------------------------------


async def test_an_admission_carries_openai_ratelimit_headers() -> None:
    gov = Governor(MemoryStore())
    admission = await admit(gov, grant(("rpm", 3), ("tpm", 1000)))
    assert admission.counted
    assert admission.headers == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "1m1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "1m1s",
    }
    assert admission.reserved_at_ms == int(NOW * 1000)
    assert admission.estimate == ESTIMATE


async def test_headers_report_the_tightest_window_of_each_dimension() -> None:
    gov = Governor(MemoryStore())
    g = grant(("rpm", 100), ("rph", 5), ("rpd", 50), ("tpm", 1000), ("tpd", 500))
    admission = await admit(gov, g)
    assert admission.headers["x-ratelimit-limit-requests"] == "5"
    assert admission.headers["x-ratelimit-remaining-requests"] == "4"
    assert admission.headers["x-ratelimit-reset-requests"] == "1h1m0s"  # rph: 60 s buckets, 61 of them
    assert admission.headers["x-ratelimit-limit-tokens"] == "500"
    assert admission.headers["x-ratelimit-remaining-tokens"] == "400"


async def test_no_limits_means_nothing_to_count() -> None:
    store = FailingStore()
    gov = Governor(store, policy="failClosed")
    admission = await admit(gov, grant())
    assert (admission.counted, admission.headers, admission.counters) == (False, {}, [])
    await gov.settle(admission, Usage(1, 1))
    assert store.calls == []


async def test_over_the_rate_limit_is_429_with_retry_after_and_headers() -> None:
    gov = Governor(MemoryStore())
    g = grant(("rpm", 2), ("tpm", 1000))
    for _ in range(2):
        await admit(gov, g)
    later = NOW + 12.5
    with pytest.raises(RateLimited) as caught:
        await admit(gov, g, now=later)
    err = caught.value
    assert (err.status, err.type, err.code) == (429, "rate_limit_exceeded", "rate_limit_exceeded")
    retry_ms = (int(NOW) + 61) * 1000 - int(later * 1000)
    assert err.headers["Retry-After"] == str(math.ceil(retry_ms / 1000)) == "49"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-limit-requests"] == "2"
    assert err.headers["x-ratelimit-reset-requests"] == "49s"
    assert err.headers["x-ratelimit-remaining-tokens"] == "800"  # the refused request reserved nothing
    assert "rpm" in err.message


async def test_the_refusing_window_decides_retry_after() -> None:
    gov = Governor(MemoryStore())
    g = grant(("rpm", 100), ("rph", 2))
    await admit(gov, g)
    await admit(gov, g, now=NOW + 30)
    with pytest.raises(RateLimited) as caught:
        await admit(gov, g, now=NOW + 90)
    bucket = int(NOW * 1000) // 60_000
    assert caught.value.headers["Retry-After"] == str(((bucket + 61) * 60_000 - int((NOW + 90) * 1000)) // 1000)
    assert caught.value.headers["x-ratelimit-limit-requests"] == "2"


async def test_a_request_that_can_never_fit_gets_no_retry_after() -> None:
    gov = Governor(MemoryStore())
    with pytest.raises(RateLimited) as caught:
        await admit(gov, grant(("tpm", 50)))
    assert "Retry-After" not in caught.value.headers
    assert "max_tokens" in caught.value.message
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "50"


async def test_concurrency_refusal_is_429() -> None:
    gov = Governor(MemoryStore())
    g = grant(("concurrency", 1))
    first = await admit(gov, g)
    with pytest.raises(RateLimited) as caught:
        await admit(gov, g)
    assert caught.value.headers["Retry-After"] == "1"
    await gov.settle(first, Usage(1, 1))
    await admit(gov, g)


async def test_a_zero_concurrency_limit_is_refused_without_retry_after() -> None:
    gov = Governor(MemoryStore())
    with pytest.raises(RateLimited) as caught:
        await admit(gov, grant(("concurrency", 0)))
    assert "Retry-After" not in caught.value.headers


# --- quotas -------------------------------------------------------------------------------------------------


def quota(period: str, value: int = 150, name: str = "team") -> Quota:
    return Quota(name=name, period=period, budgets=(QuotaBudget(type="total", value=value),))


@pytest.mark.parametrize("period", ["daily", "monthly"])
async def test_an_exhausted_periodic_quota_is_429_until_the_period_ends(period: str) -> None:
    gov = Governor(MemoryStore())
    q, g = quota(period), grant(quota="team")
    await admit(gov, g, q)
    now = NOW + 7.25
    with pytest.raises(QuotaExceeded) as caught:
        await admit(gov, g, q, now=now)
    err = caught.value
    assert (err.status, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    end = period_end(period, now)
    assert end is not None
    assert err.headers["Retry-After"] == str(math.ceil(end - now))
    assert "quota team (total)" in err.message
    assert "50 of 150" in err.message


async def test_an_exhausted_lifetime_quota_has_no_retry_after() -> None:
    gov = Governor(MemoryStore())
    q, g = quota("lifetime", 100), grant(quota="team")
    await admit(gov, g, q)
    with pytest.raises(QuotaExceeded) as caught:
        await admit(gov, g, q, now=NOW + 86_400 * 400)
    assert "Retry-After" not in caught.value.headers


async def test_a_quota_is_shared_by_the_tokens_that_reference_it() -> None:
    gov = Governor(MemoryStore())
    q = quota("lifetime", 150)
    await admit(gov, grant(quota="team"), q, name="alice")
    with pytest.raises(QuotaExceeded):
        await admit(gov, grant(quota="team"), q, name="bob")


async def test_a_new_day_starts_a_daily_quota_afresh() -> None:
    gov = Governor(MemoryStore())
    q, g = quota("daily"), grant(quota="team")
    await admit(gov, g, q)
    end = period_end("daily", NOW)
    assert end is not None
    with pytest.raises(QuotaExceeded):
        await admit(gov, g, q, now=end - 0.001)
    await admit(gov, g, q, now=end)


# --- settlement ---------------------------------------------------------------------------------------------


async def test_settlement_refunds_the_estimate_and_charges_actual_use() -> None:
    gov = Governor(MemoryStore())
    g = grant(("rpm", 10), ("tpm", 1000), quota="team")
    q = quota("lifetime", 10_000)
    first = await admit(gov, g, q)
    await gov.settle(first, Usage(10, 20))
    second = await admit(gov, g, q, now=NOW + 1)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 30 - 100)
    assert second.headers["x-ratelimit-remaining-requests"] == "8"
    await gov.settle(second, Usage(10, 400))
    assert await QuotaLedger(gov.store).usage("ns", (q,), NOW + 2) == {"team": {"total": 30 + 410}}


async def test_fail_open_admits_uncounted_and_reports_the_failure() -> None:
    failures: list[str] = []
    store = FailingStore()
    gov = Governor(store, policy="failOpen", on_store_failure=failures.append)
    admission = await admit(gov, grant(("rpm", 1)), quota("daily"))
    assert (admission.counted, admission.headers) == (False, {})
    await gov.settle(admission, Usage(5, 5))
    assert store.calls == ["reserve"]  # an uncounted request has nothing to settle
    assert failures == ["reserve"]


async def test_fail_closed_refuses_with_503_and_retry_after() -> None:
    failures: list[str] = []
    gov = Governor(FailingStore(), policy="failClosed", on_store_failure=failures.append)
    with pytest.raises(BackendUnavailable) as caught:
        await admit(gov, grant(("rpm", 1)))
    assert (caught.value.status, caught.value.type) == (503, "server_error")
    assert caught.value.headers == {"Retry-After": "1"}
    assert failures == ["reserve"]


async def test_a_settlement_the_store_cannot_take_is_kept_and_lands_when_it_is_back() -> None:
    failures: list[str] = []
    sleeps: list[float] = []
    store = SettleFails()

    async def sleep(delay: float) -> None:  # the retry loop's backoff, without waiting
        sleeps.append(delay)
        if len(sleeps) == 3:
            store.down = False

    gov = Governor(store, on_store_failure=failures.append,
                   settlements=Settlements(store, on_failure=failures.append, sleep=sleep))
    g = grant(("concurrency", 1), quota="team")
    q = quota("lifetime", 1000)
    admission = await admit(gov, g, q)
    await gov.settle(admission, Usage(1, 1))  # never raises
    assert failures[0] == "settle"
    assert gov.settlements.pending == 1
    with pytest.raises(RateLimited):  # the lease is still held: the settlement has not landed
        await admit(gov, g, q)
    await gov.settlements.drain()
    assert gov.settlements.pending == 0
    assert sleeps == [0.1, 0.2, 0.4]  # exponential backoff
    assert failures == ["settle"] * 4
    assert await QuotaLedger(store).usage("ns", (q,), NOW) == {"team": {"total": 2}}  # charged 2, not 100
    await admit(gov, g, q)  # the lease was released


class AnswerLost(MemoryStore):
    """Settles, then fails as a timeout does when the reply is lost: the caller cannot tell it landed."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 1

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        await super().settle(counters, request_id, reserved_at_ms, amounts)
        if self.lost:
            self.lost -= 1
            raise StoreUnavailable("TimeoutError")


async def test_a_settlement_retried_after_a_lost_answer_is_applied_once() -> None:
    store = AnswerLost()
    gov = Governor(store)
    q = quota("lifetime", 1000)
    admission = await admit(gov, grant(("tpm", 1000), quota="team"), q)  # reserves the estimate, 100
    await gov.settle(admission, Usage(1, 1))
    await gov.settlements.drain()
    assert gov.settlements.pending == 0
    assert store.lost == 0  # the first attempt landed, its answer did not, and it was retried
    assert await QuotaLedger(store).usage("ns", (q,), NOW) == {"team": {"total": 2}}  # not 2 - 98 clamped to 0
    again = await admit(gov, grant(("tpm", 1000), quota="team"), q, now=NOW + 1)
    assert again.headers["x-ratelimit-remaining-tokens"] == str(1000 - 2 - 100)


# --- concurrency leases: short, renewed while the request lives ------------------------------------------------


def test_leases_are_short_by_default() -> None:
    assert GatewaySettings().lease_seconds == 30
    assert Governor(MemoryStore()).lease_ms == 30_000


async def test_a_live_request_keeps_its_lease_past_the_lease_period_by_renewal() -> None:
    store = MemoryStore()
    gov = Governor(store, lease_ms=10_000)
    g = grant(("concurrency", 1))
    held = await admit(gov, g)
    assert await gov.renew(NOW + 8) == 1
    with pytest.raises(RateLimited):  # past the original expiry (NOW + 10), still held
        await admit(gov, g, now=NOW + 15)
    await gov.settle(held, Usage(1, 1))
    assert await gov.renew(NOW + 16) == 0  # a finished request is no longer renewed
    await admit(gov, g, now=NOW + 16)


async def test_an_unrenewed_lease_frees_its_slot_after_one_lease_period() -> None:
    gov = Governor(MemoryStore(), lease_ms=10_000)
    g = grant(("concurrency", 1))
    await admit(gov, g)  # its holder dies: never settled, never renewed
    with pytest.raises(RateLimited):
        await admit(gov, g, now=NOW + 9.9)
    await admit(gov, g, now=NOW + 10)


async def test_a_failed_renewal_is_reported_not_raised() -> None:
    failures: list[str] = []
    store = MemoryStore()
    gov = Governor(store, on_store_failure=failures.append)
    await admit(gov, grant(("concurrency", 2)))
    gov.store = FailingStore()
    assert await gov.renew(NOW + 5) == 0
    assert failures == ["renew"]


# --- QuotaLedger: usage and floors ----------------------------------------------------------------------------


DAY = "2023-11-14"


def ledger_quotas(now: float) -> tuple[Quota, ...]:
    assert period_end("daily", now) == 1_700_006_400.0  # NOW is on that day
    daily = Quota(name="daily", period="daily",
                  budgets=(QuotaBudget(type="total", value=1000), QuotaBudget(type="prompt", value=1000)))
    life = Quota(name="life", budgets=(QuotaBudget(type="cost", value=10),))
    return daily, life


FLOORS = (Floor("daily", "total", 50, DAY), Floor("daily", "prompt", 999, "2023-11-13"),
          Floor("life", "cost", 7, "lifetime"), Floor("gone", "total", 5, "lifetime"))


async def test_restore_raises_only_current_period_counters() -> None:
    ledger = QuotaLedger(MemoryStore())
    quotas = ledger_quotas(NOW)
    assert await ledger.usage("ns", quotas, NOW) == {"daily": {"total": 0, "prompt": 0}, "life": {"cost": 0}}
    assert await ledger.restore("ns", quotas, FLOORS, NOW) == 2
    assert await ledger.usage("ns", quotas, NOW) == {"daily": {"total": 50, "prompt": 0}, "life": {"cost": 7}}
    assert await ledger.restore("ns", quotas, FLOORS, NOW) == 0  # already there: nothing raised again

    next_day = NOW + 86_400
    assert await ledger.restore("ns", quotas, FLOORS, next_day) == 0  # the daily floors belong to past days
    assert await ledger.usage("ns", quotas, next_day) == {"daily": {"total": 0, "prompt": 0}, "life": {"cost": 7}}


async def test_restore_never_lowers_usage() -> None:
    store = MemoryStore()
    gov, ledger = Governor(store), QuotaLedger(store)
    quotas = ledger_quotas(NOW)
    admission = await admit(gov, grant(quota="daily"), quotas[0], estimate=Usage(100, 100))
    await gov.settle(admission, Usage(60, 60))
    assert await ledger.restore("ns", quotas, FLOORS, NOW) == 1  # only "life"
    assert (await ledger.usage("ns", quotas, NOW))["daily"] == {"total": 120, "prompt": 60}


async def test_a_restored_floor_is_what_admission_counts_from() -> None:
    store = MemoryStore()
    gov, ledger = Governor(store), QuotaLedger(store)
    q = quota("lifetime", 150)
    await ledger.restore("ns", (q,), (Floor("team", "total", 100, "lifetime"),), NOW)
    with pytest.raises(QuotaExceeded):  # 100 used + 100 estimated > 150
        await admit(gov, grant(quota="team"), q)


async def test_reset_deletes_one_quota_only() -> None:
    store = MemoryStore()
    ledger = QuotaLedger(store)
    quotas = ledger_quotas(NOW)
    await ledger.restore("ns", quotas, FLOORS, NOW)
    assert await ledger.reset("ns", "daily") == 1
    assert await ledger.usage("ns", quotas, NOW) == {"daily": {"total": 0, "prompt": 0}, "life": {"cost": 7}}


async def test_a_store_failure_reaches_the_ledger_caller() -> None:
    ledger = QuotaLedger(FailingStore())  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        await ledger.restore("ns", ledger_quotas(NOW), FLOORS, NOW)
    with pytest.raises(StoreUnavailable):
        await ledger.usage("ns", ledger_quotas(NOW), NOW)
