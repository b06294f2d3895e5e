"""Observability end to end: a real Prometheus scrapes the shared stack under load and answers every query.

On the shared stack (``arks_stack``) this module adds a second app, ``tiny-slo`` (own endpoint, an
autoscaling spec with a 1 ms TTFT target that it always misses), prices on ``tiny``, a static backend
that answers health checks but fails every request before its first byte (retries), one that is down
(out of rotation), and tokens with an rpm limit and a small quota. Debian's ``prometheus`` discovers
Ray's metrics agents from Ray's service-discovery file and evaluates the chart's rules. While load runs
(and Redis is stopped for a few seconds, for store failures), it checks:

- every PromQL expression of every dashboard and of every rule (recording and alerting) returns at least
  one non-NaN sample: the alerts' conditions are all true here, by construction of the load;
- the access log: one JSON line per request in the gateway replicas' stdout, with no token value and no
  prompt text;
- series per tenant and per endpoint (printed; bounded by the label design).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.prometheus import PrometheusServer
from tests.support.redis_server import free_port
from tests.support.stack import TINY_ENGINE, SharedStack
from tests.unit.test_monitoring_chart import dashboard_exprs, rule_exprs, rules

pytestmark = pytest.mark.e2e

PROMPT = "observability probe: tell me a story"
TOKENS = ("obs-a", "obs-b", "obs-rpm", "obs-quota")
HISTOGRAM_SERIES = 17 + 15 + 17 + 14  # TTFT, e2e: 14 buckets; TPOT 12; overhead 11; each + Inf, sum, count


def objects(flaky_url: str, dead_url: str) -> str:
    def token(name: str, endpoints: tuple[str, ...], extra: str = "") -> str:
        qos = "".join(f"\n    - arksEndpoint: {{name: {e}}}{extra}" for e in endpoints)
        return f"""---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: {name}, namespace: default}}
spec:
  token: sk-{name}-value
  qos:{qos}
"""
    return f"""
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: tiny-slo, namespace: default}}
spec:
  servedModelName: tiny-slo
  autoscaling: {{minReplicas: 1, maxReplicas: 1, slo: {{ttftMs: 1}}}}
{TINY_ENGINE}---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: tiny, namespace: default}}
spec:
  defaultWeight: 1
  pricing: {{promptPerMillion: 1000000, completionPerMillion: 2000000}}
  routeConfigs:
    - {{kind: ArksApplication, name: tiny, weight: 4}}
    - {{name: "{flaky_url}", weight: 1}}
    - {{name: "{dead_url}", weight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: tiny-slo, namespace: default}}
spec:
  defaultWeight: 1
---
apiVersion: arks.ai/v1
kind: ArksQuota
metadata: {{name: obs-small, namespace: default}}
spec:
  quotas: [{{type: total, value: 300}}]
""" + token("obs-a", ("tiny", "tiny-slo")) + token("obs-b", ("tiny",)) \
        + token("obs-rpm", ("tiny",), "\n      rateLimits: [{type: rpm, value: 3}]") \
        + token("obs-quota", ("tiny",), "\n      quota: {name: obs-small}")


class _Flaky(BaseHTTPRequestHandler):
    """Up for health checks (GET), failing every request (POST) with a 500 before any byte of an answer."""

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": []})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._send(500, {"error": {"message": "flaky backend", "type": "server_error"}})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def flaky() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def stack(arks_stack: SharedStack, flaky: str) -> Iterator[SharedStack]:
    with arks_stack.extended(objects(flaky, f"http://127.0.0.1:{free_port()}"), label="observability"):
        yield arks_stack


@pytest.fixture(scope="module")
def prometheus(stack: SharedStack) -> Iterator[PrometheusServer]:
    server = PrometheusServer(rules=rules()).start()
    yield server
    server.stop()


async def _one(client: httpx.AsyncClient, token: str, model: str, stream: bool, max_tokens: int) -> int:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream,
                            "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer sk-{token}-value"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        async for _ in r.aiter_bytes():
            pass
        return r.status_code


class Load:
    """Traffic from every tenant in a background thread, until stopped; statuses counted per token."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: dict[str, dict[int, int]] = {t: {} for t in TOKENS}
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                calls = [("obs-a", "tiny", True, 8), ("obs-a", "tiny-slo", True, 8), ("obs-a", "tiny", False, 4),
                         ("obs-b", "tiny", True, 8), ("obs-rpm", "tiny", False, 2), ("obs-rpm", "tiny", False, 2),
                         ("obs-quota", "tiny", False, 4)]
                results = await asyncio.gather(*(_one(client, *c) for c in calls), return_exceptions=True)
                for (token, *_), status in zip(calls, results, strict=True):
                    code = status if isinstance(status, int) else -1
                    self.statuses[token][code] = self.statuses[token].get(code, 0) + 1
                await asyncio.sleep(0.3)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=180)


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(s["value"][1])) for s in result)


def _missing(prom: PrometheusServer) -> list[str]:
    exprs = [(f"{d} / {title}", e) for d, title, e in dashboard_exprs()] + [(f"rule {n}", e) for n, e in rule_exprs()]
    return [f"{where}: {e}" for where, e in exprs if not _has_data(prom.query(e))]


@pytest.fixture(scope="module")
def loaded(stack: SharedStack, prometheus: PrometheusServer) -> Iterator[dict[str, Any]]:
    """Load runs; Redis is stopped for a few seconds early on; every expression is polled until it has data."""
    assert stack.redis is not None
    with Load(stack.url) as load:
        time.sleep(10)
        stack.redis.stop()  # store failures: failOpen admits uncounted, each failure counted
        time.sleep(6)
        stack.redis.start()
        deadline = time.monotonic() + 240
        missing = _missing(prometheus)
        while missing and time.monotonic() < deadline:
            time.sleep(5)
            missing = _missing(prometheus)
        yield {"missing": missing, "statuses": load.statuses, "prometheus": prometheus}


def test_every_dashboard_and_rule_expression_returns_data(loaded: dict[str, Any]) -> None:
    prom: PrometheusServer = loaded["prometheus"]
    assert prom.targets_up() >= 1
    statuses = loaded["statuses"]
    assert statuses["obs-rpm"].get(429), statuses
    assert statuses["obs-quota"].get(429), statuses
    exported = prom.query('count by (__name__) ({__name__=~"ray_(arks|serve|vllm)_.*"})')
    names = [s["metric"]["__name__"] for s in exported]
    assert not loaded["missing"], f"no data for {loaded['missing']}; exported: {sorted(names)}"
    assert len(dashboard_exprs()) >= 30


def test_alerts_are_pending_or_firing_for_what_the_load_provoked(loaded: dict[str, Any]) -> None:
    prom: PrometheusServer = loaded["prometheus"]
    expected = {"ArksBackendSloBreach", "ArksBackendOutOfRotation", "ArksStoreFailures", "ArksQuotaNearlyUsed"}
    # A rule's expression can have data before Prometheus next evaluates the rule: ALERTS follows by then.
    deadline = time.monotonic() + 60
    alerts = {s["metric"]["alertname"] for s in prom.query("ALERTS")}
    while not alerts >= expected and time.monotonic() < deadline:
        time.sleep(3)
        alerts = {s["metric"]["alertname"] for s in prom.query("ALERTS")}
    assert alerts >= expected, alerts
    out = {s["metric"].get("backend") for s in prom.query('ALERTS{alertname="ArksBackendOutOfRotation"}')}
    assert all(b and b.startswith("http://127.0.0.1:") for b in out), out


def test_the_access_log_has_one_line_per_request_and_no_secret(loaded: dict[str, Any]) -> None:
    lines = []
    for path in Path("/tmp/ray/session_latest/logs").glob("worker-*.out"):
        for text in path.read_text(errors="replace").splitlines():
            if text.startswith("{") and '"request_id"' in text:
                lines.append(text)
    entries = [json.loads(x) for x in lines]
    mine = [e for e in entries if e["token"] in TOKENS]
    assert mine, f"no access log lines among {len(lines)}"
    for e in mine:
        assert e["namespace"] == "default"
        assert e["endpoint"] in ("tiny", "tiny-slo")
    assert {e["token"] for e in mine} == set(TOKENS)
    assert {e["outcome"] for e in mine} >= {"ok", "limited", "quota"}
    joined = "\n".join(lines)
    assert "-value" not in joined  # no token value (sk-<name>-value)
    assert PROMPT not in joined


def test_series_per_tenant_and_per_endpoint_stay_bounded(loaded: dict[str, Any]) -> None:
    prom: PrometheusServer = loaded["prometheus"]
    per_token = {s["metric"]["token"]: int(float(s["value"][1])) for s in prom.query(
        'count by (token) ({__name__=~"ray_arks_gateway_.*", token!=""})')}
    per_endpoint = {s["metric"]["endpoint"]: int(float(s["value"][1])) for s in prom.query(
        'count by (endpoint) ({__name__=~"ray_arks_gateway_.*", endpoint!=""})')}
    replicas = len(prom.query('count by (WorkerId) (ray_arks_gateway_requests_total)'))
    print(f"\nseries per token: {per_token}\nseries per endpoint: {per_endpoint}\ngateway replicas: {replicas}")
    assert set(TOKENS) <= set(per_token)
    # Per token: histograms and counters per (endpoint, backend) it reached, per replica; outcomes/codes few.
    backends_reached = 5  # tiny, tiny-slo, the flaky and dead static ones, none (refused)
    bound = (HISTOGRAM_SERIES + 2 + 1 + 8) * backends_reached * replicas
    assert max(per_token.values()) <= bound, (per_token, bound)


def test_top_and_usage_read_the_live_stack(stack: SharedStack, loaded: dict[str, Any]) -> None:
    from arks_ray.gateway.usage import quota_usage, token_usage
    from arks_ray.local import top
    from arks_ray.stores.redis import RedisStore

    urls = top.discover()
    first = top.snapshot(top.scrape(urls))
    time.sleep(12)  # Ray's agent exports about every 10 s
    rows = {r.endpoint: r for r in top.endpoint_rows(first, top.snapshot(top.scrape(urls)), 12)}
    assert rows["tiny"].req_s > 0, rows
    assert {b.name for b in rows["tiny"].backends} >= {"tiny"}
    print("\n" + top.render(list(rows.values()), 12))
    assert stack.redis is not None
    assert stack.plan is not None
    config, url = stack.plan.rendered.gateway, stack.redis.url

    async def read() -> tuple[Any, Any]:
        store = RedisStore(url)
        try:
            return await token_usage(store, config, time.time()), await quota_usage(store, config, time.time())
        finally:
            await store.close()

    limits, quotas = asyncio.run(read())
    rpm = next(u for u in limits if u.token == "obs-rpm" and u.limit == "rpm")
    assert rpm.value == 3
    assert rpm.used is not None
    assert 1 <= rpm.used <= 3
    (small,) = [q for q in quotas if q.quota == "obs-small"]
    assert small.used > 0.9 * small.limit
