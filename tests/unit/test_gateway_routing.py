"""Routing policy: circuit breakers, SLO factors and effective weights, on a fake clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arks_ray.api.gateway import Backend, Endpoint
from arks_ray.errors import BackendUnavailable
from arks_ray.gateway.health import Breaker, BreakerSettings
from arks_ray.gateway.routing import Router
from arks_ray.gateway.signals import Signals, Slo, SloSettings, best_of, step, target_factor


def endpoint(*weights: int, **slo: float) -> Endpoint:
    return Endpoint(name="m", backends=tuple(
        Backend(kind="app", name=f"b{i}", weight=w, **slo) for i, w in enumerate(weights)))


# --- the breaker ---------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = Breaker(BreakerSettings(failure_threshold=3))
    b.on_failure(0, "x")
    b.on_failure(0, "x")
    b.on_success(0)  # not consecutive any more
    b.on_failure(0, "x")
    b.on_failure(0, "x")
    assert b.available(0)
    b.on_failure(0, "boom")
    assert (b.available(0), b.view(0), b.reason) == (False, "open", "boom")


def test_breaker_half_opens_after_the_cooldown_and_admits_one_probe() -> None:
    b = Breaker(BreakerSettings(failure_threshold=1, cooldown_s=5, half_open_probes=1))
    b.on_failure(10, "x")
    assert not b.available(14.9)
    assert b.available(15)
    assert b.view(15) == "half_open"
    b.on_start(15)
    assert not b.available(15)  # the probe slot is taken
    b.on_success(16)
    assert b.view(16) == "closed"
    assert b.available(16)


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_max() -> None:
    b = Breaker(BreakerSettings(failure_threshold=1, cooldown_s=5, max_cooldown_s=12))
    b.on_failure(0, "x")
    cooldowns = []
    now = 0.0
    for _ in range(3):
        now += b.cooldown_s
        assert b.view(now) == "half_open"
        b.on_start(now)
        b.on_failure(now, "still down")
        cooldowns.append(b.cooldown_s)
    assert cooldowns == [10, 12, 12]
    b.on_success(now + 100)
    assert b.cooldown_s == 5


def test_a_released_probe_frees_its_slot() -> None:
    b = Breaker(BreakerSettings(failure_threshold=1, cooldown_s=1))
    b.on_failure(0, "x")
    b.on_start(1)
    b.on_release(1)
    assert b.available(1)


def test_health_checks_open_at_once_and_a_pass_closes_what_only_they_opened() -> None:
    b = Breaker(BreakerSettings(cooldown_s=30))
    b.on_health_check(0, False, "Serve app DEPLOYING")
    assert (b.view(0), b.reason) == ("open", "Serve app DEPLOYING")
    b.on_health_check(1, True)
    assert b.view(1) == "closed"  # it came up: no need to wait out 30 s, nor to probe one request at a time


def test_a_backend_the_checks_keep_finding_down_takes_no_probe() -> None:
    # The e2e flake: a Serve app gone for good went half-open when its cooldown ran out between two failed
    # checks, and a request's one retry landed on it. Each failed check now restarts the cooldown.
    b = Breaker(BreakerSettings(failure_threshold=1, cooldown_s=4.5))  # it runs out between two checks
    for t in range(0, 30):
        b.on_health_check(t, False, "Serve app not found")
        assert not b.available(t + 0.99), t
    assert b.view(29 + 4.5) == "half_open"  # checks stopped (disabled, or the gateway lost them): time decides


def test_a_passing_health_check_only_half_opens_a_breaker_that_requests_opened() -> None:
    b = Breaker(BreakerSettings(failure_threshold=1, cooldown_s=30))
    b.on_failure(0, "HTTP 500")
    b.on_health_check(1, True)  # alive, but it failed real requests: probe before trusting it
    assert b.view(1) == "half_open"
    b.on_start(1)
    b.on_success(2)
    b.on_health_check(3, False, "down")
    b.on_health_check(4, True)
    assert b.view(4) == "closed"  # this time only the check had doubts


# --- SLO factors ---------------------------------------------------------------------------------

S = SloSettings(alpha=1.0, tolerance=2.0, min_factor=0.05, max_change_per_s=0.5, queue_target=10, stale_s=60)


def sig(ttft: float | None = None, tpot: float | None = None, in_flight: int = 0, at: float = 0) -> Signals:
    s = Signals(in_flight=in_flight)
    if ttft is not None:
        s.ttft_ms.add(ttft, at, 1.0)
    if tpot is not None:
        s.tpot_ms.add(tpot, at, 1.0)
    return s


def test_an_slo_breach_scales_the_factor_by_the_overshoot() -> None:
    factor, reason = target_factor(sig(ttft=400), Slo(ttft_ms=200), {}, 0, S)
    assert factor == pytest.approx(0.5)
    assert reason.startswith("TTFT 400ms against an SLO of 200ms")
    assert target_factor(sig(ttft=150), Slo(ttft_ms=200), {}, 0, S) == (1.0, "")


def test_peers_within_the_tolerance_are_not_penalised() -> None:
    best = best_of([sig(ttft=100), sig(ttft=190)], 0, S)
    assert target_factor(sig(ttft=190), Slo(), best, 0, S)[0] == 1.0
    factor, reason = target_factor(sig(ttft=800), Slo(), best, 0, S)
    assert factor == pytest.approx(2.0 / 8)
    assert "8.0x the best peer" in reason


def test_the_worst_signal_binds_and_queueing_counts() -> None:
    factor, reason = target_factor(sig(ttft=100, tpot=90, in_flight=40), Slo(ttft_ms=200, tpot_ms=30), {}, 0, S)
    assert factor == pytest.approx(0.25)
    assert "requests in flight" in reason
    factor, reason = target_factor(sig(ttft=100, tpot=90, in_flight=5), Slo(ttft_ms=200, tpot_ms=30), {}, 0, S)
    assert factor == pytest.approx(1 / 3)
    assert reason.startswith("TPOT")


def test_stale_samples_are_forgotten() -> None:
    assert target_factor(sig(ttft=10_000, at=0), Slo(ttft_ms=100), {}, 61, S) == (1.0, "")


def test_the_factor_never_goes_below_the_floor() -> None:
    assert target_factor(sig(ttft=1e9), Slo(ttft_ms=1), {}, 0, S)[0] == S.min_factor


def test_the_factor_moves_at_a_bounded_rate() -> None:
    s = Signals()
    step(s, 1.0, "", 0, S)
    assert step(s, 0.1, "slow", 1, S) == pytest.approx(0.5)  # 0.5 per second at most
    assert step(s, 0.1, "slow", 1, S) == pytest.approx(0.5)  # no time passed: no change
    assert step(s, 0.1, "slow", 3, S) == pytest.approx(0.1)
    assert step(s, 1.0, "", 3.5, S) == pytest.approx(0.35)   # and back up at the same rate


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0.05, 1)), min_size=1, max_size=30))
def test_factor_steps_are_bounded_and_stay_in_range(moves: list[tuple[float, float]]) -> None:
    s, now = Signals(), 0.0
    step(s, 1.0, "", now, S)
    for dt, target in moves:
        before = s.factor
        now += dt
        after = step(s, target, "", now, S)
        assert S.min_factor <= after <= 1.0
        assert abs(after - before) <= S.max_change_per_s * dt + 1e-9


# --- the router ----------------------------------------------------------------------------------


def test_weights_split_as_configured_when_all_is_well() -> None:
    router, rng = Router(), random.Random(0)
    counts = Counter(router.choose(endpoint(3, 1), rng, 0).name for _ in range(8000))
    assert abs(counts["b0"] / 8000 - 0.75) < 0.02


def test_a_failing_backend_leaves_rotation_and_comes_back_through_a_probe() -> None:
    router, rng, ep = Router(BreakerSettings(failure_threshold=2, cooldown_s=5)), random.Random(0), endpoint(1, 1)
    for _ in range(2):
        router.failed(router.start("m", "b0", 0, True), 0, "HTTP 500")
    assert router.weights(ep, 1) == {"b0": 0.0, "b1": 1.0}
    assert {router.choose(ep, rng, 1).name for _ in range(200)} == {"b1"}
    assert router.weights(ep, 5)["b0"] == 1.0  # half-open: one probe may go
    probe = router.start("m", "b0", 5, False)
    assert router.weights(ep, 5)["b0"] == 0.0
    router.succeeded(probe, 6)
    assert router.weights(ep, 6) == {"b0": 1.0, "b1": 1.0}


def test_when_every_backend_is_out_of_rotation_they_are_tried_anyway() -> None:
    router, ep = Router(BreakerSettings(failure_threshold=1)), endpoint(1, 0)
    router.health_check("m", "b0", 0, False, "down")
    assert router.choose(ep, random.Random(0), 0).name == "b0"  # panic routing, by configured weight
    with pytest.raises(BackendUnavailable, match="no backend is available"):
        router.choose(ep, random.Random(0), 0, exclude={"b0"})


def test_weight_zero_drains_even_in_panic() -> None:
    with pytest.raises(BackendUnavailable):
        Router().choose(endpoint(0, 0), random.Random(0), 0)


def test_a_slow_backend_loses_weight_gradually_and_the_reason_is_reported() -> None:
    router = Router(slo=SloSettings(alpha=1.0, max_change_per_s=0.5))
    ep = endpoint(1, 1, slo_ttft_ms=100)
    router.weights(ep, 0)
    for now, backend, ttft in ((0.0, "b0", 0.4), (0.0, "b1", 0.05)):
        t = router.start("m", backend, now, True)
        router.first_byte(t, now + ttft)
        router.succeeded(t, now + ttft + 0.1, completion_tokens=5)
    assert router.weights(ep, 1)["b0"] == pytest.approx(0.5)   # rate-limited on its way to 0.25
    assert router.weights(ep, 2)["b0"] == pytest.approx(0.25)
    view = {v.backend: v for v in router.snapshot([ep], 2)}
    assert view["b0"].reason.startswith("TTFT 400ms against an SLO of 100ms")
    assert (view["b1"].effective_weight, view["b1"].reason) == (1.0, "")


def test_tpot_is_measured_between_the_first_and_the_last_token() -> None:
    router = Router(slo=SloSettings(alpha=1.0))
    t = router.start("m", "b0", 0, True)
    router.first_byte(t, 0.2)
    router.succeeded(t, 1.2, completion_tokens=11)
    state = router.state("m", "b0").signals
    assert (state.ttft_ms.value, state.tpot_ms.value, state.in_flight) == (pytest.approx(200), pytest.approx(100), 0)


def test_a_verdict_counts_once_and_a_client_leaving_is_no_verdict() -> None:
    router = Router(BreakerSettings(failure_threshold=1))
    t = router.start("m", "b0", 0, True)
    router.released(t, 0)
    router.failed(t, 0, "late")  # the same ticket again: ignored
    assert router.state("m", "b0").breaker.view(0) == "closed"


def test_reconfiguration_keeps_the_history_of_backends_that_stay() -> None:
    router = Router(BreakerSettings(failure_threshold=1))
    router.failed(router.start("m", "b0", 0, False), 0, "x")
    router.failed(router.start("m", "b1", 0, False), 0, "x")
    router.retain([endpoint(1)])
    assert router.state("m", "b0").breaker.view(0) == "open"
    assert router.state("m", "b1").breaker.view(0) == "closed"  # forgotten, then new
