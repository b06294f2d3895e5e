"""Properties of the rate-limit and quota policy in ``arks_ray.gateway.limits`` and the period maths in
``arks_ray.api.quota``, with injected times: window sums, retry and reset times, the no-burst guarantee of
the sliding window (simulated through ``MemoryStore``), periods, costs, estimates and counter keys."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import math
import re
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from arks_ray.api.endpoint import Pricing
from arks_ray.api.gateway import Grant, Limit, Quota, QuotaBudget, Token
from arks_ray.api.quota import period_end, period_id
from arks_ray.gateway.limits import (
    WINDOWS_MS,
    Counter,
    Usage,
    cost_micro,
    counters_for,
    estimate_usage,
    format_reset,
    settled_amounts,
    usage_from,
    window_counter,
    window_reset_ms,
    window_retry_after_ms,
    window_used,
)
from arks_ray.stores.memory import MemoryStore

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

T0 = 1_700_000_040_000
DIGEST = "0" * 64


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()


# --- the sliding window, simulated through MemoryStore ------------------------------------------------------


@st.composite
def traffic(draw: st.DrawFn) -> tuple[Counter, list[tuple[int, int, int]]]:
    """A window counter and a sequence of (gap_ms, amount, final amount) hits; time only moves forward."""
    rule = draw(st.sampled_from(["rpm", "tpm", "rph"]))
    window = WINDOWS_MS[rule[-1]]
    bucket = window // 60
    limit = draw(st.integers(1, 12))
    counter = window_counter("k", rule, limit, 1, "slidingWindow")
    gap = st.one_of(st.integers(0, 3 * bucket), st.integers(0, 2 * window), st.just(0))
    hits = []
    for _ in range(draw(st.integers(1, 60))):
        amount = 1 if rule.startswith("r") else draw(st.integers(1, limit + 2))
        final = amount if rule.startswith("r") else draw(st.integers(0, amount))
        hits.append((draw(gap), amount, final))
    return counter, hits


async def simulate(counter: Counter, hits: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Reserve every hit, settle it at once; return (time, final amount) of the admitted ones.

    On every refusal, checks on a copy of the store that retry_after_ms is positive and minimal."""
    store, now, admitted = MemoryStore(), T0 + 123, []
    for i, (gap, amount, final) in enumerate(hits):
        now += gap
        c = dataclasses.replace(counter, amount=amount)
        d = await store.reserve([c], f"r{i}", now)
        if d.admitted:
            await store.settle([c], f"r{i}", now, [final])
            admitted.append((now, final))
            continue
        if amount > c.limit:
            assert d.retry_after_ms == -1
            continue
        assert d.retry_after_ms > 0
        probe = copy.deepcopy(store)
        assert not (await probe.reserve([c], "early", now + d.retry_after_ms - 1)).admitted
        assert (await probe.reserve([c], "on-time", now + d.retry_after_ms)).admitted
    return admitted


@PROPERTY
@given(traffic())
def test_no_interval_of_one_window_admits_more_than_the_limit(case: tuple[Counter, list[tuple[int, int, int]]]) -> None:
    counter, hits = case
    window = counter.bucket_ms * 60
    admitted = asyncio.run(simulate(counter, hits))
    for end, _ in admitted:
        # Closed interval [end - W, end]: even hits exactly one window apart are counted together.
        assert sum(a for t, a in admitted if end - window <= t <= end) <= counter.limit


def test_a_minute_boundary_gives_no_burst() -> None:
    counter = window_counter("k", "rpm", 3, 1, "slidingWindow")
    hits = [(59_000, 1, 1), (0, 1, 1), (0, 1, 1), (1_000, 1, 1), (0, 1, 1), (0, 1, 1)]  # minute's end, then start
    assert [t - T0 - 123 for t, _ in asyncio.run(simulate(counter, hits))] == [59_000] * 3


# --- window maths, pure ---------------------------------------------------------------------------------------


@st.composite
def windows(draw: st.DrawFn) -> tuple[dict[int, int], int, int, int]:
    """Buckets of a window counter (some in the window, some old, some empty), a time, bucket_ms and span."""
    bucket_ms = draw(st.sampled_from([1_000, 60_000, 1_440_000]))
    span = draw(st.sampled_from([0, 60]))
    if span == 0:
        bucket_ms *= 60
    now = draw(st.integers(10**12, 2 * 10**12))
    cur = now // bucket_ms
    idx = st.integers(cur - span - 3, cur)
    buckets = draw(st.dictionaries(idx, st.integers(0, 9), max_size=12))
    return buckets, now, bucket_ms, span


@PROPERTY
@given(windows(), st.integers(0, 40), st.integers(0, 12))
def test_retry_after_is_the_first_moment_the_amount_fits(
        case: tuple[dict[int, int], int, int, int], limit: int, amount: int) -> None:
    buckets, now, bucket_ms, span = case
    assume(window_used(buckets, now, bucket_ms, span) + amount > limit)
    retry = window_retry_after_ms(buckets, now, bucket_ms, span, limit, amount)
    if amount > limit:
        assert retry == -1
        return
    assert 0 < retry <= (span + 1) * bucket_ms
    assert window_used(buckets, now + retry, bucket_ms, span) + amount <= limit
    assert window_used(buckets, now + retry - 1, bucket_ms, span) + amount > limit


@PROPERTY
@given(windows())
def test_reset_is_when_the_window_is_empty_again(case: tuple[dict[int, int], int, int, int]) -> None:
    buckets, now, bucket_ms, span = case
    reset = window_reset_ms(buckets, now, bucket_ms, span)
    assert window_used(buckets, now + reset, bucket_ms, span) == 0
    if window_used(buckets, now, bucket_ms, span) == 0:
        assert reset == 0
    else:
        assert 0 < reset <= (span + 1) * bucket_ms
        assert window_used(buckets, now + reset - 1, bucket_ms, span) > 0


@PROPERTY
@given(windows(), st.integers(0, 10**8))
def test_window_usage_only_falls_while_nothing_is_added(case: tuple[dict[int, int], int, int, int], dt_ms: int) -> None:
    buckets, now, bucket_ms, span = case
    assert 0 <= window_used(buckets, now + dt_ms, bucket_ms, span) <= window_used(buckets, now, bucket_ms, span)
    assert window_used(buckets, now, bucket_ms, span) <= sum(buckets.values())


def test_window_used_counts_the_current_bucket_and_span_before_it() -> None:
    buckets = {99: 1, 100: 2, 159: 4, 160: 8, 161: 16}
    assert window_used(buckets, 160_500, 1_000, 60) == 2 + 4 + 8
    assert window_used(buckets, 160_500, 1_000, 0) == 8


@pytest.mark.parametrize(("rule", "algorithm", "bucket", "span", "ttl", "dimension"), [
    ("rpm", "slidingWindow", 1_000, 60, 61_000, "requests"),
    ("tph", "slidingWindow", 60_000, 60, 3_660_000, "tokens"),
    ("rpd", "slidingWindow", 1_440_000, 60, 87_840_000, "requests"),
    ("tpm", "fixedWindow", 60_000, 0, 120_000, "tokens"),
    ("rpd", "fixedWindow", 86_400_000, 0, 172_800_000, "requests"),
])
def test_window_counter_shapes(rule: str, algorithm: str, bucket: int, span: int, ttl: int, dimension: str) -> None:
    c = window_counter("p", rule, 7, 3, algorithm)  # type: ignore[arg-type]
    assert (c.key, c.kind, c.limit, c.amount, c.label) == (f"p:{rule}", "window", 7, 3, rule)
    assert (c.bucket_ms, c.span, c.ttl_ms, c.dimension) == (bucket, span, ttl, dimension)


# --- periods ---------------------------------------------------------------------------------------------------


@PROPERTY
@given(st.floats(0, utc(2100, 1, 1), allow_nan=False), st.sampled_from(["daily", "monthly"]))
@example(utc(2024, 12, 31, 23, 59, 59), "monthly")
@example(utc(2024, 12, 31, 23, 59, 59), "daily")
@example(utc(2024, 2, 29, 12), "daily")
@example(utc(2025, 1, 1), "monthly")
@example(2051222399.9999995, "daily")
def test_period_end_is_the_next_utc_boundary(now: float, period: str) -> None:
    end = period_end(period, now)
    assert end is not None
    assert end > now
    assert period_id(period, end) != period_id(period, now)
    assert period_id(period, end - 0.001) == period_id(period, now)
    boundary = dt.datetime.fromtimestamp(end, dt.UTC)
    # fromtimestamp rounds to the microsecond, so a time under 0.5 us before midnight already counts as the
    # next period (both functions agree on it): hence the slack below.
    slack = 1e-6
    assert (boundary.hour, boundary.minute, boundary.second, boundary.microsecond) == (0, 0, 0, 0)
    if period == "daily":
        assert end - now <= 86_400 + slack
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", period_id(period, now))
    else:
        assert boundary.day == 1
        assert end - now <= 31 * 86_400 + slack
        assert re.fullmatch(r"\d{4}-\d{2}", period_id(period, now))


def test_period_examples_including_the_december_rollover() -> None:
    now = utc(2024, 12, 31, 23, 59, 59)
    assert (period_id("monthly", now), period_end("monthly", now)) == ("2024-12", utc(2025, 1, 1))
    assert (period_id("daily", now), period_end("daily", now)) == ("2024-12-31", utc(2025, 1, 1))
    assert period_id("monthly", utc(2025, 1, 1)) == "2025-01"
    assert period_end("daily", utc(2024, 2, 28, 8)) == utc(2024, 2, 29)
    assert period_end("monthly", utc(2024, 2, 10)) == utc(2024, 3, 1)
    assert (period_id("lifetime", now), period_end("lifetime", now)) == ("lifetime", None)


# --- cost, estimates, settlement -------------------------------------------------------------------------------


PRICES = st.builds(Pricing, prompt_per_million=st.integers(0, 10**8), completion_per_million=st.integers(0, 10**8))
TOKENS = st.integers(0, 10**7)


@PROPERTY
@given(PRICES, TOKENS, TOKENS, TOKENS, TOKENS)
def test_cost_is_an_integer_rounded_up_and_monotone(pricing: Pricing, p: int, c: int, dp: int, dc: int) -> None:
    cost = cost_micro(pricing, p, c)
    exact = Fraction(p * pricing.prompt_per_million + c * pricing.completion_per_million, 1_000_000)
    assert type(cost) is int
    assert cost == math.ceil(exact)
    assert cost_micro(pricing, p + dp, c + dc) >= cost


def test_cost_examples() -> None:
    pricing = Pricing(prompt_per_million=1_000_000, completion_per_million=3)
    assert cost_micro(pricing, 1, 0) == 1
    assert cost_micro(pricing, 0, 1) == 1  # 3/1e6 of a micro-unit still costs one
    assert cost_micro(pricing, 0, 0) == 0
    assert cost_micro(None, 10**6, 10**6) == 0


@pytest.mark.parametrize(("kind", "body", "expected"), [
    ("chat", {"messages": [{"role": "user", "content": "x" * 9}], "max_tokens": 50}, Usage(3 + 4, 50)),
    ("chat", {"messages": [{"role": "system", "content": "abcd"}, {"role": "user", "content": "abcd"}]},
     Usage(1 + 1 + 8, 256)),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 8},
                                                         {"type": "image_url", "image_url": {"url": "u"}}]}],
              "max_completion_tokens": 7, "max_tokens": 99}, Usage(2 + 4, 7)),
    ("chat", {"messages": "not a list", "max_tokens": 0}, Usage(1, 256)),
    ("chat", {}, Usage(1, 256)),
    ("completions", {"prompt": "x" * 10, "max_tokens": 5}, Usage(3, 5)),
    ("completions", {"prompt": ["x" * 4, "y" * 4]}, Usage(2, 2 * 256)),  # each prompt of a batch generates
    ("completions", {"prompt": [1, 2, 3, 4], "max_tokens": 5}, Usage(1, 5)),  # token ids: one prompt
    ("completions", {"prompt": "x", "max_tokens": 5, "n": 3}, Usage(1, 15)),  # each choice generates
    ("chat", {"messages": [], "max_tokens": 5, "n": True}, Usage(1, 5)),  # a bool is not a count
    ("responses", {"input": "x" * 8, "instructions": "y" * 4, "max_output_tokens": 9}, Usage(3, 9)),
    ("completions", {"prompt": "abc", "max_tokens": "12"}, Usage(1, 256)),
    ("completions", {"prompt": "abc", "max_tokens": -3}, Usage(1, 256)),
    ("embeddings", {"input": "x" * 41}, Usage(11, 0)),
    ("embeddings", {"input": ["x" * 4] * 3, "max_tokens": 50}, Usage(3, 0)),
    ("embeddings", {"input": ""}, Usage(1, 0)),
])
def test_estimate_usage(kind: str, body: dict[str, object], expected: Usage) -> None:
    assert estimate_usage(kind, body, 256) == expected


@PROPERTY
@given(st.lists(st.text(max_size=200), min_size=1, max_size=5), st.integers(1, 4096))
def test_chat_estimates_cover_the_text_and_the_whole_max_tokens(contents: list[str], max_tokens: int) -> None:
    body = {"messages": [{"role": "user", "content": c} for c in contents], "max_tokens": max_tokens}
    usage = estimate_usage("chat", body, 256)
    assert usage.completion_tokens == max_tokens
    assert usage.prompt_tokens >= max(1, math.ceil(sum(map(len, contents)) / 4))


def test_usage_from_prefers_the_engine_count() -> None:
    assert usage_from({"prompt_tokens": 5, "completion_tokens": 7}, 100, 100) == Usage(5, 7)
    assert usage_from({"prompt_tokens": 5}, 100, 100) == Usage(5, 0)
    assert usage_from({"total_tokens": 3}, 100, 9) == Usage(100, 9)
    assert usage_from(None, 11, 2) == Usage(11, 2)


@pytest.mark.parametrize(("ms", "text"), [
    (0, "0s"), (-5, "0s"), (1, "1s"), (1_000, "1s"), (1_001, "2s"), (59_999, "1m0s"), (61_000, "1m1s"),
    (360_000, "6m0s"), (3_600_000, "1h0m0s"), (3_723_000, "1h2m3s"), (90_000_000, "25h0m0s"),
])
def test_format_reset(ms: int, text: str) -> None:
    assert format_reset(ms) == text


# --- counters of a request (Arks key semantics) ----------------------------------------------------------------


def token(name: str, grant: Grant) -> Token:
    return Token(name=name, digest=DIGEST, grants=(grant,))


LIMITS = (Limit(type="rpm", value=10), Limit(type="tpm", value=1000), Limit(type="concurrency", value=2))
ESTIMATE = Usage(prompt_tokens=30, completion_tokens=70)
PRICING = Pricing(prompt_per_million=2_000_000, completion_per_million=1_000_000)


def test_rate_limits_are_per_token_per_endpoint() -> None:
    grant = Grant(endpoint="m", rate_limits=LIMITS)
    counters = counters_for(namespace="ns", token=token("alice", grant), grant=grant, quota=None, pricing=None,
                            estimate=ESTIMATE, now=T0 / 1000, lease_ms=5_000)
    assert [(c.key, c.kind, c.limit, c.amount, c.dimension) for c in counters] == [
        ("arks:ns:rl:alice:m:rpm", "window", 10, 1, "requests"),
        ("arks:ns:rl:alice:m:tpm", "window", 1000, 100, "tokens"),
        ("arks:ns:rl:alice:m:concurrency", "lease", 2, 1, "requests"),
    ]
    assert counters[2].ttl_ms == 5_000
    assert (counters[0].bucket_ms, counters[0].span) == (1_000, 60)

    other = Grant(endpoint="n", rate_limits=LIMITS)
    keys = {c.key for c in counters_for(namespace="ns", token=token("alice", other), grant=other, quota=None,
                                        pricing=None, estimate=ESTIMATE, now=T0 / 1000)}
    assert keys.isdisjoint(c.key for c in counters)
    bob = {c.key for c in counters_for(namespace="ns", token=token("bob", grant), grant=grant, quota=None,
                                       pricing=None, estimate=ESTIMATE, now=T0 / 1000)}
    assert bob.isdisjoint(c.key for c in counters)


def test_fixed_window_counters_have_one_bucket_per_window() -> None:
    grant = Grant(endpoint="m", rate_limits=(Limit(type="rph", value=5),))
    (c,) = counters_for(namespace="ns", token=token("a", grant), grant=grant, quota=None, pricing=None,
                        estimate=ESTIMATE, now=T0 / 1000, algorithm="fixedWindow")
    assert (c.bucket_ms, c.span, c.ttl_ms) == (3_600_000, 0, 7_200_000)


def test_a_quota_is_one_counter_per_budget_shared_by_every_token() -> None:
    quota = Quota(name="team", period="daily", budgets=(
        QuotaBudget(type="prompt", value=100), QuotaBudget(type="response", value=200),
        QuotaBudget(type="total", value=300), QuotaBudget(type="cost", value=400)))
    now = utc(2024, 3, 5, 18)
    per_token = []
    for name, endpoint in (("alice", "m"), ("bob", "n")):
        grant = Grant(endpoint=endpoint, quota="team")
        per_token.append(counters_for(namespace="ns", token=token(name, grant), grant=grant, quota=quota,
                                      pricing=PRICING, estimate=ESTIMATE, now=now))
    assert per_token[0] == per_token[1]
    counters = per_token[0]
    assert [(c.key, c.kind, c.limit, c.amount, c.dimension) for c in counters] == [
        ("arks:ns:quota:team:prompt:2024-03-05", "total", 100, 30, "quota"),
        ("arks:ns:quota:team:response:2024-03-05", "total", 200, 70, "quota"),
        ("arks:ns:quota:team:total:2024-03-05", "total", 300, 100, "quota"),
        ("arks:ns:quota:team:cost:2024-03-05", "total", 400, 130, "quota"),
    ]
    assert {c.ttl_ms for c in counters} == {(6 + 24) * 3_600_000}  # to the period's end, plus a day


def test_a_lifetime_quota_never_expires() -> None:
    quota = Quota(name="q", budgets=(QuotaBudget(type="total", value=10),))
    grant = Grant(endpoint="m", quota="q")
    (c,) = counters_for(namespace="ns", token=token("a", grant), grant=grant, quota=quota, pricing=None,
                        estimate=ESTIMATE, now=T0 / 1000)
    assert (c.key, c.ttl_ms) == ("arks:ns:quota:q:total:lifetime", 0)


def test_settled_amounts_follow_each_counter_kind() -> None:
    quota = Quota(name="q", period="monthly", budgets=(
        QuotaBudget(type="prompt", value=1), QuotaBudget(type="response", value=1),
        QuotaBudget(type="total", value=1), QuotaBudget(type="cost", value=1)))
    grant = Grant(endpoint="m", rate_limits=LIMITS, quota="q")
    counters = counters_for(namespace="ns", token=token("a", grant), grant=grant, quota=quota, pricing=PRICING,
                            estimate=ESTIMATE, now=T0 / 1000)
    assert settled_amounts(counters, Usage(3, 4), PRICING) == [1, 7, 0, 3, 4, 7, 6 + 4]
    assert settled_amounts(counters, Usage(0, 0), PRICING) == [1, 0, 0, 0, 0, 0, 0]
