"""``arks-ray top``: live per-endpoint traffic, latency and backend weights, in the terminal.

Called by the CLI. It reads the gateway's metrics straight from Ray's metrics agents (the targets Ray
lists in its Prometheus service-discovery file, or URLs given), so it needs no Prometheus: two scrapes
``interval`` apart give rates and latency percentiles over that interval. Parsing, differencing and the
table are pure functions (``snapshot``, ``endpoint_rows``, ``render``); ``scrape`` is the only I/O.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

SD_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")  # noqa: S108 - where Ray writes it
PREFIX = "ray_arks_gateway_"
Key = tuple[str, frozenset[tuple[str, str]]]


def discover(sd_file: Path = SD_FILE) -> list[str]:
    """Metrics URLs of the local Ray's agents, from Ray's service-discovery file."""
    groups = json.loads(sd_file.read_text())
    return [f"http://{t}/metrics" for g in groups for t in g.get("targets", [])]


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> str:
    """The exposition text of every reachable URL, concatenated (unreachable ones are skipped)."""
    texts = []
    for url in urls:
        try:
            r = httpx.get(url, timeout=timeout_s)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            texts.append(r.text)
    return "\n".join(texts)


def snapshot(text: str) -> dict[Key, float]:
    """The gateway's samples in exposition text, keyed by sample name and labels."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(PREFIX):
                key = (s.name, frozenset(s.labels.items()))
                out[key] = out.get(key, 0.0) + s.value
    return out


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts (upper bound -> count)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = upper, count
    return lower


@dataclass
class BackendRow:
    name: str
    weight: float
    health: float
    in_flight: float


@dataclass
class EndpointRow:
    endpoint: str
    req_s: float = 0.0
    err_s: float = 0.0
    refused_s: float = 0.0
    tok_s: float = 0.0
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    e2e_p95: float | None = None
    backends: list[BackendRow] = field(default_factory=list)


def _delta(prev: Mapping[Key, float], cur: Mapping[Key, float], name: str) -> Iterable[tuple[dict[str, str], float]]:
    for (sample, labels), value in cur.items():
        if sample == name:
            yield dict(labels), max(0.0, value - prev.get((sample, labels), 0.0))


def endpoint_rows(prev: Mapping[Key, float], cur: Mapping[Key, float], dt_s: float) -> list[EndpointRow]:
    """Per endpoint: rates and latency percentiles between two snapshots, and each backend's gauges."""
    rows: dict[str, EndpointRow] = {}

    def row(labels: Mapping[str, str]) -> EndpointRow:
        name = labels.get("endpoint", "")
        return rows.setdefault(name, EndpointRow(name))

    for labels, d in _delta(prev, cur, PREFIX + "requests_total"):
        r = row(labels)
        r.req_s += d / dt_s
        if labels.get("outcome") in ("backend_error", "unavailable"):
            r.err_s += d / dt_s
    for labels, d in _delta(prev, cur, PREFIX + "refused_total"):
        row(labels).refused_s += d / dt_s
    for labels, d in _delta(prev, cur, PREFIX + "tokens_total"):
        row(labels).tok_s += d / dt_s
    for metric, fields in (("ttft_seconds", (("ttft_p50", 0.5), ("ttft_p95", 0.95))),
                           ("request_duration_seconds", (("e2e_p95", 0.95),))):
        buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for labels, d in _delta(prev, cur, f"{PREFIX}{metric}_bucket"):
            buckets[labels.get("endpoint", "")][float(labels["le"])] += d
        for endpoint, by_le in buckets.items():
            for attr, q in fields:
                setattr(row({"endpoint": endpoint}), attr, quantile(q, by_le))
    gauges: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (sample, frozen), value in cur.items():
        if sample.startswith(PREFIX + "backend_"):
            lab = dict(frozen)
            gauges[(lab.get("endpoint", ""), lab.get("backend", ""))][sample.removeprefix(PREFIX + "backend_")].append(
                value)
    for (endpoint, backend), g in sorted(gauges.items()):
        weights = g.get("effective_weight", [0.0])
        row({"endpoint": endpoint}).backends.append(BackendRow(
            backend, sum(weights) / len(weights), min(g.get("health", [1.0])), sum(g.get("in_flight", [0.0]))))
    return sorted(rows.values(), key=lambda r: r.endpoint)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


HEALTH = {1.0: "up", 0.5: "probing", 0.0: "OUT"}


def render(rows: list[EndpointRow], interval_s: float) -> str:
    """The screen: one line per endpoint, then its backends indented."""
    lines = [f"arks-ray top: gateway traffic over the last {interval_s:g}s",
             f"{'ENDPOINT':<24}{'REQ/S':>8}{'ERR/S':>8}{'429/S':>8}{'TOK/S':>9}{'TTFT50':>8}{'TTFT95':>8}{'E2E95':>8}"
             "  (ms)"]
    if not rows:
        lines.append("(no gateway metrics yet: is the stack up and has it served a request?)")
    for r in rows:
        lines.append(f"{r.endpoint or '-':<24}{r.req_s:8.1f}{r.err_s:8.1f}{r.refused_s:8.1f}{r.tok_s:9.1f}"
                     f"{_ms(r.ttft_p50):>8}{_ms(r.ttft_p95):>8}{_ms(r.e2e_p95):>8}")
        for b in r.backends:
            health = HEALTH.get(b.health, f"{b.health:g}")
            lines.append(f"    {b.name[:40]:<40} weight {b.weight:6.2f}  {health:<8} in flight {b.in_flight:.0f}")
    return "\n".join(lines)
