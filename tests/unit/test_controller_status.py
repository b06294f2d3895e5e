"""The pure status functions of the operator (``controller.status``), case by case."""

from __future__ import annotations

from typing import Any

import pytest

from arks_ray.api.gateway import Backend, Endpoint, Token
from arks_ray.errors import Problem
from controller import status as st

NOW = 1_800_000_000.0
READY_MODEL = st.ModelState("Ready", True, "Ready", "")
LOADING_MODEL = st.ModelState("ModelLoading", False, "ModelLoading", "Job arks-model-m is downloading")


def serve_entry(status: str, *deployments: str, message: str = "") -> dict[str, Any]:
    return {"status": status, "message": message,
            "serveDeploymentStatuses": {f"d{i}": {"status": d} for i, d in enumerate(deployments)}}


@pytest.mark.parametrize(("entry", "phase", "ready", "reason"), [
    pytest.param(None, "Creating", False, "Deploying", id="no-status-yet"),
    pytest.param(serve_entry("NOT_STARTED"), "Creating", False, "Deploying", id="not-started"),
    pytest.param(serve_entry("DEPLOYING", "UPDATING"), "Creating", False, "Deploying", id="deploying"),
    pytest.param(serve_entry("RUNNING", "HEALTHY", "HEALTHY"), "Running", True, "Running", id="running-healthy"),
    pytest.param(serve_entry("RUNNING", "HEALTHY", "UPSCALING"), "Running", True, "Running", id="running-upscaling"),
    pytest.param(serve_entry("RUNNING", "HEALTHY", "UPDATING"), "Creating", False, "Updating", id="running-updating"),
    pytest.param(serve_entry("RUNNING"), "Running", True, "Running", id="running-no-deployment-info"),
    pytest.param(serve_entry("DEPLOY_FAILED", "UNHEALTHY", message="boom"), "Failed", False, "DeployFailed",
                 id="deploy-failed"),
    pytest.param(serve_entry("UNHEALTHY", "UNHEALTHY"), "Failed", False, "Unhealthy", id="unhealthy"),
    pytest.param(serve_entry("DELETING"), "Creating", False, "Deleting", id="deleting"),
])
def test_serve_health(entry: dict[str, Any] | None, phase: str, ready: bool, reason: str) -> None:
    health = st.serve_health(entry)
    assert (health.phase, health.ready, health.reason) == (phase, ready, reason)


def app_view(**kw: Any) -> st.AppView:
    base: dict[str, Any] = {"problems": [], "model": READY_MODEL, "deployed": True, "serve": None,
                            "generation": 3, "previous": None}
    return st.AppView(**{**base, **kw})


def cond(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_precheck_errors_fail_the_app_with_the_message() -> None:
    problem = Problem("ArksApplication", "a", "spec.model.name", "ArksModel 'x' not found")
    out = st.application_status(app_view(problems=[problem], deployed=False), 2, NOW)
    assert out["phase"] == "Failed"
    assert cond(out, "Precheck").items() >= {"status": "False", "reason": "PrecheckFailed"}.items()
    assert cond(out, "Precheck")["message"] == "spec.model.name: ArksModel 'x' not found"
    assert (out["replicas"], out["readyReplicas"]) == (0, 0)


def test_warnings_pass_precheck_and_are_shown() -> None:
    problem = Problem("ArksApplication", "a", "spec.driver", "deprecated", "warning")
    out = st.application_status(app_view(problems=[problem]), 1, NOW)
    assert cond(out, "Precheck")["status"] == "True"
    assert "spec.driver: deprecated" in cond(out, "Precheck")["message"]


def test_an_app_waiting_for_its_model_is_loading() -> None:
    out = st.application_status(app_view(model=LOADING_MODEL, deployed=False), 1, NOW)
    assert out["phase"] == "Loading"
    assert cond(out, "Loaded").items() >= {"status": "False", "reason": "ModelLoading"}.items()
    assert cond(out, "Ready")["reason"] == "WaitingForModel"


def test_running_means_serving_not_created() -> None:
    created = st.application_status(app_view(), 2, NOW)
    assert created["phase"] == "Creating"
    assert created["readyReplicas"] == 0
    running = st.application_status(app_view(serve=serve_entry("RUNNING", "HEALTHY")), 2, NOW)
    assert running["phase"] == "Running"
    assert (running["replicas"], running["readyReplicas"], running["updatedReplicas"]) == (2, 2, 2)
    assert running["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in running["conditions"])


def test_scaling_up_keeps_the_count_last_seen_ready() -> None:
    previous = {"readyReplicas": 2}
    out = st.application_status(app_view(serve=serve_entry("RUNNING", "UPSCALING"), previous=previous), 4, NOW)
    assert (out["replicas"], out["readyReplicas"]) == (4, 2)
    down = st.application_status(app_view(serve=serve_entry("RUNNING", "UPSCALING"), previous={"readyReplicas": 5}),
                                 1, NOW)
    assert down["readyReplicas"] == 1


def test_failed_is_not_terminal() -> None:
    failed = st.application_status(app_view(serve=serve_entry("DEPLOY_FAILED", message="OOM")), 1, NOW)
    assert failed["phase"] == "Failed"
    assert cond(failed, "Ready")["message"] == "OOM"
    again = st.application_status(app_view(serve=serve_entry("RUNNING", "HEALTHY"), previous=failed), 1, NOW + 5)
    assert again["phase"] == "Running"


def test_transition_time_moves_only_when_the_status_changes() -> None:
    first = st.conditions([st.Cond("Ready", False, "Deploying", "a")], None, NOW, None)
    same = st.conditions([st.Cond("Ready", False, "Deploying", "b")], first, NOW + 60, None)
    flipped = st.conditions([st.Cond("Ready", True, "Running", "")], same, NOW + 120, None)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert flipped[0]["lastTransitionTime"] != first[0]["lastTransitionTime"]
    assert "observedGeneration" not in first[0]


def test_status_changed_looks_at_our_keys_only() -> None:
    assert not st.status_changed({"phase": "Running", "other": 1}, {"phase": "Running"})
    assert st.status_changed({"phase": "Running"}, {"phase": "Failed"})
    assert st.status_changed({"digestPrefix": "abcd1234"}, {"digestPrefix": None})
    assert st.status_changed(None, {"routes": []})


def test_disaggregated_roles() -> None:
    out = st.disaggregated_status(app_view(serve=serve_entry("RUNNING", "HEALTHY")),
                                  {"router": 1, "prefill": 2, "decode": 3}, NOW)
    assert out["phase"] == "Running"
    assert out["decode"] == {"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}


def test_endpoint_routes_weigh_only_serving_apps() -> None:
    endpoint = Endpoint(name="m", backends=(Backend(kind="app", name="a", weight=5),
                                            Backend(kind="app", name="b", weight=1),
                                            Backend(kind="http", name="ext", weight=2, url="http://ext")))
    out = st.endpoint_status(endpoint, [], {"a"}, None, None, NOW)
    assert [(r["name"], r["kind"], r["weight"], r["effectiveWeight"]) for r in out["routes"]] == [
        ("a", "ArksApplication", 5, 5.0), ("b", "ArksApplication", 1, 0.0), ("ext", "Service", 2, 2.0)]
    assert cond(out, "Ready")["status"] == "True"
    none_ready = st.endpoint_status(Endpoint(name="m", backends=(Backend(kind="app", name="b", weight=1),)),
                                    [], set(), None, None, NOW)
    assert cond(none_ready, "Ready")["reason"] == "NoReadyBackends"


TOKEN = Token(name="t", digest="ab" * 32)


@pytest.mark.parametrize(("path", "message", "reason"), [
    ("spec.tokenSecretRef.name", "Secret 'k' not found", "SecretNotFound"),
    ("spec.tokenSecretRef.key", "Secret 'k' has no non-empty key 'token'", "SecretKeyMissing"),
    ("spec.token", "has the same value as ArksToken 'u'; both are refused", "DuplicateValue"),
    ("spec.token", "String should have at least 1 character", "InvalidSpec"),
    ("spec.qos[0].quota.name", "ArksQuota 'q' not found", "QuotaNotFound"),
    ("spec", "set exactly one of token and tokenSecretRef", "InvalidSpec"),
])
def test_token_problems_become_reasons(path: str, message: str, reason: str) -> None:
    out = st.token_status(None, [Problem("ArksToken", "t", path, message)], disabled=False, expired=False,
                          previous=None, generation=None, now=NOW)
    expected = {"status": "False", "reason": reason, "message": f"{path}: {message}"}
    assert cond(out, "Ready").items() >= expected.items()
    assert out["digestPrefix"] is None


def test_token_ready_disabled_expired() -> None:
    ok = st.token_status(TOKEN, [], disabled=False, expired=False, previous=None, generation=None, now=NOW)
    assert cond(ok, "Ready")["status"] == "True"
    assert ok["digestPrefix"] == "abababab"
    off = st.token_status(TOKEN, [], disabled=True, expired=False, previous=None, generation=None, now=NOW)
    assert cond(off, "Ready")["reason"] == "Disabled"
    old = st.token_status(TOKEN, [], disabled=False, expired=True, previous=None, generation=None, now=NOW)
    assert cond(old, "Ready")["reason"] == "Expired"


def test_quota_usage_never_drops_within_a_period_and_idle_costs_nothing() -> None:
    start = NOW - 3600
    first = st.quota_status(["total"], {"total": 100}, start, [], None, None, NOW)
    assert first["quotaStatus"] == [{"type": "total", "used": 100, "lastUpdateTime": "2027-01-15T08:00:00Z"}]
    # The store lost its data (reads 0): the recorded usage stays, so the operator can restore it.
    lost = st.quota_status(["total"], {"total": 0}, start, [], first, None, NOW + 60)
    assert lost["quotaStatus"] == first["quotaStatus"]
    assert not st.status_changed(first, lost)
    grown = st.quota_status(["total"], {"total": 150}, start, [], first, None, NOW + 60)
    assert grown["quotaStatus"][0]["used"] == 150
    assert st.status_changed(first, grown)
    # A new period starts from the store again.
    next_period = st.quota_status(["total"], {"total": 3}, NOW, [], grown, None, NOW + 120)
    assert next_period["quotaStatus"][0]["used"] == 3


def test_quota_without_a_store_writes_only_its_condition() -> None:
    out = st.quota_status(["total"], None, None, [], None, None, NOW)
    assert set(out) == {"conditions"}
