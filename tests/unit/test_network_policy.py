"""The NetworkPolicy of a namespace's Ray pods (``arks_ray.render.network_policy``): valid, selecting exactly the
Ray pods KubeRay makes from the rendered templates, and letting in only what it says.

No CNI runs here, so ``admits`` below reads the policy as the NetworkPolicy API defines it (a rule admits a
connection when one of its ports matches, or it has none, and one of its peers matches, or it has none; a peer
without ``namespaceSelector`` means the policy's own namespace). The policy itself is validated against the
Kubernetes 1.33 schema, strictly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from arks_ray.api import load_documents
from arks_ray.render import render_namespace
from arks_ray.render.network_policy import KUBERAY_OPERATOR, NETWORK_POLICY_NAME, NetworkAccess, network_policy
from tests.support.keys import TEST_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
NS = "team-a"
K8S = "1.33.0"
# What KubeRay v1.7 adds to every Ray pod (labelPod in ray-operator/controllers/ray/common/pod.go).
KUBERAY_POD_LABELS = {"ray.io/is-ray-node": "yes", "ray.io/cluster": "arks-abcde", "app.kubernetes.io/name": "kuberay",
                      "app.kubernetes.io/created-by": "kuberay-operator"}
OUTSIDE = ({"app": "curl"}, {"kubernetes.io/metadata.name": "team-b"}, False)
# KubeRay's operator pod as its Helm chart (helm-chart/kuberay-operator) and its kustomize manifests
# (ray-operator/config/manager/manager.yaml) label it, v1.7.
KUBERAY = ({"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
            "app.kubernetes.io/component": "kuberay-operator"},
           {"kubernetes.io/metadata.name": "kuberay-system"}, False)
KUBERAY_KUSTOMIZE = ({"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
                     {"kubernetes.io/metadata.name": "ray-system"}, False)
DIRECT_INGRESS = (30000, 30500, 31000, 40000, 40999, 41000)
RAY_OWN = (6379, 8265, 10001, 52365, 10002, 20000, 62000)


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"Exists": key in labels, "DoesNotExist": key not in labels,
              "In": labels.get(key) in values, "NotIn": labels.get(key) not in values}[op]
        if not ok:
            return False
    return True


def admits(policy: Mapping[str, Any], source: tuple[dict[str, str], dict[str, str], bool], port: int) -> bool:
    """Whether a TCP connection from ``source`` (pod labels, namespace labels, same namespace) to ``port`` of a
    selected pod gets in."""
    pod_labels, ns_labels, same_ns = source
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == "TCP"
                             and (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
                             for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            if "ipBlock" in peer:
                continue
            ns_ok = same_ns if "namespaceSelector" not in peer else selects(peer["namespaceSelector"], ns_labels)
            if ns_ok and ("podSelector" not in peer or selects(peer["podSelector"], pod_labels)):
                return True
    return False


def rendered(name: str, **options: Any) -> Any:
    """The example's namespace (its first, where it has several), rendered."""
    loaded = load_documents([d for d in yaml.safe_load_all((ROOT / "configs" / "examples" / name).read_text()) if d])
    ns = loaded.namespaces()[0]
    return render_namespace(loaded.objects, ns, secrets=loaded.secrets,
                            options=dataclasses.replace(TEST_OPTIONS, **options))


def ray_pods(out: Any) -> list[dict[str, str]]:
    """The labels KubeRay gives the head and worker pods of the rendered RayService."""
    cluster = out.rayservice["spec"]["rayClusterConfig"]
    head = {**cluster["headGroupSpec"]["template"]["metadata"]["labels"], **KUBERAY_POD_LABELS,
            "ray.io/node-type": "head", "ray.io/group": "headgroup"}
    workers = [{**g["template"]["metadata"]["labels"], **KUBERAY_POD_LABELS, "ray.io/node-type": "worker",
                "ray.io/group": g["groupName"]} for g in cluster["workerGroupSpecs"]]
    return [head, *workers]


@pytest.mark.parametrize("example", ["multi-app.yaml", "disaggregated.yaml", "node-cache.yaml"])
def test_it_selects_every_ray_pod_and_nothing_else(example: str) -> None:
    out = rendered(example)
    policy = out.network_policy
    assert policy is not None
    assert policy["metadata"]["name"] == NETWORK_POLICY_NAME
    kubernetes_validate.validate(policy, K8S, strict=True)
    pods = ray_pods(out)
    assert len(pods) >= 2
    assert all(selects(policy["spec"]["podSelector"], labels) for labels in pods)
    # Download Jobs and node-cache preloads are not Ray pods: the policy leaves them alone.
    others = [c["spec"]["template"]["metadata"].get("labels") or {} for c in out.children
              if c["kind"] in ("Job", "DaemonSet")]
    assert others, "the example renders a download Job"
    assert not any(selects(policy["spec"]["podSelector"], labels) for labels in others)


def test_ray_pods_reach_one_another_on_every_port_and_nobody_else_on_rays_own() -> None:
    out = rendered("multi-app.yaml", ingress="haproxy")
    policy = out.network_policy
    assert policy is not None
    peer = (ray_pods(out)[1], {"kubernetes.io/metadata.name": out.namespace}, True)
    for port in (*DIRECT_INGRESS, *RAY_OWN, 8000, 8080):
        assert admits(policy, peer, port), port
    for port in (*DIRECT_INGRESS, *RAY_OWN):
        assert not admits(policy, OUTSIDE, port), port
    # The Ray labels on a pod of another namespace are no key: the peer is the policy's own namespace only.
    impostor = (ray_pods(out)[1], {"kubernetes.io/metadata.name": "team-b"}, False)
    assert not admits(policy, impostor, 30000)
    assert admits(policy, OUTSIDE, 8000)
    assert admits(policy, OUTSIDE, 8080)


@pytest.mark.parametrize("operator", [KUBERAY, KUBERAY_KUSTOMIZE], ids=["helm", "kustomize"])
def test_kuberay_reaches_the_dashboard_and_the_serve_port_only(operator: Any) -> None:
    policy = network_policy(NS, NetworkAccess())
    assert admits(policy, operator, 8265)
    assert admits(policy, operator, 8000)
    assert not any(admits(policy, operator, p) for p in (6379, 10001, 30000, 40000))
    assert not admits(policy, OUTSIDE, 8265)
    # Another namespace's Ray pods carry KubeRay's name label (app.kubernetes.io/name: kuberay): no key.
    foreign_ray = ({**KUBERAY_POD_LABELS, "ray.io/node-type": "head"}, {"kubernetes.io/metadata.name": "team-b"}, False)
    assert not admits(policy, foreign_ray, 8265)


def test_restricted_serve_and_metrics_ports_still_let_kuberay_check_the_proxy() -> None:
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    policy = network_policy(NS, NetworkAccess(serve_from=(ingress,), metrics_from=(monitoring,)))
    kubernetes_validate.validate(policy, K8S, strict=True)
    nginx = ({"app": "nginx"}, {"kubernetes.io/metadata.name": "ingress-nginx"}, False)
    prometheus = ({"app": "prometheus"}, {"kubernetes.io/metadata.name": "monitoring"}, False)
    assert admits(policy, nginx, 8000)
    assert not admits(policy, nginx, 8080)
    assert admits(policy, prometheus, 8080)
    assert not admits(policy, prometheus, 8000)
    assert admits(policy, KUBERAY, 8000)
    assert not admits(policy, OUTSIDE, 8000)
    assert not admits(policy, OUTSIDE, 8080)


def test_no_dashboard_peers_closes_the_dashboard() -> None:
    policy = network_policy(NS, NetworkAccess(dashboard_from=()))
    kubernetes_validate.validate(policy, K8S, strict=True)
    assert not admits(policy, KUBERAY, 8265)


def test_a_template_label_cannot_take_a_pod_out_of_the_policy() -> None:
    """An app's own pod labels come first; the label the policy selects on is set after them."""
    docs = [d for d in yaml.safe_load_all((ROOT / "configs/examples/multi-app.yaml").read_text()) if d]
    for d in docs:
        if d["kind"] == "ArksApplication":
            d["spec"].setdefault("instanceSpec", {})["labels"] = {"app.kubernetes.io/managed-by": "helm",
                                                                  "ray.io/node-type": "none"}
    loaded = load_documents(docs)
    ns = loaded.namespaces()[0]
    out = render_namespace(loaded.objects, ns, secrets=loaded.secrets, options=TEST_OPTIONS)
    assert out.network_policy is not None
    groups = out.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "arks-ray"
    # KubeRay then sets ray.io/node-type itself (not overridable), and the policy selects every pod.
    assert all(selects(out.network_policy["spec"]["podSelector"], labels) for labels in ray_pods(out))


def test_host_network_pods_get_no_policy_and_a_warning() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "configs/examples/multi-app.yaml").read_text()) if d]
    app = next(d for d in docs if d["kind"] == "ArksApplication")
    app["spec"].setdefault("instanceSpec", {})["hostNetwork"] = True
    loaded = load_documents(docs)
    out = render_namespace(loaded.objects, app["metadata"]["namespace"], secrets=loaded.secrets, options=TEST_OPTIONS)
    assert out.network_policy is None
    (warning,) = [p for p in out.problems if "NetworkPolicies" in p.message]
    assert (warning.kind, warning.name, warning.severity) == ("ArksApplication", app["metadata"]["name"], "warning")
    assert warning.path == "spec.instanceSpec.hostNetwork"


GOOD_PEERS = [
    {"podSelector": {}},
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
     "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["prometheus"]}]}},
    {"namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}},
    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
    {"ipBlock": {"cidr": "fd00::/8"}},
]
# The schema refuses these (a field name or type)...
SCHEMA_BAD = [
    {"podSelector": {"matchLabel": {"app": "x"}}},
    {"podSelector": {"matchLabels": {"app": 1}}},
    {"ipBlock": {}},
    {"podSelectr": {}},
]
# ...and the API server's validation these, which the schema lets through (ValidateLabelSelector: the operator
# and its values; ValidateNetworkPolicyPeer: one kind of peer, at least one; ValidateIPBlock: the CIDRs).
SERVER_BAD = [
    {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Exist"}]}},
    {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
    {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]}},
    {"ipBlock": {"cidr": "10.0.0.0/33"}},
    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}},
    {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
    {},
]


def _schema_accepts(peer: dict[str, Any]) -> bool:
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"},
              "spec": {"podSelector": {}, "ingress": [{"from": [peer]}]}}
    try:
        kubernetes_validate.validate(policy, K8S, strict=True)
    except kubernetes_validate.ValidationError:
        return False
    return True


@pytest.mark.parametrize("peer", GOOD_PEERS)
def test_a_peer_the_api_takes_is_taken(peer: dict[str, Any]) -> None:
    assert _schema_accepts(peer)
    kubernetes_validate.validate(network_policy(NS, NetworkAccess(serve_from=(peer,))), K8S, strict=True)


@pytest.mark.parametrize("peer", SCHEMA_BAD + SERVER_BAD)
def test_a_bad_peer_is_refused_before_the_api_would(peer: dict[str, Any]) -> None:
    """Refused when the settings are read, so the operator stops at start instead of failing every namespace's
    write with the API's 422."""
    assert _schema_accepts(peer) == (peer in SERVER_BAD)
    with pytest.raises(ValueError, match="serve_from"):
        NetworkAccess(serve_from=(peer,))


def test_the_content_id_follows_the_spec() -> None:
    a, b = network_policy(NS, NetworkAccess()), network_policy(NS, NetworkAccess())
    pinned = network_policy(NS, NetworkAccess(dashboard_from=(
        {**KUBERAY_OPERATOR, "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray"}}},)))
    key = "arks.ai/content-id"
    assert a["metadata"]["annotations"][key] == b["metadata"]["annotations"][key]
    assert a["metadata"]["annotations"][key] != pinned["metadata"]["annotations"][key]


def test_none_for_the_local_runner_or_when_turned_off() -> None:
    assert rendered("multi-app.yaml", local=True).network_policy is None
    off = rendered("multi-app.yaml", network_access=None)
    assert off.network_policy is None
    assert [m["kind"] for m in off.manifests].count("NetworkPolicy") == 0
    assert [m["kind"] for m in rendered("multi-app.yaml").manifests].count("NetworkPolicy") == 1


@pytest.mark.parametrize("peer", [{}, {"podSelectr": {}}, {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}, "x"])
def test_a_bad_peer_is_refused(peer: Any) -> None:
    with pytest.raises(ValueError, match="serve_from"):
        NetworkAccess(serve_from=(peer,))
