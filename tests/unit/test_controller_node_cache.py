"""The operator applies a node-cached model's preload DaemonSet (``controller.node_caches``) against
``MemoryKube``: after the download, owned by the model, once; re-applied on change, deleted when unwanted."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.memkube import MemoryKube
from tests.unit.test_controller_reconcile import NOW, NS, QUICKSTART, converge, finish_download, run

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")
DS = ("DaemonSet", NS, "arks-cache-qwen-7b")


def kube_with(cache: dict[str, Any]) -> MemoryKube:
    kube = MemoryKube()
    for doc in QUICKSTART:
        doc = copy.deepcopy(doc)
        if doc["kind"] == "ArksModel":
            doc["spec"]["cache"] = cache
        kube.put(doc)
    return kube


def ds_writes(kube: MemoryKube) -> list[str]:
    return [w.verb for w in kube.writes if w.kind == "DaemonSet"]


async def test_the_preload_daemonset_follows_the_download_and_then_costs_nothing() -> None:
    kube = kube_with({"nodeLocal": {"nodeSelector": {"pool": "gpu"}}})
    await converge(kube)
    assert DS not in kube.objects  # the download has not finished: the copy step would refuse it
    finish_download(kube)
    await converge(kube, NOW + 10)
    ds = kube.objects[DS]
    model = kube.objects[("ArksModel", NS, "qwen-7b")]
    assert ds["metadata"]["ownerReferences"][0]["uid"] == model["metadata"]["uid"]
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert ds_writes(kube) == ["apply"]
    noop = await run(kube, NOW + 100)
    assert [w for w in noop.writes if w.kind == "DaemonSet"] == []


async def test_a_changed_tier_is_reapplied_and_preload_off_deletes_it() -> None:
    kube = kube_with({"nodeLocal": {}})
    await converge(kube)
    finish_download(kube)
    await converge(kube, NOW + 10)
    assert DS in kube.objects
    model = kube.objects[("ArksModel", NS, "qwen-7b")]
    model["spec"]["cache"] = {"nodeLocal": {"path": "/mnt/nvme/models"}}
    await converge(kube, NOW + 20)
    volumes = kube.objects[DS]["spec"]["template"]["spec"]["volumes"]
    assert {v["name"]: v for v in volumes}["arks-node-cache"]["hostPath"]["path"] == "/mnt/nvme/models"
    model["spec"]["cache"] = {"nodeLocal": {"preload": False}}
    await converge(kube, NOW + 30)
    assert DS not in kube.objects
    assert ds_writes(kube) == ["apply", "apply", "delete"]
