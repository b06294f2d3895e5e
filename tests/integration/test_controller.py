"""The real operator (kopf + the official client) against kmock's Kubernetes emulator, over HTTP.

Every scenario of issue #5 starts from the Arks quickstart (``tests/fixtures/arks/quickstart.yaml``):
apply, token edit (inline and Secret rotation), a second app, deleting an app, status following the
RayService, an operator restart, invalid objects, and ``kubectl scale``. What the emulator cannot show
(server-side apply's field ownership, CRD schema validation at admission, garbage collection) is
covered by the unit tests of the planners or listed in the README of the chart.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.integration.harness import Kubectl, Operators, eventually, settled, writes
from tests.support.paths import KUBERAY_RAYSERVICE_CRD

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = list(yaml.safe_load_all((ROOT / "tests/fixtures/arks/quickstart.yaml").read_text()))


def doc(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in QUICKSTART if d["kind"] == kind))


def serve_config(rs: dict[str, Any]) -> dict[str, Any]:
    return dict(yaml.safe_load(rs["spec"]["serveConfigV2"]))


def serve_apps(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in serve_config(rs)["applications"]}


def gateway_config(rs: dict[str, Any]) -> dict[str, Any]:
    return dict(serve_apps(rs)["gateway"]["deployments"][0]["user_config"])


def groups(rs: dict[str, Any]) -> list[dict[str, Any]]:
    return list(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"])


async def apply_quickstart(kubectl: Kubectl) -> None:
    for d in QUICKSTART:
        await kubectl.apply(copy.deepcopy(d))


async def finish_download(kubectl: Kubectl, job: str = "arks-model-qwen-7b") -> None:
    """What the Job controller would do once the weights are in the PVC."""
    await eventually(lambda: kubectl.get("Job", job))
    await kubectl.patch("Job", job, {"status": {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, sub="status")


async def rayservice_with(kubectl: Kubectl, app: str | None = None, without: str | None = None) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        rs = await kubectl.get("RayService", "arks")
        if rs is None:
            return None
        apps = serve_apps(rs)
        if (app is not None and app not in apps) or (without is not None and without in apps):
            return None
        return rs

    return dict(await eventually(check))


async def quickstart_running(kubectl: Kubectl) -> dict[str, Any]:
    await apply_quickstart(kubectl)
    await finish_download(kubectl)
    return await rayservice_with(kubectl, "app-qwen")


async def test_apply_renders_a_valid_rayservice(operators: Operators, kubectl: Kubectl, emulator: Any,
                                                crd_json_schema: Any) -> None:
    await operators.start()
    await apply_quickstart(kubectl)

    # While the weights download, the RayService runs the gateway only: the app waits for its model.
    rs = await rayservice_with(kubectl, "gateway")
    assert "app-qwen" not in serve_apps(rs)
    model = await eventually(lambda: _phase(kubectl, "ArksModel", "qwen-7b", "ModelLoading"))
    assert model["status"]["conditions"][1]["reason"] == "ModelLoading"
    app = await eventually(lambda: _phase(kubectl, "ArksApplication", "app-qwen", "Loading"))
    assert _cond(app, "Loaded")["status"] == "False"

    await finish_download(kubectl)
    rs = await rayservice_with(kubectl, "app-qwen")
    schema = crd_json_schema(yaml.safe_load(KUBERAY_RAYSERVICE_CRD.read_text()))
    jsonschema.Draft7Validator(schema).validate(rs)
    assert rs["metadata"]["annotations"]["arks.ai/spec-hash"]
    app = await kubectl.get("ArksApplication", "app-qwen")
    assert app is not None
    assert [r["uid"] for r in rs["metadata"]["ownerReferences"]] == [app["metadata"]["uid"]]
    assert rs["metadata"]["ownerReferences"][0]["controller"] is False
    assert "arks.ai/serve-app" in app["metadata"]["finalizers"]
    pvc = await kubectl.get("PersistentVolumeClaim", "qwen-7b")
    assert pvc is not None
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "ArksModel"
    assert [g["replicas"] for g in groups(rs)] == [2]  # one replica of size 2
    # Who may reach the Ray pods, written through the networking.k8s.io API (its order: the unit plan test).
    policy = await kubectl.get("NetworkPolicy", "arks-ray-cluster")
    assert policy is not None
    assert policy["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "arks-ray"}
    kubernetes_validate.validate({k: policy[k] for k in ("apiVersion", "kind", "spec")} | {
        "metadata": {"name": "arks-ray-cluster", "namespace": "default"}}, "1.33.0", strict=True)
    assert policy["spec"]["podSelector"]["matchExpressions"] == [{"key": "ray.io/node-type", "operator": "Exists"}]
    await eventually(lambda: _phase(kubectl, "ArksModel", "qwen-7b", "Ready"))
    # Created, not yet serving: Running means Serve reports it RUNNING (the Arks bug was the opposite).
    await eventually(lambda: _phase(kubectl, "ArksApplication", "app-qwen", "Creating"))


async def _phase(kubectl: Kubectl, kind: str, name: str, phase: str) -> dict[str, Any] | None:
    obj = await kubectl.get(kind, name)
    return obj if obj and (obj.get("status") or {}).get("phase") == phase else None


def _cond(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


async def test_token_edit_changes_the_gateway_user_config(operators: Operators, kubectl: Kubectl,
                                                          emulator: Any) -> None:
    await operators.start()
    rs = await quickstart_running(kubectl)
    before = gateway_config(rs)["tokens"][0]["digest"]
    await kubectl.patch("ArksToken", "example-token", {"spec": {"token": "sk-rotated"}})

    async def rotated() -> dict[str, Any] | None:
        live = await kubectl.get("RayService", "arks")
        return live if live and gateway_config(live)["tokens"][0]["digest"] != before else None

    rs = await eventually(rotated)
    assert "sk-rotated" not in json.dumps(rs)  # digests only, never the value
    token = await eventually(lambda: _token_prefix(kubectl, gateway_config(rs)["tokens"][0]["digest"][:8]))
    assert _cond(token, "Ready")["status"] == "True"


async def _token_prefix(kubectl: Kubectl, prefix: str) -> dict[str, Any] | None:
    token = await kubectl.get("ArksToken", "example-token")
    return token if token and (token.get("status") or {}).get("digestPrefix") == prefix else None


async def test_secret_rotation_reaches_the_gateway(operators: Operators, kubectl: Kubectl) -> None:
    await operators.start()
    await quickstart_running(kubectl)
    await kubectl.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "alice-key"},
                         "stringData": {"token": "sk-alice-1"}})
    qos = [{"arksEndpoint": {"name": "qwen-7b"}}]
    await kubectl.apply({"apiVersion": "arks.ai/v1", "kind": "ArksToken", "metadata": {"name": "alice"},
                         "spec": {"tokenSecretRef": {"name": "alice-key"}, "qos": qos}})
    first = await eventually(lambda: _digest_of(kubectl, "alice"))
    await kubectl.patch("Secret", "alice-key", {"stringData": {"token": "sk-alice-2"}})
    second = await eventually(lambda: _digest_of(kubectl, "alice", not_=first))
    assert second != first


async def _digest_of(kubectl: Kubectl, token: str, not_: str | None = None) -> str | None:
    rs = await kubectl.get("RayService", "arks")
    digests = {t["name"]: t["digest"] for t in gateway_config(rs)["tokens"]} if rs else {}
    found = digests.get(token)
    return found if found and found != not_ else None


SECOND_APP = {
    "apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": "app-qwen-big"},
    "spec": {"replicas": 1, "size": 1, "tensorParallelSize": 4, "model": {"name": "qwen-7b"},
             "servedModelName": "qwen-7b",
             "instanceSpec": {"resources": {"limits": {"nvidia.com/gpu": "4"}, "requests": {"nvidia.com/gpu": "4"}}}},
}


async def test_second_app_appends_a_worker_group(operators: Operators, kubectl: Kubectl) -> None:
    await operators.start()
    rs = await quickstart_running(kubectl)
    before = groups(rs)
    await kubectl.apply(copy.deepcopy(SECOND_APP))
    rs = await rayservice_with(kubectl, "app-qwen-big")
    after = groups(rs)
    assert after[: len(before)] == before  # untouched, in place: KubeRay updates the cluster in place
    assert len(after) == len(before) + 1
    assert "gpu4" in after[-1]["groupName"]
    endpoint = await eventually(lambda: _routes(kubectl, 2))
    assert {r["name"] for r in endpoint} == {"app-qwen", "app-qwen-big"}


async def test_a_namespace_emptied_of_arks_objects_loses_its_rayservice_and_network_policy(
        operators: Operators, kubectl: Kubectl) -> None:
    await operators.start()
    await quickstart_running(kubectl)
    assert await kubectl.get("NetworkPolicy", "arks-ray-cluster") is not None
    for d in QUICKSTART:
        await kubectl.delete(d["kind"], d["metadata"]["name"])
    assert await eventually(lambda: _gone(kubectl, "RayService", "arks"))
    assert await eventually(lambda: _gone(kubectl, "NetworkPolicy", "arks-ray-cluster"))


async def _routes(kubectl: Kubectl, count: int) -> list[dict[str, Any]] | None:
    ep = await kubectl.get("ArksEndpoint", "qwen-7b")
    routes = ((ep or {}).get("status") or {}).get("routes") or []
    return list(routes) if len(routes) == count else None


async def test_deleting_an_app_removes_its_serve_app_and_keeps_groups(operators: Operators, kubectl: Kubectl) -> None:
    await operators.start()
    await quickstart_running(kubectl)
    await kubectl.apply(copy.deepcopy(SECOND_APP))
    rs = await rayservice_with(kubectl, "app-qwen-big")
    names = [g["groupName"] for g in groups(rs)]

    await kubectl.delete("ArksApplication", "app-qwen")
    rs = await rayservice_with(kubectl, "app-qwen-big", without="app-qwen")
    assert [g["groupName"] for g in groups(rs)] == names  # order kept; the retired group scales to 0
    assert groups(rs)[0]["maxReplicas"] == 0
    assert [r["name"] for r in rs["metadata"]["ownerReferences"]] == ["app-qwen-big"]
    # The finalizer was released after the RayService without the app was applied, so it is gone.
    assert await eventually(lambda: _gone(kubectl, "ArksApplication", "app-qwen"))


async def _gone(kubectl: Kubectl, kind: str, name: str) -> bool:
    return await kubectl.get(kind, name) is None


async def test_status_follows_the_rayservice(operators: Operators, kubectl: Kubectl) -> None:
    await operators.start()
    await quickstart_running(kubectl)

    async def serve(status: str, deployment: str = "HEALTHY", message: str = "") -> None:
        await kubectl.patch("RayService", "arks", {"status": {"activeServiceStatus": {"applicationStatuses": {
            "app-qwen": {"status": status, "message": message,
                         "serveDeploymentStatuses": {"LLMServer:app-qwen": {"status": deployment}}}}}}}, sub="status")

    await serve("DEPLOYING", "UPDATING")
    app = await eventually(lambda: _phase(kubectl, "ArksApplication", "app-qwen", "Creating"))
    assert _cond(app, "Ready")["reason"] == "Deploying"

    await serve("RUNNING")
    app = await eventually(lambda: _phase(kubectl, "ArksApplication", "app-qwen", "Running"))
    assert (app["status"]["replicas"], app["status"]["readyReplicas"]) == (1, 1)
    assert _cond(app, "Ready")["status"] == "True"
    routes = await eventually(lambda: _routes(kubectl, 1))
    assert routes[0]["effectiveWeight"] == 5

    await serve("DEPLOY_FAILED", "UNHEALTHY", "engine crashed")
    app = await eventually(lambda: _phase(kubectl, "ArksApplication", "app-qwen", "Failed"))
    assert "engine crashed" in _cond(app, "Ready")["message"]

    await serve("RUNNING")  # Failed is not terminal
    await eventually(lambda: _phase(kubectl, "ArksApplication", "app-qwen", "Running"))


async def test_restart_makes_no_writes(operators: Operators, kubectl: Kubectl, emulator: Any) -> None:
    first = await operators.start()
    await quickstart_running(kubectl)
    await eventually(lambda: _phase(kubectl, "ArksModel", "qwen-7b", "Ready"))
    await settled(first, emulator)
    await operators.stop_all()

    second = await operators.start()
    state = await eventually(lambda: _reconciled(second, "default"))
    await settled(second, emulator)
    assert state.last.writes == []
    assert [f"{r.method.value} {r.url.path}" for r in writes(emulator, second.started_at)] == []


async def _reconciled(op: Any, namespace: str) -> Any:
    state = op.runtime.scheduler.namespaces.get(namespace)
    return state if state and state.reconciles >= 1 else None


async def test_invalid_objects_get_explaining_conditions(operators: Operators, kubectl: Kubectl) -> None:
    await operators.start()
    await quickstart_running(kubectl)
    broken = copy.deepcopy(SECOND_APP)
    broken["metadata"]["name"] = "app-orphan"
    broken["spec"]["model"] = {"name": "no-such-model"}
    await kubectl.apply(broken)
    bad_args = copy.deepcopy(SECOND_APP)
    bad_args["metadata"]["name"] = "app-bad-args"
    bad_args["spec"]["runtimeCommonArgs"] = ["--tensor-parallel-size 2"]
    await kubectl.apply(bad_args)
    twin = doc("ArksToken")
    twin["metadata"]["name"] = "twin-token"
    await kubectl.apply(twin)

    app = await eventually(lambda: _phase(kubectl, "ArksApplication", "app-orphan", "Failed"))
    precheck = _cond(app, "Precheck")
    assert precheck["status"] == "False"
    assert "spec.model.name" in precheck["message"]
    assert "no-such-model" in precheck["message"]
    app = await eventually(lambda: _phase(kubectl, "ArksApplication", "app-bad-args", "Failed"))
    assert "spec.runtimeCommonArgs" in _cond(app, "Precheck")["message"]
    token = await eventually(lambda: _reason(kubectl, "ArksToken", "twin-token", "DuplicateValue"))
    assert "example-token" in _cond(token, "Ready")["message"]
    # The others keep serving: one tenant's mistake does not take the namespace down.
    rs = await kubectl.get("RayService", "arks")
    assert rs is not None
    assert "app-qwen" in serve_apps(rs)
    assert "app-orphan" not in serve_apps(rs)


async def _reason(kubectl: Kubectl, kind: str, name: str, reason: str) -> dict[str, Any] | None:
    obj = await kubectl.get(kind, name)
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return obj if any(c.get("reason") == reason for c in conds) else None


async def test_kubectl_scale_changes_serve_replicas(operators: Operators, kubectl: Kubectl) -> None:
    await operators.start()
    await quickstart_running(kubectl)
    # `kubectl scale arksapplication/app-qwen --replicas=3` patches the scale subresource.
    await kubectl.patch("ArksApplication", "app-qwen", {"spec": {"replicas": 3}}, sub="scale")

    async def scaled() -> dict[str, Any] | None:
        rs = await kubectl.get("RayService", "arks")
        app = serve_apps(rs)["app-qwen"] if rs else {}
        config = app.get("args", {}).get("llm_config", {}).get("deployment_config", {})
        return rs if config.get("num_replicas") == 3 else None

    rs = await eventually(scaled)
    assert groups(rs)[0]["maxReplicas"] == 6  # 3 replicas x size 2
