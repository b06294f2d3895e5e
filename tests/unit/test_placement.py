"""Multi-node placement and heterogeneous accelerators: what the renderer writes, and what Ray makes of it.

``size``/TP/PP/``placement.strategy`` become one placement group per replica; ``spec.accelerator`` or a GPU
node-selector label becomes Ray's ``accelerator_type`` and the worker group's resource. The Ray side is
checked with Ray's own classes (``LLMConfig``, ``VLLMEngineConfig``, ``LLMServer.get_deployment_options``)
without starting Ray. The live placement runs in ``tests/e2e/test_placement.py``.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest

from arks_ray.api.loading import load_documents
from arks_ray.errors import Problem
from arks_ray.render import Rendered, render_namespace
from arks_ray.render.accelerators import RAY_ACCELERATOR_TYPES, from_node_selector

MODEL = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "m", "namespace": "default"},
         "spec": {"model": "Qwen/Qwen2.5-7B-Instruct",
                  "storage": {"pvc": {"spec": {"accessModes": ["ReadWriteMany"],
                                               "resources": {"requests": {"storage": "20Gi"}}}}}}}


def app(name: str, gpus: int = 0, **spec: Any) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {"limits": {"cpu": "4"}}
    inst = {"resources": resources, **spec.pop("instanceSpec", {})}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"name": "m"}, "instanceSpec": inst, **spec}}


def render(*apps: dict[str, Any]) -> Rendered:
    loaded = load_documents([MODEL, *apps])
    assert loaded.errors == [], loaded.errors
    return render_namespace(loaded.objects, "default")


def llm_config(rendered: Rendered, name: str) -> dict[str, Any]:
    (found,) = [a for a in rendered.serve_config["applications"] if a["name"] == name]
    config: dict[str, Any] = found["args"]["llm_config"]
    return config


def groups(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def findings(rendered: Rendered) -> list[tuple[str, str, str]]:
    return [(p.name, p.path, p.severity) for p in rendered.problems]


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ray's LLMServer reads the driver's runtime env, which would start a local Ray; give it an empty one."""
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(runtime_env={}))
    yield
    assert not ray.is_initialized()


def test_ray_accelerator_types_are_rays() -> None:
    from ray.llm._internal.serve.core.configs.llm_config import AcceleratorType

    assert list(RAY_ACCELERATOR_TYPES) == [t.value for t in AcceleratorType]


@pytest.mark.parametrize(("selector", "expected"), [
    ({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "H100"),
    ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, "A100"),
    ({"nvidia.com/gpu.product": "Tesla-T4"}, "T4"),
    ({"nvidia.com/gpu.product": "NVIDIA-L40S"}, "L40S"),
    ({"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, "A100"),
    ({"cloud.google.com/gke-accelerator": "nvidia-l4"}, "L4"),
    ({"karpenter.k8s.aws/instance-gpu-name": "a10g"}, "A10G"),
    ({"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}, None),
    ({"kubernetes.io/arch": "amd64"}, None),
    (None, None),
])
def test_gpu_node_selector_names_the_accelerator(selector: dict[str, str] | None, expected: str | None) -> None:
    assert from_node_selector(selector) == expected


def test_a_multi_node_replica_is_one_placement_group_over_its_pods(no_ray: None) -> None:
    """size 2 pods x 8 GPUs, TP 8 x PP 2: 16 one-GPU bundles, packed over the two pods of each replica."""
    from ray.serve.llm import LLMConfig, LLMServer

    rendered = render(app("big", gpus=8, replicas=3, size=2, tensorParallelSize=8, pipelineParallelSize=2,
                          accelerator="H100"))
    assert rendered.problems == []
    cfg = llm_config(rendered, "big")
    (group,) = groups(rendered).values()
    resource = "arks-wg-" + group["groupName"]
    assert cfg["engine_kwargs"] == {"tensor_parallel_size": 8, "pipeline_parallel_size": 2}
    assert cfg["placement_group_config"] == {"bundles": [{resource: 1, "GPU": 1}] * 16, "strategy": "PACK"}
    assert (group["minReplicas"], group["maxReplicas"]) == (6, 6)  # 3 replicas x size 2
    assert '\\"accelerator_type:H100\\": 1000' in group["rayStartParams"]["resources"]

    config = LLMConfig.model_validate(cfg)
    engine = config.get_engine_config()
    assert engine.placement_strategy == "PACK"
    assert engine.placement_bundles == [{resource: 1, "GPU": 1, "accelerator_type:H100": 0.001}] * 16
    options = LLMServer.get_deployment_options(config)
    # Serve gets the whole replica as one placement group; the replica actor's CPU joins bundle 0.
    assert options["placement_group_strategy"] == "PACK"
    assert options["placement_group_bundles"][0] == {resource: 1, "GPU": 1, "accelerator_type:H100": 0.001,
                                                     "CPU": 1}
    assert len(options["placement_group_bundles"]) == 16
    assert "gang_scheduling_config" not in options


def test_strict_spread_cpu_replica_as_the_e2e_runs_it(no_ray: None) -> None:
    from ray.serve.llm import LLMConfig, LLMServer

    rendered = render(app("spread", size=2, tensorParallelSize=2, placement={"strategy": "STRICT_SPREAD"}))
    assert rendered.problems == []
    cfg = llm_config(rendered, "spread")
    (name,) = groups(rendered)
    resource = "arks-wg-" + name
    assert cfg["placement_group_config"] == {"bundles": [{resource: 1, "CPU": 1.0}] * 2, "strategy": "STRICT_SPREAD"}
    options = LLMServer.get_deployment_options(LLMConfig.model_validate(cfg))
    # The replica actor (1 CPU, 0 GPU) joins bundle 0: 2 CPUs on one node, 1 on the other.
    assert options["placement_group_bundles"] == [{resource: 1, "CPU": 2.0, "GPU": 0}, {resource: 1, "CPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_SPREAD"


@pytest.mark.parametrize(("spec", "strategy"), [
    ({"size": 1, "tensorParallelSize": 4}, "STRICT_PACK"),
    ({"size": 2, "tensorParallelSize": 4}, "PACK"),
    ({"size": 4, "tensorParallelSize": 4, "placement": {"strategy": "STRICT_SPREAD"}}, "STRICT_SPREAD"),
    ({"size": 2, "tensorParallelSize": 4, "placement": {"strategy": "SPREAD"}}, "SPREAD"),
])
def test_strategy_default_and_override(spec: dict[str, Any], strategy: str) -> None:
    rendered = render(app("a", gpus=2, **spec))
    assert llm_config(rendered, "a")["placement_group_config"]["strategy"] == strategy


@pytest.mark.parametrize(("spec", "gpus", "path", "words"), [
    ({"size": 1, "tensorParallelSize": 8}, 4, "spec.tensorParallelSize", "cannot be placed"),
    ({"size": 3, "tensorParallelSize": 8}, 8, "spec.size", "extra pods stay idle"),
    ({"size": 2, "tensorParallelSize": 4, "placement": {"strategy": "STRICT_SPREAD"}}, 2, "spec.placement.strategy",
     "its own node"),
    ({"size": 2, "tensorParallelSize": 2, "placement": {"strategy": "STRICT_PACK"}}, 1, "spec.placement.strategy",
     "1 of its 2 pods stay idle"),
    ({"size": 1, "tensorParallelSize": 3, "placement": {"strategy": "STRICT_SPREAD"}}, 0, "spec.placement.strategy",
     "3 bundles"),
])
def test_placements_that_cannot_fit_or_waste_pods_are_warned(spec: dict[str, Any], gpus: int, path: str,
                                                              words: str) -> None:
    rendered = render(app("a", gpus=gpus, **spec))
    (problem,) = rendered.problems
    assert (problem.kind, problem.name, problem.path, problem.severity) == ("ArksApplication", "a", path, "warning")
    assert words in problem.message
    assert llm_config(rendered, "a")  # a warning still renders the app


@pytest.mark.parametrize(("spec", "gpus", "words"), [
    ({"accelerator": "A100"}, 0, "needs GPUs"),
    ({"accelerator": "A1000"}, 1, "'A1000' is not a Ray accelerator type"),
])
def test_an_accelerator_ray_would_refuse_is_an_error_naming_the_app(spec: dict[str, Any], gpus: int,
                                                                     words: str) -> None:
    rendered = render(app("bad", gpus=gpus, **spec), app("good"))
    (problem,) = rendered.errors
    assert isinstance(problem, Problem)
    assert (problem.kind, problem.name, problem.path) == ("ArksApplication", "bad", "spec.accelerator")
    assert words in problem.message
    assert [a["name"] for a in rendered.serve_config["applications"]] == ["gateway", "good"]
    assert len(groups(rendered)) == 1  # the bad app leaves no worker group behind


def test_two_accelerator_shapes_render_two_groups_each_app_pinned_to_its_own() -> None:
    from ray.serve.llm import LLMConfig

    rendered = render(
        app("on-a100", gpus=1, accelerator="A100"),
        # No spec.accelerator: the GPU feature-discovery label names it.
        app("on-h100", gpus=1, instanceSpec={"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}),
    )
    assert rendered.problems == []
    by_group = groups(rendered)
    assert len(by_group) == 2
    for name, accelerator in (("on-a100", "A100"), ("on-h100", "H100")):
        cfg = llm_config(rendered, name)
        assert cfg["accelerator_type"] == accelerator
        (resource,) = {k for b in cfg["placement_group_config"]["bundles"] for k in b if k.startswith("arks-wg-")}
        group = by_group[resource.removeprefix("arks-wg-")]
        assert f'accelerator_type:{accelerator}\\": 1000' in group["rayStartParams"]["resources"]
        assert group["groupName"].startswith(f"{name}-{accelerator.lower()}1-")
        bundles = LLMConfig.model_validate(cfg).get_engine_config().placement_bundles
        assert bundles == [{resource: 1, "GPU": 1, f"accelerator_type:{accelerator}": 0.001}]
    # The pods land on their nodes by the node selector, and Ray replicas on the pods by the group resource.
    h100 = next(g for g in by_group.values() if g["groupName"].startswith("on-h100-h1001"))
    assert h100["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_cpu_apps_with_different_pod_shapes_get_different_groups() -> None:
    """The e2e's two CPU apps: same image and resources, different node selectors, so two groups."""
    rendered = render(app("a", instanceSpec={"nodeSelector": {"arks.ai/pool": "a"}}),
                      app("b", instanceSpec={"nodeSelector": {"arks.ai/pool": "b"}}))
    resources = {name: {k for b in llm_config(rendered, name)["placement_group_config"]["bundles"] for k in b
                        if k.startswith("arks-wg-")} for name in ("a", "b")}
    assert resources["a"].isdisjoint(resources["b"])
    assert len(groups(rendered)) == 2
