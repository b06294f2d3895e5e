"""Operator settings, as plain dataclasses with a docstring on every field (kopf's style).

Built once by ``controller.__main__`` from the command line and the environment, and passed down to
the handlers, the scheduler and the reconciler; tests build them directly. Importing this module
reads nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, get_args
from urllib.parse import quote

import yaml

from arks_ray.api.digests import TokenKeys
from arks_ray.render import RenderOptions
from arks_ray.render.network_policy import NetworkAccess, check_peer
from arks_ray.render.options import GangScheduler, Ingress, UpgradeStrategy

FIELD_MANAGER = "arks-ray"
FINALIZER = "arks.ai/serve-app"


@dataclasses.dataclass
class TimingSettings:
    """When reconciles run, and how failures are retried."""

    debounce: float = 0.2
    """Seconds to wait after the first event of a burst before reconciling its namespace. ``kubectl
    apply -f`` of five objects is five events; they become one reconcile."""

    drift_interval: float = 300.0
    """Seconds between full reconciles of every known namespace, whatever happened. It repairs drift
    (someone edited the RayService) and anything a missed watch event left behind."""

    status_interval: float = 30.0
    """Seconds between reconciles of namespaces that hold ArksQuotas, to mirror usage from the counter
    store (which sends no events). Only used when ``redis_url`` is set."""

    max_concurrent: int = 4
    """Namespaces reconciled at the same time. Each reconcile holds a few API requests in flight."""

    retry_backoff: tuple[float, float] = (1.0, 300.0)
    """First and largest delay, in seconds, before retrying a failed reconcile (doubling in between)."""

    download_backoff: tuple[float, float] = (60.0, 3600.0)
    """First and largest delay before re-creating a failed model download Job (doubling per failure).
    The Job already retried its pod ``backoffLimit`` times, so these are long."""


@dataclasses.dataclass
class NetworkingSettings:
    """Timeouts of API requests, for kopf's watches and for the operator's own client.

    Set explicitly, as dask-kubernetes does: kopf's defaults wait for the server (minutes) and a
    half-open connection then stalls the operator silently (nolar/kopf#585, #847)."""

    request_timeout: float = 30.0
    """Seconds for one API request (reads and writes) before it is abandoned and retried."""

    connect_timeout: float = 10.0
    """Seconds to establish a connection to the API server."""

    watch_server_timeout: float = 300.0
    """Seconds the API server keeps one watch request open; kopf then re-establishes it."""

    watch_client_timeout: float = 330.0
    """Seconds the client waits on one watch request (a little more than the server's)."""


@dataclasses.dataclass
class ControllerSettings:
    """Everything the operator process needs that no Arks object carries."""

    namespaces: tuple[str, ...] = ()
    """Namespaces to watch. Empty means cluster-wide (the chart's default, with a ClusterRole)."""

    field_manager: str = FIELD_MANAGER
    """Server-side-apply field manager of every write, so ``kubectl`` shows who owns which field."""

    finalizer: str = FINALIZER
    """Finalizer on ArksApplications (and disaggregated ones): deletion waits until the Serve
    application is gone from the RayService."""

    redis_url: str | None = None
    """Counter store to mirror quota usage from into ``ArksQuota.status``. None: no mirroring (the
    embedded in-memory store lives inside the gateway, out of the operator's reach)."""

    gateway_redis_password: str | None = dataclasses.field(default=None, repr=False)
    """Password of the gateways' Redis; written into each namespace's gateway Secret, never rendered."""

    render: RenderOptions = dataclasses.field(default_factory=RenderOptions)
    """Images, head sizing and gateway settings passed to ``arks_ray.render``."""

    timing: TimingSettings = dataclasses.field(default_factory=TimingSettings)
    """Debounce, drift and status intervals, and retry backoffs."""

    networking: NetworkingSettings = dataclasses.field(default_factory=NetworkingSettings)
    """API request and watch timeouts."""

    standalone: bool = True
    """Run without kopf peering. The chart runs one replica with ``strategy: Recreate``; two operators
    at once would both write (kopf's peering would instead freeze both at equal priority)."""

    watch_secrets: bool = True
    """Watch Secrets, so a rotated ``tokenSecretRef`` reaches the gateway in seconds. Off: rotation
    takes effect at the next drift reconcile, and the RBAC needs only ``get``/``list`` on Secrets."""

    dynamic_scanning: bool = False
    """Let kopf watch CustomResourceDefinitions and Namespaces. Off (default): the CRDs (and KubeRay's)
    must exist when the operator starts, and the RBAC needs no access to either."""

    metrics_port: int | None = 8080
    """Port of the Prometheus ``/metrics`` endpoint; None disables it."""

    health_port: int | None = 8081
    """Port of kopf's liveness endpoint (``/healthz``); None disables it."""

    kubeconfig: str | None = None
    """Kubeconfig file outside a cluster; None: in-cluster config, else ``$KUBECONFIG``/``~/.kube/config``."""

    context: str | None = None
    """Kubeconfig context to use (with ``kubeconfig``, or the default file)."""


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def from_env(env: Mapping[str, str], base: ControllerSettings | None = None) -> ControllerSettings:
    """Overlay ``ARKS_*`` environment variables (as set by the Helm chart) on ``base``."""
    s = dataclasses.replace(base) if base else ControllerSettings()
    s.timing = dataclasses.replace(s.timing)
    if env.get("ARKS_NAMESPACES"):
        s.namespaces = _split(env["ARKS_NAMESPACES"])
    if env.get("ARKS_REDIS_URL"):
        s.redis_url = with_password(env["ARKS_REDIS_URL"], env.get("ARKS_REDIS_PASSWORD"))
    if env.get("ARKS_WATCH_SECRETS"):
        s.watch_secrets = env["ARKS_WATCH_SECRETS"].strip().lower() in ("1", "true", "yes")
    if env.get("ARKS_DRIFT_INTERVAL"):
        s.timing = dataclasses.replace(s.timing, drift_interval=float(env["ARKS_DRIFT_INTERVAL"]))
    images: dict[str, str] = {}
    for runtime in ("vllm", "sglang", "dynamo"):
        value = env.get(f"ARKS_RUNTIME_IMAGE_{runtime.upper()}")
        if value:
            images[runtime] = value
    changes: dict[str, object] = {}
    if images:
        changes["runtime_images"] = {**s.render.runtime_images, **images}
    for var, key in (("ARKS_HEAD_IMAGE", "head_image"), ("ARKS_DOWNLOADER_IMAGE", "downloader_image"),
                     ("ARKS_RAY_VERSION", "ray_version")):
        if env.get(var):
            changes[key] = env[var]
    if env.get("ARKS_GATEWAY_REDIS_URL"):
        # The gateway runs in the tenant's Ray pods: the URL is in its Serve config, the password is not (it
        # reaches the head pod from the namespace's gateway Secret, controller.gateway_secret).
        changes["gateway_settings"] = {**s.render.gateway_settings, "redis_url": env["ARKS_GATEWAY_REDIS_URL"]}
        s.gateway_redis_password = env.get("ARKS_REDIS_PASSWORD") or None
    keys = TokenKeys.from_environ(env)
    if keys is not None:
        changes["token_keys"] = keys
    if env.get("ARKS_GANG_SCHEDULER"):
        changes["gang_scheduler"] = _choice(env["ARKS_GANG_SCHEDULER"], get_args(GangScheduler), "ARKS_GANG_SCHEDULER")
    if env.get("ARKS_INGRESS"):
        changes["ingress"] = _choice(env["ARKS_INGRESS"], get_args(Ingress), "ARKS_INGRESS")
    if env.get("ARKS_GATEWAY_REPLICAS"):
        changes["gateway_replicas"] = replica_range(env["ARKS_GATEWAY_REPLICAS"], "ARKS_GATEWAY_REPLICAS")
    if env.get("ARKS_UPGRADE_STRATEGY"):
        changes["upgrade_strategy"] = _choice(env["ARKS_UPGRADE_STRATEGY"], get_args(UpgradeStrategy),
                                              "ARKS_UPGRADE_STRATEGY")
    if env.get("ARKS_NETWORK_POLICY"):
        changes["network_access"] = network_access(env["ARKS_NETWORK_POLICY"], "ARKS_NETWORK_POLICY")
    if changes:
        s.render = dataclasses.replace(s.render, **changes)  # type: ignore[arg-type]
    return s


_ACCESS_KEYS = {"dashboardFrom": "dashboard_from", "serveFrom": "serve_from", "metricsFrom": "metrics_from"}


def network_access(value: str, var: str) -> NetworkAccess | None:
    """The chart's ``networkPolicy`` block (YAML): who may reach the Ray pods, or None when ``enabled`` is false."""
    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ValueError(f"{var}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{var}: expected a mapping with enabled, dashboardFrom, serveFrom, metricsFrom")
    unknown = set(data) - {"enabled", *_ACCESS_KEYS}
    if unknown:
        raise ValueError(f"{var}: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(expected enabled, dashboardFrom, serveFrom, metricsFrom)")
    if not isinstance(data.get("enabled", True), bool):
        raise ValueError(f"{var}: enabled must be true or false")
    if not data.get("enabled", True):
        return None
    fields: dict[str, tuple[Any, ...]] = {}
    for key, attr in _ACCESS_KEYS.items():
        peers = data.get(key)
        if peers is None:
            continue
        if not isinstance(peers, list):
            raise ValueError(f"{var}: {key} must be a list of NetworkPolicy peers")
        for peer in peers:
            check_peer(peer, f"{var}: {key}")
        fields[attr] = tuple(peers)
    return NetworkAccess(**fields)


def replica_range(value: str, var: str) -> tuple[int, int]:
    """``MIN,MAX`` (or one number for both) as a checked replica range."""
    parts = [p.strip() for p in value.split(",")]
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        low, high = 0, 0
    if not 1 <= low <= high:
        raise ValueError(f"{var}={value!r}: expected MIN,MAX with 1 <= MIN <= MAX (or one number)")
    return low, high


def _choice(value: str, allowed: tuple[str, ...], var: str) -> str:
    if value not in allowed:
        raise ValueError(f"{var}={value!r}: expected one of {', '.join(allowed)}")
    return value


def with_password(url: str, password: str | None) -> str:
    """Insert a password into a ``redis://host`` URL that has none (the chart keeps it in a Secret)."""
    if not password or "@" in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://:{quote(password, safe='')}@{rest}"
