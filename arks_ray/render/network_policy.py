"""Who may connect to a namespace's Ray pods: one NetworkPolicy, ``arks-ray-cluster``. Pure.

Without it every pod of the cluster reaches every port of the Ray pods. Most of those ports are Ray's own
and unauthenticated: the dashboard (8265) takes job submissions (code that runs in the cluster), the GCS
(6379) and the raylets run the cluster, the Ray client (10001) runs a remote driver, and under
``ingress: haproxy`` each app's ingress replica, engines included, serves HTTP on a port of its own
(Ray 2.60's direct ingress, 30000-31000 and gRPC 40000-41000), where a client would skip the gateway's
auth, limits and quotas. The policy lets in:

- every port, from the Ray pods of the namespace's own RayService (head and workers, old and new cluster
  during an upgrade): Ray's own traffic, HAProxy to the replicas;
- the Serve port (8000), from ``serve_from`` (anyone by default): clients, through the gateway, which
  authenticates every request; and KubeRay's proxy health check on the head pod;
- the metrics port (8080), from ``metrics_from`` (anyone by default): Prometheus;
- the dashboard (8265), from ``dashboard_from``: KubeRay's operator, which deploys the Serve config there
  (KubeRay v1.7 connects to the head pod's 8265 and 8000 and nowhere else).

Kubelet probes come from the node, which NetworkPolicies always allow. Egress is not restricted. The pods are
selected by ``ray.io/node-type`` (KubeRay sets it on every Ray pod and lets no template override it) with
the label every Ray pod template here carries; a RayCluster's own name changes at every upgrade.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arks_ray.render.names import CONTENT_ANNOTATION, MANAGED_BY, digest

NETWORK_POLICY_NAME = "arks-ray-cluster"
SERVE_PORT, METRICS_PORT, DASHBOARD_PORT = 8000, 8080, 8265

RAY_PODS: dict[str, Any] = {
    "matchLabels": dict(MANAGED_BY),
    "matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}],
}
"""The Ray pods of a namespace's RayService (``ray.io/node-type``: KubeRay's, head or worker)."""

KUBERAY_OPERATOR: dict[str, Any] = {
    "namespaceSelector": {},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
}
"""KubeRay's operator pods as its Helm chart labels them, in any namespace. Pin the namespace
(``namespaceSelector.matchLabels: {kubernetes.io/metadata.name: ...}``): anyone who may create pods could
label one so."""

_PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})


@dataclass(frozen=True)
class NetworkAccess:
    """Who may reach a namespace's Ray pods from outside them (NetworkPolicy peers, as in the API)."""

    dashboard_from: tuple[Mapping[str, Any], ...] = (KUBERAY_OPERATOR,)
    """Peers allowed to the dashboard (8265) and the Serve port: KubeRay's operator. Empty: nobody (a
    RayService then never gets its Serve config). With KubeRay's ``--use-kubernetes-proxy`` the API server
    connects instead: add its addresses as an ``ipBlock``."""

    serve_from: tuple[Mapping[str, Any], ...] = ()
    """Peers allowed to the Serve port (8000); empty: anyone."""

    metrics_from: tuple[Mapping[str, Any], ...] = ()
    """Peers allowed to the metrics port (8080); empty: anyone."""

    def __post_init__(self) -> None:
        for name in ("dashboard_from", "serve_from", "metrics_from"):
            for peer in getattr(self, name):
                check_peer(peer, name)


def check_peer(peer: Any, where: str) -> None:
    """A NetworkPolicyPeer: a mapping of ``podSelector``, ``namespaceSelector`` and/or ``ipBlock``."""
    if not isinstance(peer, Mapping) or not peer:
        raise ValueError(f"{where}: a peer is a mapping of podSelector, namespaceSelector or ipBlock, got {peer!r}")
    unknown = set(peer) - _PEER_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown peer field(s) {', '.join(sorted(unknown))} "
                         f"(expected podSelector, namespaceSelector or ipBlock)")
    if "ipBlock" in peer and len(peer) > 1:
        raise ValueError(f"{where}: an ipBlock peer cannot also select pods or namespaces")


def _rule(port: int, peers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port}]}
    if peers:
        rule["from"] = [dict(p) for p in peers]
    return rule


def network_policy(namespace: str, access: NetworkAccess) -> dict[str, Any]:
    """The namespace's ``arks-ray-cluster`` NetworkPolicy."""
    serve_peers = [*access.serve_from, *access.dashboard_from] if access.serve_from else []
    ingress: list[dict[str, Any]] = [
        {"from": [{"podSelector": RAY_PODS}]},
        _rule(SERVE_PORT, serve_peers),
        _rule(METRICS_PORT, access.metrics_from),
    ]
    if access.dashboard_from:
        ingress.append(_rule(DASHBOARD_PORT, access.dashboard_from))
    spec = {"podSelector": RAY_PODS, "policyTypes": ["Ingress"], "ingress": ingress}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": NETWORK_POLICY_NAME, "namespace": namespace, "labels": dict(MANAGED_BY),
                     "annotations": {CONTENT_ANNOTATION: digest(spec, 16)}},
        "spec": spec,
    }
