"""The same load step under the arks-ray SLO policy and under Ray Serve's default policy, in one run.

One local stack: the gateway and one vLLM app on the tiny model, min 1 / max 2 replicas. For each round
and each policy the app is deployed afresh at one replica, left idle long enough for its policy to
have seen it, then ``--clients`` streaming clients start at once (the step) and keep sending. Measured
from the step:

- **decision**: Serve's own "Upscaling ... from 1 to 2 replicas" controller log line, which Serve
  writes whatever the policy (so both are timed the same way);
- **serving**: the second replica RUNNING in Serve (Serve routes to it from then on).

Every policy gets the same spec (``targetOngoingRequests``, ``upscaleDelaySeconds``, the TTFT SLO) and
the same metric plumbing (2 s pushes, 10 s look-back), so the difference is the policy:

- ``arks``: ``deployments.autoscaling`` (panic window on the SLO, load averaged over the delay);
- ``ray-default``: Serve's ``replica_queue_length_autoscaling_policy`` with ``upscale_delay_s`` from the
  spec;
- ``ray-stock`` (``--stock``): the same with Serve's stock plumbing (10 s pushes, 30 s look-back), i.e.
  what Serve does out of the box.

    flock /tmp/arks-ray.lock .venv/bin/python benchmarks/autoscaling_step.py [--clients 24] [--rounds 1] [--stock]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from arks_ray.local import runner  # noqa: E402
from tests.support.autoscaling import LoadStep, policy_decisions, running_replicas, serve_upscales  # noqa: E402
from tests.support.redis_server import free_port  # noqa: E402
from tests.support.stack import DEMO_TOKEN, TINY_ENGINE, bring_up, demo_without, make_plan  # noqa: E402

APP = "tiny"
SPEC = {"upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
OBJECTS = f"""
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: {APP}, namespace: default}}
spec:
  servedModelName: tiny
{TINY_ENGINE}  autoscaling:
    minReplicas: 1
    maxReplicas: 2
    targetOngoingRequests: 8
    upscaleDelaySeconds: {SPEC["upscale_delay_s"]:g}
    downscaleDelaySeconds: {SPEC["downscale_delay_s"]:g}
    slo: {{ttftMs: 100, percentile: 90}}
"""


def with_policy(config: dict[str, Any], policy: str) -> dict[str, Any]:
    """The rendered Serve config with the app's autoscaling under ``policy``."""
    out = copy.deepcopy(config)
    app = next(a for a in out["applications"] if a["name"] == APP)
    auto = app["args"]["llm_config"]["deployment_config"]["autoscaling_config"]
    if policy != "arks":
        del auto["policy"]
        auto.update(SPEC)
    if policy == "ray-stock":
        del auto["metrics_interval_s"], auto["look_back_period_s"]
    return out


def deploy_fresh(config: dict[str, Any]) -> None:
    """Deploy and wait for the app at exactly one RUNNING replica (the previous round's are gone)."""
    runner.deploy(config)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        app = runner.serve_status().get(APP, {})
        states = [d["replicas"] for d in app.get("deployments", {}).values()]
        if app.get("status") == "RUNNING" and states == [{"RUNNING": 1}]:
            return
        time.sleep(1)
    raise RuntimeError(f"{APP} did not come back at one replica")


def step(base: str, clients: int, timeout_s: float) -> dict[str, Any]:
    with LoadStep(base, DEMO_TOKEN, "tiny", clients) as load:
        t0 = load.started_at
        decided = serving = None
        deadline = time.time() + timeout_s
        while time.time() < deadline and serving is None:
            if decided is None:
                decided = next((at for at, old, new in serve_upscales(APP) if at > t0 and (old, new) == (1, 2)), None)
            if decided is not None and running_replicas(APP) == 2:
                serving = time.time()
            time.sleep(0.25)
    ours = next((d for d in policy_decisions(APP) if d.get("action") == "up" and d.get("at", 0) > t0), None)
    return {"decision_s": None if decided is None else decided - t0, "serving_s": None if serving is None
            else serving - t0, "signal": ours["signal"] if ours else "-", "reason": ours["reason"] if ours else "",
            "ok": load.ok, "failed": len(load.failed)}


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds idle before each step")
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds to wait for the new replica")
    parser.add_argument("--stock", action="store_true", help="also Ray's default policy with stock plumbing")
    args = parser.parse_args()

    port = free_port()
    plan = make_plan(OBJECTS, port, base=demo_without("ArksApplication"))
    policies = ["arks", "ray-default", *(["ray-stock"] if args.stock else [])]
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        bring_up(plan)
        for r in range(args.rounds):
            for policy in policies if r % 2 == 0 else reversed(policies):
                deploy_fresh(with_policy(plan.serve_config, policy))
                time.sleep(args.idle)
                result = step(f"http://127.0.0.1:{port}", args.clients, args.timeout)
                rows.append((policy, result))
                print(f"round {r + 1} {policy:12s} decision {fmt(result['decision_s'])} s, serving "
                      f"{fmt(result['serving_s'])} s, signal {result['signal']}, {result['ok']} ok, "
                      f"{result['failed']} failed  {result['reason']}", flush=True)
    finally:
        runner.down()

    print(f"\nLoad step: 0 -> {args.clients} streaming clients (64 tokens each), min 1 / max 2 replicas, "
          f"targetOngoingRequests 8, upscaleDelaySeconds {SPEC['upscale_delay_s']:g}, TTFT SLO 100 ms p90\n")
    print("| policy | step -> scale-up decision (s) | step -> new replica serving (s) | rounds |")
    print("|---|---|---|---|")
    for policy in policies:
        mine = [res for p, res in rows if p == policy]
        decisions = [x["decision_s"] for x in mine if x["decision_s"] is not None]
        servings = [x["serving_s"] for x in mine if x["serving_s"] is not None]
        print(f"| {policy} | {fmt(statistics.median(decisions) if decisions else None)} | "
              f"{fmt(statistics.median(servings) if servings else None)} | {len(mine)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
