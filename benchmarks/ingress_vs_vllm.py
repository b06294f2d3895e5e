#!/usr/bin/env python
"""Our full stack (Serve proxy -> gateway ingress -> handle -> LLMServer/vLLM) against a raw ``vllm serve``.

One run:

1. ``arks-ray up -f configs/examples/local-demo.yaml --detach`` (returns quickly when the demo already runs);
2. a raw vLLM OpenAI server on the same model with the same engine args, on a free loopback port
   (always stopped at the end, also on error or Ctrl-C: its whole process group is killed);
3. optionally (``--stock``) Ray's stock OpenAI ingress (``ray.serve.llm.build_openai_app``) on the same
   model as an extra, imperatively deployed Serve app at ``/stock`` (deleted at the end);
4. the same streaming chat load against every target, interleaved in rounds (ours, raw, [stock], ours, ...)
   so that drift hits every target alike; fixed output length (``max_tokens`` + ``ignore_eos``);
5. a side-by-side table with the ratios ours/raw, and optionally ``--json OUT``.

The machine is small and may be shared, so every phase also records the machine's CPU use and the CPU of
processes outside the benchmark; before each phase the script waits (``--quiet-wait``) for them to go idle
and measures a disturbed phase again (``--retries``). The raw server runs at Ray's worker niceness (15) by
default so that both stacks compete alike with the load generator (``--raw-nice 0`` to compare).
``--stock-stream-batch-ms`` sets the stock app's ``stream_batching_interval_ms`` (Ray's default is 50 ms).

Exit status: 0 on success, 1 if any request failed or returned the wrong number of tokens.

    .venv/bin/python benchmarks/ingress_vs_vllm.py                # defaults: 96 req x c8 x 64 tok x 3 rounds
    .venv/bin/python benchmarks/ingress_vs_vllm.py --stock --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.vllm_server import ENGINE_ENV, VllmServer  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "examples" / "local-demo.yaml"
MODEL_PATH = "/tmp/arks-ray/models/tiny-qwen2"
MODEL_NAME = "tiny"
DEMO_TOKEN = "sk-arks-demo-local-only"  # the public demo token of local-demo.yaml
# The demo app's engine: configs/examples/local-demo.yaml (runtimeCommonArgs and instanceSpec.env).
ENGINE_KWARGS = {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.1, "enforce_eager": True}
# Ray starts its workers (proxy, gateway, engine replicas) at this niceness; the raw server gets the same
# by default so that both compete alike with the load generator for the 2 cores.
RAY_WORKER_NICENESS = 15
FOREIGN_WARN_CORES = 0.15  # warn when processes outside the benchmark use more CPU than this
STOCK_APP = "arks-bench-stock"
STOCK_PREFIX = "/stock"

WORDS = ("river", "engine", "garden", "cloud", "violin", "harbor", "pixel", "lantern", "quartz", "meadow",
         "rocket", "saffron", "tunnel", "orbit", "maple", "glacier", "compass", "ember", "falcon", "canyon")
TEMPLATES = ("Tell me a short story about a {} and a {}.", "Explain how a {} differs from a {}.",
             "Write a haiku about the {} near the {}.", "List three facts about a {} and a {}.",
             "Why would a {} need a {}?", "Describe a {} to someone who has only seen a {}.")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"#{i} " + rng.choice(TEMPLATES).format(rng.choice(WORDS), rng.choice(WORDS)) for i in range(count)]


# ------------------------------------------------------------------------------------------ CPU usage
# The machine is small (2 cores) and may be shared: every phase records how busy the machine was and how
# much CPU went to processes outside the benchmark (not this process, not the raw server's process group,
# not Ray's processes and their children), so that a disturbed phase is visible instead of silently wrong.

HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    at: float
    machine: tuple[int, int]  # (busy, total) jiffies of all cores
    procs: dict[int, tuple[int, int, int, str]]  # pid -> (jiffies, ppid, pgid, command)


def cpu_sample() -> CpuSample:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parts = stat.rsplit(")", 1)[1].split()
        name = cmd or "[" + stat.split("(", 1)[1].rsplit(")", 1)[0] + "]"
        procs[int(entry.name)] = (int(parts[11]) + int(parts[12]), int(parts[1]), int(parts[2]), name)
    return CpuSample(time.monotonic(), (total - idle, total), procs)


def _is_stack(pid: int, procs: dict[int, tuple[int, int, int, str]], own_pgids: set[int]) -> bool:
    """This benchmark, the raw server or part of the local Ray (by the process or one of its ancestors)."""
    seen = 0
    while pid in procs and seen < 64:
        _, ppid, pgid, cmd = procs[pid]
        if pgid in own_pgids or cmd.startswith(("ray::", "VLLM::")) or "site-packages/ray/" in cmd:
            return True
        pid, seen = ppid, seen + 1
    return False


@dataclass
class CpuUse:
    machine_busy: float  # fraction of all cores
    foreign_cores: float  # cores used by processes outside the benchmark
    foreign_top: list[str]


def cpu_use(a: CpuSample, b: CpuSample, own_pgids: set[int]) -> CpuUse:
    total = b.machine[1] - a.machine[1]
    elapsed = max(b.at - a.at, 1e-6)
    foreign = []
    for pid, (jiffies, *_rest, cmd) in b.procs.items():
        used = (jiffies - a.procs[pid][0]) if pid in a.procs else jiffies
        if used > 0 and not _is_stack(pid, b.procs, own_pgids):
            foreign.append((used / HZ / elapsed, cmd))
    foreign.sort(reverse=True)
    return CpuUse((b.machine[0] - a.machine[0]) / total if total else 0.0, sum(c for c, _ in foreign),
                  [f"{c:.0%} {cmd[:70]}" for c, cmd in foreign if c >= 0.05])


# ----------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    base_url: str  # up to and including /v1
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def ensure_demo(config: Path, port: int, timeout_s: float, ingress: str = "auto") -> None:
    exe = Path(sys.executable).with_name("arks-ray")
    cmd = [str(exe) if exe.exists() else (shutil.which("arks-ray") or "arks-ray"),
           "up", "-f", str(config), "--detach", "--port", str(port), "--timeout", str(int(timeout_s)),
           "--ingress", ingress]
    log("ensuring the arks-ray demo is up: " + " ".join(cmd[1:]))
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"arks-ray up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    log(f"arks-ray demo is up ({time.monotonic() - started:.1f}s)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RawVllm(VllmServer):
    """The raw ``vllm serve`` compared against, logged like the rest of the benchmark."""

    def __init__(self, model_path: str, port: int, log_path: Path, nice: int) -> None:
        log(f"starting raw vLLM on 127.0.0.1:{port} (nice {nice}, log {log_path})")
        super().__init__(model_path, MODEL_NAME, port, log_path, nice)

    def stop(self) -> None:
        if self.proc.poll() is None:
            log("stopping raw vLLM")
        super().stop()


# ------------------------------------------------------------------------------- the stock Ray ingress


def _ray_connect() -> Any:
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the demo's Ray keeps dashboard/GCS token auth on
    import ray

    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    return ray


def stock_helper(action: str, model_path: str, stream_batch_ms: float | None) -> None:
    """Runs in a child process so the benchmark process never holds a Ray driver connection."""
    ray = _ray_connect()
    from ray import serve

    if action == "deploy":
        from ray.serve.llm import LLMConfig, build_openai_app

        config = LLMConfig(
            model_loading_config={"model_id": MODEL_NAME, "model_source": model_path},
            engine_kwargs=ENGINE_KWARGS,
            placement_group_config={"bundles": [{"CPU": 1}], "strategy": "STRICT_PACK"},
            deployment_config={"num_replicas": 1},
            runtime_env={"env_vars": ENGINE_ENV},
            experimental_configs={} if stream_batch_ms is None else {"stream_batching_interval_ms": stream_batch_ms},
        )
        serve.run(build_openai_app({"llm_configs": [config]}), name=STOCK_APP, route_prefix=STOCK_PREFIX)
    else:
        serve.delete(STOCK_APP)
    ray.shutdown()


def run_stock_helper(action: str, model_path: str, timeout_s: float, stream_batch_ms: float | None = None) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stock-helper", action, "--model-path", model_path]
    if stream_batch_ms is not None:
        cmd += ["--stock-stream-batch-ms", str(stream_batch_ms)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"stock app {action} failed ({proc.returncode}):\n{tail}")


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0  # request sent -> first chunk with content
    latency: float = 0.0  # request sent -> end of stream
    completion_tokens: int = 0
    content_chunks: int = 0
    finish_reason: str | None = None
    error: str = ""


@dataclass
class Phase:
    target: str
    round: int
    wall_s: float
    cpu: CpuUse
    results: list[Result] = field(repr=False)
    attempts: int = 1


async def one_request(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int) -> Result:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft = None
    res = Result(ok=False)
    done = False
    try:
        async with client.stream("POST", f"{target.base_url}/chat/completions", json=body,
                                 headers=target.headers()) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"in-band error: {data[:300]}"
                    return res
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        res.content_chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - started
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                if event.get("usage"):
                    res.completion_tokens = int(event["usage"].get("completion_tokens") or 0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - started
    res.ttft = ttft if ttft is not None else res.latency
    if not done:
        res.error = "stream ended without [DONE]"
    elif res.completion_tokens != max_tokens:
        res.error = (f"usage.completion_tokens={res.completion_tokens}, expected {max_tokens} "
                     f"(finish_reason={res.finish_reason}; did ignore_eos pass through?)")
    else:
        res.ok = True
    return res


async def run_phase(target: Target, batch: list[str], concurrency: int, max_tokens: int) -> tuple[float, list[Result]]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in batch:
        queue.put_nowait(p)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, target, prompt, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return wall, results


# ----------------------------------------------------------------------------------------- reporting


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(phases: list[Phase]) -> dict[str, Any]:
    results = [r for p in phases for r in p.results]
    ok = [r for r in results if r.ok]
    wall = sum(p.wall_s for p in phases)
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.ttft for r in ok]
    # Per token, by the usage's count: an event may carry several tokens (vLLM's stream_interval).
    tpot = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
        "ttft_p95_ms": pct(ttft, 0.95) * 1e3,
        "tpot_p50_ms": pct(tpot, 0.5) * 1e3,
        "latency_p50_ms": pct([r.latency for r in ok], 0.5) * 1e3,
        "tokens_per_s_by_round": [sum(r.completion_tokens for r in p.results if r.ok) / p.wall_s for p in phases],
        "machine_cpu_busy": sum(p.cpu.machine_busy * p.wall_s for p in phases) / wall if wall else 0.0,
        "foreign_cores": sum(p.cpu.foreign_cores * p.wall_s for p in phases) / wall if wall else 0.0,
        "foreign_top_by_round": [p.cpu.foreign_top for p in phases],
        "attempts_by_round": [p.attempts for p in phases],
        "first_errors": [r.error for r in results if not r.ok][:5],
    }


ROWS = (("tokens/s", "tokens_per_s", "{:.0f}"), ("requests/s", "requests_per_s", "{:.2f}"),
        ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"), ("TTFT p95 ms", "ttft_p95_ms", "{:.1f}"),
        ("TPOT p50 ms", "tpot_p50_ms", "{:.2f}"), ("latency p50 ms", "latency_p50_ms", "{:.0f}"),
        ("output tokens", "output_tokens", "{:d}"), ("wall s", "wall_s", "{:.1f}"),
        ("machine CPU %", "machine_cpu_busy", "{:.0%}"), ("others' cores", "foreign_cores", "{:.2f}"),
        ("errors", "errors", "{:d}"))


def table(summary: dict[str, dict[str, Any]]) -> str:
    names = list(summary)
    others = [n for n in names if n != "raw"]
    header = f"{'metric':<16}" + "".join(f"{n:>10}" for n in names) + "".join(f"{n + '/raw':>12}" for n in others)
    lines = [header, "-" * len(header)]
    for label, key, fmt in ROWS:
        cells = "".join(f"{fmt.format(summary[n][key]):>10}" for n in names)
        ratios = ""
        for n in others:
            raw = summary["raw"][key]
            shown = raw and key not in ("errors", "machine_cpu_busy", "foreign_cores")
            ratios += f"{summary[n][key] / raw:>12.3f}" if shown else f"{'':>12}"
        lines.append(f"{label:<16}{cells}{ratios}")
    rounds = "  ".join(f"{n}: " + " / ".join(f"{v:.0f}" for v in summary[n]["tokens_per_s_by_round"]) for n in names)
    lines.append(f"tokens/s by round  {rounds}")
    return "\n".join(lines)


def headline(summary: dict[str, dict[str, Any]]) -> Iterator[str]:
    raw = summary["raw"]
    for n in (n for n in summary if n != "raw"):
        s = summary[n]
        yield (f"tokens/s  {n} {s['tokens_per_s']:.0f}  raw {raw['tokens_per_s']:.0f}  "
               f"ratio {s['tokens_per_s'] / raw['tokens_per_s']:.2f}")
        yield (f"TTFT p50  {n} {s['ttft_p50_ms']:.1f} ms  raw {raw['ttft_p50_ms']:.1f} ms  "
               f"ratio {s['ttft_p50_ms'] / raw['ttft_p50_ms']:.2f}")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=96, help="requests per target per round (default 96)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, ignore_eos (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=4, help="warm-up requests per target, not measured (default 4)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--stock", action="store_true",
                    help="add a third target: Ray's stock build_openai_app at /stock in the demo's Ray")
    ap.add_argument("--stock-stream-batch-ms", type=float, metavar="MS",
                    help="the stock app's LLMConfig experimental_configs.stream_batching_interval_ms "
                         "(Ray's default 50 ms when unset; 0 streams every token on its own)")
    ap.add_argument("--gateway-port", type=int, default=8000, help="HTTP port of the arks-ray demo (default 8000)")
    ap.add_argument("--config", type=Path, default=DEMO_CONFIG, help="demo manifest for `arks-ray up`")
    ap.add_argument("--ingress", choices=("auto", "haproxy", "serve"), default="auto",
                    help="`arks-ray up --ingress` when it starts the demo (default auto, up's own; a running demo "
                         "keeps its own)")
    ap.add_argument("--model-path", default=MODEL_PATH, help=f"model directory (default {MODEL_PATH})")
    ap.add_argument("--token", default=DEMO_TOKEN, help="bearer token of the arks-ray gateway (demo token)")
    ap.add_argument("--raw-nice", type=int, default=RAY_WORKER_NICENESS,
                    help=f"niceness of the raw vLLM server (default {RAY_WORKER_NICENESS}, as Ray's workers)")
    ap.add_argument("--vllm-log", type=Path, default=Path("/tmp/arks-ray/bench-raw-vllm.log"))
    ap.add_argument("--startup-timeout", type=float, default=300.0,
                    help="seconds for the demo, raw vLLM and the stock app to be ready (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each phase, wait up to this many seconds for other processes to go idle (default 60)")
    ap.add_argument("--retries", type=int, default=2,
                    help="measure a phase again when other processes were busy during it (default 2)")
    ap.add_argument("--stock-helper", choices=("deploy", "delete"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("requests", "concurrency", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


async def measure(targets: list[Target], args: argparse.Namespace, own_pgids: set[int]) -> dict[str, list[Phase]]:
    warm = prompts(args.warmup, args.seed + 1000)
    for t in targets:
        if warm:
            _, res = await run_phase(t, warm, min(args.concurrency, len(warm)), args.max_tokens)
            bad = [r.error for r in res if not r.ok]
            if bad:
                raise RuntimeError(f"warm-up against {t.name} ({t.base_url}) failed: {bad[0]}")
            log(f"warm-up {t.name}: {len(res)} ok, ignore_eos honoured ({args.max_tokens} tokens each)")
    phases: dict[str, list[Phase]] = {t.name: [] for t in targets}
    for rnd in range(args.rounds):
        batch = prompts(args.requests, args.seed + rnd)
        for t in targets:
            for attempt in range(args.retries + 1):
                await wait_quiet(own_pgids, args.quiet_wait)
                before = cpu_sample()
                wall, res = await run_phase(t, batch, args.concurrency, args.max_tokens)
                phase = Phase(t.name, rnd, wall, cpu_use(before, cpu_sample(), own_pgids), res)
                toks = sum(r.completion_tokens for r in res if r.ok)
                errors = sum(not r.ok for r in res)
                log(f"round {rnd + 1}/{args.rounds} {t.name:>5}: {len(res)} req in {wall:.2f}s, "
                    f"{toks / wall:.0f} tok/s, {errors} errors, machine CPU {phase.cpu.machine_busy:.0%}, "
                    f"outside the benchmark {phase.cpu.foreign_cores:.2f} cores")
                if phase.cpu.foreign_cores <= FOREIGN_WARN_CORES:
                    break
                again = "; measuring it again" if attempt < args.retries else "; keeping it (no retries left)"
                log("WARNING: other processes were busy during this phase: " + "; ".join(phase.cpu.foreign_top) + again)
            phase.attempts = attempt + 1
            phases[t.name].append(phase)
    return phases


async def wait_quiet(own_pgids: set[int], max_wait_s: float) -> None:
    """Wait (at most ``max_wait_s``) until processes outside the benchmark stay idle for a second."""
    deadline = time.monotonic() + max_wait_s
    waited = False
    while True:
        before = cpu_sample()
        await asyncio.sleep(1.0)
        use = cpu_use(before, cpu_sample(), own_pgids)
        if use.foreign_cores <= FOREIGN_WARN_CORES:
            if waited:
                log("machine quiet again")
            return
        if time.monotonic() > deadline:
            log(f"WARNING: still busy after {max_wait_s:.0f}s, measuring anyway: " + "; ".join(use.foreign_top))
            return
        if not waited:
            log("waiting for other processes to go idle: " + "; ".join(use.foreign_top))
            waited = True


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stock_helper:
        stock_helper(args.stock_helper, args.model_path, args.stock_stream_batch_ms)
        return 0

    # Ctrl-C and SIGTERM both unwind through the finally below (SIGINT explicitly: a shell starting us in
    # the background would otherwise leave it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    ensure_demo(args.config, args.gateway_port, args.startup_timeout, args.ingress)
    targets = [Target("ours", f"http://127.0.0.1:{args.gateway_port}/v1", args.token)]
    args.vllm_log.parent.mkdir(parents=True, exist_ok=True)
    raw: RawVllm | None = None
    background: dict[str, Any] = {}
    stock_deployed = False
    stock_note = ""
    try:
        raw = RawVllm(args.model_path, free_port(), args.vllm_log, args.raw_nice)
        if args.stock:
            log(f"deploying Ray's stock OpenAI app as Serve app {STOCK_APP!r} at {STOCK_PREFIX}")
            started = time.monotonic()
            stock_deployed = True  # a failed deploy may leave a half-made app: delete it either way
            try:
                run_stock_helper("deploy", args.model_path, args.startup_timeout, args.stock_stream_batch_ms)
                targets.append(Target("stock", f"http://127.0.0.1:{args.gateway_port}{STOCK_PREFIX}/v1"))
                log(f"stock app RUNNING ({time.monotonic() - started:.1f}s)")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                stock_note = f"stock target skipped: {exc}"
                log(stock_note)
        log(f"raw vLLM healthy after {raw.wait_healthy(args.startup_timeout):.1f}s")
        targets.insert(1, Target("raw", f"http://127.0.0.1:{raw.port}/v1"))
        own_pgids = {os.getpgid(0), raw.proc.pid}
        before = cpu_sample()
        time.sleep(3)
        idle = cpu_use(before, cpu_sample(), own_pgids)
        background = asdict(idle)
        log(f"idle check: machine CPU {idle.machine_busy:.0%} of {os.cpu_count()} cores, "
            f"outside the benchmark {idle.foreign_cores:.2f} cores")
        if idle.foreign_cores > FOREIGN_WARN_CORES:
            log("WARNING: other processes are busy; numbers will be noisy: " + "; ".join(idle.foreign_top))
        log(f"load: {args.requests} requests x concurrency {args.concurrency} x {args.max_tokens} tokens, "
            f"{args.rounds} round(s), order {' -> '.join(t.name for t in targets)}")
        phases = asyncio.run(measure(targets, args, own_pgids))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if raw is not None:
            raw.stop()
        if stock_deployed:
            log(f"deleting Serve app {STOCK_APP!r}")
            try:
                run_stock_helper("delete", args.model_path, 120)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"WARNING: could not delete {STOCK_APP!r}: {exc}")

    summary = {name: summarize(p) for name, p in phases.items()}
    print()
    print(f"{args.requests} streaming chat requests x concurrency {args.concurrency} x {args.max_tokens} output "
          f"tokens (ignore_eos) x {args.rounds} round(s) per target; model {MODEL_NAME} at {args.model_path}")
    print(table(summary))
    print()
    for line in headline(summary):
        print(line)
    if stock_note:
        print(stock_note)
    disturbed = [f"{n} round {i + 1}: " + "; ".join(p.cpu.foreign_top) for n, ps in phases.items()
                 for i, p in enumerate(ps) if p.cpu.foreign_cores > FOREIGN_WARN_CORES]
    if disturbed:
        print(f"WARNING: other processes used more than {FOREIGN_WARN_CORES} cores during: " + " | ".join(disturbed))
    total = time.monotonic() - t0
    print(f"total run time {total:.0f}s")
    if args.json:
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "token"}
        out = {"params": params,
               "targets": {t.name: asdict(t) | {"token": None} for t in targets},
               "summary": summary, "stock_note": stock_note, "total_s": total, "idle_check": background,
               "ratios_vs_raw": {n: {"tokens_per_s": s["tokens_per_s"] / summary["raw"]["tokens_per_s"],
                                     "ttft_p50": s["ttft_p50_ms"] / summary["raw"]["ttft_p50_ms"]}
                                 for n, s in summary.items() if n != "raw"}}
        Path(args.json).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json}")
    errors = {n: s for n, s in summary.items() if s["errors"]}
    if errors:
        for n, s in errors.items():
            print(f"FAILED: {n}: {s['errors']} of {s['requests']} requests failed, e.g. {s['first_errors']}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
