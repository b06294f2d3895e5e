#!/usr/bin/env python
"""The arks-ray gateway against the LiteLLM proxy, both in front of the same fast mock OpenAI upstream.

One run on one machine:

1. a mock OpenAI server on loopback (``mock`` subcommand, its own process): chat completions answered at
   once, non-streaming (with usage) or streaming (``--tokens`` content events, a usage event, ``[DONE]``);
2. our gateway: ``arks-ray up`` with an ArksEndpoint whose only backend is the mock (``routeConfigs``) and a
   token with rpm, tpm and concurrency limits and a quota, counted on a real ``redis-server``;
3. the LiteLLM proxy (``--litellm BIN``, its own environment) on the same mock and the same Redis: with
   ``--database-url`` a virtual key with rpm/tpm/parallel limits and a budget (LiteLLM keeps keys in its
   Postgres database through Prisma); without one, its master key and per-model rpm/tpm limits;
4. for every cell (non-streaming and streaming x each ``--concurrency``), rounds interleave the targets
   (direct to the mock, arks, litellm), each round ``--seconds`` long; requests/s and latency p50/p99 per
   target, and the latency each proxy adds over the direct path in the same cell.

Run it under ``flock /tmp/arks-ray.lock`` (it starts Ray). Writes JSON and a PNG (when matplotlib is
installed) to ``--out``.

    .venv/bin/python benchmarks/gateway_vs_litellm.py --litellm /tmp/litellm-venv/bin/litellm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import httpx2 as httpx  # noqa: E402

from tests.support.redis_server import RedisServer, free_port  # noqa: E402

TOKEN = "sk-bench-gateway-local-only"  # local benchmark credentials, public on purpose
MASTER = "sk-litellm-master-local-only"
MODEL = "mock"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the mock


def mock_main(port: int, tokens: int) -> None:
    from aiohttp import web

    def chunk(i: int, text: str) -> bytes:
        return (b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"mock","choices":[{"index":0,'
                b'"delta":{"content":"' + text.encode() + b'"},"finish_reason":null}]}\n\n')

    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    whole = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "mock", "usage": usage,
                        "choices": [{"index": 0, "finish_reason": "length",
                                     "message": {"role": "assistant", "content": "tok " * tokens}}]}).encode()
    tail = (b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"mock","choices":[{"index":0,'
            b'"delta":{},"finish_reason":"length"}]}\n\n'
            b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"mock","choices":[],"usage":'
            + json.dumps(usage).encode() + b"}\n\ndata: [DONE]\n\n")

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=whole, content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(tokens):
            await resp.write(chunk(i, "tok "))
        await resp.write(tail)
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --------------------------------------------------------------------------------------------- targets


def arks_yaml(mock_url: str) -> str:
    return f"""
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: {MODEL}, namespace: default}}
spec:
  routeConfigs: [{{name: "{mock_url}", weight: 1}}]
---
apiVersion: arks.ai/v1
kind: ArksQuota
metadata: {{name: q, namespace: default}}
spec: {{quotas: [{{type: total, value: 100000000000}}]}}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: bench, namespace: default}}
spec:
  token: {TOKEN}
  qos:
    - arksEndpoint: {{name: {MODEL}}}
      rateLimits: [{{type: rpm, value: 100000000}}, {{type: tpm, value: 100000000000}},
                   {{type: concurrency, value: 100000}}]
      quota: {{name: q}}
"""


def litellm_config(mock_url: str, redis_port: int, database_url: str | None) -> str:
    general = {"master_key": MASTER, **({"database_url": database_url} if database_url else {})}
    limits = {} if database_url else {"rpm": 100000000, "tpm": 100000000000}
    return json.dumps({  # YAML is a superset of JSON
        "model_list": [{"model_name": MODEL, "litellm_params": {"model": "openai/mock", "api_base": mock_url,
                                                                "api_key": "sk-mock", **limits}}],
        "general_settings": general,
        "router_settings": {"redis_host": "127.0.0.1", "redis_port": redis_port},
        "litellm_settings": {"drop_params": True, "set_verbose": False, "json_logs": False},
    })


def wait_ok(url: str, headers: dict[str, str], timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url, headers=headers, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def litellm_key(base: str, database_url: str | None) -> str:
    if not database_url:
        return MASTER
    r = httpx.post(f"{base}/key/generate", headers={"Authorization": f"Bearer {MASTER}"}, timeout=60, json={
        "models": [MODEL], "rpm_limit": 100000000, "tpm_limit": 100000000000, "max_parallel_requests": 100000,
        "max_budget": 1000000.0, "budget_duration": "30d"})
    r.raise_for_status()
    return str(r.json()["key"])


# ------------------------------------------------------------------------------------------------ load


async def run_cell(url: str, key: str | None, stream: bool, concurrency: int, seconds: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": stream}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with client.stream("POST", url, json=body, headers=headers) as resp:
                        data = b"".join([c async for c in resp.aiter_raw()])
                    ok = resp.status_code == 200 and (b"[DONE]" in data if stream else b'"choices"' in data)
                except httpx.HTTPError as exc:
                    ok, data = False, repr(exc).encode()
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(f"{resp.status_code if 'resp' in dir() else '?'} {data[:160]!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "latencies": latencies, "errors": len(errors), "first_errors": errors[:2]}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [v for r in rounds for v in r["latencies"]]
    wall = sum(r["wall_s"] for r in rounds)
    return {"requests": len(lat), "errors": sum(r["errors"] for r in rounds), "req_per_s": len(lat) / wall,
            "p50_ms": (pct(lat, 0.5) or 0) * 1e3, "p99_ms": (pct(lat, 0.99) or 0) * 1e3,
            "first_errors": [e for r in rounds for e in r["first_errors"]][:2]}


def table(cells: dict[str, dict[str, Any]]) -> str:
    lines = ["| mode | c | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | arks / litellm req/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell, by_target in cells.items():
        mode, c = cell.split(":")
        direct = by_target["direct"]
        for name in ("arks", "litellm"):
            s = by_target.get(name)
            if not s:
                continue
            ratio = ""
            if name == "arks" and by_target.get("litellm", {}).get("req_per_s"):
                ratio = f"{s['req_per_s'] / by_target['litellm']['req_per_s']:.2f}"
            lines.append(f"| {mode} | {c} | {name} | {s['req_per_s']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{s['p50_ms'] - direct['p50_ms']:.1f} | {s['p99_ms'] - direct['p99_ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def plot(cells: dict[str, dict[str, Any]], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no plot at {png}")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("non-streaming", "streaming"), strict=True):
        keys = [k for k in cells if k.startswith(mode + ":")]
        cs = [int(k.split(":")[1]) for k in keys]
        for name in ("direct", "arks", "litellm"):
            ax.plot(cs, [cells[k].get(name, {}).get("req_per_s", 0) for k in keys], marker="o", label=name)
        ax.set(title=mode, xlabel="concurrent requests", ylabel="requests/s", xticks=cs)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "mock"])
    ap.add_argument("--port", type=int, default=0, help="mock: its port")
    ap.add_argument("--tokens", type=int, default=16, help="content events per streamed answer")
    ap.add_argument("--litellm", default="litellm", help="the litellm proxy command (its own environment)")
    ap.add_argument("--database-url", help="LiteLLM's Postgres: virtual keys with limits and a budget")
    ap.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one round of one target")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gateway-port", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--ingress", choices=["auto", "serve", "haproxy"], default="auto",
                    help="what answers on the gateway port (arks-ray up --ingress; auto, its default: haproxy "
                         "where it can start)")
    args = ap.parse_args()
    if args.mode == "mock":
        mock_main(args.port, args.tokens)
        return 0
    from arks_ray.local.runner import choose_ingress

    args.ingress = choose_ingress(args.ingress)[0]  # up's own choice, named in the results
    procs: list[subprocess.Popen[bytes]] = []
    redis = RedisServer().start()
    arks = str(Path(sys.executable).with_name("arks-ray"))
    workdir = Path(tempfile.mkdtemp(prefix="gw-vs-litellm-"))
    try:
        mport, lport = free_port(), free_port()
        mock_url = f"http://127.0.0.1:{mport}"
        procs.append(subprocess.Popen([sys.executable, __file__, "mock", "--port", str(mport), "--tokens",
                                       str(args.tokens)]))
        wait_ok(mock_url + "/v1/models", {}, 30, procs[-1])
        (workdir / "arks.yaml").write_text(arks_yaml(mock_url))
        (workdir / "litellm.yaml").write_text(litellm_config(mock_url + "/v1", redis.port, args.database_url))
        t0 = time.monotonic()
        subprocess.run([arks, "up", "-f", str(workdir / "arks.yaml"), "--port", str(args.gateway_port),
                        "--redis-url", redis.url, "--detach", "--timeout", "300", "--ingress", args.ingress],
                       check=True)
        log(f"arks-ray gateway up in {time.monotonic() - t0:.1f}s")
        env = {**os.environ, "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "true"}
        lproc = subprocess.Popen([args.litellm, "--config", str(workdir / "litellm.yaml"), "--host", "127.0.0.1",
                                  "--port", str(lport)], env=env, stdout=(workdir / "litellm.log").open("wb"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(lproc)
        lbase = f"http://127.0.0.1:{lport}"
        wait_ok(lbase + "/health/liveliness", {}, 180, lproc)
        lkey = litellm_key(lbase, args.database_url)
        targets = {"direct": (mock_url + "/v1/chat/completions", None),
                   "arks": (f"http://127.0.0.1:{args.gateway_port}/v1/chat/completions", TOKEN),
                   "litellm": (lbase + "/v1/chat/completions", lkey)}
        for name, (url, key) in targets.items():  # warm-up until clean (a gateway may route only after a probe)
            t0 = time.monotonic()
            while True:
                warm = asyncio.run(run_cell(url, key, True, 2, 1.0))
                if not warm["errors"] and warm["latencies"]:
                    break
                if time.monotonic() - t0 > 90:
                    raise RuntimeError(f"{name} does not answer: {warm['first_errors']}")
                time.sleep(1)
            log(f"{name} answers after {time.monotonic() - t0:.1f}s of warm-up")
        cells: dict[str, dict[str, Any]] = {}
        for stream in (False, True):
            for c in args.concurrency:
                cell = f"{'streaming' if stream else 'non-streaming'}:{c}"
                rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in targets}
                for r in range(args.rounds):
                    order = list(targets) if r % 2 == 0 else list(reversed(targets))
                    for name in order:
                        url, key = targets[name]
                        rounds[name].append(asyncio.run(run_cell(url, key, stream, c, args.seconds)))
                cells[cell] = {n: summarize(rs) for n, rs in rounds.items()}
                log(f"{cell}: " + ", ".join(f"{n} {s['req_per_s']:.0f} req/s p50 {s['p50_ms']:.1f} ms "
                                           f"({s['errors']} errors)" for n, s in cells[cell].items()))
        out = {"cells": cells, "litellm": {"database": bool(args.database_url), "version": subprocess.run(
            [args.litellm, "--version"], capture_output=True, text=True, check=False).stdout.strip()[-80:]},
            "arks": {"governance": "auth, rpm, tpm, concurrency, quota on Redis", "ingress": args.ingress},
            "args": vars(args) | {
                "out": str(args.out)}}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gateway_vs_litellm.json").write_text(json.dumps(out, indent=1))
        plot(cells, args.out / "gateway_vs_litellm.png")
        print(table(cells))
        return 0
    finally:
        subprocess.run([arks, "down"], check=False, capture_output=True)
        for p in procs:
            p.kill()
            p.wait()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
