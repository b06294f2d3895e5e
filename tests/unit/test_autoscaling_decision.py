"""The SLO autoscaling decision (``arks_ray.autoscaling.decision``) on synthetic metric series.

A small simulator plays Serve: it applies each decision to the target and brings new replicas up after a
start delay. Series: steady, load step, SLO step, spike, noisy, missing metrics; then bounds, step limits
and the down window as properties.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arks_ray.autoscaling.decision import (
    Memory,
    Observation,
    PolicySettings,
    ReplicaSignals,
    Step,
    decide,
)

SLO = PolicySettings(target_ongoing_requests=8, ttft_ms=500, upscale_delay_s=30, downscale_delay_s=300)


def signals(in_flight: float, count: int, ttft: float | None = 200.0, samples: int = 20,
            **more: float) -> tuple[ReplicaSignals, ...]:
    """``count`` replicas sharing ``in_flight`` evenly, each with the same TTFT percentile."""
    return tuple(ReplicaSignals(in_flight=in_flight / count, ttft_ms=ttft, ttft_samples=samples, **more)  # type: ignore[arg-type]
                 for _ in range(count))


Series = Callable[[float, int], tuple[ReplicaSignals, ...]]


@dataclass
class Sim:
    """Serve, as far as the policy can tell: the target follows decisions, replicas take ``start_s`` to run."""

    s: PolicySettings = SLO
    target: int = 1
    low: int = 1
    high: int = 4
    start_s: float = 20.0
    running: int = 1
    memory: Memory = field(default_factory=Memory)
    ready_at: float = 0.0
    steps: list[tuple[float, Step]] = field(default_factory=list)

    def tick(self, now: float, reps: tuple[ReplicaSignals, ...]) -> Step:
        if self.running < self.target and now >= self.ready_at:
            self.running = self.target
        step = decide(self.s, Observation(now, self.running, self.target, self.low, self.high, reps), self.memory)
        self.memory = step.memory
        self.steps.append((now, step))
        new = step.decision.replicas
        if new > self.target:
            self.ready_at = now + self.start_s
        elif new < self.target:
            self.running = new
        self.target = new
        return step

    def run(self, series: Series, until: float, start: float = 0.0, dt: float = 1.0) -> Sim:
        now = start
        while now < until:
            self.tick(now, series(now, self.running))
            now += dt
        return self

    def changes(self) -> list[tuple[float, str, int, str]]:
        return [(t, st.decision.action, st.decision.replicas, st.decision.reason) for t, st in self.steps
                if st.decision.action != "hold"]


def test_steady_load_holds_and_logs_once() -> None:
    sim = Sim().run(lambda t, n: signals(6, n, ttft=300), until=900)
    assert sim.changes() == []
    assert sim.target == 1
    logged = [st.memory.log[-1] for _, st in sim.steps if st.fresh]
    assert {(e["action"], e["signal"]) for e in logged} == {("hold", "steady")}
    # One decision, then the same one again as a heartbeat every heartbeat_s; the log keeps the newest.
    assert [e["repeat"] for e in logged] == [False] + [True] * (len(logged) - 1)
    assert [e["at"] for e in logged] == [SLO.heartbeat_s * i for i in range(len(logged))]
    log = sim.memory.log
    assert list(log) == logged[-SLO.log_size:]
    assert "6 requests in flight" in log[-1]["reason"]
    assert log[-1]["signals"] == "1 of 1 replica(s) reporting: in flight 6, TTFT p95 300 ms (20 samples)"


def test_load_step_scales_up_within_the_stable_window_and_keeps_up() -> None:
    sim = Sim().run(lambda t, n: signals(4 if t < 100 else 30, n), until=400)
    ups = sim.changes()
    assert ups, "a load step to 30 requests in flight (8 per replica wanted) must scale up"
    first_at, action, replicas, reason = ups[0]
    assert action == "up"
    assert 100 < first_at <= 130  # once the 30 s average passes 8 per replica, before the window is over
    assert replicas == 2
    assert "requests in flight" in reason
    assert "8 per replica wanted" in reason
    assert sim.target == 4  # ceil(30 / 8)
    assert all(a == "up" for _, a, _, _ in ups)
    # Each further step waited for the replicas of the previous one.
    for (t1, _, _, _), (t2, _, _, _) in itertools.pairwise(ups):
        assert t2 - t1 >= sim.start_s


def test_slo_breach_scales_up_after_the_panic_window() -> None:
    sim = Sim(high=2).run(lambda t, n: signals(4, n, ttft=200 if t < 100 else 1200), until=160)
    ((at, action, replicas, reason),) = sim.changes()
    assert (action, replicas) == ("up", 2)
    assert 100 + SLO.panic_s <= at <= 100 + SLO.panic_s + 1
    assert "TTFT p95 1200 ms is over its SLO of 500 ms (2.40x)" in reason
    assert "panic window" in reason
    assert "capped at the maximum of 2" in reason
    assert sim.memory.log[-1]["signal"] == "ttft"


def test_spikes_shorter_than_their_windows_change_nothing() -> None:
    def spiky(t: float, n: int) -> tuple[ReplicaSignals, ...]:
        burst = 100 <= t < 100 + SLO.panic_s - 1
        return signals(60 if burst else 4, n, ttft=3000 if burst else 200)

    sim = Sim().run(spiky, until=200)
    assert sim.changes() == []
    assert any(st.decision.signal == "pending" and "not yet sustained" in st.decision.reason
               for _, st in sim.steps)


def test_noisy_signals_below_target_never_scale() -> None:
    rnd = random.Random(7)
    sim = Sim().run(lambda t, n: signals(rnd.uniform(0, 12), n, ttft=max(1.0, rnd.gauss(300, 60))), until=1200)
    assert sim.changes() == []


def test_noisy_load_above_target_scales_once_and_does_not_flap() -> None:
    rnd = random.Random(11)
    sim = Sim().run(lambda t, n: signals(rnd.uniform(8, 20), n, ttft=max(1.0, rnd.gauss(250, 50))), until=900)
    assert [(a, r) for _, a, r, _ in sim.changes()] == [("up", 2)]


def test_missing_metrics_hold_and_start_the_windows_again() -> None:
    def series(t: float, n: int) -> tuple[ReplicaSignals, ...]:
        return () if 250 <= t < 270 else signals(2, n)

    sim = Sim(target=2, running=2).run(series, until=700)
    missing = [st for t, st in sim.steps if 250 <= t < 270]
    assert all((st.decision.action, st.decision.signal, st.decision.replicas) == ("hold", "missing", 2)
               for st in missing)
    assert "no engine metrics from the 2 running replica(s)" in missing[0].decision.reason
    # 250 s of low demand before the gap do not count: 300 s of fresh evidence after it are needed.
    ((at, action, replicas, reason),) = sim.changes()
    assert (action, replicas) == ("down", 1)
    assert 570 <= at <= 571
    assert "for 300s at most 1 replica(s) needed" in reason


def test_scale_down_waits_for_the_window_then_steps_one_at_a_time() -> None:
    sim = Sim(target=4, running=4).run(lambda t, n: signals(0, n), until=400)
    downs = sim.changes()
    assert [(a, r) for _, a, r, _ in downs] == [("down", 3), ("down", 2), ("down", 1)]
    assert downs[0][0] == 300
    for (t1, _, _, _), (t2, _, _, _) in itertools.pairwise(downs):
        assert t2 - t1 >= SLO.latency_window_s  # the new capacity is measured before the next step


def test_latency_near_its_slo_blocks_scale_down() -> None:
    sim = Sim(target=2, running=2).run(lambda t, n: signals(0, n, ttft=450), until=700)
    assert sim.changes() == []
    assert "TTFT p95 450 ms is 90% of its SLO of 500 ms" in sim.steps[-1][1].decision.reason


def test_a_new_capacity_is_measured_before_another_slo_step() -> None:
    # TTFT stays high after the first step (the replicas' windows still hold old samples).
    sim = Sim(start_s=5).run(lambda t, n: signals(4, n, ttft=200 if t < 100 else 800), until=200)
    ups = sim.changes()
    assert [(a, r) for _, a, r, _ in ups] == [("up", 2), ("up", 4)]
    first, second = ups[0][0], ups[1][0]
    assert second - first >= sim.start_s + SLO.latency_window_s + SLO.panic_s
    assert "(1.60x)" in ups[1][3]  # ceil(2 x 1.6) = 4


def test_queue_and_kv_cache_are_urgent_signals() -> None:
    s = PolicySettings(upscale_delay_s=30, panic_window_s=0)
    queue = Sim(s=s).run(lambda t, n: signals(2, n, ttft=None, waiting=30, running=4), until=20)
    (_, action, replicas, reason), *_ = queue.changes()
    assert (action, replicas) == ("up", 4)
    assert "30 requests waiting in vLLM's queue behind 4 running" in reason
    kv = Sim(s=s).run(lambda t, n: signals(2, n, ttft=None, kv_cache_usage=0.97), until=20)
    (_, action, replicas, reason), *_ = kv.changes()
    assert (action, replicas) == ("up", 2)
    assert "KV cache 97% full, over its target of 90%" in reason


def test_a_percentile_of_few_samples_does_not_count() -> None:
    sim = Sim().run(lambda t, n: signals(1, n, ttft=5000, samples=SLO.min_latency_samples - 1), until=60)
    assert sim.changes() == []


def test_bounds_outside_the_target_are_restored_at_once() -> None:
    reps = signals(1, 1)
    up = decide(SLO, Observation(0, 1, 0, 1, 3, reps), Memory()).decision
    assert (up.action, up.replicas, up.signal) == ("up", 1, "bounds")
    down = decide(SLO, Observation(0, 5, 5, 1, 3, signals(1, 5)), Memory()).decision
    assert (down.action, down.replicas, down.signal) == ("down", 3, "bounds")


def test_starting_replicas_hold_further_scale_ups() -> None:
    s = PolicySettings(ttft_ms=500, upscale_delay_s=0, panic_window_s=0, latency_window_s=0.5)
    step = decide(s, Observation(10, 1, 2, 1, 4, signals(40, 1, ttft=3000)), Memory())
    assert (step.decision.action, step.decision.signal) == ("hold", "starting")
    assert "waiting for the 1 starting replica(s) first" in step.decision.reason


def test_memory_survives_the_policy_state_as_json() -> None:
    sim = Sim().run(lambda t, n: signals(4 if t < 50 else 30, n), until=120)
    again = Memory.from_state(json.loads(json.dumps(sim.memory.to_state())))
    assert again == sim.memory
    assert Memory.from_state(None) == Memory()


@pytest.mark.parametrize("bad", [{"ttft_ms": 0}, {"percentile": 100}, {"max_step_up": 0}, {"upscale_delay_s": -1},
                                 {"headroom": 1.5}])
def test_settings_are_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        PolicySettings(**bad)  # type: ignore[arg-type]


# --- properties --------------------------------------------------------------------------------------------------

ticks = st.lists(st.tuples(
    st.floats(0.1, 40),                                     # seconds since the previous tick
    st.floats(0, 80),                                       # requests in flight
    st.one_of(st.none(), st.floats(1, 5000)),               # TTFT percentile
    st.booleans(),                                          # metrics missing
    st.floats(0, 1),                                        # KV-cache use
), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(ticks, st.integers(0, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 3),
       st.sampled_from([0.0, 5.0, 30.0]), st.sampled_from([0.0, 20.0, 120.0]))
def test_decisions_respect_bounds_steps_and_the_down_window(
        series: list[tuple[float, float, float | None, bool, float]], low: int, span: int, step_up: int,
        step_down: int, up_delay: float, down_delay: float) -> None:
    high = low + span
    s = PolicySettings(target_ongoing_requests=8, ttft_ms=500, upscale_delay_s=up_delay, downscale_delay_s=down_delay,
                       max_step_up=step_up, max_step_down=step_down, latency_window_s=5)
    sim = Sim(s=s, target=low or 1, running=low or 1, low=low, high=high, start_s=3)
    now = 0.0
    ups: list[float] = []
    for dt, in_flight, ttft, missing, kv in series:
        now += dt
        before = sim.target
        reps = () if missing else signals(in_flight, max(sim.running, 1), ttft=ttft, kv_cache_usage=kv)
        d = sim.tick(now, reps).decision
        assert low <= d.replicas <= high
        assert (d.action == "hold") == (d.replicas == before)
        if missing and sim.running:
            assert d.action == "hold"
        if d.signal != "bounds":
            assert d.replicas - before <= step_up
            assert before - d.replicas <= step_down
        if d.action == "up" and d.signal != "bounds":
            ups.append(now)
        if d.action == "down" and d.signal != "bounds":
            assert not [t for t in ups if t > now - down_delay], "scaled down within the window of a scale-up"
