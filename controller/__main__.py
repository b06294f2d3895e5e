"""``python -m controller``: run the arks-ray operator.

Inside a pod it uses the in-cluster service account; elsewhere the current kubeconfig (or
``--kubeconfig``/``--context``). Settings come from flags, then ``ARKS_*`` environment variables (the
Helm chart sets those), see ``controller.settings``.

``--standalone`` (the default) runs without kopf peering: run exactly one replica. The chart does
(``replicas: 1``, ``strategy: Recreate``, so an upgrade never overlaps two operators). ``--no-standalone``
turns kopf peering on, which needs kopf's ``KopfPeering``/``ClusterKopfPeering`` CRDs; the chart does
not ship them, because peering pauses operators of equal priority rather than electing a leader.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from controller.kube import load_configuration
from controller.metrics import Metrics
from controller.runtime import build_runtime, run
from controller.settings import ControllerSettings, from_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m controller", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable); default: all namespaces ($ARKS_NAMESPACES)")
    p.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=True,
                   help="run without kopf peering (default; run a single replica)")
    p.add_argument("--redis-url", help="counter store to mirror ArksQuota usage from ($ARKS_REDIS_URL)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port; 0 disables")
    p.add_argument("--health-port", type=int, default=8081, help="liveness /healthz port; 0 disables")
    p.add_argument("--drift-interval", type=float, help="seconds between full reconciles of every namespace")
    p.add_argument("-v", "--verbose", action="store_true", help="log every handler call and request")
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace, env: dict[str, str]) -> ControllerSettings:
    settings = from_env(env)
    if args.namespace:
        settings.namespaces = tuple(args.namespace)
    if args.redis_url:
        settings.redis_url = args.redis_url
    settings.standalone = args.standalone
    settings.kubeconfig, settings.context = args.kubeconfig, args.context
    settings.metrics_port = args.metrics_port or None
    settings.health_port = args.health_port or None
    if args.drift_interval:
        settings.timing.drift_interval = args.drift_interval
    return settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kopf logs every successful handler call; the reconciler logs what it writes instead.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        settings = build_settings(args, dict(os.environ))
    except ValueError as exc:
        # A bad chart value: one line that names it, not a traceback (the pod's log is what the user reads).
        sys.exit(f"error: {exc}")
    metrics = Metrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    runtime = build_runtime(settings, load_configuration(settings.kubeconfig, settings.context), metrics)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(run(runtime, liveness_endpoint=liveness))


if __name__ == "__main__":
    main()
