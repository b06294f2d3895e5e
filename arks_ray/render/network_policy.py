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

Kubelet probes come from the pod's own node, which NetworkPolicies let in (how depends on the CNI). Egress
is not restricted. The pods are
selected by ``ray.io/node-type`` (KubeRay sets it on every Ray pod and lets no template override it) with
the label every Ray pod template here carries; a RayCluster's own name changes at every upgrade.
"""

from __future__ import annotations

import ipaddress
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
    "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}},
}
"""KubeRay's operator pods, in any namespace: its Helm chart and its kustomize manifests both label them
``app.kubernetes.io/component: kuberay-operator`` (Ray pods carry ``app.kubernetes.io/name: kuberay``, so the
name label would not do). Pin the namespace (``namespaceSelector.matchLabels: {kubernetes.io/metadata.name:
...}``): anyone who may create pods could label one so."""

_PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})
_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


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
    """A NetworkPolicyPeer as the API validates it: ``podSelector`` and/or ``namespaceSelector`` (label
    selectors), or an ``ipBlock`` alone. Checked when the settings are read, so that a bad value stops the
    operator at start instead of failing every namespace's write."""
    if not isinstance(peer, Mapping) or not peer:
        raise ValueError(f"{where}: a peer is a mapping of podSelector, namespaceSelector or ipBlock, got {peer!r}")
    unknown = set(peer) - _PEER_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown peer field(s) {', '.join(sorted(unknown))} "
                         f"(expected podSelector, namespaceSelector or ipBlock)")
    if "ipBlock" in peer:
        if len(peer) > 1:
            raise ValueError(f"{where}: an ipBlock peer cannot also select pods or namespaces")
        _check_ip_block(peer["ipBlock"], f"{where}: ipBlock")
    for key in ("podSelector", "namespaceSelector"):
        if key in peer:
            _check_selector(peer[key], f"{where}: {key}")


def _check_selector(selector: Any, where: str) -> None:
    if not isinstance(selector, Mapping):
        raise ValueError(f"{where}: a label selector is a mapping, got {selector!r}")
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                         f"(expected matchLabels or matchExpressions)")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in labels.items()):
        raise ValueError(f"{where}: matchLabels maps label names to strings, got {labels!r}")
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise ValueError(f"{where}: matchExpressions is a list, got {expressions!r}")
    for expr in expressions:
        if not isinstance(expr, Mapping) or set(expr) - {"key", "operator", "values"} or \
                not isinstance(expr.get("key"), str) or expr.get("operator") not in _OPERATORS:
            raise ValueError(f"{where}: a match expression has a key, an operator ({', '.join(sorted(_OPERATORS))}) "
                             f"and values, got {expr!r}")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}: values is a list of strings, got {values!r}")
        if (expr["operator"] in ("In", "NotIn")) != bool(values):
            raise ValueError(f"{where}: {expr['operator']} {'needs' if not values else 'takes no'} values")


def _check_ip_block(block: Any, where: str) -> None:
    if not isinstance(block, Mapping) or set(block) - {"cidr", "except"} or "cidr" not in block:
        raise ValueError(f"{where}: an ipBlock has a cidr and optional except, got {block!r}")
    try:
        cidr = ipaddress.ip_network(str(block["cidr"]))
        excepts = [ipaddress.ip_network(str(e)) for e in block.get("except") or []]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if any(e.version != cidr.version or e == cidr or not e.subnet_of(cidr)  # type: ignore[arg-type]
           for e in excepts):
        raise ValueError(f"{where}: each except must be a strict subnet of {cidr}")


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
