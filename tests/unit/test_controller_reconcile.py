"""``reconcile_namespace`` against ``MemoryKube`` (mocked at our own ``KubeClient`` seam, as kopf's tests
mock at theirs): what a reconcile writes, in which order, and that a converged namespace costs nothing."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from arks_ray.api.gateway import Quota
from arks_ray.gateway.limits import Counter, quota_key
from arks_ray.gateway.ports import StoreUnavailable
from arks_ray.gateway.quotas import Floor, QuotaLedger
from arks_ray.render.network_policy import NetworkAccess
from arks_ray.stores.memory import MemoryStore
from controller import errors
from controller.memkube import MemoryKube
from controller.plans import POLICY_NOT_OURS, POLICY_RECHECK_S, live_apps
from controller.reconcile import Outcome, reconcile_namespace
from controller.settings import ControllerSettings
from tests.support.keys import TEST_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = list(yaml.safe_load_all((ROOT / "tests/fixtures/arks/quickstart.yaml").read_text()))
NS = "default"
NOW = 1_800_000_000.0
RS = ("RayService", NS, "arks")
POLICY = ("NetworkPolicy", NS, "arks-ray-cluster")

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")




def quickstart_kube() -> MemoryKube:
    kube = MemoryKube()
    for doc in QUICKSTART:
        kube.put(copy.deepcopy(doc))
    return kube


async def run(kube: MemoryKube, now: float = NOW, **kw: Any) -> Outcome:
    return await reconcile_namespace(kube, NS, ControllerSettings(render=TEST_OPTIONS), now=now, **kw)


async def converge(kube: MemoryKube, now: float = NOW, **kw: Any) -> Outcome:
    for i in range(6):
        out = await run(kube, now + i, **kw)
        if not out.writes:
            return out
    raise AssertionError(f"no convergence: {[str(w) for w in out.writes]}")


def finish_download(kube: MemoryKube) -> None:
    job = kube.objects[("Job", NS, "arks-model-qwen-7b")]
    job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}


def rs(kube: MemoryKube) -> dict[str, Any]:
    return kube.objects[RS]


async def test_first_reconcile_then_nothing() -> None:
    kube = quickstart_kube()
    first = await run(kube)
    assert [(w.verb, w.kind) for w in first.writes] == [
        ("patch", "ArksApplication"),  # the finalizer, before anything depends on it
        ("create", "PersistentVolumeClaim"), ("create", "Job"), ("apply", "Secret"), ("apply", "NetworkPolicy"),
        ("apply", "RayService"),
        *[("status", k) for k in ("ArksApplication", "ArksEndpoint", "ArksModel", "ArksQuota", "ArksToken")]]
    await converge(kube)
    before = len(kube.writes)
    noop = await run(kube, NOW + 100)
    assert noop.writes == []
    assert len(kube.writes) == before


async def test_apps_wait_for_their_model_and_stay_through_a_redownload() -> None:
    kube = quickstart_kube()
    await converge(kube)
    assert live_apps(rs(kube)) == {"gateway"}
    assert kube.objects[("ArksApplication", NS, "app-qwen")]["status"]["phase"] == "Loading"
    finish_download(kube)
    await converge(kube)
    assert live_apps(rs(kube)) == {"gateway", "app-qwen"}
    assert kube.objects[("ArksApplication", NS, "app-qwen")]["status"]["phase"] == "Creating"
    # A new model id means a new download; the serving app is not taken down meanwhile.
    kube.objects[("ArksModel", NS, "qwen-7b")]["spec"]["model"] = "Qwen/Qwen2.5-7B-Instruct"
    out = await run(kube, NOW + 50)
    assert ("create", "Job", "arks-model-qwen-7b-attempt-2") in [(w.verb, w.kind, w.name) for w in out.writes]
    await converge(kube, NOW + 60)
    assert "app-qwen" in live_apps(rs(kube))


async def test_rayservice_is_owned_by_the_applications() -> None:
    kube = quickstart_kube()
    await converge(kube)
    app = kube.objects[("ArksApplication", NS, "app-qwen")]
    (ref,) = rs(kube)["metadata"]["ownerReferences"]
    assert (ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == (app["metadata"]["uid"], False, False)
    assert app["metadata"]["finalizers"] == ["arks.ai/serve-app"]


async def test_deleting_an_app_applies_the_rayservice_before_releasing_the_finalizer() -> None:
    kube = quickstart_kube()
    await converge(kube)
    finish_download(kube)
    await converge(kube)
    kube.remove(("ArksApplication", NS, "app-qwen"))  # kubectl delete: held by the finalizer
    out = await run(kube, NOW + 10)
    assert [(w.verb, w.kind) for w in out.writes][:2] == [("apply", "RayService"), ("patch", "ArksApplication")]
    assert ("ArksApplication", NS, "app-qwen") not in kube.objects
    assert live_apps(rs(kube)) == {"gateway"}
    assert "ownerReferences" not in rs(kube)["metadata"] or not rs(kube)["metadata"]["ownerReferences"]


async def test_a_failed_apply_keeps_the_finalizer() -> None:
    kube = quickstart_kube()
    await converge(kube)
    finish_download(kube)
    await converge(kube)
    kube.remove(("ArksApplication", NS, "app-qwen"))
    kube.fail[("apply", "RayService")] = errors.ApiUnavailable(503, "Unavailable")
    with pytest.raises(errors.ApiUnavailable):
        await run(kube, NOW + 10)
    assert kube.objects[("ArksApplication", NS, "app-qwen")]["metadata"]["finalizers"] == ["arks.ai/serve-app"]
    del kube.fail[("apply", "RayService")]
    await converge(kube, NOW + 20)
    assert ("ArksApplication", NS, "app-qwen") not in kube.objects


async def test_no_arks_objects_left_deletes_the_rayservice() -> None:
    kube = quickstart_kube()
    await converge(kube)
    for key in [k for k in kube.objects if k[0].startswith("Arks")]:
        kube.remove(key)
    out = await converge(kube, NOW + 10)
    assert RS not in kube.objects
    assert out.empty
    assert ("delete", "RayService") in [(w.verb, w.kind) for w in kube.writes]
    assert POLICY not in kube.objects


async def test_the_network_policy_follows_the_settings_and_closes_a_hand_made_opening() -> None:
    kube = quickstart_kube()
    await converge(kube)
    policy = kube.objects[POLICY]
    assert policy["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "arks-ray"}
    # Edits that open it, or take the head out of it, are undone at the next reconcile: removed keys and added ones.
    wanted = copy.deepcopy(policy["spec"])
    edits = [lambda spec: spec["ingress"][-1].pop("from"),
             lambda spec: spec["ingress"][0]["from"][0].update(namespaceSelector={}),
             lambda spec: spec["podSelector"]["matchLabels"].update({"ray.io/node-type": "worker"}),
             lambda spec: spec["ingress"].append({})]
    for n, edit in enumerate(edits):
        edit(kube.objects[POLICY]["spec"])
        out = await run(kube, NOW + 10 + n)
        assert [(w.verb, w.kind, w.why) for w in out.writes] == [("apply", "NetworkPolicy", "drift")], n
        assert kube.objects[POLICY]["spec"] == wanted
    # The dashboard pinned to KubeRay's namespace: one apply, nothing else.
    kuberay = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    pinned = dataclasses.replace(TEST_OPTIONS, network_access=NetworkAccess(dashboard_from=(kuberay,)))
    out = await reconcile_namespace(kube, NS, ControllerSettings(render=pinned), now=NOW + 20)
    assert [(w.verb, w.kind, w.why) for w in out.writes] == [("apply", "NetworkPolicy", "content changed")]
    assert kube.objects[POLICY]["spec"]["ingress"][-1]["from"] == [kuberay]
    # Turned off: ours is deleted, and the RayService is not touched.
    off = dataclasses.replace(TEST_OPTIONS, network_access=None)
    out = await reconcile_namespace(kube, NS, ControllerSettings(render=off), now=NOW + 30)
    assert [(w.verb, w.kind, w.why) for w in out.writes] == [("delete", "NetworkPolicy", "network policy turned off")]
    # A policy of that name that someone else made is left alone, turned off or on (and said so).
    kube.put({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "arks-ray-cluster", "namespace": NS}, "spec": {"podSelector": {}}})
    assert (await reconcile_namespace(kube, NS, ControllerSettings(render=off), now=NOW + 40)).writes == []
    on = await run(kube, NOW + 50)
    assert on.writes == []
    assert on.plan is not None
    assert on.plan.warnings == [POLICY_NOT_OURS]
    assert kube.objects[POLICY]["spec"] == {"podSelector": {}}


async def test_a_forbidden_policy_read_stops_only_an_operator_that_writes_one() -> None:
    kube = quickstart_kube()
    kube.fail[("get", "NetworkPolicy")] = errors.Forbidden(403, "networkpolicies is forbidden")
    off = dataclasses.replace(TEST_OPTIONS, network_access=None)
    out = await reconcile_namespace(kube, NS, ControllerSettings(render=off), now=NOW)
    assert ("apply", "RayService") in [(w.verb, w.kind) for w in out.writes]
    with pytest.raises(errors.Forbidden):
        await run(kube, NOW + 10)


async def test_the_policy_goes_after_the_rayservice() -> None:
    kube = quickstart_kube()
    await converge(kube)
    for key in [k for k in kube.objects if k[0].startswith("Arks")]:
        kube.remove(key)
    kube.put(kube.objects[RS] | {"metadata": {**kube.objects[RS]["metadata"], "finalizers": ["ray.io/kuberay"]}})
    for i in range(4):  # the applications' finalizers are released first
        first = await run(kube, NOW + 10 + i)
        if ("delete", "RayService") in [(w.verb, w.kind) for w in first.writes]:
            break
    assert ("delete", "NetworkPolicy") not in [(w.verb, w.kind) for w in kube.writes]
    assert POLICY in kube.objects
    assert not first.empty
    assert first.requeue_after == POLICY_RECHECK_S
    # Its pods stop meanwhile; once it is gone, the policy goes and the namespace is done.
    del kube.objects[RS]
    last = await run(kube, NOW + 20)
    assert [(w.verb, w.kind) for w in last.writes] == [("delete", "NetworkPolicy")]
    assert last.empty


async def test_drift_is_repaired_but_server_defaults_are_not_drift() -> None:
    kube = quickstart_kube()
    await converge(kube)
    head = rs(kube)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["terminationMessagePath"] = "/dev/termination-log"  # what a server may default
    head["ports"][0]["protocol"] = "TCP"
    assert (await run(kube, NOW + 10)).writes == []
    head["image"] = "someone/else:latest"  # kubectl edit
    out = await run(kube, NOW + 20)
    assert [(w.verb, w.kind, w.why) for w in out.writes] == [("apply", "RayService", "drift")]


async def test_a_pvc_created_meanwhile_is_not_an_error() -> None:
    kube = quickstart_kube()
    kube.fail[("create", "PersistentVolumeClaim")] = errors.Conflict(409, "AlreadyExists")
    out = await run(kube)
    assert "PersistentVolumeClaim" not in [w.kind for w in out.writes]
    assert "RayService" in [w.kind for w in out.writes]


class FixedUsage:
    """A ``UsageReader`` with scripted usage; ``restore`` raises what reads lower, as ``QuotaLedger`` does."""

    def __init__(self, used: dict[str, dict[str, int]]) -> None:
        self.used = used
        self.calls = 0
        self.restored: list[Floor] = []

    async def usage(self, namespace: str, quotas: Sequence[Quota], now: float) -> dict[str, dict[str, int]]:
        assert namespace == NS
        self.calls += 1
        return {q.name: {b.type: self.used.get(q.name, {}).get(b.type, 0) for b in q.budgets} for q in quotas}

    async def restore(self, namespace: str, quotas: Sequence[Quota], floors: Iterable[Floor], now: float) -> int:
        raised = 0
        for f in floors:
            self.restored.append(f)
            if self.used.setdefault(f.quota, {}).get(f.type, 0) < f.value:
                self.used[f.quota][f.type] = f.value
                raised += 1
        return raised


def statused(kube: MemoryKube) -> dict[str, int]:
    quota = kube.objects[("ArksQuota", NS, "basic-quota")]["status"]
    return {u["type"]: u["used"] for u in quota["quotaStatus"]}


async def test_quota_usage_is_mirrored_and_restored_by_the_operator_not_the_gateway() -> None:
    kube = quickstart_kube()
    reader = FixedUsage({"basic-quota": {"prompt": 10, "response": 20, "total": 30}})
    await converge(kube, usage=reader)
    assert statused(kube) == {"prompt": 10, "response": 20, "total": 30}
    assert reader.restored == []  # nothing read lower than the status
    # Usage never reaches the RayService: a usage change must not touch it.
    gateway = yaml.safe_load(rs(kube)["spec"]["serveConfigV2"])["applications"][0]
    (quota,) = gateway["deployments"][0]["user_config"]["quotas"]
    assert "used" not in quota
    reader.used = {}  # the store lost everything
    assert (await run(kube, NOW + 100, usage=reader)).writes == []  # nothing to write: the status stays
    assert reader.used == {"basic-quota": {"prompt": 10, "response": 20, "total": 30}}  # raised back
    assert sorted((f.quota, f.type, f.value, f.period) for f in reader.restored) == [
        ("basic-quota", t, v, "lifetime") for t, v in (("prompt", 10), ("response", 20), ("total", 30))]


async def test_a_store_reading_lower_than_the_status_is_raised_back() -> None:
    store = MemoryStore()
    ledger = QuotaLedger(store)
    kube = quickstart_kube()

    def key(kind: str) -> str:
        return quota_key(NS, "basic-quota", kind, "lifetime", NOW)

    for kind, value in (("prompt", 10), ("response", 20), ("total", 30)):
        await store.raise_floor(key(kind), value, 0)
    await converge(kube, usage=ledger)
    assert statused(kube) == {"prompt": 10, "response": 20, "total": 30}

    ledger.store = store = MemoryStore()  # Redis lost its data: a new, empty store
    await store.raise_floor(key("prompt"), 50, 0)  # meanwhile one request was counted from zero
    await store.raise_floor(key("total"), 5, 0)
    out = await run(kube, NOW + 100, usage=ledger)
    assert await store.read([key(k) for k in ("prompt", "response", "total")]) == {
        key("prompt"): 50, key("response"): 20, key("total"): 30}  # raised back, never lowered
    assert [(w.verb, w.kind) for w in out.writes] == [("status", "ArksQuota")]
    assert statused(kube) == {"prompt": 50, "response": 20, "total": 30}
    # The gateway counts on from the restored value: a request that would fit an empty store does not.
    over = Counter(key=key("total"), kind="total", limit=600_000, amount=599_990, label="q", dimension="quota")
    assert not (await store.reserve([over], "r1", int(NOW * 1000))).admitted


async def test_a_store_down_while_restoring_leaves_the_status_as_it_was() -> None:
    kube = quickstart_kube()
    reader = FixedUsage({"basic-quota": {"prompt": 10, "response": 20, "total": 30}})
    await converge(kube, usage=reader)

    async def down(*args: Any) -> int:
        raise StoreUnavailable("ConnectionError")

    reader.used = {}
    reader.restore = down  # type: ignore[method-assign]
    out = await run(kube, NOW + 100, usage=reader)
    # At most the condition changes (a merge patch without quotaStatus): the recorded usage, the only copy
    # left while the store is empty, is kept for the next try.
    assert [(w.verb, w.kind) for w in out.writes] in ([], [("status", "ArksQuota")])
    assert all("quotaStatus" not in w.body["status"] for w in out.writes)
    assert statused(kube) == {"prompt": 10, "response": 20, "total": 30}
    reader.restore = FixedUsage.restore.__get__(reader)  # type: ignore[method-assign]  # the store is back
    await converge(kube, NOW + 200, usage=reader)
    assert reader.used == {"basic-quota": {"prompt": 10, "response": 20, "total": 30}}
    assert statused(kube) == {"prompt": 10, "response": 20, "total": 30}


async def test_a_token_secret_is_read_and_rotation_changes_the_digest() -> None:
    kube = quickstart_kube()
    kube.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k", "namespace": NS},
              "data": {"token": "c2stb25l"}})  # sk-one
    kube.put({"apiVersion": "arks.ai/v1", "kind": "ArksToken", "metadata": {"name": "alice", "namespace": NS},
              "spec": {"tokenSecretRef": {"name": "k"}, "qos": [{"arksEndpoint": {"name": "qwen-7b"}}]}})
    out = await converge(kube)
    assert out.secrets == {"k"}
    status = kube.objects[("ArksToken", NS, "alice")]["status"]
    assert status["digestPrefix"]
    assert status["conditions"][0]["status"] == "True"
    kube.objects[("Secret", NS, "k")]["data"]["token"] = "c2stdHdv"  # sk-two
    out = await run(kube, NOW + 10)
    assert [(w.verb, w.kind) for w in out.writes] == [("apply", "RayService"), ("status", "ArksToken")]


async def test_written_statuses_fit_the_crd_schemas(crd_json_schema: Any) -> None:
    kube = quickstart_kube()
    disagg = {"apiVersion": "arks.ai/v1", "kind": "ArksDisaggregatedApplication", "metadata": {"name": "pd"},
              "spec": {"model": {"name": "qwen-7b"}, "router": {}, "prefill": {}, "decode": {}}}
    kube.put(disagg)
    kube.put({**copy.deepcopy(disagg), "metadata": {"name": "pd-bad"}, "spec": {"model": {"name": "gone"}}})
    await converge(kube)
    finish_download(kube)
    await converge(kube, usage=FixedUsage({"basic-quota": {"total": 5}}))
    checked = set()
    for (kind, _, _name), obj in kube.objects.items():
        if not kind.startswith("Arks"):
            continue
        crd = yaml.safe_load((ROOT / "configs/crds" / f"arks.ai_{kind.lower()}s.yaml").read_text())
        status_schema = crd_json_schema(crd)["properties"]["status"]
        status_schema.pop("x-kubernetes-preserve-unknown-fields", None)
        status_schema["additionalProperties"] = kind == "ArksEndpoint"  # conditions: preserved, not declared
        jsonschema.Draft7Validator(status_schema).validate(obj["status"])
        checked.add(kind)
    assert len(checked) == 6


class FixedRoutes:
    def __init__(self, weights: dict[tuple[str, str], float]) -> None:
        self.weights = weights

    async def routes(self, namespace: str, now: float) -> dict[tuple[str, str], float]:
        return dict(self.weights)


async def test_endpoint_status_shows_the_effective_weights_the_gateway_reported() -> None:
    kube = quickstart_kube()
    await converge(kube)
    finish_download(kube)
    routes = FixedRoutes({("qwen-7b", "app-qwen"): 3.7112})  # weight 5 x health 1 x SLO factor 0.74
    await converge(kube, routes=routes)
    status = kube.objects[("ArksEndpoint", NS, "qwen-7b")]["status"]
    assert [(r["name"], r["weight"], r["effectiveWeight"]) for r in status["routes"]] == [("app-qwen", 5, 3.71)]
    routes.weights = {("qwen-7b", "app-qwen"): 3.7088}  # noise below the status precision: no write
    assert (await run(kube, NOW + 50, routes=routes)).writes == []
    routes.weights = {}  # no report (the gateway restarted): what the operator sees itself
    out = await run(kube, NOW + 60, routes=routes)
    assert [(w.verb, w.kind) for w in out.writes] == [("status", "ArksEndpoint")]
