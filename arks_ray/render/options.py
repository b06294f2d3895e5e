"""Render settings: images, head sizing and gateway settings that are not part of any Arks object.

Built by the CLI or the controller from their own settings and passed to ``render``; the defaults are
what a stock install uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from arks_ray import __version__
from arks_ray.api.digests import TokenKeys
from arks_ray.render.network_policy import NetworkAccess

IMAGE_REPO = "ghcr.io/arks-ray/arks-ray"
GATEWAY_SECRET = "arks-gateway"  # noqa: S105 - a Secret name
GangScheduler = Literal["none", "volcano", "yunikorn", "scheduler-plugins"]
UpgradeStrategy = Literal["NewCluster", "None"]


# Ray Serve's throughput-optimized mode (Ray 2.60: gRPC between handles and replicas, user code and the
# router on the replica's own event loop, GC frozen after start), with its logging left as Ray's defaults
# have it and direct ingress off. Direct ingress: the Kubernetes Service and `arks-ray up` reach Serve's
# proxy on port 8000. Logging: the mode buffers 1000 records per Serve component (the gateway's routers and
# the autoscaling decisions would reach their files late, and be lost with the process) and sends replica
# stdout to the Serve log file only (the gateway's JSON access log goes to stdout). Measured on the Serve
# path alone (benchmarks/gpu_side_by_side.py --mock-engine; README, Performance).
# The proxy's own switch to gRPC is set explicitly: Ray 2.60 reads RAY_SERVE_PROXY_USE_GRPC from
# RAY_SERVE_USE_GRPC_BY_DEFAULT before the mode's block turns that on, so in the mode alone the proxy
# still streams from the ingress replica through Ray's actor-call generator (its cost in the GPU profile).
SERVE_THROUGHPUT_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}


Ingress = Literal["serve", "haproxy"]
HAPROXY_ENV: dict[str, str] = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
"""``ingress: haproxy``: Ray 2.60 runs HAProxy on the Serve port (8000) of each node with a proxy, in front of the
gateway replicas' own HTTP servers, instead of Serve's Python proxy. On the Serve path with a stand-in engine at
128 streams it took the time from the client to the gateway's code from 238-333 ms to 14 ms (README,
Performance). It needs the ``haproxy`` binary on every such node. Ray then refuses a custom request router on an
application's ingress deployment, so an engine app with ``spec.routing`` gets a placeholder ingress
(``deployments.engines.EngineFront``)."""


def ingress_env(ingress: Ingress) -> dict[str, str]:
    """The Serve settings an ingress adds to ``SERVE_THROUGHPUT_ENV``."""
    return dict(HAPROXY_ENV) if ingress == "haproxy" else {}


def _runtime_images() -> dict[str, str]:
    return {
        "vllm": f"{IMAGE_REPO}-vllm:{__version__}",
        "sglang": f"{IMAGE_REPO}-sglang:{__version__}",
        "dynamo": f"{IMAGE_REPO}-dynamo:{__version__}",
    }


@dataclass(frozen=True)
class RenderOptions:
    """Settings of the renderer that no Arks object carries."""

    ray_version: str = "2.60.0"
    """Ray version of every image; KubeRay checks it against the cluster."""

    head_image: str = f"{IMAGE_REPO}-vllm:{__version__}"
    """Image of the head pod, which runs the Serve controller, proxy and gateway ingress. A runtime image:
    Serve builds every application there, and ``ray.serve.llm`` refuses to import without vLLM or SGLang
    (found by the image smoke test), so the operator's slim image cannot be the head."""

    runtime_images: dict[str, str] = field(default_factory=_runtime_images)
    """Default worker image per runtime, when an app sets no ``runtimeImage``."""

    downloader_image: str = f"{IMAGE_REPO}:{__version__}"
    """Image of model download Jobs; it must contain arks-ray (``python -m arks_ray.models``)."""

    head_resources: dict[str, Any] = field(default_factory=lambda: {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    })
    """Head container resources; the gateway ingress replicas are scheduled there."""

    gateway_settings: dict[str, Any] = field(default_factory=dict)
    """Gateway process settings (Redis URL, failure policy, limits), passed as the gateway app's args."""

    gateway_replicas: tuple[int, int] = (1, 4)
    """Min and max gateway ingress replicas (Serve autoscaling at 64 requests in flight each), with a shared
    counter store (``gateway_settings`` ``redis_url``) or nothing to count. A namespace with rate limits or quotas
    and no shared store gets one replica: each replica's in-memory counters would count them on their own. A
    second replica took the intake time at 128 streams from 108-200 ms to 27-66 ms on a GPU (README,
    Performance)."""

    head_resource: str = "arks-head"
    """Custom Ray resource only the head pod advertises; gateway replicas ask for it."""

    gateway_cpus: float = 0.5
    """CPUs per gateway replica (the head's CPUs bound how many fit)."""

    bundle_cpus: float = 1.0
    """CPUs per placement-group bundle for engines without GPUs."""

    group_resource_units: int = 1000
    """How much of its group's custom resource each worker pod advertises (a large, non-binding number)."""

    local: bool = False
    """Render for the local runner: hub models load by id (no PVC), local-source models by path."""

    model_mount_read_only: bool = True
    """Mount the model volume read-only in engine pods (the download Job mounts it read-write)."""

    token_keys: TokenKeys | None = field(default=None, repr=False)
    """The installation's token keys; each namespace's are derived from them. None: no token renders."""

    gateway_secret: str = GATEWAY_SECRET
    """Secret in each tenant namespace (written by the operator, never rendered) whose keys ``token-key``,
    ``token-key-next`` and ``redis-password`` reach the head pod as environment variables."""

    gang_scheduler: GangScheduler = "none"
    """The batch scheduler KubeRay runs with (its ``batchScheduler`` setting); podGroupPolicy maps onto it."""

    serve_env: dict[str, str] = field(default_factory=lambda: dict(SERVE_THROUGHPUT_ENV))
    """Ray Serve settings put in the environment of every Ray container, head and workers alike: the
    caller's setting picks a handle's transport (the gateway on the head; a PD decode replica calling its
    prefill), while the replica-side parts (user code on the event loop, GC frozen) act where the replica
    runs. Every replica serves gRPC whatever its own setting. An app's own ``instanceSpec.env`` wins for its
    pods; ``{}`` renders Ray's defaults."""

    ingress: Ingress = "serve"
    """What answers on the Serve port: ``serve``, Serve's Python proxy (the default), or ``haproxy``
    (``HAPROXY_ENV``; the images carry the binary). Its settings join ``serve_env`` in every Ray container."""

    @property
    def ray_env(self) -> dict[str, str]:
        """``serve_env`` with the ingress's settings: the environment every Ray container gets."""
        return {**self.serve_env, **ingress_env(self.ingress)}

    network_access: NetworkAccess | None = field(default_factory=NetworkAccess)
    """Who may connect to the namespace's Ray pods from outside them: rendered as the NetworkPolicy
    ``arks-ray-cluster`` (``arks_ray.render.network_policy``). None renders none (every pod reaches every Ray
    port). Never rendered for the local runner."""

    upgrade_strategy: UpgradeStrategy = "NewCluster"
    """RayService ``upgradeStrategy.type``: what KubeRay does when the cluster spec changes beyond appended
    worker groups (README, "Upgrades")."""
