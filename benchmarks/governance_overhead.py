"""Gateway throughput with governance on (Redis) against governance off, measured in the same run.

Both targets are the same stack (Serve proxy -> gateway -> vLLM CPU engine) with the gateway on a real
Redis; they differ only in the token: one has no limits or quota (no store calls), the other has an rpm,
tpm, concurrency limit and a cost quota, all generous enough never to refuse. Rounds alternate between
the two. Short answers (few tokens) make per-request overhead visible. It also counts Redis round trips
per governed request with INFO commandstats.

    .venv/bin/python benchmarks/governance_overhead.py [--requests 96] [--concurrency 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from ingress_vs_vllm import Target, pct, prompts, run_phase  # noqa: E402

from tests.support.redis_server import RedisServer  # noqa: E402

EXTRA = """
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: gov-off, namespace: default}
spec:
  token: sk-gov-off
  qos: [{arksEndpoint: {name: tiny}}]
---
apiVersion: arks.ai/v1
kind: ArksQuota
metadata: {name: big, namespace: default}
spec:
  period: monthly
  quotas: [{type: total, value: 1000000000000}, {type: cost, value: 1000000000000}]
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: gov-on, namespace: default}
spec:
  token: sk-gov-on
  qos:
    - arksEndpoint: {name: tiny}
      rateLimits: [{type: rpm, value: 1000000}, {type: tpm, value: 1000000000}, {type: concurrency, value: 10000}]
      quota: {name: big}
"""


def evalsha_calls(redis: RedisServer) -> int:
    for line in redis.command("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    redis = RedisServer().start()
    extra = Path(tempfile.mkdtemp()) / "governance.yaml"
    extra.write_text(EXTRA)
    arks = str(Path(sys.executable).with_name("arks-ray"))
    try:
        subprocess.run([arks, "down"], check=False, capture_output=True)
        subprocess.run([arks, "up", "-f", str(ROOT / "configs/examples/local-demo.yaml"), "-f", str(extra),
                        "--port", str(args.port), "--redis-url", redis.url, "--detach", "--timeout", "600"],
                       check=True)
        base = f"http://127.0.0.1:{args.port}/v1"
        targets = {"off": Target("off", base, "sk-gov-off"), "on": Target("on", base, "sk-gov-on")}
        stats: dict[str, dict[str, list[float]]] = {k: {"wall": [], "tokens": [], "ttft": [], "n": []}
                                                     for k in targets}
        calls: dict[str, int] = {"off": 0, "on": 0}
        for name in ("off", "on"):  # warm-up
            asyncio.run(run_phase(targets[name], prompts(8, 99), args.concurrency, args.max_tokens))
        for r in range(args.rounds):
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                before = evalsha_calls(redis)
                wall, results = asyncio.run(run_phase(targets[name], prompts(args.requests, r), args.concurrency,
                                                      args.max_tokens))
                time.sleep(0.5)  # let the last settlements land before counting
                calls[name] += evalsha_calls(redis) - before
                bad = [x.error for x in results if not x.ok]
                if bad:
                    print(f"errors in {name}: {bad[:3]}", file=sys.stderr)
                    return 1
                s = stats[name]
                s["wall"].append(wall)
                s["tokens"].append(sum(x.completion_tokens for x in results))
                s["ttft"] += [x.ttft for x in results]
                s["n"].append(len(results))
                print(f"round {r} {name:>3}: {len(results) / wall:6.1f} req/s")
        out = {}
        for name, s in stats.items():
            n = sum(s["n"])
            out[name] = {"req_s": n / sum(s["wall"]), "tok_s": sum(s["tokens"]) / sum(s["wall"]),
                         "ttft_p50_ms": pct(s["ttft"], 0.5) * 1000, "evalsha_per_request": calls[name] / n}
        print(f"\n{'':24}{'governance off':>16}{'governance on':>16}{'on/off':>10}")
        for key, label in (("req_s", "requests/s"), ("tok_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)")):
            print(f"{label:24}{out['off'][key]:16.1f}{out['on'][key]:16.1f}{out['on'][key] / out['off'][key]:10.2f}")
        print(f"{'Redis EVALSHA / request':24}{out['off']['evalsha_per_request']:16.2f}"
              f"{out['on']['evalsha_per_request']:16.2f}")
        return 0
    finally:
        subprocess.run([arks, "down"], check=False, capture_output=True)
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
