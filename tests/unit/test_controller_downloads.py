"""An ArksModel's PVC, download Job attempts and phase (``controller.downloads``), pure."""

from __future__ import annotations

from typing import Any

import pytest

from arks_ray.api import ArksModel
from arks_ray.errors import Problem
from arks_ray.render.models import render_download_job, render_pvc
from controller.downloads import ATTEMPT, HASH, RETRIES, ModelInputs, download_hash, plan_model
from controller.meta import timestamp

NS = "default"
NOW = 1_800_000_000.0
BACKOFF = (60.0, 3600.0)


def model_raw(source: dict[str, Any] | None = None, storage: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "Qwen/Qwen2.5-7B"}
    if source is not None:
        spec["source"] = source
    if storage:
        spec["storage"] = {"pvc": {"spec": {"accessModes": ["ReadWriteOnce"],
                                            "resources": {"requests": {"storage": "1Gi"}}}}}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksModel",
            "metadata": {"name": "m", "namespace": NS, "uid": "uid-m", "generation": 2}, "spec": spec}


def inputs(raw: dict[str, Any], live_pvc: dict[str, Any] | None = None, jobs: list[dict[str, Any]] | None = None,
           problems: list[Problem] | None = None) -> ModelInputs:
    model = ArksModel.model_validate(raw)
    return ModelInputs(raw, model, problems or [], render_pvc(model, NS), live_pvc,
                       render_download_job(model, NS, "img"), jobs or [])


HF = {"huggingface": {}}
PVC = {"metadata": {"name": "m"}, "status": {"phase": "Bound"}}


def live_job(plan_inputs: ModelInputs, attempt: int = 1, retries: int = 0, state: str = "running",
             failed_at: float = NOW - 30, spec_hash: str | None = None) -> dict[str, Any]:
    assert plan_inputs.job is not None
    job = {**plan_inputs.job, "metadata": {**plan_inputs.job["metadata"], "annotations": {
        HASH: spec_hash or download_hash(plan_inputs.job), ATTEMPT: str(attempt), RETRIES: str(retries)}}}
    if attempt > 1:
        job["metadata"]["name"] = f"arks-model-m-attempt-{attempt}"
    if state == "succeeded":
        job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    elif state == "failed":
        job["status"] = {"failed": 7, "conditions": [{
            "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "401 from the hub",
            "lastTransitionTime": timestamp(failed_at)}]}
    return job


def verbs(plan: Any) -> list[tuple[str, str, str]]:
    return [(w.verb, w.kind, w.name) for w in plan.writes]


def test_first_sight_creates_pvc_and_job_with_owner_references() -> None:
    plan = plan_model(inputs(model_raw(HF)), NS, NOW, BACKOFF)
    assert verbs(plan) == [("create", "PersistentVolumeClaim", "m"), ("create", "Job", "arks-model-m")]
    for w in plan.writes:
        assert w.body is not None
        (ref,) = w.body["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("ArksModel", "uid-m", True)
    assert plan.writes[1].body["metadata"]["annotations"][ATTEMPT] == "1"
    assert plan.status["phase"] == "StorageCreating"


def test_an_existing_pvc_is_never_touched() -> None:
    plan = plan_model(inputs(model_raw(HF), live_pvc={"metadata": {"name": "m"}, "status": {"phase": "Pending"}}),
                      NS, NOW, BACKOFF)
    assert verbs(plan) == [("create", "Job", "arks-model-m")]
    assert plan.status["phase"] == "ModelLoading"


def test_running_then_succeeded() -> None:
    base = inputs(model_raw(HF), PVC)
    running = plan_model(inputs(model_raw(HF), PVC, [live_job(base)]), NS, NOW, BACKOFF)
    assert verbs(running) == []
    assert running.status["phase"] == "ModelLoading"
    assert not running.state.ready
    done = plan_model(inputs(model_raw(HF), PVC, [live_job(base, state="succeeded")]), NS, NOW, BACKOFF)
    assert verbs(done) == []
    assert done.status["phase"] == "Ready"
    assert done.state.ready
    assert done.status["observedGeneration"] == 2


def test_a_failed_attempt_waits_then_retries_with_backoff() -> None:
    base = inputs(model_raw(HF), PVC)
    failed = live_job(base, state="failed", failed_at=NOW - 30)
    waiting = plan_model(inputs(model_raw(HF), PVC, [failed]), NS, NOW, BACKOFF)
    assert verbs(waiting) == []
    assert waiting.status["phase"] == "Failed"
    assert waiting.requeue_after == pytest.approx(30)
    assert "401 from the hub" in waiting.state.message
    assert f"retrying at {timestamp(NOW + 30)}" in waiting.state.message

    retry = plan_model(inputs(model_raw(HF), PVC, [failed]), NS, NOW + 31, BACKOFF)
    assert verbs(retry) == [("create", "Job", "arks-model-m-attempt-2"), ("delete", "Job", "arks-model-m")]
    assert retry.writes[0].body["metadata"]["annotations"][RETRIES] == "1"
    assert retry.status["phase"] == "ModelLoading"

    # The second failure waits twice as long.
    second = live_job(base, attempt=2, retries=1, state="failed", failed_at=NOW)
    later = plan_model(inputs(model_raw(HF), PVC, [second]), NS, NOW + 100, BACKOFF)
    assert verbs(later) == []
    assert later.requeue_after == pytest.approx(20)


def test_a_changed_spec_starts_a_new_attempt() -> None:
    base = inputs(model_raw(HF), PVC)
    old = live_job(base, state="succeeded", spec_hash="0" * 16)
    plan = plan_model(inputs(model_raw(HF), PVC, [old]), NS, NOW, BACKOFF)
    assert verbs(plan) == [("create", "Job", "arks-model-m-attempt-2"), ("delete", "Job", "arks-model-m")]
    assert plan.writes[0].body["metadata"]["annotations"][RETRIES] == "0"


def test_a_new_downloader_image_downloads_nothing_again() -> None:
    base = inputs(model_raw(HF), PVC)
    done = live_job(base, state="succeeded")
    model = ArksModel.model_validate(model_raw(HF))
    upgraded = ModelInputs(base.raw, model, [], base.pvc, PVC, render_download_job(model, NS, "img:v2"), [done])
    plan = plan_model(upgraded, NS, NOW, BACKOFF)
    assert verbs(plan) == []
    assert plan.state.ready


def test_superseded_attempts_are_deleted() -> None:
    base = inputs(model_raw(HF), PVC)
    jobs = [live_job(base, state="failed"), live_job(base, attempt=2, retries=1)]
    plan = plan_model(inputs(model_raw(HF), PVC, jobs), NS, NOW, BACKOFF)
    assert verbs(plan) == [("delete", "Job", "arks-model-m")]


def test_weights_already_in_storage_need_no_job() -> None:
    plan = plan_model(inputs(model_raw(None), PVC), NS, NOW, BACKOFF)
    assert verbs(plan) == []
    assert plan.status["phase"] == "Ready"
    local = model_raw({"local": {"path": "/weights/m"}}, storage=False)
    plan = plan_model(inputs(local), NS, NOW, BACKOFF)
    assert verbs(plan) == []
    assert plan.state.ready


def test_lost_storage_fails_the_model() -> None:
    plan = plan_model(inputs(model_raw(HF), {"metadata": {"name": "m"}, "status": {"phase": "Lost"}}), NS, NOW, BACKOFF)
    assert verbs(plan) == []
    assert plan.status["phase"] == "Failed"
    assert plan.state.reason == "StorageLost"


def test_an_invalid_model_says_why() -> None:
    raw = model_raw(HF)
    problem = Problem("ArksModel", "m", "spec.storage.pvc", "required unless source.local is set")
    plan = plan_model(ModelInputs(raw, None, [problem], None, None, None, []), NS, NOW, BACKOFF)
    assert plan.status["phase"] == "Failed"
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "spec.storage.pvc: required unless source.local is set"
