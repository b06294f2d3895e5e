"""What ``spec.cache.nodeLocal`` renders to: worker pods that copy the model onto their node's disk first
and load it from there, and the preload DaemonSet on the nodes that will serve it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from arks_ray.api import ArksModel, load_documents
from arks_ray.render import RenderOptions, render

K8S = "1.33.0"
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "node-cache.yaml"
BASE = list(yaml.safe_load_all(EXAMPLE.read_text()))


def docs(cache: dict[str, Any] | None = None, *, second_selector: dict[str, str] | None = None) -> list[Any]:
    out = copy.deepcopy(BASE)
    model = next(d for d in out if d["kind"] == "ArksModel")
    if cache is not None:
        model["spec"]["cache"] = cache
    if second_selector is not None:
        app = copy.deepcopy(next(d for d in out if d["kind"] == "ArksApplication"))
        app["metadata"]["name"] = "qwen-b"
        app["spec"]["instanceSpec"]["nodeSelector"] = second_selector
        out.append(app)
    return out


def rendered(documents: list[Any], local: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    (result,) = render(load_documents(documents), options=RenderOptions(local=local))
    assert not result.errors, result.errors
    (app,) = [a for a in result.serve_config["applications"] if a["name"] == "qwen"]
    return result.manifests, app["args"]["llm_config"]


def daemonsets(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == "DaemonSet"]


def worker_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    group = manifests[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    return dict(group["template"]["spec"])


def test_worker_pods_copy_onto_the_node_and_the_engine_loads_the_copy() -> None:
    manifests, llm = rendered(docs())
    pod = worker_pod(manifests)
    (init,) = pod["initContainers"]
    assert init["command"] == ["python", "-m", "arks_ray.models.node_cache", "--source", "/models/models/llm/qwen-7b",
                               "--cache", "/arks-node-cache", "--key", "llm.qwen-7b"]
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True
    assert "readOnly" not in mounts["arks-node-cache"]  # the copy step writes the node's cache
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["arks-node-cache"]["hostPath"] == {"path": "/var/lib/arks-ray/models", "type": "DirectoryOrCreate"}
    assert llm["model_loading_config"]["model_source"] == "/arks-node-cache/llm.qwen-7b"
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"}, "spec": pod},
                                 K8S, strict=True)


def test_the_preload_daemonset_runs_the_same_copy_on_the_apps_nodes() -> None:
    manifests, _ = rendered(docs())
    (ds,) = daemonsets(manifests)
    kubernetes_validate.validate(ds, K8S, strict=True)
    assert ds["metadata"]["name"] == "arks-cache-qwen-7b"
    assert ds["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "arks-ray", "arks.ai/model": "qwen-7b"}
    pod = ds["spec"]["template"]["spec"]
    assert pod["initContainers"] == worker_pod(manifests)["initContainers"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}  # the app's, by default
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_new_source_rolls_the_daemonset_so_nodes_copy_again() -> None:
    changed = docs()
    next(d for d in changed if d["kind"] == "ArksModel")["spec"]["source"]["huggingface"] = {"revision": "v2"}
    (before,) = daemonsets(rendered(docs())[0])
    (after,) = daemonsets(rendered(changed)[0])
    key = "arks.ai/source-digest"
    assert before["spec"]["template"]["metadata"]["annotations"][key] != \
        after["spec"]["template"]["metadata"]["annotations"][key]


def test_node_selection_explicit_or_agreed_or_every_node() -> None:
    explicit = {"nodeLocal": {"nodeSelector": {"pool": "llm"}}}
    (ds,) = daemonsets(rendered(docs(explicit))[0])
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "llm"}
    (ds,) = daemonsets(rendered(docs(second_selector={"nvidia.com/gpu.product": "NVIDIA-L4"}))[0])
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    (ds,) = daemonsets(rendered(docs(second_selector={"nvidia.com/gpu.product": "NVIDIA-A100"}))[0])
    assert "nodeSelector" not in ds["spec"]["template"]["spec"]  # the apps disagree: every node


def test_without_preload_pods_still_copy_but_no_daemonset() -> None:
    manifests, llm = rendered(docs({"nodeLocal": {"preload": False, "path": "/mnt/nvme/models"}}))
    assert daemonsets(manifests) == []
    pod = worker_pod(manifests)
    assert {v["name"]: v for v in pod["volumes"]}["arks-node-cache"]["hostPath"]["path"] == "/mnt/nvme/models"
    assert llm["model_loading_config"]["model_source"] == "/arks-node-cache/llm.qwen-7b"


def test_a_model_without_the_tier_and_local_runs_are_unchanged() -> None:
    plain = docs()
    del next(d for d in plain if d["kind"] == "ArksModel")["spec"]["cache"]
    manifests, llm = rendered(plain)
    assert daemonsets(manifests) == []
    assert "initContainers" not in worker_pod(manifests)
    assert llm["model_loading_config"]["model_source"] == "/models/models/llm/qwen-7b"
    manifests, llm = rendered(docs(), local=True)
    assert daemonsets(manifests) == []
    assert llm["model_loading_config"]["model_source"] == "Qwen/Qwen2.5-7B-Instruct"


def test_the_tier_needs_a_downloaded_model() -> None:
    spec = {"model": "x", "source": {"local": {"path": "/weights"}}, "cache": {"nodeLocal": {}}}
    with pytest.raises(ValueError, match="needs a downloaded model"):
        ArksModel.model_validate({"metadata": {"name": "m"}, "spec": spec})
