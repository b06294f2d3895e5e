"""Download progress in ``ArksModel.status``: the Job's log report read back by the reconciler
(``controller.progress`` over ``MemoryKube``) and planned into status by ``controller.downloads``."""

from __future__ import annotations

from typing import Any

import pytest

from arks_ray.api import ArksModel
from arks_ray.api.crds import all_crds
from arks_ray.models.progress import Snapshot, report_line
from arks_ray.render.models import render_download_job, render_pvc
from controller.downloads import HASH, PROGRESS_EVERY_S, ModelInputs, download_hash, plan_model
from controller.memkube import MemoryKube
from controller.reconcile import reconcile_namespace
from controller.settings import ControllerSettings

NS = "default"
NOW = 1_800_000_000.0
GIB = 1 << 30
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


def raw_model() -> dict[str, Any]:
    return {"apiVersion": "arks.ai/v1", "kind": "ArksModel",
            "metadata": {"name": "m", "namespace": NS, "uid": "u", "generation": 1},
            "spec": {"model": "acme/tiny", "source": {"s3": {"uri": "s3://models/acme/tiny"}},
                     "storage": {"pvc": {"spec": {"resources": {"requests": {"storage": "1Gi"}}}}}}}


REPORT = report_line(Snapshot(GIB, 4 * GIB, 3, 9, 100 * (1 << 20), 31.0, 10.0))


def test_a_running_job_with_a_report_shows_progress_and_is_looked_at_again() -> None:
    raw = raw_model()
    model = ArksModel.model_validate(raw)
    job = render_download_job(model, NS, "img")
    assert job is not None
    live = {**job, "metadata": {**job["metadata"], "annotations": {HASH: download_hash(job)}}}
    inputs = ModelInputs(raw, model, [], render_pvc(model, NS), {"status": {"phase": "Bound"}}, job, [live],
                         {"arks-model-m": "arks-ray: ...\n" + REPORT})
    plan = plan_model(inputs, NS, NOW, (60, 3600))
    assert plan.status["phase"] == "ModelLoading"
    assert plan.status["progress"] == "1.0 GiB / 4.0 GiB (25%), 3/9 files, 100.0 MiB/s, ETA 31s"
    assert plan.status["download"] == {"bytesDone": GIB, "bytesTotal": 4 * GIB, "filesDone": 3, "filesTotal": 9,
                                       "rateBytesPerSecond": 100.0 * (1 << 20), "etaSeconds": 31}
    assert plan.requeue_after == PROGRESS_EVERY_S
    # The status fields are part of the CRD (a printer column shows the line).
    crd = all_crds()["arks.ai_arksmodels.yaml"]["spec"]["versions"][0]
    assert {"name": "Progress", "type": "string", "jsonPath": ".status.progress"} in crd["additionalPrinterColumns"]
    props = crd["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(plan.status["download"]) <= set(props["download"]["properties"])


def test_no_report_means_no_progress_fields() -> None:
    raw = raw_model()
    model = ArksModel.model_validate(raw)
    job = render_download_job(model, NS, "img")
    assert job is not None
    live = {**job, "metadata": {**job["metadata"], "annotations": {HASH: download_hash(job)}}}
    plan = plan_model(ModelInputs(raw, model, [], render_pvc(model, NS), {"status": {}}, job, [live]), NS, NOW,
                      (60, 3600))
    assert plan.status["phase"] == "ModelLoading"
    assert plan.status["progress"] is None


async def test_the_reconciler_reads_the_running_pods_log_into_the_status() -> None:
    kube = MemoryKube()
    kube.put(raw_model())
    await reconcile_namespace(kube, NS, ControllerSettings(), now=NOW)
    assert ("Job", NS, "arks-model-m") in kube.objects
    kube.put({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "arks-model-m-x1", "namespace": NS, "labels": {"job-name": "arks-model-m"},
        "creationTimestamp": "2027-01-15T08:00:00Z"}, "status": {"phase": "Running"}})
    kube.logs[(NS, "arks-model-m-x1")] = "arks-ray: starting\n" + REPORT
    out = await reconcile_namespace(kube, NS, ControllerSettings(), now=NOW + 5)
    status = kube.objects[("ArksModel", NS, "m")]["status"]
    assert status["progress"].startswith("1.0 GiB / 4.0 GiB (25%)")
    assert status["download"]["filesTotal"] == 9
    assert out.requeue_after is not None
    assert out.requeue_after <= PROGRESS_EVERY_S
    # The Job finishes: the progress fields go, the model is Ready.
    kube.objects[("Job", NS, "arks-model-m")]["status"] = {
        "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    await reconcile_namespace(kube, NS, ControllerSettings(), now=NOW + 10)
    status = kube.objects[("ArksModel", NS, "m")]["status"]
    assert status["phase"] == "Ready"
    assert status.get("progress") is None


async def test_a_pod_without_a_log_is_not_an_error() -> None:
    kube = MemoryKube()
    kube.put(raw_model())
    await reconcile_namespace(kube, NS, ControllerSettings(), now=NOW)
    kube.put({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "arks-model-m-x2", "namespace": NS, "labels": {"job-name": "arks-model-m"}},
        "status": {"phase": "Running"}})
    await reconcile_namespace(kube, NS, ControllerSettings(), now=NOW + 5)
    status = kube.objects[("ArksModel", NS, "m")]["status"]
    assert status["phase"] == "ModelLoading"
    assert status.get("progress") is None
