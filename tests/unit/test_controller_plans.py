"""The planner's decisions (``controller.plans``, ``controller.meta``), pure: when to apply the RayService,
drift versus server defaults, gating, and the order of writes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.meta import contains, owner_ref
from controller.plans import Observed, live_apps, plan_namespace, rayservice_write
from controller.snapshot import take
from tests.support.keys import TEST_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = list(yaml.safe_load_all((ROOT / "tests/fixtures/arks/quickstart.yaml").read_text()))
NOW = 1_800_000_000.0


def desired(spec: dict[str, Any] | None = None, hash_: str = "h1", owners: list[str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": "arks", "namespace": "ns", "labels": {"app.kubernetes.io/managed-by": "arks-ray"},
                         "annotations": {"arks.ai/spec-hash": hash_},
                         "ownerReferences": [{"uid": u} for u in owners or []]},
            "spec": spec or {"serveConfigV2": "applications: []", "rayClusterConfig": {"workerGroupSpecs": []}}}


@pytest.mark.parametrize(("live", "why"), [
    pytest.param(None, "create", id="absent"),
    pytest.param(desired(), "", id="same"),
    pytest.param(desired(hash_="h0"), "spec changed", id="hash-differs"),
    pytest.param(desired(owners=["u1"]), "owners changed", id="owners-differ"),
    pytest.param(desired({"serveConfigV2": "applications: []", "rayClusterConfig": {"workerGroupSpecs": [],
                                                                                   "extra": "default"}}), "",
                 id="server-defaults"),
    pytest.param(desired({"serveConfigV2": "edited", "rayClusterConfig": {"workerGroupSpecs": []}}), "drift",
                 id="edited-spec"),
])
def test_rayservice_write(live: dict[str, Any] | None, why: str) -> None:
    write = rayservice_write(desired(), live, "ns")
    assert (write.why if write else "") == why


def test_contains() -> None:
    assert contains({"a": 1, "b": {"c": [1, {"d": 2, "x": 0}]}}, {"b": {"c": [1, {"d": 2}]}})
    assert not contains({"b": {"c": [1]}}, {"b": {"c": [1, 2]}})
    assert not contains({"a": True}, {"a": 1})
    assert contains({"a": 1.0}, {"a": 1})
    assert contains({}, {"a": None})


def test_owner_ref_needs_a_uid() -> None:
    assert owner_ref({"kind": "ArksModel", "metadata": {"name": "m"}}, controller=True) is None


def test_live_apps_tolerates_garbage() -> None:
    assert live_apps(None) == set()
    assert live_apps({"spec": {"serveConfigV2": ": : :"}}) == set()
    assert live_apps({"spec": {"serveConfigV2": "applications: [{name: a}, {name: b}]"}}) == {"a", "b"}


def raw_objects(uid: bool = True) -> list[dict[str, Any]]:
    out = []
    for i, doc in enumerate(copy.deepcopy(QUICKSTART)):
        doc["metadata"].setdefault("namespace", "default")
        if uid:
            doc["metadata"]["uid"] = f"u{i}"
        out.append(doc)
    return out


def test_phases_are_ordered() -> None:
    plan = plan_namespace(take("default", raw_objects()), Observed(), options=TEST_OPTIONS, now=NOW,
                          finalizer="arks.ai/serve-app")
    kinds = [[(w.verb, w.kind) for w in phase] for phase in plan.phases]
    assert kinds[0] == [("patch", "ArksApplication")]
    # The gateway Secret and the Ray pods' NetworkPolicy before the RayService: its head pod cannot start
    # without the Secret, and its pods are never reachable without the policy.
    assert kinds[1] == [("create", "PersistentVolumeClaim"), ("create", "Job"), ("apply", "Secret"),
                        ("apply", "NetworkPolicy")]
    assert kinds[2] == [("apply", "RayService")]
    assert {v for v, _ in kinds[3]} == {"status"}


def test_an_app_waits_outside_until_its_model_is_ready() -> None:
    snap = take("default", raw_objects())
    plan = plan_namespace(snap, Observed(), options=TEST_OPTIONS, now=NOW, finalizer="f")
    assert plan.rendered is not None
    assert set(plan.rendered.serve_apps) == set()
    # The endpoint has no ready backend yet, and says so rather than failing.
    endpoint = next(w for w in plan.writes if w.kind == "ArksEndpoint")
    assert endpoint.body is not None
    assert endpoint.body["status"]["conditions"][0]["reason"] == "NoReadyBackends"


def test_objects_without_uid_get_no_owner_references() -> None:
    plan = plan_namespace(take("default", raw_objects(uid=False)), Observed(), options=TEST_OPTIONS, now=NOW,
                          finalizer="f")
    rs = next(w for w in plan.writes if w.kind == "RayService")
    assert rs.body is not None
    assert rs.body["metadata"]["ownerReferences"] == []
