"""LoRA on a live vLLM CPU replica behind the gateway: adapter load time, and mixed base + adapter load
against base only, in the same run.

One stack (Ray, gateway, one vLLM engine for app ``lora``: the tiny chat model with ``spec.lora``), all
through the gateway with the ``openai``-compatible HTTP API:

1. load time: with the engine warm, the first request naming adapter ``a`` (loaded on that request)
   against the median of the next ones; then adapter ``b`` is added to the running app (a user_config
   change, no restart) and timed the same way, plus the time from the deploy call to its first answer;
2. throughput: rounds alternate between base only (every request to ``lora``) and mixed (requests
   round-robin over ``lora``, ``lora:a`` and ``lora:b``), same prompts, concurrency and token counts.

    flock /tmp/arks-ray.lock .venv/bin/python benchmarks/lora_mixed.py [--requests 128] [--rounds 4]

Writes benchmarks/results/lora_mixed.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from arks_ray.local import runner  # noqa: E402
from tests.support.redis_server import free_port  # noqa: E402
from tests.support.stack import TINY_ENGINE, bring_up, make_plan  # noqa: E402

TOKEN = "sk-lora-bench"
OUT = ROOT / "benchmarks/results"


def objects(adapters: tuple[str, ...]) -> str:
    listed = ", ".join(f"{{name: {a}, model: {{name: tiny-lora}}}}" for a in adapters)
    grants = "".join(f"\n    - {{arksEndpoint: {{name: 'lora:{a}'}}}}" for a in adapters)
    return f"""
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {{name: tiny-lora, namespace: default}}
spec:
  model: arks-ray/tiny-qwen2-lora
  source: {{local: {{path: /tmp/arks-ray/models/tiny-qwen2-lora}}}}
---
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: lora, namespace: default}}
spec:
  servedModelName: lora
{TINY_ENGINE}  lora:
    adapters: [{listed}]
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {{name: lora, namespace: default}}
spec: {{defaultWeight: 1}}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {{name: bench, namespace: default}}
spec:
  token: {TOKEN}
  qos:
    - {{arksEndpoint: {{name: lora}}}}{grants}
"""


# The demo's own app stays out: one engine, so base and adapters share it.
BASE = "\n---\n".join(d for d in (ROOT / "configs/examples/local-demo.yaml").read_text().split("\n---\n")
                      if "kind: ArksModel\n" in d)


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    resp = await client.post(url, json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0},
                             headers={"Authorization": f"Bearer {TOKEN}"})
    if resp.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {resp.status_code}: {resp.text[:300]}")
    return time.perf_counter() - started, int(resp.json()["usage"]["completion_tokens"])


async def phase(url: str, models: list[str], requests: int, concurrency: int, max_tokens: int,
                seed: int) -> dict[str, Any]:
    todo = [(models[i % len(models)], f"#{seed}-{i} tell me a story about the sea") for i in range(requests)]
    latencies: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker() -> None:
            nonlocal tokens
            while todo:
                model, prompt = todo.pop()
                took, n = await one(client, url, model, prompt, max_tokens)
                latencies.append(took)
                tokens += n

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "req_s": requests / wall, "tok_s": tokens / wall,
            "latency_p50_s": statistics.median(latencies)}


def first_vs_warm(url: str, model: str, warm: int = 5, wait_s: float = 0.0) -> dict[str, float]:
    """The first answered request naming ``model`` (refused ones retried for ``wait_s``: the gateway may not
    know it yet) against the median of the next ``warm``."""

    async def run() -> dict[str, float]:
        deadline = time.perf_counter() + wait_s
        async with httpx.AsyncClient(timeout=300) as client:
            while True:
                try:
                    first, _ = await one(client, url, model, "load me", 1)
                    answered = time.perf_counter()
                    break
                except RuntimeError:
                    if time.perf_counter() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            rest = [(await one(client, url, model, "load me", 1))[0] for _ in range(warm)]
        median = statistics.median(rest)
        return {"first_request_s": first, "warm_request_s": median, "load_s": first - median,
                "answered_at": answered}

    return asyncio.run(run())


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["base only", "mixed base + 2 adapters"]
    values = [result["throughput"]["base"]["tok_s"], result["throughput"]["mixed"]["tok_s"]]
    left.bar(names, values, color=["#4c72b0", "#dd8452"])
    left.set_ylabel("output tokens/s (gateway, vLLM CPU)")
    left.set_title("Throughput, same run")
    loads = result["load"]
    right.bar(list(loads), [v["load_s"] * 1000 for v in loads.values()], color="#55a868")
    right.set_ylabel("first request - warm request (ms)")
    right.set_title("Adapter load on a live replica")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    result: dict[str, Any] = {"args": vars(args), "load": {}}
    try:
        plan = make_plan(objects(("a",)), port, base=BASE)
        bring_up(plan)
        # The gateway's health check may still hold the app for not ready: wait for its first answer.
        first_vs_warm(url, "lora", wait_s=60)
        asyncio.run(phase(url, ["lora"], 8, 4, 4, 99))  # warm the engine on the base model
        result["load"]["a (at first use)"] = first_vs_warm(url, "lora:a")
        started = time.perf_counter()
        runner.deploy(make_plan(objects(("a", "b")), port, base=BASE).serve_config)
        # The gateway learns lora:b when its reconfigure lands; the first answer is also b's first load.
        result["load"]["b (added live)"] = first_vs_warm(url, "lora:b", wait_s=60)
        result["added_b_until_first_answer_s"] = result["load"]["b (added live)"].pop("answered_at") - started
        result["load"]["a (at first use)"].pop("answered_at")
        rounds: dict[str, list[dict[str, Any]]] = {"base": [], "mixed": []}
        mixes = {"base": ["lora"], "mixed": ["lora", "lora:a", "lora:b"]}
        for r in range(args.rounds):
            for name in ("base", "mixed") if r % 2 == 0 else ("mixed", "base"):
                got = asyncio.run(phase(url, mixes[name], args.requests, args.concurrency, args.max_tokens, r))
                rounds[name].append(got)
                print(f"round {r} {name:>5}: {got['tok_s']:.1f} tok/s, {got['req_s']:.2f} req/s", flush=True)
        result["throughput"] = {name: {"tok_s": statistics.mean(x["tok_s"] for x in rs),
                                       "req_s": statistics.mean(x["req_s"] for x in rs), "rounds": rs}
                                for name, rs in rounds.items()}
        result["mixed_over_base"] = result["throughput"]["mixed"]["tok_s"] / result["throughput"]["base"]["tok_s"]
    finally:
        runner.down()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lora_mixed.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, OUT / "lora_mixed.png")
    print(json.dumps({k: v for k, v in result.items() if k != "throughput"}, indent=2))
    print(f"mixed/base throughput: {result['mixed_over_base']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
