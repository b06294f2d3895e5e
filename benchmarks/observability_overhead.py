"""Gateway throughput with per-tenant metrics and the access log on against off, same run; series counts.

Two gateways (``Pipeline`` + ``make_api`` on uvicorn, loopback) in one process, identical but for their
``Metrics``: one records to ``build_metrics`` (``ServeMetrics`` + ``AccessLog``, the log written to a
real file), the other to ``NoMetrics``. Both sit in front of a mock engine that answers at once (16
chunks per stream), so the gateway is all that is measured; limits are off (no store calls). The
process joins a local Ray (``ray.init``) first, so metrics take Ray's real recording path and are
exported by Ray's metrics agent. Rounds alternate between the two (ABBA), whole and streamed answers.

Then the series the gateway exported, scraped from Ray's metrics agent, are counted per token and per
endpoint after ``--tenants`` tokens sent traffic to ``--endpoints`` endpoints.
Start Ray-using runs under the machine's Ray lock. Writes JSON and a PNG.

    flock /tmp/arks-ray.lock .venv/bin/python benchmarks/observability_overhead.py \
        --out benchmarks/results/observability_overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from load import closed_loop, serve  # noqa: E402 - found through the path set just above

BODY = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}}
CHUNK = 'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
        '"delta":{"content":"w "},"finish_reason":null}]}\n\n'


class MockEngine:
    """Answers every request at once: a whole response, or 16 chunks, [DONE] and the usage."""

    def open(self, backend: Any, request: Any) -> Any:
        return _Stream(bool(request.body.get("stream")))

    def forget(self, backend: Any) -> None: ...


class _Stream:
    def __init__(self, stream: bool) -> None:
        from arks_ray.engines.protocol import Answer, Chunk, Final

        self.items: list[Any] = [Chunk(CHUNK)] * 16 + [Chunk("data: [DONE]\n\n"), Final(BODY["usage"], 16)] \
            if stream else [Answer(BODY)]

    async def _gen(self) -> Any:
        for item in self.items:
            yield item

    def __aiter__(self) -> Any:
        return self._gen()

    def cancel(self) -> None: ...


def config(tenants: int, endpoints: int, keys: Any) -> dict[str, Any]:
    from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Token

    eps = tuple(Endpoint(name=f"m{e}", backends=(Backend(kind="app", name=f"app-m{e}", weight=1),))
                for e in range(endpoints))
    tokens = tuple(Token(name=f"tenant-{t}", digest=keys.digest(f"sk-bench-{t}"),
                         grants=tuple(Grant(endpoint=f"m{e}") for e in range(endpoints))) for t in range(tenants))
    return GatewayConfig(namespace="bench", endpoints=eps, tokens=tokens).model_dump(mode="json")


async def load(port: int, n: int, concurrency: int, stream: bool, tenants: int, endpoints: int) -> dict[str, float]:
    def request(i: int) -> tuple[dict[str, Any], dict[str, str]]:
        return ({"model": f"m{i % endpoints}", "messages": [{"role": "user", "content": "hello"}],
                 "max_tokens": 16, "stream": stream}, {"Authorization": f"Bearer sk-bench-{i % tenants}"})

    return await closed_loop(port, n, concurrency, request)


def series_counts(wait_s: float) -> dict[str, Any]:
    """The gateway's series in Ray's metrics agent, per token and per endpoint (polled until stable)."""
    import ray

    from arks_ray.local import top

    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]
    deadline = time.monotonic() + wait_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        keys = list(top.snapshot(top.scrape(urls)))
        per_token = Counter(dict(labels).get("token") for _, labels in keys)
        per_endpoint = Counter(dict(labels).get("endpoint") for _, labels in keys)
        now = {"total": len(keys), "per_token": {k: v for k, v in per_token.items() if k},
               "per_endpoint": {k: v for k, v in per_endpoint.items() if k}}
        if now == last and now["total"]:
            return now
        last = now
        time.sleep(5)
    return last


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    modes = ["whole", "stream"]
    for i, side in enumerate(("off", "on")):
        values = [summary["median_rps"][side][m] for m in modes]
        a.bar([x + 0.38 * i for x in range(len(modes))], values, width=0.38,
              label=f"metrics + access log {side}")
    a.set_xticks([x + 0.19 for x in range(len(modes))], modes)
    a.set_ylabel("requests/s (median of rounds)")
    a.set_title("gateway throughput, mock engine")
    a.legend()
    per_token = summary["series"]["per_token"]
    names = sorted(per_token)
    b.bar(names, [per_token[n] for n in names])
    b.set_title(f"series per token ({summary['endpoints']} endpoints)")
    b.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--endpoints", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/observability_overhead")
    ap.add_argument("--without-ray", action="store_true",
                    help="A quick check without Ray (its metrics calls then record nowhere; no series counts).")
    args = ap.parse_args()

    import ray

    from arks_ray.api.digests import TokenKeys
    from arks_ray.gateway.settings import GatewaySettings
    from deployments.gateway_metrics import AccessLog, Fanout, NoMetrics, ServeMetrics
    from deployments.http_api import make_api
    from deployments.pipeline import Pipeline

    if not args.without_ray:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        keys = TokenKeys.from_text("bench-key-" + "k" * 32)
        settings = GatewaySettings(seed=0, health_check_interval_s=0)
        log_file = Path(tempfile.mkdtemp()) / "access.log"
        sides: dict[str, Any] = {
            "on": Fanout(ServeMetrics(settings.metrics_max_token_names), AccessLog(log_file.open("w"))),
            "off": NoMetrics()}
        ports = {}
        for name, metrics in sides.items():
            pipeline = Pipeline(settings, MockEngine(), metrics=metrics, keys=keys)  # type: ignore[arg-type]
            pipeline.reconfigure(config(args.tenants, args.endpoints, keys))
            ports[name], _ = serve(make_api(pipeline))
        rounds: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for name in ("on", "off"):  # warm-up
            for stream in (False, True):
                asyncio.run(load(ports[name], 50, args.concurrency, stream, args.tenants, args.endpoints))
        for r in range(args.rounds):
            for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                out = {("stream" if s else "whole"): asyncio.run(load(
                    ports[name], args.requests, args.concurrency, s, args.tenants, args.endpoints))
                    for s in (False, True)}
                rounds[name].append(out)
                print(f"round {r} {name:>3}: whole {out['whole']['rps']:6.0f} req/s, "
                      f"stream {out['stream']['rps']:6.0f} req/s", flush=True)
        lines = sum(1 for _ in log_file.open())
        median = {k: {m: statistics.median(x[m]["rps"] for x in v) for m in ("whole", "stream")}
                  for k, v in rounds.items()}
        summary = {
            "what": "gateway (Pipeline + make_api, uvicorn) over a mock engine, metrics+access log on vs off",
            "requests_per_phase": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
            "tenants": args.tenants, "endpoints": args.endpoints, "median_rps": median,
            "ratio_on_off": {m: median["on"][m] / median["off"][m] for m in ("whole", "stream")},
            "access_log_lines": lines, "with_ray": not args.without_ray,
            "series": series_counts(60) if not args.without_ray else {"per_token": {}, "per_endpoint": {}},
            "rounds_detail": rounds}
        for m in ("whole", "stream"):
            print(f"{m}: off {median['off'][m]:.0f} req/s, on {median['on'][m]:.0f} req/s, "
                  f"on/off {summary['ratio_on_off'][m]:.3f}")
        print(f"series: {summary['series']}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        plot(summary, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
