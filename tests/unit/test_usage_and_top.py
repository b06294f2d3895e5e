"""``arks-ray usage`` (usage against limits from the store) and ``arks-ray top`` (rates from two scrapes).

``usage`` runs on the in-memory store here and on a real redis-server in the integration test below,
after the same reservations the gateway makes. ``top`` is driven with exposition text in the exact
shape Ray's metrics agent exports (names with the ``ray_`` prefix, ``_total`` counters, Ray's labels).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arks_ray.api.gateway import GatewayConfig, Grant, Limit, Quota, QuotaBudget, Token
from arks_ray.cli import app
from arks_ray.gateway.limits import Usage, counters_for
from arks_ray.gateway.usage import format_usage, quota_usage, token_usage
from arks_ray.local import top
from arks_ray.stores.memory import MemoryStore
from tests.support.redis_server import RedisServer

NOW = 1_790_000_000.0
QUOTA = Quota(name="small", budgets=(QuotaBudget(type="total", value=300),))
ALICE = Token(name="alice", digest="a" * 64, grants=(
    Grant(endpoint="tiny", rate_limits=(Limit(type="rpm", value=3), Limit(type="tpm", value=1000),
                                        Limit(type="concurrency", value=2)), quota="small"),))
BOB = Token(name="bob", digest="b" * 64, grants=(Grant(endpoint="tiny"),))
CONFIG = GatewayConfig(namespace="team-a", tokens=(ALICE, BOB), quotas=(QUOTA,))


async def _spend(store: object, requests: int, tokens_each: int) -> None:
    """What the gateway does per request: reserve every counter (here with the actual amounts)."""
    for i in range(requests):
        counters = counters_for(namespace="team-a", token=ALICE, grant=ALICE.grants[0], quota=QUOTA, pricing=None,
                                estimate=Usage(tokens_each, 0), now=NOW)
        decision = await store.reserve([c for c in counters if c.kind != "lease"], f"r{i}", int(NOW * 1000))
        assert decision.admitted


async def _report(store: object) -> str:
    limits = await token_usage(store, CONFIG, NOW + 1)  # type: ignore[arg-type]
    quotas = await quota_usage(store, CONFIG, NOW + 1)  # type: ignore[arg-type]
    return format_usage("team-a", limits, quotas, {"small": "lifetime"})


def test_usage_reads_windows_and_quotas_without_spending() -> None:
    store = MemoryStore()
    asyncio.run(_spend(store, 2, 40))
    limits = asyncio.run(token_usage(store, CONFIG, NOW + 1))
    by = {(u.token, u.limit): u for u in limits}
    assert (by["alice", "rpm"].used, by["alice", "rpm"].value) == (2, 3)
    assert by["alice", "tpm"].used == 80
    assert by["alice", "concurrency"].used is None
    assert by["bob", ""].used is None
    again = asyncio.run(token_usage(store, CONFIG, NOW + 1))
    assert [u.used for u in again] == [u.used for u in limits]  # reading twice spends nothing
    quotas = asyncio.run(quota_usage(store, CONFIG, NOW + 1))
    assert [(q.quota, q.type, q.used, q.limit) for q in quotas] == [("small", "total", 80, 300)]
    text = asyncio.run(_report(store))
    assert "alice  tiny      rpm          2/3" in text
    assert "small  total  lifetime  80/300      26.7%" in text
    assert "bob    tiny      -            no rate limits" in text


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.mark.integration
def test_usage_command_on_a_real_redis(redis: RedisServer, tmp_path: Path) -> None:
    from arks_ray.stores.redis import RedisStore

    manifest = tmp_path / "arks.yaml"
    manifest.write_text("""
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: tiny, namespace: team-a}
spec: {defaultWeight: 1}
---
apiVersion: arks.ai/v1
kind: ArksQuota
metadata: {name: small, namespace: team-a}
spec: {quotas: [{type: total, value: 300}]}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: alice, namespace: team-a}
spec:
  token: sk-alice-secret
  qos: [{arksEndpoint: {name: tiny}, rateLimits: [{type: rpm, value: 3}], quota: {name: small}}]
""")

    async def spend() -> None:
        store = RedisStore(redis.url)
        grant = Grant(endpoint="tiny", rate_limits=(Limit(type="rpm", value=3),), quota="small")
        now = time.time()
        try:
            counters = counters_for(namespace="team-a", token=ALICE, grant=grant, quota=QUOTA, pricing=None,
                                    estimate=Usage(50, 0), now=now)
            assert (await store.reserve(counters, "r1", int(now * 1000))).admitted
        finally:
            await store.close()

    asyncio.run(spend())
    result = CliRunner().invoke(app, ["usage", "-f", str(manifest), "--redis-url", redis.url])
    assert result.exit_code == 0, result.output
    assert "namespace team-a" in result.output
    assert "1/3" in result.output
    assert "50/300" in result.output
    assert "sk-alice-secret" not in result.output
    redis.stop()
    failed = CliRunner().invoke(app, ["usage", "-f", str(manifest), "--redis-url", redis.url])
    assert failed.exit_code == 1
    assert "cannot read the store" in failed.output


RAY_LABELS = 'Component="core_worker",SessionName="s",WorkerId="w1",application="gateway",deployment="ArksGateway"'


def _exposition(requests: float, errors: float, refused: float, tokens: float, buckets: dict[str, float]) -> str:
    t = f'namespace="team-a",endpoint="tiny",backend="tiny",token="alice",{RAY_LABELS}'
    lines = [
        "# HELP ray_arks_gateway_requests_total Finished requests.", "# TYPE ray_arks_gateway_requests_total counter",
        f'ray_arks_gateway_requests_total{{{t},outcome="ok",code="200"}} {requests}',
        f'ray_arks_gateway_requests_total{{{t},outcome="backend_error",code="502"}} {errors}',
        "# HELP ray_arks_gateway_refused_total Refused.", "# TYPE ray_arks_gateway_refused_total counter",
        f'ray_arks_gateway_refused_total{{{t},reason="rpm"}} {refused}',
        "# HELP ray_arks_gateway_tokens_total Tokens.", "# TYPE ray_arks_gateway_tokens_total counter",
        f'ray_arks_gateway_tokens_total{{{t},type="completion"}} {tokens}',
        "# HELP ray_arks_gateway_ttft_seconds TTFT.", "# TYPE ray_arks_gateway_ttft_seconds histogram",
        *(f'ray_arks_gateway_ttft_seconds_bucket{{{t},le="{le}"}} {v}' for le, v in buckets.items()),
        f'ray_arks_gateway_ttft_seconds_count{{{t}}} {buckets["+Inf"]}',
        f'ray_arks_gateway_ttft_seconds_sum{{{t}}} 1.0',
        "# HELP ray_arks_gateway_backend_effective_weight W.", "# TYPE ray_arks_gateway_backend_effective_weight gauge",
        f'ray_arks_gateway_backend_effective_weight{{endpoint="tiny",backend="tiny",{RAY_LABELS}}} 3.0',
        f'ray_arks_gateway_backend_effective_weight{{endpoint="tiny",backend="http://down",{RAY_LABELS}}} 0.0',
        "# HELP ray_arks_gateway_backend_health H.", "# TYPE ray_arks_gateway_backend_health gauge",
        f'ray_arks_gateway_backend_health{{endpoint="tiny",backend="tiny",{RAY_LABELS}}} 1.0',
        f'ray_arks_gateway_backend_health{{endpoint="tiny",backend="http://down",{RAY_LABELS}}} 0.0',
        "# HELP ray_serve_num_http_requests_total Other.", "# TYPE ray_serve_num_http_requests_total counter",
        'ray_serve_num_http_requests_total{route="/"} 99',
    ]
    return "\n".join(lines) + "\n"


def test_top_turns_two_scrapes_into_rates_percentiles_and_backend_state() -> None:
    before = top.snapshot(_exposition(10, 0, 1, 100, {"0.05": 5, "0.1": 10, "0.25": 10, "+Inf": 10}))
    after = top.snapshot(_exposition(30, 2, 5, 500, {"0.05": 5, "0.1": 20, "0.25": 30, "+Inf": 30}))
    assert all(name.startswith("ray_arks_gateway_") for name, _ in after)
    (row,) = top.endpoint_rows(before, after, 2.0)
    assert (row.req_s, row.err_s, row.refused_s, row.tok_s) == (11.0, 1.0, 2.0, 200.0)
    # 20 new observations: 10 in (0.05, 0.1], 10 in (0.1, 0.25]: the median is at 0.1, p95 at 0.2425.
    assert row.ttft_p50 == pytest.approx(0.1)
    assert row.ttft_p95 == pytest.approx(0.1 + 0.15 * 0.9)
    assert [(b.name, b.weight, b.health) for b in row.backends] == [("http://down", 0.0, 0.0), ("tiny", 3.0, 1.0)]
    screen = top.render([row], 2.0)
    assert "tiny" in screen
    assert "OUT" in screen
    assert "(no gateway metrics yet" in top.render([], 2.0)


def test_quantile_matches_prometheus_interpolation() -> None:
    assert top.quantile(0.5, {0.1: 0.0, 1.0: 10.0, float("inf"): 10.0}) == pytest.approx(0.55)
    assert top.quantile(0.99, {0.1: 0.0, 1.0: 0.0, float("inf"): 4.0}) == 1.0  # all above the last bound
    assert top.quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
