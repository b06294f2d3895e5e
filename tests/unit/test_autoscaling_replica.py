"""What an engine replica reports for autoscaling, and how the policy reads it back.

``arks_ray.autoscaling.replica`` (per-request TTFT/TPOT, in flight, vLLM counters), ``reports`` (the
newest report per replica, staleness) and ``config`` (the spec as Serve's autoscaling config).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arks_ray.api.application import SLO, Autoscaling
from arks_ray.autoscaling import replica as keys
from arks_ray.autoscaling.config import POLICY, replica_stats, serve_autoscaling_config
from arks_ray.autoscaling.decision import PolicySettings
from arks_ray.autoscaling.replica import LatencyWindow, ReplicaStats, percentile
from arks_ray.autoscaling.reports import latest, observe


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([10.0], 95) == 10.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=50), st.floats(0.1, 99.9))
def test_percentile_lies_between_min_and_max(values: list[float], q: float) -> None:
    assert min(values) <= percentile(values, q) <= max(values)


def test_latency_window_forgets_old_samples() -> None:
    w = LatencyWindow(window_s=10)
    w.add(1.0, now=0)
    w.add(2.0, now=5)
    assert w.values(now=9) == [1.0, 2.0]
    assert w.values(now=12) == [2.0]
    capped = LatencyWindow(window_s=100, max_samples=3)
    for i in range(5):
        capped.add(float(i), now=i)
    assert capped.values(now=5) == [2.0, 3.0, 4.0]


def test_a_stream_gives_ttft_and_tpot() -> None:
    stats = ReplicaStats(percentile=50, window_s=10)
    timer = stats.start(now=100.0)
    assert stats.report(100.0)[keys.IN_FLIGHT] == 1
    stats.first_output(timer, now=100.25)
    stats.first_output(timer, now=100.5)  # only the first chunk counts
    assert stats.report(100.5)[keys.TTFT_MS] == pytest.approx(250.0)  # known before the answer ends
    stats.finish(timer, output_tokens=11, now=100.75)
    report = stats.report(101.0)
    assert report[keys.IN_FLIGHT] == 0
    assert report[keys.TTFT_MS] == pytest.approx(250.0)
    assert report[keys.TPOT_MS] == pytest.approx(50.0)  # 500 ms over 10 tokens after the first
    assert (report[keys.TTFT_SAMPLES], report[keys.TPOT_SAMPLES]) == (1, 1)
    later = stats.report(111.0)
    assert keys.TTFT_MS not in later
    assert later[keys.TTFT_SAMPLES] == 0


def test_answers_without_a_first_chunk_only_leave_the_queue() -> None:
    stats = ReplicaStats()
    whole = stats.start(now=0)  # non-streaming answer, or an error before any output
    one_token = stats.start(now=0)
    stats.first_output(one_token, now=0.1)
    stats.finish(whole, output_tokens=30, now=1)
    stats.finish(one_token, output_tokens=1, now=1)
    report = stats.report(now=1)
    assert report[keys.IN_FLIGHT] == 0
    assert report[keys.TTFT_SAMPLES] == 1
    assert report[keys.TPOT_SAMPLES] == 0


def test_vllm_counters_are_reported_while_busy_and_zero_when_idle() -> None:
    stats = ReplicaStats(engine_stale_s=5)
    assert keys.KV_CACHE not in stats.report(now=0)  # no engine stats at all: absent, not zero
    timer = stats.start(now=0)
    stats.scheduler(running=3, waiting=2, kv_cache_usage=0.5, now=1)
    assert {k: stats.report(now=2)[k] for k in (keys.RUNNING, keys.WAITING, keys.KV_CACHE)} == {
        keys.RUNNING: 3, keys.WAITING: 2, keys.KV_CACHE: 0.5}
    assert keys.KV_CACHE not in stats.report(now=10)  # busy but no step for too long: stale
    stats.finish(timer, output_tokens=0, now=11)
    assert stats.report(now=12)[keys.WAITING] == 0  # idle: the last busy step no longer describes it


def test_latest_takes_each_replicas_newest_point_only() -> None:
    series = {
        keys.IN_FLIGHT: {"a": [(1.0, 3.0), (2.0, 5.0)], "b": [(1.5, 1.0)]},
        keys.TTFT_MS: {"a": [(1.0, 900.0)], "b": [(1.5, 200.0)]},  # a's TTFT is from an older point
        "serve_running_requests": {"a": [(2.0, 7.0)]},                # not ours
    }
    reports = latest(series)
    assert reports["a"].at == 2.0
    assert reports["a"].values == {keys.IN_FLIGHT: 5.0}
    assert reports["b"].values == {keys.IN_FLIGHT: 1.0, keys.TTFT_MS: 200.0}


def test_observe_keeps_fresh_reports_of_running_replicas() -> None:
    series = {keys.IN_FLIGHT: {"a": [(100.0, 2.0)], "b": [(80.0, 9.0)], "gone": [(100.0, 50.0)]}}
    obs = observe(series, ["a", "b", "new"], now=101.0, target=3, low=1, high=4, queued=1.0, max_age_s=15)
    assert obs.running == 3
    assert obs.queued == 1.0
    assert [r.in_flight for r in obs.replicas] == [2.0]  # b is stale, "new" has not reported, "gone" is gone
    assert obs.report_age_s == pytest.approx(1.0)
    none = observe(series, ["b"], now=101.0, target=1, low=1, high=4, queued=0, max_age_s=15)
    assert none.replicas == ()
    assert none.report_age_s == pytest.approx(21.0)


def test_the_spec_maps_onto_serve_and_the_policy() -> None:
    spec = Autoscaling(min_replicas=1, max_replicas=3, target_ongoing_requests=4, upscale_delay_seconds=20,
                       downscale_delay_seconds=120, slo=SLO(ttft_ms=400, tpot_ms=40, percentile=90))
    config = serve_autoscaling_config(spec, replicas=5)
    assert (config["min_replicas"], config["max_replicas"], config["initial_replicas"]) == (1, 3, 3)
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (0.0, 0.0)  # the policy has the windows
    assert config["policy"]["policy_function"] == POLICY
    s = PolicySettings(**config["policy"]["policy_kwargs"])
    assert (s.ttft_ms, s.tpot_ms, s.percentile, s.target_ongoing_requests) == (400, 40, 90, 4)
    assert (s.upscale_delay_s, s.downscale_delay_s, s.panic_s) == (20, 120, 2)
    no_slo = serve_autoscaling_config(Autoscaling(), replicas=1)["policy"]["policy_kwargs"]
    assert "ttft_ms" not in no_slo
    assert "percentile" not in no_slo


def test_replicas_measure_the_percentile_their_policy_reads() -> None:
    spec = Autoscaling(max_replicas=2, slo=SLO(ttft_ms=300, percentile=99))
    stats = replica_stats({"autoscaling_config": serve_autoscaling_config(spec, 1)})
    assert (stats.percentile, stats.window_s) == (99, PolicySettings().latency_window_s)
    assert replica_stats({}).percentile == 95
    other = {"autoscaling_config": {"policy": {"policy_function": "x:y", "policy_kwargs": {"percentile": 50}}}}
    assert replica_stats(other).percentile == 95
