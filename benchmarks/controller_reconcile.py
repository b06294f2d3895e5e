"""Time to reconcile one namespace of 1, 10 and 100 ArksApplications against the Kubernetes emulator, and the
writes a no-op reconcile makes (the target is 0).

Each size gets a fresh kmock ``KubernetesEmulator`` in its own process (so its CPU is not the
operator's), seeded over HTTP with one ArksModel (weights already in storage: every app is rendered),
one ArksEndpoint, a token, a quota, and N ArksApplications of four shapes (1-4 GPUs per pod).
``reconcile_namespace`` then runs with the official client, exactly as the operator runs it:

- **first**: the new namespace -> RayService, PVC, finalizers and every status;
- **converge**: more reconciles until one writes nothing (they re-read the statuses the first wrote);
- **no-op**: ``--rounds`` reconciles of the converged namespace: wall time (median, max), the pure
  planning part of it (load + render + diff, the operator's own CPU), requests and writes.

kmock keeps every request and matches each new one against the whole log, so its answers slow down
as a run goes on; the wall times are upper bounds, and the plan column is the operator's share.

    .venv/bin/python benchmarks/controller_reconcile.py [--sizes 1 10 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kubernetes.client  # noqa: E402

from controller.kube import RESOURCES, OfficialKubeClient  # noqa: E402
from controller.reconcile import reconcile_namespace  # noqa: E402
from controller.settings import ControllerSettings  # noqa: E402

NS = "bench"
EMULATOR = """
import asyncio, json, sys
import kmock

async def main():
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        for key, info in json.loads(sys.argv[1]).items():
            emulator.resources[key] = info
        print(str(emulator.url).rstrip("/"), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


def objects(apps: int) -> list[dict[str, Any]]:
    def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "arks.ai/v1", "kind": kind,
                "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1},
                "spec": spec}

    out = [
        obj("ArksModel", "m", {"model": "org/m", "storage": {"pvc": {"spec": {
            "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}}}}}),
        obj("ArksEndpoint", "m", {"defaultWeight": 1}),
        obj("ArksQuota", "q", {"quotas": [{"type": "total", "value": 1_000_000}]}),
        obj("ArksToken", "t", {"token": "sk-bench", "qos": [{"arksEndpoint": {"name": "m"}, "quota": {"name": "q"}}]}),
    ]
    for i in range(apps):
        gpus = str(1 + i % 4)
        out.append(obj("ArksApplication", f"app-{i:03d}", {
            "replicas": 1, "model": {"name": "m"}, "servedModelName": "m",
            "instanceSpec": {"resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}}}))
    return out


def resources() -> dict[str, Any]:
    out = {}
    for kind, res in RESOURCES.items():
        prefix = f"{res.group}/{res.version}" if res.group else res.version
        out[f"{prefix}/{res.plural}"] = {"kind": kind, "namespaced": True,
                                         "verbs": ["get", "list", "create", "patch", "delete"]}
    return out


class Counting(OfficialKubeClient):
    """The operator's client, counting its requests."""

    requests = 0
    writes = 0

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.requests += 1
        self.writes += method != "GET"
        return super()._call(method, path, **kwargs)


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    """The emulator in a child process; it runs until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, json.dumps(resources())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


async def measure(apps: int, rounds: int) -> dict[str, Any]:
    proc, url = await asyncio.to_thread(start_emulator)
    try:
        kube = Counting(kubernetes.client.Configuration(host=url), field_manager="arks-ray")
        for o in objects(apps):
            await kube.create(o)
        settings = ControllerSettings()
        try:
            kube.requests = kube.writes = 0
            t = time.perf_counter()
            first = await reconcile_namespace(kube, NS, settings)
            cold = time.perf_counter() - t
            cold_writes = kube.writes
            converge = 1
            while (await reconcile_namespace(kube, NS, settings)).writes:
                converge += 1
            walls, plans, writes, requests = [], [], [], []
            for _ in range(rounds):
                kube.requests = kube.writes = 0
                t = time.perf_counter()
                out = await reconcile_namespace(kube, NS, settings)
                walls.append(time.perf_counter() - t)
                plans.append(out.timings["plan"])
                writes.append(kube.writes)
                requests.append(kube.requests)
        finally:
            await kube.close()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
    return {"apps": apps, "cold_s": cold, "cold_plan_s": first.timings["plan"], "cold_writes": cold_writes,
            "converge": converge, "noop_s": statistics.median(walls), "noop_max_s": max(walls),
            "noop_plan_s": statistics.median(plans), "noop_writes": max(writes), "noop_requests": max(requests)}


async def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"{'apps':>5} | {'first: wall s':>13} {'plan s':>7} {'writes':>6} | {'rounds':>6} | "
          f"{'no-op: wall s':>13} {'max s':>6} {'plan s':>7} {'reads':>5} {'writes':>6}")
    for n in args.sizes:
        r = await measure(n, args.rounds)
        print(f"{r['apps']:>5} | {r['cold_s']:>13.3f} {r['cold_plan_s']:>7.3f} {r['cold_writes']:>6} | "
              f"{r['converge']:>6} | {r['noop_s']:>13.3f} {r['noop_max_s']:>6.3f} {r['noop_plan_s']:>7.3f} "
              f"{r['noop_requests']:>5} {r['noop_writes']:>6}")


if __name__ == "__main__":
    asyncio.run(main())
