"""The rendered RayCluster as a platform engineer meets it: per-app pods, gang scheduling, upgrades, images.

- ``kubectl get pods -l arks.ai/application=<app>`` selects exactly the worker groups whose pods serve it;
- ``podGroupPolicy`` becomes the labels KubeRay v1.7's batch schedulers read, or a warning naming the field;
- ``upgradeStrategy`` is set; retired groups are dropped exactly when KubeRay would build a new cluster anyway;
- a ``runtimeImage`` that is no Ray image is a warning, SGLang PD an error (``test_api_validation``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from arks_ray.api import load_documents
from arks_ray.render import Rendered, RenderOptions, render_namespace
from arks_ray.render.cluster import needs_new_cluster
from arks_ray.render.validation import is_ray_image
from tests.support.keys import TEST_KEYS

MODEL = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "m", "namespace": "ns"},
         "spec": {"model": "Qwen/Qwen2.5-7B-Instruct",
                  "storage": {"pvc": {"spec": {"accessModes": ["ReadWriteMany"],
                                               "resources": {"requests": {"storage": "20Gi"}}}}}}}


def app(name: str, gpus: int = 1, **spec: Any) -> dict[str, Any]:
    inst = {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}, **spec.pop("instanceSpec", {})}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"model": {"name": "m"}, "instanceSpec": inst, **spec}}


def pd(name: str) -> dict[str, Any]:
    side = {"runtimeCommonArgs": ["--tp 1"], "instanceSpec": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksDisaggregatedApplication",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"runtime": "vllm", "model": {"name": "m"}, "router": {}, "prefill": side, "decode": side}}


def render(*docs: dict[str, Any], previous: dict[str, Any] | None = None, **options: Any) -> Rendered:
    loaded = load_documents([MODEL, *copy.deepcopy(docs)])
    assert loaded.errors == [], loaded.errors
    return render_namespace(loaded.objects, "ns", previous=previous,
                            options=RenderOptions(token_keys=TEST_KEYS, **options))


def groups(rendered: Rendered) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return groups


def selected(rendered: Rendered, selector: dict[str, str]) -> set[str]:
    """Worker groups whose pods a label selector selects (what ``kubectl get pods -l`` would list)."""
    return {g["groupName"] for g in groups(rendered)
            if selector.items() <= g["template"]["metadata"]["labels"].items()}


def serving(rendered: Rendered, name: str) -> set[str]:
    """Worker groups an app's replicas can be placed on: those whose resource its bundles ask for."""
    (found,) = [a for a in rendered.serve_config["applications"] if a["name"] == name]
    args = found["args"]
    configs = [args["llm_config"]] if "llm_config" in args else [args["prefill"], args["decode"]]
    return {k.removeprefix("arks-wg-") for c in configs for b in c["placement_group_config"]["bundles"]
            for k in b if k.startswith("arks-wg-")}


# --- per-app pods -----------------------------------------------------------------------------------------


def test_the_application_label_selects_exactly_the_pods_serving_the_app() -> None:
    # Two apps of the very same pod shape, and a PD app: shapes no longer share pods across apps.
    rendered = render(app("a"), app("b"), pd("p"))
    assert rendered.errors == []
    for name in ("a", "b", "p"):
        assert selected(rendered, {"arks.ai/application": name}) == serving(rendered, name) != set()
    assert serving(rendered, "a").isdisjoint(serving(rendered, "b"))
    prefill = selected(rendered, {"arks.ai/application": "p", "arks.ai/role": "prefill"})
    decode = selected(rendered, {"arks.ai/application": "p", "arks.ai/role": "decode"})
    assert len(prefill) == len(decode) == 1
    assert prefill != decode


def test_changing_an_apps_pods_appends_a_group_and_retires_the_old_one_in_place() -> None:
    before = render(app("a"), app("b"))
    after = render(app("a", instanceSpec={"nodeSelector": {"pool": "x"}}), app("b"), previous=before.rayservice)
    old, new = [g["groupName"] for g in groups(before)], [g["groupName"] for g in groups(after)]
    assert new[:len(old)] == old  # append-only: KubeRay updates the running cluster in place
    assert len(new) == len(old) + 1
    retired = next(g for g in groups(after) if g["groupName"] not in serving(after, "a") | serving(after, "b"))
    assert (retired["replicas"], retired["minReplicas"], retired["maxReplicas"]) == (0, 0, 0)
    assert not needs_new_cluster(before.rayservice["spec"]["rayClusterConfig"],
                                 after.rayservice["spec"]["rayClusterConfig"])


def test_retired_groups_go_when_kuberay_builds_a_new_cluster_anyway() -> None:
    before = render(app("a"), app("b"))
    shrunk = render(app("a"), previous=before.rayservice)
    assert len(groups(shrunk)) == 2  # b's group stays, at zero pods: removing it would rebuild the cluster
    upgraded = render(app("a"), previous=shrunk.rayservice, head_image="ghcr.io/arks-ray/arks-ray:0.2.0")
    assert [g["groupName"] for g in groups(upgraded)] == list(serving(upgraded, "a"))
    assert needs_new_cluster(shrunk.rayservice["spec"]["rayClusterConfig"],
                             upgraded.rayservice["spec"]["rayClusterConfig"])


def test_defaults_the_api_server_adds_are_not_a_change() -> None:
    before = render(app("a")).rayservice["spec"]["rayClusterConfig"]
    live = copy.deepcopy(before)
    live["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = "TCP"
    live["workerGroupSpecs"][0]["numOfHosts"] = 1
    live["workerGroupSpecs"][0]["replicas"] = 7  # the autoscaler's
    assert not needs_new_cluster(live, before)
    changed = copy.deepcopy(before)
    changed["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = "other:1"
    assert needs_new_cluster(live, changed)


@pytest.mark.parametrize("strategy", ["NewCluster", "None"])
def test_the_upgrade_strategy_is_set(strategy: str) -> None:
    assert render(app("a"), upgrade_strategy=strategy).rayservice["spec"]["upgradeStrategy"] == {"type": strategy}


# --- gang scheduling ----------------------------------------------------------------------------------------


def warnings(rendered: Rendered) -> list[tuple[str, str]]:
    return [(p.name, p.path) for p in rendered.problems if p.severity == "warning"]


def labels(rendered: Rendered) -> dict[str, str]:
    out: dict[str, str] = rendered.rayservice["metadata"]["labels"]
    return out


VOLCANO = {"volcanoScheduling": {"queue": "llm", "priorityClassName": "high"}}
KUBE = {"kubeScheduling": {"scheduleTimeoutSeconds": 120}}


def test_without_a_batch_scheduler_a_policy_is_a_warning_naming_it() -> None:
    rendered = render(app("a", podGroupPolicy=VOLCANO), app("b"))
    assert warnings(rendered) == [("a", "spec.podGroupPolicy")]
    assert "gang" not in str(labels(rendered))
    assert "gangScheduling.scheduler" in rendered.problems[0].message


def test_volcano_queue_and_priority_become_the_podgroups() -> None:
    rendered = render(app("a", podGroupPolicy=VOLCANO), gang_scheduler="volcano")
    assert warnings(rendered) == []
    assert labels(rendered)["volcano.sh/queue-name"] == "llm"
    assert labels(rendered)["ray.io/priority-class-name"] == "high"
    # Two apps asking for different queues: one PodGroup per RayCluster, so the second is not honoured.
    other = {"volcanoScheduling": {"queue": "batch"}}
    both = render(app("a", podGroupPolicy=VOLCANO), app("b", podGroupPolicy=other), gang_scheduler="volcano")
    assert warnings(both) == [("b", "spec.podGroupPolicy.volcanoScheduling.queue")]
    assert labels(both)["volcano.sh/queue-name"] == "llm"


def test_scheduler_plugins_gang_is_switched_on_and_its_timeout_is_not_honoured() -> None:
    rendered = render(app("a", podGroupPolicy=KUBE), gang_scheduler="scheduler-plugins")
    assert labels(rendered)["ray.io/gang-scheduling-enabled"] == "true"
    assert warnings(rendered) == [("a", "spec.podGroupPolicy.kubeScheduling.scheduleTimeoutSeconds")]
    # The default timeout (not set by the user) is no reason to warn.
    quiet = render(app("a", podGroupPolicy={"kubeScheduling": {}}), gang_scheduler="scheduler-plugins")
    assert warnings(quiet) == []


def test_a_policy_for_another_scheduler_says_which_one_runs() -> None:
    rendered = render(app("a", podGroupPolicy=VOLCANO), gang_scheduler="yunikorn")
    assert labels(rendered)["ray.io/gang-scheduling-enabled"] == "true"
    assert labels(rendered)["yunikorn.apache.org/app-id"] == "ns-arks"
    assert warnings(rendered) == [("a", "spec.podGroupPolicy.volcanoScheduling")]
    assert "yunikorn" in rendered.problems[0].message


def test_a_policy_added_to_a_running_namespace_says_when_it_takes_effect() -> None:
    before = render(app("a"), gang_scheduler="scheduler-plugins")
    after = render(app("a", podGroupPolicy={"kubeScheduling": {}}), gang_scheduler="scheduler-plugins",
                   previous=before.rayservice)
    assert warnings(after) == [("a", "spec.podGroupPolicy")]
    assert "next builds" in after.problems[0].message
    again = render(app("a", podGroupPolicy={"kubeScheduling": {}}), gang_scheduler="scheduler-plugins",
                   previous=after.rayservice)
    assert warnings(again) == []


# --- images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "ray"), [
    ("vllm/vllm-openai:v0.8.5", False), ("lmsysorg/sglang:v0.4.6", False), ("nvcr.io/nvidia/ai-dynamo/vllm:0.3", False),
    ("rayproject/ray-llm:2.60.0-py311-cu128", True), ("ghcr.io/arks-ray/arks-ray-vllm:0.1.0", True),
    ("registry.local:5000/team/arks-ray-cpu@sha256:abc", True),
])
def test_runtime_images_that_are_not_ray_images_are_warned(image: str, ray: bool) -> None:
    assert is_ray_image(image) is ray
    rendered = render(app("a", runtimeImage=image))
    assert warnings(rendered) == ([] if ray else [("a", "spec.runtimeImage")])
    assert rendered.errors == []


def _env(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = template["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_every_ray_container_gets_the_serve_settings_and_an_apps_own_env_wins() -> None:
    """Callers (the gateway on the head) and replicas (on the workers) alike get the settings; an app that
    sets one of them itself keeps its value (and only for its own pods)."""
    from arks_ray.render.options import SERVE_THROUGHPUT_ENV

    own = {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "0"}
    rendered = render(app("a"), app("b", instanceSpec={"env": [own, {"name": "X", "value": "y"}]}))
    head = rendered.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert SERVE_THROUGHPUT_ENV.items() <= _env(head).items()
    by_app = {g["template"]["metadata"]["labels"]["arks.ai/application"]: _env(g["template"]) for g in groups(rendered)}
    assert SERVE_THROUGHPUT_ENV.items() <= by_app["a"].items()
    assert by_app["b"] == {**SERVE_THROUGHPUT_ENV, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "X": "y"}
    # {} renders Ray's own defaults: no Serve settings anywhere.
    bare = render(app("a"), serve_env={})
    assert not any(k.startswith("RAY_SERVE") for g in groups(bare) for k in _env(g["template"]))


def test_haproxy_ingress_reaches_every_ray_container() -> None:
    from arks_ray.render.options import HAPROXY_ENV, SERVE_THROUGHPUT_ENV

    rendered = render(app("a"), app("b", routing={"router": "prefixCache"}), ingress="haproxy")
    head = rendered.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert _env(head).items() >= {**SERVE_THROUGHPUT_ENV, **HAPROXY_ENV}.items()
    assert _env(head)["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"  # the mode's, over the default's "0"
    assert all(_env(g["template"]).items() >= HAPROXY_ENV.items() for g in groups(rendered))
    # An app with its own router renders as ever: its engine app puts a placeholder ingress in front
    # (deployments.engines.fronted, tests/unit/test_engine_front.py).
    assert not rendered.errors
    assert sorted(a["name"] for a in rendered.serve_config["applications"]) == ["a", "b", "gateway"]
    plain = render(app("a"))
    assert not any("HA_PROXY" in k for g in groups(plain) for k in _env(g["template"]))
