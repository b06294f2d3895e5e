"""The gateway alone, before and after a change, same run, same mock backend: requests/s and Redis round trips.

Each side is a checkout of the project (``--before`` a git revision, checked out into a worktree; the
working tree is "after"). A side runs in its own process: a uvicorn server on loopback serving that
checkout's gateway (auth, a tpm rate limit, a concurrency limit and a quota, on a real redis-server),
in front of an in-process mock engine that answers at once, so the gateway is all that is measured.
Rounds alternate between the sides. Writes JSON and a PNG.

    .venv/bin/python benchmarks/gateway_redesign.py --before f905f03 --out benchmarks/results/gateway_redesign
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --- one side (runs inside the checkout being measured) ------------------------------------------------

def _side_app(redis_url: str) -> tuple[Any, Any]:
    """The checkout's gateway app and a counter of Redis calls, whatever its API generation."""
    import hashlib

    from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Limit, Quota, QuotaBudget, Token
    from arks_ray.gateway.settings import GatewaySettings
    from arks_ray.stores.redis import RedisStore

    store = RedisStore(redis_url)
    calls = {"n": 0}
    for name in ("reserve", "settle", "renew"):
        if hasattr(store, name):
            orig = getattr(store, name)

            async def counted(*a: Any, _orig: Any = orig, **kw: Any) -> Any:
                calls["n"] += 1
                return await _orig(*a, **kw)

            setattr(store, name, counted)
    settings = GatewaySettings(seed=0, health_check_interval_s=0)
    limits = (Limit(type="tpm", value=10**9), Limit(type="concurrency", value=10**6))
    endpoint = Endpoint(name="m", backends=(Backend(kind="app", name="app-m", weight=1),))
    quota = Quota(name="q", budgets=(QuotaBudget(type="total", value=10**12),))
    try:
        from arks_ray.api.digests import TokenKeys

        keys = TokenKeys.from_text("bench-key-" + "k" * 32)
        digest = keys.digest("sk-bench")
    except ImportError:
        keys, digest = None, hashlib.sha256(b"sk-bench").hexdigest()
    cfg = GatewayConfig(endpoints=(endpoint,), quotas=(quota,), tokens=(Token(
        name="bench", digest=digest, grants=(Grant(endpoint="m", rate_limits=limits, quota="q"),)),))
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
    chunk = 'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
            '"delta":{"content":"w "},"finish_reason":null}]}\n\n'
    try:
        from arks_ray.engines.protocol import Answer, Chunk, Final
        from deployments.http_api import make_api
        from deployments.pipeline import Pipeline

        class New:
            def open(self, backend: Any, request: Any) -> Any:
                return _NewStream(request, Answer, Chunk, Final, body, chunk)

            def forget(self, backend: Any) -> None: ...

        pipeline = Pipeline(settings, New(), store=store, keys=keys)  # type: ignore[arg-type]
        pipeline.reconfigure(cfg.model_dump(mode="json"))
        return make_api(pipeline), calls
    except ImportError:
        from deployments.gateway import Gateway
        from deployments.gateway import make_api as old_api

        class Old:
            def open(self, backend: Any, kind: str, b: dict[str, Any], client_usage: bool,
                     session: str | None = None) -> Any:
                return _old_stream(b, body, chunk)

        gateway = Gateway(settings, Old(), store=store)
        gateway.reconfigure(cfg.model_dump(mode="json"))
        return old_api(gateway), calls


class _NewStream:
    def __init__(self, request: Any, answer: Any, chunk_t: Any, final: Any, body: Any, chunk: str) -> None:
        self.items = [chunk_t(chunk)] * 16 + [chunk_t("data: [DONE]\n\n"), final(body["usage"], 16)] \
            if request.body.get("stream") else [answer(body)]

    async def _gen(self) -> Any:
        for item in self.items:
            yield item

    def __aiter__(self) -> Any:
        return self._gen()

    def cancel(self) -> None: ...


async def _old_stream(b: dict[str, Any], body: Any, chunk: str) -> Any:
    if b.get("stream"):
        for _ in range(16):
            yield chunk
        yield "data: [DONE]\n\n"
        yield {"arks": "usage", "usage": body["usage"], "completion_tokens": 16}
    else:
        yield {"arks": "response", "status": 200, "body": body}


async def _load(port: int, n: int, concurrency: int, stream: bool) -> dict[str, float]:
    from load import closed_loop

    payload = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": stream}
    return await closed_loop(port, n, concurrency, lambda _: (payload, {"Authorization": "Bearer sk-bench"}))


def run_side(redis_url: str, n: int, concurrency: int) -> None:
    from load import serve

    app, calls = _side_app(redis_url)
    port, server = serve(app)
    out: dict[str, Any] = {}
    for stream in (False, True):
        asyncio.run(_load(port, 20, concurrency, stream))  # warm up
        before = calls["n"]
        out["stream" if stream else "whole"] = {**asyncio.run(_load(port, n, concurrency, stream)),
                                                "redis_calls_per_request": (calls["n"] - before) / n}
    time.sleep(0.5)
    server.should_exit = True
    print(json.dumps(out))


# --- the driver ------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="f905f03", help="git revision of the 'before' side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/gateway_redesign")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        run_side(args.side, args.requests, args.concurrency)
        return
    sys.path.insert(0, str(ROOT))
    from tests.support.redis_server import RedisServer

    redis = RedisServer().start()
    before_dir = Path(tempfile.mkdtemp(prefix="arks-before-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_dir), args.before],
                   check=True, capture_output=True)
    sides = {"before": before_dir, "after": ROOT}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    try:
        for r in range(args.rounds):
            for name, tree in sides.items():
                env = {**os.environ, "PYTHONPATH": str(tree)}
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", redis.url,
                                       "--requests", str(args.requests), "--concurrency", str(args.concurrency)],
                                      cwd=tree, env=env, capture_output=True, text=True, check=True)
                results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {r} {name}: {results[name][-1]}", flush=True)
    finally:
        redis.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_dir)], check=False)
    summary: dict[str, Any] = {"before": args.before, "requests": args.requests, "concurrency": args.concurrency,
                               "rounds": results}
    for mode in ("whole", "stream"):
        med = {k: statistics.median(x[mode]["rps"] for x in v) for k, v in results.items()}
        summary[f"{mode}_rps_median"] = med
        summary[f"{mode}_after_over_before"] = round(med["after"] / med["before"], 3)
        summary[f"{mode}_redis_calls_per_request"] = {k: v[-1][mode]["redis_calls_per_request"]
                                                     for k, v in results.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    _plot(summary, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    modes = ["whole", "stream"]
    for i, side in enumerate(("before", "after")):
        ax.bar([m + (0.38 * i) for m in range(2)], [summary[f"{m}_rps_median"][side] for m in modes], 0.38,
               label=f"{side} ({summary['before'] if side == 'before' else 'working tree'})")
    ax.set_xticks([0.19, 1.19], ["non-streaming", "streaming (16 chunks)"])
    ax.set_ylabel("requests/s (median of rounds)")
    ax.set_title(f"gateway alone, Redis governance, c={summary['concurrency']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
