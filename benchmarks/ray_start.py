#!/usr/bin/env python
"""How long a local Ray and Serve take to start, under variants of Ray's settings, each in a fresh process.

The first stages of a cold start of the whole stack (``gpu_side_by_side.py startup``): ``ray.init`` (the GCS,
the raylet and the workers Ray starts ahead for the first driver), Serve's controller and proxy
(``serve_start``), then one task (a worker ready for work: what a build task waits for). ``--variant NAME:K=V,...``
adds one set of environment variables for Ray's processes (``RAY_prestart_worker_first_driver=0``: no workers
started ahead; ``JOB_RUNTIME_ENV=1``: the driver's job gets a runtime env, which Serve's actors and tasks then
wait for a worker of their own for); ``default`` is Ray as it comes. The variants alternate, ``--rounds`` times;
JSON to ``--out``.

    python benchmarks/ray_start.py --rounds 3 --variant noprestart:RAY_prestart_worker_first_driver=0 \
        --variant jobenv:JOB_RUNTIME_ENV=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_side_by_side import stop_ray

ONE = """
import json, sys, time
t0 = time.monotonic()
import ray
from ray.serve._private.api import serve_start
t1 = time.monotonic()
job_env = {"runtime_env": {"env_vars": {"ARKS_PROBE": "1"}}} if sys.argv[2] == "1" else {}
ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, **job_env)
t2 = time.monotonic()
serve_start(http_options={"host": "127.0.0.1", "port": 8000}, proxy_location="HeadOnly")
t3 = time.monotonic()
ray.get(ray.remote(lambda: 1).remote())
t4 = time.monotonic()
print(json.dumps({"import_s": t1 - t0, "ray_init_s": t2 - t1, "serve_s": t3 - t2, "task_s": t4 - t3,
                  "total_s": t4 - t1}))
"""


def one_start(env: dict[str, str], cpus: int) -> dict[str, float]:
    job_env = env.pop("JOB_RUNTIME_ENV", "0")
    done = subprocess.run([sys.executable, "-c", ONE, str(cpus), job_env], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, check=False)
    stop_ray()
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}  # type: ignore[dict-item]
    return {k: round(v, 2) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="ray.init's num_cpus (default: all)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ray_start.json"))
    args = ap.parse_args()
    variants: dict[str, dict[str, str]] = {"default": {}}
    for spec in args.variant:
        name, _, pairs = spec.partition(":")
        variants[name] = dict(kv.split("=", 1) for kv in pairs.split(",") if kv)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for name in list(variants) if rnd % 2 == 0 else list(variants)[::-1]:
            results[name].append(one_start(dict(variants[name]), args.cpus))
            print(f"round {rnd} {name}: {results[name][-1]}", flush=True)
    summary = {name: {key: round(statistics.median(r[key] for r in runs if key in r), 2)
                      for key in ("ray_init_s", "serve_s", "task_s", "total_s")}
               for name, runs in results.items() if any("total_s" in r for r in runs)}
    args.out.write_text(json.dumps({"cpus": args.cpus, "variants": variants, "starts": results,
                                    "medians": summary}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
