"""Arks manifests render unchanged: the quickstart and the config/samples, validated against KubeRay v1.7,
Ray Serve's own config schema, and the Kubernetes core schemas."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from arks_ray.api.loading import Loaded, load_documents, load_yaml
from arks_ray.render import Rendered, render
from tests.support.keys import TEST_OPTIONS, keyed_digest
from tests.support.paths import KUBERAY_RAYSERVICE_CRD, SHARED

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "arks"
SAMPLES = FIXTURES / "samples"
QUICKSTART = FIXTURES / "quickstart.yaml"
EXAMPLES = ROOT / "configs" / "examples"
KUBERAY_CRDS = KUBERAY_RAYSERVICE_CRD.parent
REFERENCE = SHARED / "reference/arks.md"
K8S_VERSION = "1.35"
APP_SAMPLES = ("arks_v1_arksapplication_vllm.yaml", "arks_v1_arksapplication_sglang.yaml",
               "arks_v1_arksapplication_dynamon.yaml")
COMPANIONS = tuple(SAMPLES / n for n in ("arks_v1_arksmodel.yaml", "arks_v1_arksendpoint.yaml",
                                         "arks_v1_arksquota.yaml", "arks_v1_arkstoken.yaml"))
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "local-demo.yaml")


def read_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_paths(*paths: Path) -> Loaded:
    """Several files as one input, as ``arks-ray render -f a -f b`` loads them."""
    return load_yaml("\n---\n".join(p.read_text() for p in paths))


def render_one(loaded: Loaded) -> Rendered:
    (result,) = render(loaded, options=TEST_OPTIONS)
    return result


@pytest.fixture(scope="module")
def rayservice_validator(crd_json_schema: Callable[[dict[str, Any]], dict[str, Any]]) -> jsonschema.Draft7Validator:
    crd = yaml.load((KUBERAY_CRDS / "ray.io_rayservices.yaml").read_text(), Loader=yaml.CSafeLoader)
    assert crd["spec"]["versions"][0]["name"] == "v1"
    schema = crd_json_schema(crd)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def serve_schema() -> Any:
    """Ray Serve's own schema of a serve config (what ``serve deploy`` and KubeRay's serveConfigV2 accept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's own pydantic deprecation noise, not ours
        from ray.serve.schema import ServeDeploySchema
    return ServeDeploySchema


def kuberay_errors(validator: jsonschema.Draft7Validator, rayservice: dict[str, Any]) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(rayservice)]


def serve_config_of(rendered: Rendered) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(rendered.rayservice["spec"]["serveConfigV2"])
    return cfg


def sample_namespace(app_sample: str) -> Rendered:
    return render_one(load_paths(SAMPLES / app_sample, *COMPANIONS))


def engine_app(rendered: Rendered, name: str) -> dict[str, Any]:
    apps = {a["name"]: a for a in serve_config_of(rendered)["applications"]}
    return apps[name]


# --- the quickstart -------------------------------------------------------------------------------


def test_fixture_quickstart_is_the_examples_quickstart() -> None:
    assert QUICKSTART.read_text() == (EXAMPLES / "quickstart.yaml").read_text()


@pytest.mark.parametrize("path", [QUICKSTART, *sorted(SAMPLES.glob("*.yaml"))], ids=lambda p: p.name)
@pytest.mark.skipif(not REFERENCE.exists(), reason="the project's shared/reference is not beside this clone")
def test_fixtures_are_verbatim_from_the_arks_reference(path: Path) -> None:
    # Byte for byte, trailing spaces and comments included: "accepts Arks manifests unchanged".
    assert path.read_text().rstrip("\n") in REFERENCE.read_text()


def test_quickstart_loads_and_renders_with_no_problem_at_all() -> None:
    loaded = load_paths(QUICKSTART)
    assert loaded.problems == []
    assert sorted(o.kind for o in loaded.objects) == [
        "ArksApplication", "ArksEndpoint", "ArksModel", "ArksQuota", "ArksToken"]
    rendered = render_one(loaded)
    assert rendered.problems == []
    assert rendered.namespace == "default"


def test_quickstart_rayservice_validates_against_kuberay_crd(rayservice_validator: jsonschema.Draft7Validator) -> None:
    rendered = render_one(load_paths(QUICKSTART))
    rs = rendered.rayservice
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    assert kuberay_errors(rayservice_validator, rs) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), "two"),
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"), ["not", "a", "map"]),
        (("spec", "serveConfigV2"), {"applications": []}),
    ],
)
def test_kuberay_validator_catches_a_broken_rayservice(
    rayservice_validator: jsonschema.Draft7Validator, path: tuple[Any, ...], value: Any
) -> None:
    # Guards the check above: the converted CRD schema does reject wrong types.
    rs = copy.deepcopy(render_one(load_paths(QUICKSTART)).rayservice)
    node = rs
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert kuberay_errors(rayservice_validator, rs) != []


def test_kuberay_validator_catches_a_missing_required_field(rayservice_validator: jsonschema.Draft7Validator) -> None:
    rs = copy.deepcopy(render_one(load_paths(QUICKSTART)).rayservice)
    del rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in kuberay_errors(rayservice_validator, rs))


def test_quickstart_serve_config_is_a_valid_ray_serve_config(serve_schema: Any) -> None:
    rendered = render_one(load_paths(QUICKSTART))
    cfg = serve_config_of(rendered)
    assert cfg == rendered.serve_config
    schema = serve_schema.model_validate(cfg)
    names = [a.name for a in schema.applications]
    assert names == ["gateway", "app-qwen"]
    prefixes = {a.name: a.route_prefix for a in schema.applications}
    assert prefixes == {"gateway": "/", "app-qwen": None}


def test_quickstart_rendered_meaning() -> None:
    """The quickstart's numbers land where Arks meant them: 1 group of 2 pods, TP 2, weight 5, the limits."""
    rendered = render_one(load_paths(QUICKSTART))
    cluster = rendered.rayservice["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 2)  # replicas 1 x size 2
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "qwen-7b"

    llm = engine_app(rendered, "app-qwen")["args"]["llm_config"]
    assert llm["model_loading_config"] == {"model_id": "qwen-7b", "model_source": "/models/models/default/qwen-7b"}
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 2
    assert len(llm["placement_group_config"]["bundles"]) == 2
    assert all(b.get("GPU") == 1 for b in llm["placement_group_config"]["bundles"])
    assert llm["deployment_config"]["num_replicas"] == 1

    gw = rendered.gateway
    (endpoint,) = gw.endpoints
    assert endpoint.name == "qwen-7b"
    assert [(b.kind, b.name, b.weight) for b in endpoint.backends] == [("app", "app-qwen", 5)]
    (token,) = gw.tokens
    assert token.digest == keyed_digest("sk-test123456")
    (grant,) = token.grants
    assert {(limit.type, limit.value) for limit in grant.rate_limits} == {
        ("rpm", 5), ("tpm", 40000), ("rpd", 100), ("tpd", 1000000)}
    assert grant.quota == "basic-quota"
    (quota,) = gw.quotas
    assert quota.period == "lifetime"
    assert {(b.type, b.value) for b in quota.budgets} == {("prompt", 100000), ("response", 500000),
                                                          ("total", 600000)}
    kinds = [(m["kind"], m["metadata"]["name"]) for m in rendered.children]
    assert kinds == [("PersistentVolumeClaim", "qwen-7b"), ("Job", "arks-model-qwen-7b")]


@pytest.mark.parametrize("path", [QUICKSTART, *EXAMPLE_FILES], ids=lambda p: p.name)
def test_core_objects_validate_against_kubernetes(path: Path) -> None:
    rendered = render_one(load_paths(path))
    assert rendered.errors == []
    for child in rendered.children:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_kubernetes_validate_catches_a_broken_job() -> None:
    job = copy.deepcopy(render_one(load_paths(QUICKSTART)).children[1])
    job["spec"]["template"]["spec"]["restartPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", [QUICKSTART, *EXAMPLE_FILES], ids=lambda p: p.name)
def test_every_example_renders_valid_rayservice_and_serve_config(
    path: Path, rayservice_validator: jsonschema.Draft7Validator, serve_schema: Any
) -> None:
    loaded = load_paths(path)
    assert loaded.errors == []
    rendered = render_one(loaded)
    assert rendered.errors == []
    assert kuberay_errors(rayservice_validator, rendered.rayservice) == []
    serve_schema.model_validate(serve_config_of(rendered))
    assert set(rendered.serve_apps) == {o.metadata.name for o in loaded.objects
                                        if o.kind in ("ArksApplication", "ArksDisaggregatedApplication")}


# --- config/samples ---------------------------------------------------------------------------------


def test_sample_model_and_quota_are_the_quickstarts() -> None:
    quickstart = read_docs(QUICKSTART)
    assert read_docs(SAMPLES / "arks_v1_arksmodel.yaml") == [quickstart[0]]
    assert read_docs(SAMPLES / "arks_v1_arksquota.yaml") == [quickstart[3]]


@pytest.mark.parametrize("sample", APP_SAMPLES)
def test_app_samples_render_without_errors(
    sample: str, rayservice_validator: jsonschema.Draft7Validator, serve_schema: Any
) -> None:
    rendered = sample_namespace(sample)
    assert rendered.errors == []
    assert kuberay_errors(rayservice_validator, rendered.rayservice) == []
    serve_schema.model_validate(serve_config_of(rendered))
    assert len(rendered.serve_apps) == 1


def test_sglang_sample_stale_extra_options_is_a_warning_and_still_honoured() -> None:
    loaded = load_paths(SAMPLES / "arks_v1_arksapplication_sglang.yaml", *COMPANIONS)
    stale = [p for p in loaded.problems if p.path == "spec.extraOptions"]
    assert [(p.kind, p.name, p.severity) for p in stale] == [("ArksApplication", "app-qwen", "warning")]
    assert loaded.errors == []
    rendered = render_one(loaded)
    kwargs = engine_app(rendered, "app-qwen")["args"]["llm_config"]["engine_kwargs"]
    # SGLang's ServerArgs: the stale extraOptions, TP, and the model (Ray's SGLangServer passes no model).
    assert kwargs == {"mem_fraction_static": 0.7, "tp_size": 2, "model_path": "/models/models/default/qwen-7b",
                      "served_model_name": "qwen-7b"}
    assert engine_app(rendered, "app-qwen")["args"]["runtime"] == "sglang"


def test_dynamo_sample_serves_its_own_name_and_ignores_tp_with_a_warning() -> None:
    loaded = load_paths(SAMPLES / "arks_v1_arksapplication_dynamon.yaml", *COMPANIONS)
    assert [(p.path, p.severity) for p in loaded.problems] == [("spec.tensorParallelSize", "warning")]
    rendered = render_one(loaded)
    app = engine_app(rendered, "app-qwen")
    assert app["args"]["runtime"] == "dynamo"
    assert app["args"]["llm_config"]["model_loading_config"]["model_id"] == "myqwen-7b"
    assert "tensor_parallel_size" not in app["args"]["llm_config"]["engine_kwargs"]
    assert app["runtime_env"]["env_vars"]["NATS_SERVER"] == "nats://dynamo-platform-nats.dynamo-playground:4222"
    # The sample endpoint is named qwen-7b, which this app does not serve: Arks would route nothing either.
    (endpoint,) = rendered.gateway.endpoints
    assert endpoint.backends == ()
    assert any(p.kind == "ArksEndpoint" and p.severity == "warning" for p in rendered.problems)


def test_vllm_sample_warns_that_tp2_does_not_fit_one_gpu() -> None:
    rendered = sample_namespace("arks_v1_arksapplication_vllm.yaml")
    assert [(p.path, p.severity) for p in rendered.problems] == [("spec.tensorParallelSize", "warning")]


def test_arks_v01_instance_spec_replicas_and_driver_are_warnings() -> None:
    """Arks v0.1 manifests (docs still show them): instanceSpec.replicas and driver are stale, not fatal."""
    (doc,) = read_docs(SAMPLES / "arks_v1_arksapplication_vllm.yaml")
    doc["spec"]["instanceSpec"]["replicas"] = 2
    doc["spec"]["driver"] = "LWS"
    loaded = load_documents([*read_docs(SAMPLES / "arks_v1_arksmodel.yaml"), doc])
    assert loaded.errors == []
    stale = sorted((p.path, p.severity) for p in loaded.problems)
    assert stale == [("spec.driver", "warning"), ("spec.instanceSpec.replicas", "warning")]
    assert render_one(loaded).errors == []


def test_stale_instance_spec_replicas_is_located_per_role_in_a_disaggregated_app() -> None:
    doc = {
        "apiVersion": "arks.ai/v1", "kind": "ArksDisaggregatedApplication", "metadata": {"name": "pd"},
        "spec": {"model": {"name": "qwen-7b"}, "router": {},
                 "prefill": {"instanceSpec": {"replicas": 2}}, "decode": {}},
    }
    loaded = load_documents([doc])
    assert [(p.path, p.severity) for p in loaded.problems] == [("spec.prefill.instanceSpec.replicas", "warning")]
