"""The Helm chart (charts/arks-ray) and the plain manifests (configs/deploy), without a helm binary.

The chart's templates use a small subset of Helm on purpose: ``{{ .Values.x }}``, ``.Release.Namespace``,
``.Chart.AppVersion``, ``toYaml X | nindent N``, ``required "msg" X`` and non-nested ``if``/``end``.
``render_chart`` below implements exactly that subset, so what is tested here is what helm renders.
The rendered objects are validated with kubernetes-validate (strict), the least-privilege RBAC is
pinned verb by verb, and configs/deploy is checked to be the chart's output. Regenerate it with
``.venv/bin/python tests/unit/test_controller_chart.py --write``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from arks_ray.api.gateway import GatewayConfig, Quota
from arks_ray.render import render_namespace
from arks_ray.render.serve_config import gateway_app
from controller.settings import from_env

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "arks-ray"
DEPLOY = ROOT / "configs" / "deploy"
NAMESPACE = "arks-system"
K8S = "1.33.0"


class ChartError(Exception):
    pass


def _lookup(context: dict[str, Any], path: str) -> Any:
    value: Any = context
    for part in path.strip(".").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _expression(expr: str, context: dict[str, Any]) -> str:
    expr = expr.strip()
    if m := re.fullmatch(r"toYaml (\S+) \| nindent (\d+)", expr):
        text = yaml.safe_dump(_lookup(context, m[1]), sort_keys=False).rstrip("\n")
        pad = " " * int(m[2])
        return "\n" + "\n".join(pad + line for line in text.splitlines())
    if m := re.fullmatch(r'required "([^"]*)" (\S+)', expr):
        value = _lookup(context, m[2])
        if value in (None, ""):
            raise ChartError(m[1])
        return _scalar(value)
    if re.fullmatch(r"\.[A-Za-z][\w.]*", expr):
        return _scalar(_lookup(context, expr))
    raise ChartError(f"template construct outside the supported subset: {{{{ {expr} }}}}")


def _render_text(text: str, context: dict[str, Any]) -> str:
    def conditional(m: re.Match[str]) -> str:
        return m[2] if _lookup(context, m[1]) else ""

    # {{- trims the whitespace (and newline) before the action, as in Go templates.
    text = re.sub(r"\s*\{\{-\s*if (\S+)\s*\}\}(.*?)\s*\{\{-\s*end\s*\}\}", lambda m: conditional(m), text,
                  flags=re.S)
    text = re.sub(r"\s*\{\{-(.*?)\}\}", lambda m: _expression(m[1], context), text)
    return re.sub(r"\{\{(.*?)\}\}", lambda m: _expression(m[1], context), text)


def chart_values(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted, value in overrides.items():
        node = values
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return values


def render_chart(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    context = {"Values": values or chart_values(), "Release": {"Namespace": namespace, "Name": "arks-ray"},
               "Chart": {"AppVersion": chart["appVersion"], "Version": chart["version"]}}
    docs: list[dict[str, Any]] = []
    for path in sorted((CHART / "templates").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(_render_text(path.read_text(), context)) if d]
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    context = {"Values": values or chart_values(), "Release": {"Namespace": NAMESPACE},
               "Chart": {"AppVersion": chart["appVersion"]}}
    return _render_text((CHART / "templates" / "NOTES.txt").read_text(), context)


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The operator container's plain environment variables (not those from Secrets)."""
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_default_chart_objects_are_valid() -> None:
    docs = render_chart()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("ClusterRole", "arks-ray-gateway-secrets"), ("ClusterRole", "arks-ray-operator"),
                     ("ClusterRole", "arks-ray-token-secrets"), ("ClusterRoleBinding", "arks-ray-gateway-secrets"),
                     ("ClusterRoleBinding", "arks-ray-operator"), ("ClusterRoleBinding", "arks-ray-token-secrets"),
                     ("Deployment", "arks-ray-operator"), ("ServiceAccount", "arks-ray-operator")]
    for d in docs:
        kubernetes_validate.validate(d, K8S, strict=True)


def test_redis_objects_are_valid_and_need_a_password() -> None:
    with pytest.raises(ChartError, match=r"redis\.password is required"):
        render_chart(chart_values(redis__enabled=True))
    docs = render_chart(chart_values(redis__enabled=True, redis__password="s3cret"))
    for d in docs:
        kubernetes_validate.validate(d, K8S, strict=True)
    redis = by_kind(docs, "StatefulSet", "arks-redis")
    command = redis["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert by_kind(docs, "Secret", "arks-redis")["stringData"]["password"] == "s3cret"
    env = {e["name"]: e for e in by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ARKS_REDIS_URL"]["value"] == f"redis://arks-redis.{NAMESPACE}.svc:6379/0"
    assert env["ARKS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "arks-redis", "key": "password"}


def test_operator_runs_one_standalone_replica() -> None:
    deployment = by_kind(render_chart(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["python", "-m", "controller", "--standalone"]
    assert container["resources"] == chart_values()["operator"]["resources"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ARKS_RUNTIME_IMAGE_VLLM"] == chart_values()["images"]["vllm"]


# The least-privilege contract: every verb here is used by the code (see the comments in rbac.yaml).
EXPECTED_RULES = {
    ("arks.ai", "arksapplications"): {"list", "watch", "patch"},
    ("arks.ai", "arksdisaggregatedapplications"): {"list", "watch", "patch"},
    ("arks.ai", "arksmodels"): {"list", "watch"},
    ("arks.ai", "arksendpoints"): {"list", "watch"},
    ("arks.ai", "arkstokens"): {"list", "watch"},
    ("arks.ai", "arksquotas"): {"list", "watch"},
    **{("arks.ai", f"{k}/status"): {"patch"} for k in ("arksapplications", "arksdisaggregatedapplications",
                                                        "arksmodels", "arksendpoints", "arkstokens", "arksquotas")},
    ("arks.ai", "arksmodels/finalizers"): {"update"},
    ("ray.io", "rayservices"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create"},
    ("batch", "jobs"): {"list", "watch", "create", "delete"},
    ("apps", "daemonsets"): {"list", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"create"},
    ("networking.k8s.io", "networkpolicies:arks-ray-cluster"): {"get", "create", "patch", "delete"},
}


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                if rule.get("resourceNames"):  # a grant narrowed to names: "resource:name,name"
                    resource += ":" + ",".join(rule["resourceNames"])
                assert (group, resource) not in out, f"{group}/{resource} is granted twice"
                out[group, resource] = set(rule["verbs"])
    return out


def test_rbac_is_least_privilege() -> None:
    docs = render_chart()
    assert _rules(by_kind(docs, "ClusterRole", "arks-ray-operator")) == EXPECTED_RULES
    assert _rules(by_kind(docs, "ClusterRole", "arks-ray-token-secrets")) == {("", "secrets"): {"list", "watch"}}
    rbac_text = (CHART / "templates" / "rbac.yaml").read_text()
    assert rbac_text.count("\n# ") >= len({r for r in EXPECTED_RULES if "/" not in r[1]}) // 2  # reasons written


def test_the_operator_gets_its_token_key_and_writes_only_the_gateway_secret() -> None:
    docs = render_chart(chart_values(gangScheduling__scheduler="volcano", upgradeStrategy="None", ingress="haproxy"))
    env = {e["name"]: e for e in by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ARKS_TOKEN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "arks-token-key", "key": "key"}
    assert env["ARKS_TOKEN_KEY_NEXT"]["valueFrom"]["secretKeyRef"] == {"name": "arks-token-key", "key": "next",
                                                                     "optional": True}
    # The operator reads the chart's settings as the chart sets them (the key as the Secret would give it).
    plain = {name: e["value"] for name, e in env.items() if "value" in e}
    settings = from_env({**plain, "ARKS_TOKEN_KEY": "ab" * 32})
    assert settings.render.gang_scheduler == "volcano"
    assert settings.render.upgrade_strategy == "None"
    assert settings.render.ingress == "haproxy"
    assert settings.render.token_keys is not None
    role = by_kind(docs, "ClusterRole", "arks-ray-gateway-secrets")
    # Server-side apply creates a missing object, and the API server authorizes that create with its name
    # (apiserver/pkg/endpoints/handlers/patch.go), so even create is held to the one name.
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["arks-gateway"],
                              "verbs": ["get", "create", "patch"]}]
    with pytest.raises(ValueError, match="ARKS_GANG_SCHEDULER"):
        from_env({"ARKS_GANG_SCHEDULER": "kueue"})
    with pytest.raises(ValueError, match="ARKS_INGRESS='nginx': expected one of serve, haproxy"):
        from_env({"ARKS_INGRESS": "nginx"})
    assert from_env({}).render.ingress == "serve"


def test_secret_access_can_be_left_to_per_namespace_bindings() -> None:
    docs = render_chart(chart_values(rbac__secretsClusterWide=False))
    # Token Secrets are no longer bound cluster-wide; the gateway Secret's narrow role still is.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"] == [
        "arks-ray-gateway-secrets", "arks-ray-operator"]
    assert _operator_env(docs)["ARKS_WATCH_SECRETS"] == "false"


def test_kuberay_is_named_as_a_prerequisite() -> None:
    assert "KubeRay operator v1.7" in yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"][
        "arks.ai/prerequisites"]
    assert "KubeRay operator v1.7" in notes()
    assert "--standalone" in notes()


def test_chart_crds_are_the_generated_ones() -> None:
    generated = sorted(p.name for p in (ROOT / "configs" / "crds").glob("*.yaml"))
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == generated
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (ROOT / "configs" / "crds" / name).read_text()


def plain_manifests() -> dict[str, list[dict[str, Any]]]:
    """configs/deploy as the chart renders it: defaults, then the Redis additions (without the Secret)."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    redis = [d for d in render_chart(chart_values(redis__enabled=True, redis__password="unused"))
             if d["kind"] in ("Service", "StatefulSet", "Deployment")]
    return {"operator.yaml": [namespace, *render_chart()], "redis.yaml": redis}


def test_plain_manifests_equal_the_chart() -> None:
    for name, docs in plain_manifests().items():
        on_disk = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
        assert on_disk == docs, f"configs/deploy/{name} is stale: run {Path(__file__).name} --write"
        for d in on_disk:
            kubernetes_validate.validate(d, K8S, strict=True)


HEADERS = {
    "operator.yaml": "# The arks-ray operator: namespace, service account, RBAC and Deployment. Generated from\n"
                     "# charts/arks-ray with its default values (see README.md here).\n",
    "redis.yaml": "# Optional Redis (AOF) and the operator Deployment wired to it. Create the Secret first:\n"
                  "#   kubectl -n arks-system create secret generic arks-redis --from-literal=password=...\n"
                  "# Generated from charts/arks-ray with redis.enabled=true (see README.md here).\n",
}


def write_plain_manifests() -> None:
    for name, docs in plain_manifests().items():
        body = yaml.safe_dump_all(docs, sort_keys=False, width=120)
        (DEPLOY / name).write_text(HEADERS[name] + body)


def test_the_gateway_replica_range_reaches_the_render_where_replicas_may_scale() -> None:
    docs = render_chart(chart_values(gateway__minReplicas=2, gateway__maxReplicas=6, redis__enabled=True,
                                     redis__password="x"))
    env = _operator_env(docs)
    assert env["ARKS_GATEWAY_REPLICAS"] == "2,6"
    settings = from_env(env)
    assert settings.render.gateway_replicas == (2, 6)
    counted = GatewayConfig(quotas=(Quota(name="q"),))
    autoscaling = gateway_app(counted, settings.render)["deployments"][0]["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (2, 6)
    # Without a shared counter store each replica would count limits on its own: one replica where there are
    # any, the range where there are none.
    alone = from_env({"ARKS_GATEWAY_REPLICAS": "2,6"}).render
    pinned = gateway_app(counted, alone)["deployments"][0]["autoscaling_config"]
    assert (pinned["min_replicas"], pinned["max_replicas"]) == (1, 1)
    free = gateway_app(GatewayConfig(), alone)["deployments"][0]["autoscaling_config"]
    assert (free["min_replicas"], free["max_replicas"]) == (2, 6)
    assert from_env({"ARKS_GATEWAY_REPLICAS": "3"}).render.gateway_replicas == (3, 3)
    assert from_env({}).render.gateway_replicas == (1, 4)
    for bad in ("0,2", "3,2", "two", "1,2,3", ",4"):
        with pytest.raises(ValueError, match="ARKS_GATEWAY_REPLICAS"):
            from_env({"ARKS_GATEWAY_REPLICAS": bad})


def test_a_release_without_gateway_values_renders_and_keeps_the_default_range() -> None:
    """``helm upgrade --reuse-values`` from a release before these values has no ``gateway`` map."""
    values = chart_values()
    values.pop("gateway")
    assert "ARKS_GATEWAY_REPLICAS" not in _operator_env(render_chart(values))


def test_the_network_policy_values_reach_the_render() -> None:
    kuberay = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs = render_chart(chart_values(networkPolicy__dashboardFrom=[kuberay], networkPolicy__metricsFrom=[prometheus]))
    policy = render_namespace([], "team-a", options=from_env(_operator_env(docs)).render).network_policy
    assert policy is not None
    kubernetes_validate.validate(policy, K8S, strict=True)
    by_port = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"] if "ports" in r}
    assert by_port == {8000: None, 8080: [prometheus], 8265: [kuberay]}
    # The default: on, KubeRay's operator pods on the dashboard.
    default = render_namespace([], "team-a", options=from_env(_operator_env(render_chart())).render).network_policy
    assert default is not None
    assert default["spec"]["ingress"][-1]["from"] == chart_values()["networkPolicy"][
        "dashboardFrom"]
    off = from_env(_operator_env(render_chart(chart_values(networkPolicy__enabled=False))))
    assert off.render.network_access is None
    assert render_namespace([], "team-a", options=off.render).network_policy is None


@pytest.mark.parametrize(("value", "message"), [
    ("[1, 2]", "expected a mapping"),
    ("enabled: yes-please", "enabled must be true or false"),
    ("dashbordFrom: []", "unknown key.*dashbordFrom"),
    ("serveFrom: {podSelector: {}}", "serveFrom must be a list"),
    ("serveFrom: [{podSelectr: {}}]", "unknown peer field.*podSelectr"),
    ("metricsFrom: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]", "ipBlock peer cannot also"),
    ("serveFrom: [{}]", "a peer is a mapping"),
])
def test_a_bad_network_policy_value_is_named_at_startup(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"ARKS_NETWORK_POLICY: .*{message}"):
        from_env({"ARKS_NETWORK_POLICY": value})


def test_a_release_without_network_policy_values_keeps_the_default() -> None:
    """``helm upgrade --reuse-values`` from a release before these values: the operator's default applies."""
    values = chart_values()
    values.pop("networkPolicy")
    env = _operator_env(render_chart(values))
    assert "ARKS_NETWORK_POLICY" not in env
    assert from_env(env).render.network_access is not None


if __name__ == "__main__" and "--write" in sys.argv:
    write_plain_manifests()
