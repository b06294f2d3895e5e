"""Per-tenant metrics and the access log, from ``RequestRecord`` to samples, Serve metric calls and JSON lines.

``ServeMetrics`` is driven with a recording stand-in for ``ray.serve.metrics`` (same constructor and
``inc``/``observe``/``set`` signatures); what Ray's agent exports from them is checked by the
observability e2e against a real Prometheus.
"""

from __future__ import annotations

import io
import json
import types
from dataclasses import replace
from typing import Any

import pytest

from arks_ray.api.gateway import GatewayConfig, Quota, QuotaBudget
from arks_ray.gateway import access_log
from arks_ray.gateway.records import RequestRecord
from arks_ray.gateway.routing import RouteView
from arks_ray.gateway.series import OTHER, QuotaLevel, TokenNames, quota_levels, refusal_reason, samples, tpot_s
from arks_ray.gateway.settings import GatewaySettings
from deployments.gateway_metrics import AccessLog, Fanout, NoMetrics, ServeMetrics, build_metrics

OK = RequestRecord(
    request_id="r1", namespace="team-a", token="alice", endpoint="tiny", backend="tiny-app", kind="chat",
    stream=True, status=200, outcome="ok", prompt_tokens=12, completion_tokens=11, cost=0.25,
    started=1_790_000_000.1234, ttft_s=0.05, duration_s=1.05, gateway_s=0.002)
LIMITED = replace(OK, backend="", status=429, outcome="limited", completion_tokens=0, prompt_tokens=0, cost=0.0,
                  ttft_s=None, duration_s=0.003, gateway_s=0.003, limit="rpm")


class _Metric:
    def __init__(self, kind: str, name: str, description: str = "", boundaries: Any = None,
                 tag_keys: tuple[str, ...] = ()) -> None:
        self.kind, self.name, self.tag_keys, self.calls = kind, name, tag_keys, []
        self.boundaries = boundaries

    def _record(self, value: float, tags: dict[str, str] | None) -> None:
        assert set(tags or {}) == set(self.tag_keys), (self.name, tags)
        self.calls.append((value, dict(tags or {})))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0
        self._record(value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)


class FakeServeMetrics:
    """``ray.serve.metrics``' constructors, recording every metric made."""

    def __init__(self) -> None:
        self.made: dict[str, _Metric] = {}

    def _make(self, kind: str, name: str, *args: Any, **kwargs: Any) -> _Metric:
        metric = self.made[name] = _Metric(kind, name, *args, **kwargs)
        return metric

    def Counter(self, *a: Any, **k: Any) -> _Metric:
        return self._make("counter", *a, **k)

    def Gauge(self, *a: Any, **k: Any) -> _Metric:
        return self._make("gauge", *a, **k)

    def Histogram(self, *a: Any, **k: Any) -> _Metric:
        return self._make("histogram", *a, **k)


TENANT = {"namespace": "team-a", "endpoint": "tiny", "backend": "tiny-app", "token": "alice"}


def test_a_finished_stream_counts_tokens_cost_and_all_four_latencies() -> None:
    fake = FakeServeMetrics()
    metrics = ServeMetrics(metrics_module=fake)
    metrics.finished(OK)
    m = fake.made
    assert m["arks_gateway_requests_total"].calls == [(1.0, {**TENANT, "outcome": "ok", "code": "200"})]
    assert m["arks_gateway_tokens_total"].calls == [(12, {**TENANT, "type": "prompt"}),
                                                     (11, {**TENANT, "type": "completion"})]
    assert m["arks_gateway_cost_total"].calls == [(0.25, TENANT)]
    assert m["arks_gateway_ttft_seconds"].calls == [(0.05, TENANT)]
    assert m["arks_gateway_tpot_seconds"].calls == [(pytest.approx(0.1), TENANT)]  # (1.05 - 0.05) / 10
    assert m["arks_gateway_request_duration_seconds"].calls == [(1.05, TENANT)]
    assert m["arks_gateway_overhead_seconds"].calls == [(0.002, TENANT)]
    assert m["arks_gateway_refused_total"].calls == []
    assert all(name.endswith("_total") for name, x in m.items() if x.kind == "counter")  # no Ray gauge twin


def test_a_429_counts_its_reason_and_no_latency() -> None:
    fake = FakeServeMetrics()
    ServeMetrics(metrics_module=fake).finished(LIMITED)
    tenant = {**TENANT, "backend": "_none"}
    assert fake.made["arks_gateway_refused_total"].calls == [(1.0, {**tenant, "reason": "rpm"})]
    assert fake.made["arks_gateway_requests_total"].calls == [(1.0, {**tenant, "outcome": "limited", "code": "429"})]
    for name in ("ttft_seconds", "tpot_seconds", "request_duration_seconds", "overhead_seconds", "tokens_total"):
        assert fake.made[f"arks_gateway_{name}"].calls == [], name


def test_refusal_reasons_are_a_closed_set() -> None:
    assert refusal_reason(replace(LIMITED, outcome="quota", limit="quota small (total)")) == "quota"
    assert refusal_reason(replace(LIMITED, limit="concurrency")) == "concurrency"
    assert refusal_reason(replace(LIMITED, limit="something new")) == "rate_limit"
    assert refusal_reason(LIMITED) == "rpm"
    assert refusal_reason(OK) is None


def test_token_names_are_capped_per_replica_first_come_first_kept() -> None:
    names = TokenNames(2)
    assert [names.label(n) for n in ("a", "b", "c", "a", "d", "", "b")] == ["a", "b", OTHER, "a", OTHER, "_none",
                                                                            "b"]
    assert names.overflowed == 2
    fake = FakeServeMetrics()
    metrics = ServeMetrics(max_token_names=3, metrics_module=fake)
    for i in range(50):
        metrics.finished(replace(OK, token=f"t{i}"))
    tokens = {tags["token"] for _, tags in fake.made["arks_gateway_requests_total"].calls}
    assert tokens == {"t0", "t1", "t2", OTHER}


def test_unusual_status_codes_fold_into_their_class() -> None:
    fake = FakeServeMetrics()
    metrics = ServeMetrics(metrics_module=fake)
    for status in (200, 418, 507, 503):
        metrics.finished(replace(OK, status=status, outcome="ok" if status < 400 else "backend_error"))
    codes = [tags["code"] for _, tags in fake.made["arks_gateway_requests_total"].calls]
    assert codes == ["200", "4xx", "5xx", "503"]


def test_tpot_only_for_streams_of_two_tokens_or_more() -> None:
    assert tpot_s(replace(OK, stream=False)) is None
    assert tpot_s(replace(OK, completion_tokens=1)) is None
    assert tpot_s(replace(OK, ttft_s=None)) is None
    assert tpot_s(replace(OK, completion_tokens=3, duration_s=0.25, ttft_s=0.05)) == pytest.approx(0.1)


def test_an_unanswered_request_has_no_latency_samples() -> None:
    gone = replace(OK, outcome="client_gone", ttft_s=None, status=499)
    s = samples(gone, TokenNames(10))
    assert (s.ttft_s, s.tpot_s, s.duration_s) == (None, None, None)
    assert s.gateway_s == 0.002  # it reached a backend: the gateway's own part is known


def test_routes_and_quotas_become_gauges() -> None:
    fake = FakeServeMetrics()
    metrics = ServeMetrics(metrics_module=fake)
    view = RouteView("tiny", "tiny-app", "app", 3, "open", 0.5, 0.0, 2, 120.0, None, "down")
    metrics.routes([view])
    tags = {"endpoint": "tiny", "backend": "tiny-app"}
    assert fake.made["arks_gateway_backend_health"].calls == [(0.0, tags)]
    assert fake.made["arks_gateway_backend_slo_factor"].calls == [(0.5, tags)]
    assert fake.made["arks_gateway_backend_in_flight"].calls == [(2, tags)]
    assert fake.made["arks_gateway_backend_ttft_ms"].calls == [(120.0, tags)]
    assert fake.made["arks_gateway_backend_tpot_ms"].calls == []
    config = GatewayConfig(namespace="team-a", quotas=(
        Quota(name="small", budgets=(QuotaBudget(type="total", value=150), QuotaBudget(type="cost", value=9))),))
    levels = quota_levels(config, {"small": {"total": 140}})
    assert levels == [QuotaLevel("small", "total", 140, 150), QuotaLevel("small", "cost", 0, 9)]
    metrics.quotas("team-a", levels)
    assert fake.made["arks_quota_used"].calls[0] == (140, {"namespace": "team-a", "quota": "small", "type": "total"})
    assert fake.made["arks_quota_limit"].calls[1] == (9, {"namespace": "team-a", "quota": "small", "type": "cost"})


def test_access_log_line_has_every_field_and_nothing_secret() -> None:
    record = replace(OK, token="alice")
    entry = json.loads(access_log.line(record))
    assert list(entry) == [f for f in access_log.FIELDS if f not in ("limit", "client_request_id")]
    assert entry["time"] == "2026-09-21T14:13:20.123Z"
    assert (entry["ttft_ms"], entry["duration_ms"], entry["gateway_ms"]) == (50.0, 1050.0, 2.0)
    assert (entry["token"], entry["status"], entry["prompt_tokens"], entry["completion_tokens"]) == ("alice", 200,
                                                                                                     12, 11)
    limited = json.loads(access_log.line(LIMITED))
    assert limited["limit"] == "rpm"
    assert limited["ttft_ms"] is None
    assert access_log.iso_time(1.9996) == "1970-01-01T00:00:02.000Z"


def test_the_access_log_writes_one_line_per_request_and_can_be_turned_off() -> None:
    out = io.StringIO()
    sink = Fanout(NoMetrics(), AccessLog(out))
    sink.finished(OK)
    sink.finished(LIMITED)
    sink.store_failure("reserve")
    lines = out.getvalue().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == ["r1", "r1"]
    assert isinstance(build_metrics(GatewaySettings(access_log=False)), ServeMetrics)
    assert isinstance(build_metrics(GatewaySettings(metrics=False)), AccessLog)
    assert type(build_metrics(GatewaySettings(metrics=False, access_log=False))) is NoMetrics
    on = build_metrics(GatewaySettings())
    assert isinstance(on, Fanout)
    assert any(isinstance(s, AccessLog) for s in on.sinks)


def test_every_store_operation_that_can_fail_has_its_series_from_the_start() -> None:
    """The store-failure counter starts at 0 for each operation (so rate() sees a short outage's first
    failures); the operations are those the code reports, found in its source."""
    import re
    from pathlib import Path

    from deployments.gateway_metrics import STORE_OPERATIONS

    root = Path(__file__).resolve().parents[2]
    sources = [*root.joinpath("arks_ray/gateway").glob("*.py"), *root.joinpath("deployments").glob("*.py")]
    reported = {op for path in sources
                for op in re.findall(r"(?:on_store_failure|on_failure|store_failure)\(\"(\w+)\"\)", path.read_text())}
    assert reported
    assert reported <= set(STORE_OPERATIONS)

    class Metric:
        def __init__(self, name: str, *_: Any, **__: Any) -> None:
            self.name, self.records = name, []

        def _record(self, value: float, tags: dict[str, str] | None = None) -> None:
            self.records.append((value, tags))

    fake = types.SimpleNamespace(Counter=Metric, Gauge=Metric, Histogram=Metric)
    metrics = ServeMetrics(metrics_module=fake)
    assert metrics._store.records == [(0, {"operation": op}) for op in STORE_OPERATIONS]
