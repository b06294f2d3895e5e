#!/usr/bin/env python
"""Raw vLLM, arks-ray and Ray's stock ``build_openai_app`` on one GPU, one engine at a time, same load.

Four phases, each runnable on its own (one GPU holds one engine: the targets run one after another):

- ``raw``: ``python -m vllm.entrypoints.openai.api_server`` on the model with the engine arguments below;
- ``ray``: one local Ray; the Arks YAML below rendered by ``arks_ray.local.runner.plan`` (the gateway with
  auth, rpm/tpm/concurrency limits and a quota on a real ``redis-server``, and the vLLM ``LLMServer``
  engine app) is measured; then (``--hops``) the same load straight through the engine's Serve handle,
  skipping the proxy and the gateway; then (``--profile``) one more load under ``py-spy``; then the engine
  app is deleted and Ray's stock OpenAI app is deployed on the same GPU and measured;
- ``startup``: cold starts side by side, ``--starts`` of each, alternating: raw vLLM until it answers, and the
  whole stack from nothing (the ``ray`` phase in a fresh process, with the same options, until the gateway
  answers; then Ray is stopped), with the stages of each start of ours (``ray.init``, Serve, each app's build
  task, the engine replica's process start, its ``__init__``, and in it the EngineCore process's start) and
  raw's EngineCore start; ``--variant NAME:K=V`` adds a start of ours with those ``--serve-env`` settings to
  each round (``--variant spawn:ARKS_ENGINE_CORE_START=spawn``);
- ``report``: merges the phases' JSON files, prints the table with ratios to raw and writes a PNG
  (tokens/s and TTFT p50 per concurrency, one line per target) when matplotlib is installed.

Every load is N streaming chats with a fixed output length (``ignore_eos``), at each ``--concurrency``,
``--rounds`` times; each load also records CPU per process role (``gpu_probe.CpuSampler``) and the chunks
each hop carried (SSE events, HTTP body chunks at the client, Serve stream items at the handle).

    python benchmarks/gpu_side_by_side.py raw  --model DIR --out OUT
    python benchmarks/gpu_side_by_side.py ray  --model DIR --out OUT --hops --redis-server redis-server
    python benchmarks/gpu_side_by_side.py startup --model DIR --out OUT --starts 3 --redis-server redis-server
    python benchmarks/gpu_side_by_side.py report OUT OUT/gpu_side_by_side.png

``--mock-engine TTFT,TPOT,INTERVAL`` (ms) puts a stand-in engine at a GPU engine's pace in the engine app's
place (``benchmarks/mock_serve_engine.py``), so that the Serve path alone is measured, on any machine.
``--serve-env K=V`` sets environment variables for every Ray process of the ``ray`` phase, over the Serve
settings a rendered cluster has (``arks_ray.render.options.SERVE_THROUGHPUT_ENV``; for Ray's defaults:
``--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=0``). ``--engine-arg ARG`` adds a ``runtimeCommonArgs`` entry to
the app (``--engine-arg '--distributed-executor-backend ray'``: vLLM under Ray's executor, as Ray's LLM
serving runs every GPU engine). ``--llm-config KEY=JSON`` sets a field of the engine app's Ray LLMConfig
(``--llm-config log_engine_metrics=false``). ``--label`` names the target in the results.

``--frontend vllmServer`` gives the app vLLM's own server as its frontend (``spec.engineFrontend``).
``--upstream-raw`` runs no app: raw vLLM is the endpoint's HTTP backend, so the gateway's HTTP path to an
engine's own server is measured; ``--gateway-setting K=JSON`` and ``--http-intervals`` set the gateway (its
HTTP read interval, live). ``--interleave-raw`` runs raw vLLM alongside the app (two engines on the GPU) and
alternates the loads round by round, so that a machine whose speed drifts during the lease weighs on both.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import gpu_probe  # noqa: E402
from gpu_report import merge, report  # noqa: E402

try:
    import httpx2 as httpx
except ImportError:  # the GPU image's own httpx has the same API
    import httpx  # type: ignore[no-redef]

TOKEN = "sk-gpu-bench-local-only"  # a local benchmark token, public on purpose
MODEL = "small"
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.22, "enforce_eager": True}
ENGINE_CLI = ["--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.22", "--enforce-eager"]
STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - STARTED:5.0f}s] {msg}", flush=True)


def arks_yaml(model_dir: str, gpu: bool = True, extra_args: tuple[str, ...] = (), upstream: str | None = None,
              frontend: str | None = None) -> str:
    """The benchmark's Arks YAML: the engine app, its endpoint, a token with limits and a quota. With ``upstream``
    (an OpenAI server's URL) there is no app: the endpoint's one backend is that server, over HTTP."""
    if upstream:
        return f"""
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: {MODEL}, namespace: default}}
spec: {{defaultWeight: 1, routeConfigs: [{{name: "{upstream}", weight: 1}}]}}
---""" + GOVERNANCE
    resources = 'resources: {limits: {nvidia.com/gpu: "1"}, requests: {nvidia.com/gpu: "1"}}' if gpu else \
        'env: [{name: VLLM_CPU_KVCACHE_SPACE, value: "1"}]'
    args = ", ".join([*(f'"{a} {b}"' for a, b in zip(ENGINE_CLI[:-1:2], ENGINE_CLI[1::2], strict=True)),
                      *(json.dumps(a) for a in extra_args)])
    return f"""
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {{name: {MODEL}, namespace: default}}
spec: {{model: local/{MODEL}, source: {{local: {{path: {model_dir}}}}}}}
---
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: {MODEL}, namespace: default}}
spec:
  replicas: 1
  runtime: vllm
  servedModelName: {MODEL}
  model: {{name: {MODEL}}}
  runtimeCommonArgs: [{args}, "--enforce-eager"]{f"{chr(10)}  engineFrontend: {frontend}" if frontend else ""}
  instanceSpec:
    {resources}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: {MODEL}, namespace: default}}
spec: {{defaultWeight: 1}}
---""" + GOVERNANCE


GOVERNANCE = f"""
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
      rateLimits: [{{type: rpm, value: 10000000}}, {{type: tpm, value: 10000000000}},
                   {{type: concurrency, value: 100000}}]
      quota: {{name: q}}
"""


def body(i: int, seed: int, max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"#{seed}-{i} Tell me a long story about a "
                                          f"river and a lantern, number {i}."}],
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0.8,
            "stream_options": {"include_usage": True}}


# ------------------------------------------------------------------------------------------------- load


async def one(client: Any, url: str, headers: dict[str, str], payload: dict[str, Any]) -> dict[str, Any]:
    rid = f"bench-{next(_IDS)}"  # the gateway logs it (client_request_id): its view of this very request
    sent, started = time.time(), time.perf_counter()
    ttft, chunks, events, tokens, usage, tail = None, 0, 0, 0, 0, b""
    async with client.stream("POST", url, json=payload, headers={**headers, "x-request-id": rid}) as resp:
        if resp.status_code != 200:
            return {"ok": False, "error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
        async for raw in resp.aiter_raw():
            chunks += 1
            *whole, tail = (tail + raw).split(b"\n\n")
            for event in whole:
                if not event.startswith(b"data: {"):
                    continue
                events += 1
                if b'"content":"' in event and b'"content":""' not in event:
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                elif b'"usage":{' in event and b'"choices":[]' in event:
                    usage = int(json.loads(event[6:])["usage"]["completion_tokens"])
    latency = time.perf_counter() - started
    ok = usage == payload["max_tokens"]
    # Tokens are the usage's count: an event can carry several (vLLM's --stream-interval), so the events with
    # content ("content_events") are not tokens.
    return {"ok": ok, "ttft": ttft or latency, "latency": latency, "chunks": chunks, "events": events,
            "content_events": tokens, "tokens": usage, "sent_unix": sent, "id": rid,
            "error": "" if ok else f"usage {usage} != {payload['max_tokens']}"}


_IDS = itertools.count()


async def http_load(url: str, headers: dict[str, str], bodies: list[dict[str, Any]], concurrency: int
                    ) -> tuple[float, list[dict[str, Any]]]:
    queue = list(reversed(bodies))
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while queue:
                try:
                    results.append(await one(client, url, headers, queue.pop()))
                except Exception as exc:  # a broken stream is a failed request, not a crashed benchmark
                    results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]})

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, results


def pct(values: list[float], q: float) -> float | None:
    from arks_ray.autoscaling.replica import percentile

    return percentile(values, q * 100) if values else None


def summary(wall: float, results: list[dict[str, Any]], cpu: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    ms = lambda v: round(v * 1e3, 1) if v is not None else None  # noqa: E731
    n = max(len(ok), 1)
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "requests_per_s": round(len(ok) / wall, 2),
            "ttft_p50_ms": ms(pct([r["ttft"] for r in ok], 0.5)), "ttft_p90_ms": ms(pct([r["ttft"] for r in ok], 0.9)),
            "tpot_p50_ms": ms(pct([(r["latency"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in ok], 0.5)),
            "latency_p50_ms": ms(pct([r["latency"] for r in ok], 0.5)),
            "per_request": {k: round(sum(r.get(k, 0) for r in ok) / n, 1)
                            for k in ("events", "content_events", "chunks", "items")},
            "first_errors": [r["error"] for r in results if not r["ok"]][:3], "cpu": cpu}


def measure(name: str, fn: Any, args: argparse.Namespace, store: dict[str, Any], seed0: int = 0,
            rounds: int | None = None, first_round: int = 0, gateway: bool = True) -> None:
    """``rounds`` loads per concurrency level through ``fn(bodies, concurrency)``, into ``store[name]``
    (numbered from ``first_round``; ``gateway``: read the gateway's own view of each load off its log)."""
    for conc in args.concurrency:
        n = max(args.min_requests, args.requests_per_stream * conc)
        for rnd in range(first_round, first_round + (args.rounds if rounds is None else rounds)):
            bodies = [body(i, seed0 + 10 * rnd + conc, args.max_tokens) for i in range(n)]
            waits0 = optional_waits(args)
            sampler = gpu_probe.CpuSampler()
            sampler.start()
            began = time.time()
            wall, results = asyncio.run(fn(bodies, conc))
            s = summary(wall, results, sampler.stop())
            s["gateway"] = gpu_probe.gateway_view(began, time.time(), results) if gateway else None
            if waits0 is not None:
                time.sleep(2.5)  # the last second's samples reach Ray's metrics endpoint
                s["serve_waits"] = gpu_probe.waits_between(waits0, optional_waits(args) or {})
                log(f"{name} c={conc} round {rnd}: Serve's waits p50/p90/p99 (ms, bucket edges): " + "; ".join(
                    f"{key} {v['p50_le_ms']:g}/{v['p90_le_ms']:g}/{v['p99_le_ms']:g}"
                    for key, v in s["serve_waits"].items()))
            store.setdefault(name, {}).setdefault(str(conc), []).append(s)
            roles = ", ".join(f"{k} {v:.2f}" for k, v in list(s["cpu"]["cores_by_role"].items())[:6])
            g = s["gateway"] or {}
            split = f"; in {g['in_p50_ms']} ms, out {g['out_p50_ms']} ms" if "in_p50_ms" in g else ""
            seen = g and f" (at the gateway: TTFT p50 {g['ttft_p50_ms']} ms, own {g['gateway_p50_ms']} ms{split})"
            log(f"{name} c={conc} round {rnd}: {s['tokens_per_s']} tok/s, TTFT p50 {s['ttft_p50_ms']} ms"
                f"{seen or ''}, failed {s['failed']}, per request {s['per_request']}; cores: {roles}")


def optional_waits(args: argparse.Namespace) -> dict[str, dict[float, float]] | None:
    """Serve's wait histograms now (``--serve-waits``), or None: off, no Ray here, or no endpoint."""
    if not args.serve_waits:
        return None
    try:
        return gpu_probe.serve_waits()
    except Exception as exc:  # a diagnostic: the load's figures stand without it
        log(f"Serve's waits not read: {type(exc).__name__}: {exc}")
        return None


def measure_interleaved(targets: list[tuple[str, Any]], args: argparse.Namespace, store: dict[str, Any]) -> None:
    """``measure`` for several targets up at once, one load each in turn per round (the order reversed every
    other round), so that a machine whose speed drifts during the run weighs on every target alike."""
    for rnd in range(args.rounds):
        for name, fn in targets if rnd % 2 == 0 else targets[::-1]:
            measure(name, fn, args, store, rounds=1, first_round=rnd, gateway=not name.startswith("raw"))


def http_target(url: str, headers: dict[str, str]) -> Any:
    return lambda bodies, conc: http_load(url, headers, bodies, conc)


def warm(url: str, headers: dict[str, str], timeout_s: float = 120) -> float:
    """Warm-up requests until they all succeed (a fresh app can be RUNNING before the gateway routes to it);
    returns the seconds that took."""
    t0 = time.monotonic()
    while True:
        _, results = asyncio.run(http_load(url, headers, [body(i, 999, 16) for i in range(16)], 8))
        if all(r["ok"] for r in results):
            return round(time.monotonic() - t0, 1)
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"warm-up still failing after {timeout_s}s: {results[0].get('error')}")
        time.sleep(0.5)


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s}s")


# ----------------------------------------------------------------------------------------------- phases


RAW = "http://127.0.0.1:8100"


def start_raw(args: argparse.Namespace, res: dict[str, Any], key: str = "raw_ready_s", url: str = RAW,
              extra: tuple[str, ...] = (), logname: str = "raw_vllm.log") -> subprocess.Popen[bytes]:
    """``vllm serve`` on the model at ``url`` with ``extra`` engine arguments, ready (its start time in
    ``res["startup"][key]``); the caller kills its process group."""
    try:
        stale = httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        stale = None
    if stale is not None:  # an earlier run's server, still up, would be timed instead of this one
        raise RuntimeError(f"something already answers on {url} (HTTP {stale}): stop it first")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--served-model-name",
           MODEL, "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], *ENGINE_CLI, *extra]
    logf = (args.out / logname).open("wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        res["startup"][key] = round(wait_http(f"{url}/health", 300, proc), 1)
    except BaseException:
        stop_raw(proc)
        raise
    log(f"raw vLLM{' ' + ' '.join(extra) if extra else ''} ready in {res['startup'][key]} s")
    return proc


def raw_variants(args: argparse.Namespace) -> list[tuple[str, str, tuple[str, ...]]]:
    """``--raw-variant NAME:ARGS``: (target name, URL, engine arguments) of each raw vLLM beside the default one,
    on the ports after ``RAW``'s."""
    port = int(RAW.rsplit(":", 1)[1])
    out = []
    for i, spec in enumerate(args.raw_variant, start=1):
        name, sep, words = spec.partition(":")
        if not sep or not name or not words.strip():
            raise SystemExit(f"--raw-variant {spec!r}: expected NAME:ARGS, e.g. si8:--stream-interval 8")
        out.append((f"raw {name}", f"http://127.0.0.1:{port + i}", tuple(shlex.split(words))))
    return out


def stop_raw(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_ray() -> None:
    """Stop what is left of a local Ray (``ray stop --force``; without Ray's CLI, its processes by name)."""
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                          check=False)
    if done.returncode != 0:
        subprocess.run(["pkill", "-9", "-f", "raylet|gcs_server|ray::|EngineCore"], capture_output=True, check=False)


def wait_gpu_free(timeout_s: float = 60) -> float:
    """Until no process holds the GPU (a stopped engine's memory is given back); seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            held = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return 0.0  # no GPU: nothing to wait for
        if not held:
            break
        time.sleep(1)
    return round(time.monotonic() - t0, 1)


def phase_startup(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """``--starts`` cold starts each of raw vLLM and of the whole stack from nothing, alternating which goes
    first. Raw: ``vllm serve`` until it answers a chat. Ours: the ``ray`` phase in a fresh process up to its
    first answer through the gateway (``ray.init``, Serve, the apps' build tasks and replicas), then Ray
    stopped; with the stages of its start. In ``res["startup"]["cold_LABEL"]``."""
    raw_starts: list[dict[str, Any]] = []  # one raw start per round, shared by every variant of ours
    variants = {"": [], **{f"-{name}": kv.split(",") for name, _, kv in (v.partition(":") for v in args.variant)}}
    colds = {suffix: res["startup"].setdefault(f"cold_{args.label}{suffix}", {"raw": raw_starts, "ours": []})
             for suffix in variants}
    rest, skip = [], False
    for arg in sys.argv[2:]:  # this run's own arguments, less --starts and --variant, go to the ray phase
        if skip or arg in ("--starts", "--variant") or arg.startswith(("--starts=", "--variant=")):
            skip = arg in ("--starts", "--variant")
            continue
        rest.append(arg)
    for i in range(args.starts):
        order = ["raw", *variants]
        for which in order[i % len(order):] + order[:i % len(order)]:  # each goes first in turn
            t0 = time.monotonic()
            if which == "raw":
                one: dict[str, Any] = {}
                proc = start_raw(args, {"startup": one}, "ready_s")
                try:
                    one["answered_s"] = round(one["ready_s"] + warm(f"{RAW}/v1/chat/completions", {}), 1)
                finally:
                    stop_raw(proc)
                one["engine_core_s"] = gpu_probe.engine_core_s(args.out / "raw_vllm.log")
                one["engine_core_spawned"] = "must use the `spawn`" in (args.out / "raw_vllm.log").read_text(
                    errors="replace")
            else:
                name = f"start_{args.label}{which}_{i}"
                sub = args.out / name
                cmd = [sys.executable, str(Path(__file__).resolve()), "ray", *rest, "--startup-only",
                       "--out", str(sub), "--label", "start", *(f"--serve-env={kv}" for kv in variants[which])]
                with (args.out / f"{name}.log").open("wb") as logf:
                    done = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False)
                stop_ray()
                got = json.loads((sub / "gpu_ray_start.json").read_text()).get("startup", {})
                one = {k.removeprefix("start_"): v for k, v in got.items()}
                if done.returncode != 0 or "total_s" not in one:
                    one["error"] = f"exit {done.returncode}; see {name}.log"
                else:
                    one["answered_s"] = round(one["total_s"] + one["serving_after_running_s"], 1)
            one["gpu_freed_s"] = wait_gpu_free()
            (raw_starts if which == "raw" else colds[which]["ours"]).append(one)
            log(f"start {i} {which or 'ours'}: {one.get('answered_s')} s to the first answer "
                f"({time.monotonic() - t0:.0f} s with the stop)")
            gpu_probe.dump(res, args.json)


def phase_raw(args: argparse.Namespace, res: dict[str, Any]) -> None:
    proc = start_raw(args, res)
    try:
        warm(f"{RAW}/v1/chat/completions", {})
        measure("raw", http_target(f"{RAW}/v1/chat/completions", {}), args, res["targets"])
    finally:
        stop_raw(proc)


def _wait_apps(serve: Any, names: list[str], timeout_s: float) -> dict[str, float]:
    t0, ready = time.monotonic(), {}
    while time.monotonic() - t0 < timeout_s:
        apps = serve.status().applications
        for n in names:
            if n in apps and apps[n].status == "RUNNING" and n not in ready:
                ready[n] = round(time.monotonic() - t0, 1)
            if n in apps and apps[n].status == "DEPLOY_FAILED":
                raise RuntimeError(f"{n} failed: {apps[n].message[:2000]}")
        if len(ready) == len(names):
            return ready
        time.sleep(0.2)
    raise RuntimeError(f"not RUNNING after {timeout_s}s: {set(names) - set(ready)}")


def phase_ray(args: argparse.Namespace, res: dict[str, Any]) -> None:
    if args.raw_variant and not args.interleave_raw:
        raise SystemExit("--raw-variant runs beside the app: it needs --interleave-raw")
    raws: list[subprocess.Popen[bytes]] = []
    try:
        if args.upstream_raw or args.interleave_raw:
            raws.append(start_raw(args, res, "upstream_ready_s"))
        for name, url, extra in raw_variants(args):
            raws.append(start_raw(args, res, f"{name}_ready_s", url, extra, f"{name.replace(' ', '_')}_vllm.log"))
        serve_phase(args, res)
    finally:
        for proc in raws:
            stop_raw(proc)


def serve_phase(args: argparse.Namespace, res: dict[str, Any]) -> None:
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from arks_ray.api.loading import load_yaml
    from arks_ray.local.runner import choose_ingress, plan
    from tests.support.redis_server import RedisServer

    redis = None
    if args.redis_server:
        os.environ["PATH"] = f"{Path(args.redis_server).parent}:{os.environ['PATH']}"
        redis = RedisServer().start()
    settings: dict[str, Any] = {"redis_url": redis.url} if redis else {}
    settings.update((key, json.loads(value)) for key, value in (kv.split("=", 1) for kv in args.gateway_setting))
    res["gateway_settings"] = {k: v for k, v in settings.items() if k != "redis_url"}
    res["governance"] = {"redis": bool(redis), "limits": "rpm, tpm, concurrency, quota (total)"}
    upstream = RAW if args.upstream_raw else None
    loaded = load_yaml(arks_yaml(args.model or "/nonexistent", args.gpus > 0, tuple(args.engine_arg), upstream,
                                 args.frontend), source="gpu-bench")
    res["frontend"] = args.frontend or "rayLLM"
    res["engine_args"] = args.engine_arg
    args.ingress = choose_ingress(args.ingress)[0]
    lp = plan(loaded, "default", 8000, gateway_settings=settings, gateway_replicas=args.gateways,
              ingress=args.ingress)
    res["gateways"] = lp.gateway_replicas
    engine_app = lp.engine_apps[0] if lp.engine_apps else ""
    if not engine_app and (args.mock_engine or args.llm_config):
        raise SystemExit("--mock-engine and --llm-config need the engine app (not --upstream-raw)")
    if args.mock_engine:  # the engine app's place goes to a stand-in at a GPU engine's pace
        ttft, tpot, interval = (float(x) for x in args.mock_engine.split(","))
        (app,) = [a for a in lp.serve_config["applications"] if a["name"] == engine_app]
        app.pop("runtime_env", None)
        app.update(import_path="mock_serve_engine:build_app",
                   args={"ttft_ms": ttft, "tpot_ms": tpot, "interval_ms": interval})
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "benchmarks"), str(REPO),
                                                    os.environ.get("PYTHONPATH", "")])
        res["mock_engine"] = {"ttft_ms": ttft, "tpot_ms": tpot, "interval_ms": interval}
    if args.llm_config:  # e.g. log_engine_metrics=false: fields of the engine app's Ray LLMConfig
        fields = {key: json.loads(value) for key, value in (kv.split("=", 1) for kv in args.llm_config)}
        (app,) = [a for a in lp.serve_config["applications"] if a["name"] == engine_app]
        app["args"]["llm_config"].update(fields)
        res["llm_config"] = fields
    (args.out / "serve_config.json").write_text(json.dumps(lp.serve_config, indent=1))
    # What a rendered cluster runs with, unless --serve-env says otherwise (RAY_SERVE_THROUGHPUT_OPTIMIZED=0:
    # Ray's defaults).
    from arks_ray.render.options import SERVE_THROUGHPUT_ENV, ingress_env

    extra = {**SERVE_THROUGHPUT_ENV, **ingress_env(args.ingress), **(gpu_probe.WAITS_ENV if args.serve_waits else {}),
             **dict(kv.split("=", 1) for kv in args.serve_env)}
    res["ingress"] = args.ingress
    res["serve_env"] = extra
    os.environ.update(extra)
    os.environ.update(getattr(lp, "gateway_env", None) or {})  # the gateway's token keys (since 4927463)
    # Every Ray process inherits this environment, as under `arks-ray up` (`ray start`'s) and KubeRay (the pod's).
    # Not a job runtime_env: with one, Serve's controller, proxy and build tasks each wait for a worker started
    # for that env instead of taking an idle one (2-3 s each on the H200 machine).
    t0 = time.monotonic()
    ray.init(num_cpus=max(os.cpu_count() or 1, lp.num_cpus), num_gpus=args.gpus, resources=lp.resources,
             include_dashboard=False)
    res["startup"]["ray_init_s"] = round(time.monotonic() - t0, 1)
    client = serve_start(http_options={"host": "127.0.0.1", "port": 8000}, proxy_location="HeadOnly")
    res["startup"]["ray_and_serve_s"] = round(time.monotonic() - t0, 1)
    client.deploy_apps(ServeDeploySchema.model_validate(lp.serve_config))
    ready = _wait_apps(serve, ["gateway", engine_app] if engine_app else ["gateway"], 400)
    res["startup"].update({f"{args.label}_{'gateway' if k == 'gateway' else 'engine'}_ready_s": v
                           for k, v in ready.items()})
    res["startup"][f"{args.label}_total_s"] = round(time.monotonic() - t0, 1)
    url, hdr = "http://127.0.0.1:8000/v1/chat/completions", {"Authorization": f"Bearer {TOKEN}"}
    res["startup"][f"{args.label}_serving_after_running_s"] = warm(url, hdr)
    if engine_app:
        optional(res, "timeline", lambda: res["startup"].update(
            {f"{args.label}_timeline": gpu_probe.startup_timeline(engine_app)}))
    log(f"arks ready: {res['startup']}")
    if args.startup_only:
        serve.shutdown()
        ray.shutdown()
        if redis:
            redis.stop()
        return
    if args.interleave_raw:
        raws = [("raw", RAW, ()), *raw_variants(args)]
        res["raw_variants"] = {name: list(extra) for name, _, extra in raws[1:]}
        for _, raw_url, _ in raws:
            warm(f"{raw_url}/v1/chat/completions", {})
        measure_interleaved([*((name, http_target(f"{raw_url}/v1/chat/completions", {})) for name, raw_url, _ in raws),
                             (args.label, http_target(url, hdr))], args, res["targets"])
    else:
        measure(args.label, http_target(url, hdr), args, res["targets"])
    gpu_probe.dump(res, args.json)
    for interval in args.http_intervals:
        if remaining(args) < 60:
            break

        def http_step(interval: str = interval) -> None:
            base, _, top = interval.partition(":")
            change = {"http_stream_interval_ms": float(base), "http_stream_interval_max_ms": float(top or base)}
            res["startup"][f"http_interval_{interval}_s"] = update_gateway(
                client, serve, lp.serve_config, settings=change)
            warm(url, hdr)
            measure(f"{args.label}@http{interval}", http_target(url, hdr), args, res["targets"], seed0=600, rounds=1)

        optional(res, f"http interval {interval}", http_step)
        gpu_probe.dump(res, args.json)
    if not engine_app:  # the engine is raw vLLM behind the gateway: nothing of ours to reach past the gateway
        if args.profile:
            optional(res, "profile", lambda: profile(args, res, f"{args.label}", http_target(url, hdr),
                                                     ["proxy", "gateway", "raw_api_server", "engine_core"]))
        if redis:
            redis.stop()
        return
    if args.hops:
        optional(res, "hops", lambda: measure(f"{args.label}:handle", lambda b, c: gpu_probe.handle_load(
            engine_app, b, c), args, res["hops"], seed0=500, rounds=1))
        gpu_probe.dump(res, args.json)
    for ms in args.stream_intervals:
        if remaining(args) < 60:
            break

        def interval_step(ms: float = ms) -> None:
            res["startup"][f"reconfigure_{ms:g}ms_s"] = stream_interval(client, serve, lp.serve_config, engine_app, ms)
            measure(f"{args.label}@{ms:g}ms", http_target(url, hdr), args, res["targets"], seed0=300, rounds=1)

        optional(res, f"interval {ms:g}", interval_step)
        gpu_probe.dump(res, args.json)
    for n in args.gateway_replicas:
        if remaining(args) < 60:
            break

        def replicas_step(n: int = n) -> None:
            res["startup"][f"gateway_x{n}_s"] = update_gateway(client, serve, lp.serve_config, replicas=n)
            warm(url, hdr)
            measure(f"{args.label} x{n} gateway", http_target(url, hdr), args, res["targets"], seed0=400, rounds=1)

        optional(res, f"gateway x{n}", replicas_step)
        gpu_probe.dump(res, args.json)
    if args.restart_replica and remaining(args) > 150:
        optional(res, "replica restart", lambda: restart_replica(serve, engine_app, url, hdr, res))
        gpu_probe.dump(res, args.json)
    if args.profile:
        roles = ["proxy", "gateway", "engine_replica", "engine_core"]
        if args.frontend == "vllmServer":
            roles.insert(3, "raw_api_server")  # the replica's own vLLM server
        optional(res, "profile", lambda: profile(args, res, f"{args.label}", http_target(url, hdr), roles))
    if args.stock and remaining(args) > 200:
        serve.delete(engine_app)
        from ray.serve.llm import LLMConfig, build_openai_app

        cfg = LLMConfig(model_loading_config={"model_id": MODEL, "model_source": args.model},
                        deployment_config={"num_replicas": 1}, engine_kwargs=dict(ENGINE),
                        placement_group_config={"bundles": [{"GPU": 1, "CPU": 1} if args.gpus else {"CPU": 1}],
                                                "strategy": "STRICT_PACK"})
        t1 = time.monotonic()
        serve.run(build_openai_app({"llm_configs": [cfg]}), name="stock", route_prefix="/stock", blocking=False)
        res["startup"]["stock_ready_s"] = _wait_apps(serve, ["stock"], 400)["stock"]
        log(f"stock ready in {time.monotonic() - t1:.1f}s")
        surl = "http://127.0.0.1:8000/stock/v1/chat/completions"
        warm(surl, {})
        measure("stock", http_target(surl, {}), args, res["targets"])
        gpu_probe.dump(res, args.json)
        if args.profile and remaining(args) > 40:
            profile(args, res, "stock", http_target(surl, {}), ["proxy", "stock_ingress", "engine_replica"])
    if redis:
        redis.stop()


def stream_interval(client: Any, serve: Any, config: dict[str, Any], app: str, ms: float) -> float:
    """Set the engine's stream coalescing interval live (its Serve ``user_config``); seconds it took."""
    from ray.serve.schema import ServeDeploySchema

    deployment = next(iter(serve.status().applications[app].deployments))
    cfg = json.loads(json.dumps(config))
    for entry in cfg["applications"]:
        if entry["name"] == app:
            entry["deployments"] = [{"name": deployment, "user_config": {"stream_interval_ms": ms}}]
    t0 = time.monotonic()
    client.deploy_apps(ServeDeploySchema.model_validate(cfg))
    time.sleep(2)
    _wait_apps(serve, [app], 300)
    log(f"stream interval {ms:g} ms applied in {time.monotonic() - t0:.1f}s")
    return round(time.monotonic() - t0, 1)


def restart_replica(serve: Any, app: str, url: str, headers: dict[str, str], res: dict[str, Any]) -> None:
    """A new engine replica on a running cluster (what autoscaling or a lost pod costs): SIGKILL the replica's
    process. ``replica_noticed_s``: until Serve starts a replacement; ``replica_restart_s``: from then until it
    answers a request through the gateway (no Ray start and no build task in it)."""
    pids = gpu_probe.pids_by_role().get("engine_replica", [])
    if len(pids) != 1:
        raise RuntimeError(f"expected one engine replica process, found {pids}")
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    while True:  # until Serve starts the replacement (its health check notices first)
        deployments = serve.status().applications[app].deployments.values()
        if any(str(getattr(state, "value", state)) == "STARTING" for d in deployments for state in d.replica_states):
            break
        if time.monotonic() - t0 > 120:
            raise RuntimeError(f"Serve started no replacement of {app}'s replica within 120 s")
        time.sleep(0.2)
    started = time.monotonic()
    _wait_apps(serve, [app], 400)
    warm(url, headers, timeout_s=300)
    res["startup"]["replica_noticed_s"] = round(started - t0, 1)
    res["startup"]["replica_restart_s"] = round(time.monotonic() - started, 1)
    res["startup"]["replica_restart_timeline"] = gpu_probe.startup_timeline(app)[-1]
    log(f"the engine replica's loss noticed after {started - t0:.1f} s; the new one served "
        f"{res['startup']['replica_restart_s']} s later")


def optional(res: dict[str, Any], name: str, step: Any) -> None:
    """Run an optional step; a failure is recorded and the phase goes on (its measurements are kept)."""
    try:
        step()
    except Exception as exc:
        log(f"{name} failed: {type(exc).__name__}: {exc}")
        res.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"[:500]


def update_gateway(client: Any, serve: Any, config: dict[str, Any], replicas: int | None = None,
                   settings: dict[str, Any] | None = None) -> float:
    """A live Serve update of the gateway app only: ``replicas`` gateway replicas, or ``settings`` over its
    settings (a new replica); seconds until it runs again."""
    from ray.serve.schema import ServeDeploySchema

    cfg = json.loads(json.dumps(config))
    for entry in cfg["applications"]:
        if entry["name"] != "gateway":
            continue
        if replicas is not None:
            deps = entry.setdefault("deployments", [])
            found = [d for d in deps if d.get("name") == "ArksGateway"]
            (found[0] if found else deps.append({"name": "ArksGateway"}) or deps[-1])["num_replicas"] = replicas
        if settings:
            entry["args"]["settings"] = {**entry["args"].get("settings", {}), **settings}
    t0 = time.monotonic()
    client.deploy_apps(ServeDeploySchema.model_validate(cfg))
    time.sleep(2)
    _wait_apps(serve, ["gateway"], 120)
    log(f"gateway updated ({replicas or ''} {settings or ''}) in {time.monotonic() - t0:.1f}s")
    return round(time.monotonic() - t0, 1)


def remaining(args: argparse.Namespace) -> float:
    return args.deadline_s - (time.monotonic() - STARTED)


def profile(args: argparse.Namespace, res: dict[str, Any], name: str, fn: Any, roles: list[str]) -> None:
    """One more load at the highest concurrency with py-spy on the given roles' processes."""
    if not shutil.which(args.profile) and not Path(args.profile).exists():
        log(f"no py-spy at {args.profile}: profile skipped")
        return
    found = gpu_probe.pids_by_role()
    pids = {r: found[r][0] for r in roles if found.get(r)}
    conc = max(args.concurrency)
    bodies = [body(i, 777, args.max_tokens) for i in range(max(args.min_requests, args.requests_per_stream * conc))]
    spies = gpu_probe.start_profiles(args.profile, {f"{name}-{r}": p for r, p in pids.items()}, args.profile_s,
                                     args.out)
    time.sleep(1)
    wall, results = asyncio.run(fn(bodies, conc))
    for spy in spies:
        try:
            spy.wait(timeout=args.profile_s + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
    out = {}
    for r in pids:
        path = args.out / f"pyspy-{name}-{r}.txt"
        out[r] = gpu_probe.summarize_profile(path) if path.exists() else {"error": "no output"}
    res["profiles"][name] = {"tokens_per_s_under_profiler": round(sum(x.get("tokens", 0) for x in results) / wall, 1),
                             "by_role": out}
    gpu_probe.dump(res, args.json)
    log(f"profiled {name}: " + ", ".join(f"{r} {v.get('samples')} samples" for r, v in out.items()))


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    try:  # SMT: a busy sibling thread slows a process pinned to one core (vLLM's EngineCore is)
        info["cpu0_siblings"] = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                                  .splitlines() if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=20
                                     ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    for mod in ("vllm", "ray", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            continue
    info["title"] = f"{info.get('gpu') or 'no GPU'}; vLLM {info.get('vllm')}, Ray {info.get('ray')}"
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["raw", "ray", "startup", "report"])
    ap.add_argument("paths", nargs="*", help="report: the JSON files or folders to merge, then the PNG path")
    ap.add_argument("--model", help="the model folder (a Hugging Face checkpoint)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-bench"))
    ap.add_argument("--label", default="arks", help="the name of the arks-ray target in the results")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128])
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--min-requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=1, help="0: a CPU vLLM (a smoke test of the harness)")
    ap.add_argument("--redis-server", help="a redis-server binary: the gateway's limits and quota on Redis")
    ap.add_argument("--hops", action="store_true", help="also load the engine through its handle directly")
    ap.add_argument("--restart-replica", action="store_true",
                    help="then kill the engine replica and time its replacement until it serves")
    ap.add_argument("--stock", action="store_true", help="then Ray's stock build_openai_app on the same GPU")
    ap.add_argument("--profile", metavar="PY_SPY", help="py-spy binary: profile the replicas during one more load")
    ap.add_argument("--profile-s", type=int, default=8)
    ap.add_argument("--serve-env", action="append", default=[], metavar="K=V")
    ap.add_argument("--llm-config", action="append", default=[], metavar="KEY=JSON",
                    help="set a field of the engine app's Ray LLMConfig, e.g. log_engine_metrics=false")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                    help="one more runtimeCommonArgs entry of the app, e.g. '--distributed-executor-backend ray'")
    ap.add_argument("--gateway-replicas", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="then the same load once per gateway replica count (a live update of the gateway app)")
    ap.add_argument("--stream-intervals", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                    help="then the same load once per engine stream interval (ms), set live via user_config")
    ap.add_argument("--mock-engine", metavar="TTFT_MS,TPOT_MS,INTERVAL_MS",
                    help="ray phase: serve a stand-in engine at this pace instead of vLLM (benchmarks/"
                         "mock_serve_engine.py), so that only the Serve path is measured")
    ap.add_argument("--ingress", choices=["auto", "serve", "haproxy"], default="auto",
                    help="ray phase: what answers on port 8000 (RenderOptions.ingress); auto, as `arks-ray up`: "
                         "haproxy where it can start, else serve")
    ap.add_argument("--frontend", choices=["rayLLM", "vllmServer"],
                    help="the app's spec.engineFrontend (default: the app's default, rayLLM)")
    ap.add_argument("--upstream-raw", action="store_true",
                    help="ray phase: no engine app; raw vLLM (as in the raw phase) is the endpoint's HTTP backend, "
                         "so that the gateway's HTTP path to an engine's own server is measured")
    ap.add_argument("--interleave-raw", action="store_true",
                    help="ray phase: raw vLLM runs alongside (both engines on the GPU), and the loads alternate "
                         "between it and arks-ray round by round")
    ap.add_argument("--gateways", type=int, default=None,
                    help="ray phase: gateway replicas for the whole run (default: arks-ray up's, one per 8 cores, 1 "
                         "or 2; a cluster's gateway autoscales from 1 to 4 at 64 requests in flight each, so 2 at "
                         "128 streams)")
    ap.add_argument("--serve-waits", action="store_true",
                    help="ray phase: each load also reads how late Serve's event loops (the proxy's, each "
                         "replica's) woke up and how long requests waited in a router for a replica, from Ray's "
                         "metrics (loops sampled every 50 ms, metrics reported every second)")
    ap.add_argument("--raw-variant", action="append", default=[], metavar="NAME:ARGS",
                    help="with --interleave-raw: one more raw vLLM beside it, with these engine arguments, in the "
                         "same rotation as 'raw NAME' (si8:--stream-interval 8)")
    ap.add_argument("--gateway-setting", action="append", default=[], metavar="KEY=JSON",
                    help="a gateway setting (arks_ray/gateway/settings.py), e.g. http_stream_interval_ms=50")
    ap.add_argument("--http-intervals", type=lambda v: [x for x in v.split(",") if x], default=[],
                    metavar="MS[:MAX_MS],...", help="then the same load once per HTTP read interval of the gateway "
                                                    "(http_stream_interval_ms[:..._max_ms]), a live update")
    ap.add_argument("--deadline-s", type=float, default=560, help="skip optional steps past this many seconds")
    ap.add_argument("--starts", type=int, default=3, help="startup: cold starts of each (raw, ours)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V[,K=V]",
                    help="startup: also start ours with these --serve-env settings, each round, as LABEL-NAME")
    ap.add_argument("--startup-only", action="store_true", help="ray: stop once the stack has answered once")
    args = ap.parse_args()
    if args.phase == "report":
        *inputs, png = [Path(p) for p in args.paths]
        files = [f for p in inputs for f in (sorted(p.glob("gpu_*.json")) if p.is_dir() else [p])]
        data = merge(files)
        table = report(data, png)
        (png.with_suffix(".json")).write_text(json.dumps(data, indent=1))
        print(table)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.json = args.out / f"gpu_{args.phase}_{args.label}.json"
    res: dict[str, Any] = {"targets": {}, "hops": {}, "startup": {}, "profiles": {}, "machine": machine(),
                           "args": {args.phase: {k: str(v) for k, v in vars(args).items()}}}
    # A SIGTERM (`timeout`, a lease's end) unwinds like Ctrl-C: each phase's `finally` stops what it started, raw
    # vLLM included, which would otherwise go on holding the GPU and the port.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        {"raw": phase_raw, "ray": phase_ray, "startup": phase_startup}[args.phase](args, res)
    finally:
        gpu_probe.dump(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
