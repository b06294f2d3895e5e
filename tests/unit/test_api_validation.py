"""Invalid Arks specs are refused with a problem naming the field path; Arks' defaults are kept.

Each case starts from the Arks quickstart and breaks one thing, so a failure points at one rule.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from arks_ray.api import ArksApplication, ArksDisaggregatedApplication, ArksEndpoint, ArksModel
from arks_ray.api.loading import Loaded, load_documents, parse_object
from arks_ray.errors import Problem
from arks_ray.render import Rendered, render
from tests.support.keys import TEST_OPTIONS, keyed_digest

QUICKSTART = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "arks" / "quickstart.yaml"
MODEL, APP, ENDPOINT, QUOTA, TOKEN = range(5)


def quickstart() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(QUICKSTART.read_text()) if d is not None]


def check(docs: list[Any]) -> tuple[Loaded, list[Rendered], list[Problem]]:
    """Load and render, as ``arks-ray validate`` does; return every problem found on the way."""
    loaded = load_documents(docs)
    results = render(loaded, options=TEST_OPTIONS)
    return loaded, results, loaded.problems + [p for r in results for p in r.problems]


def errors_at(docs: list[Any]) -> list[tuple[str, str, str]]:
    return [(p.kind, p.name, p.path) for p in check(docs)[2] if p.severity == "error"]


def with_app(**spec: Any) -> list[dict[str, Any]]:
    docs = quickstart()
    docs[APP]["spec"].update(spec)
    return docs


def disaggregated(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"name": "qwen-7b"}, "router": {}, "prefill": {}, "decode": {}}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksDisaggregatedApplication", "metadata": {"name": "pd"},
            "spec": {**base, **spec}}


def test_quickstart_is_clean() -> None:
    # The baseline every case below breaks.
    assert check(quickstart())[2] == []


# --- ArksApplication ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["trtllm", "VLLM", "llama.cpp"])
def test_unknown_runtime(runtime: str) -> None:
    _, _, problems = check(with_app(runtime=runtime))
    (problem,) = [p for p in problems if p.severity == "error"]
    assert (problem.kind, problem.name, problem.path) == ("ArksApplication", "app-qwen", "spec.runtime")
    assert "vllm" in problem.message
    assert "sglang" in problem.message


def test_negative_replicas() -> None:
    assert errors_at(with_app(replicas=-1)) == [("ArksApplication", "app-qwen", "spec.replicas")]


def test_negative_tensor_parallel_size() -> None:
    assert errors_at(with_app(tensorParallelSize=-2)) == [("ArksApplication", "app-qwen", "spec.tensorParallelSize")]


@pytest.mark.parametrize(
    ("instance_spec", "path"),
    [
        ({"volumes": [{"name": "models", "emptyDir": {}}]}, "spec.instanceSpec.volumes[0].name"),
        ({"volumes": [{"name": "cache", "emptyDir": {}}, {"name": "models", "emptyDir": {}}]},
         "spec.instanceSpec.volumes[1].name"),
        ({"volumeMounts": [{"name": "data", "mountPath": "/models"}]}, "spec.instanceSpec.volumeMounts[0].mountPath"),
        ({"volumeMounts": [{"name": "data", "mountPath": "/models/"}]}, "spec.instanceSpec.volumeMounts[0].mountPath"),
        ({"volumeMounts": [{"name": "models", "mountPath": "/data"}]}, "spec.instanceSpec.volumeMounts[0].name"),
    ],
)
def test_reserved_model_volume_and_mount_path(instance_spec: dict[str, Any], path: str) -> None:
    (problem,) = load_documents(with_app(instanceSpec=instance_spec)).problems
    assert (problem.severity, problem.path) == ("error", path)
    assert "reserved" in problem.message


def test_reserved_names_are_checked_in_every_instance_spec() -> None:
    docs = quickstart()
    docs[MODEL]["spec"]["instanceSpec"] = {"volumes": [{"name": "models", "emptyDir": {}}]}
    pd = disaggregated(decode={"instanceSpec": {"volumeMounts": [{"name": "x", "mountPath": "/models"}]}})
    assert errors_at([*docs, pd]) == [
        ("ArksModel", "qwen-7b", "spec.instanceSpec.volumes[0].name"),
        ("ArksDisaggregatedApplication", "pd", "spec.decode.instanceSpec.volumeMounts[0].mountPath"),
        # The app's model was refused with it, so render reports the dangling reference too.
        ("ArksApplication", "app-qwen", "spec.model.name"),
    ]


def test_similar_paths_are_not_reserved() -> None:
    spec = {"volumes": [{"name": "models-cache", "emptyDir": {}}],
            "volumeMounts": [{"name": "models-cache", "mountPath": "/data/models"}]}
    assert check(with_app(instanceSpec=spec))[2] == []


def test_missing_model_is_found_by_render_not_by_the_loader() -> None:
    docs = quickstart()
    del docs[MODEL]
    loaded, results, problems = check(docs)
    assert loaded.problems == []
    assert errors_at(docs) == [("ArksApplication", "app-qwen", "spec.model.name")]
    # The app is left out; the rest of the namespace (gateway, tokens) still renders.
    (rendered,) = results
    assert rendered.serve_apps == {}
    assert [a["name"] for a in rendered.serve_config["applications"]] == ["gateway"]
    assert rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] == []
    assert len(rendered.gateway.tokens) == 1
    assert any("qwen-7b" in p.message for p in problems)


def test_app_named_gateway_is_refused_and_others_still_render() -> None:
    docs = quickstart()
    other = copy.deepcopy(docs[APP])
    other["metadata"]["name"] = "gateway"
    _, (rendered,), problems = check([*docs, other])
    assert [(p.name, p.path, p.severity) for p in problems] == [("gateway", "metadata.name", "error")]
    assert set(rendered.serve_apps) == {"app-qwen"}
    assert [a["name"] for a in rendered.serve_config["applications"]].count("gateway") == 1


def test_app_and_disaggregated_app_with_the_same_name() -> None:
    docs = quickstart()
    pd = disaggregated()
    pd["metadata"]["name"] = "app-qwen"
    assert errors_at([*docs, pd]) == [("ArksDisaggregatedApplication", "app-qwen", "metadata.name")]


def test_autoscaling_bounds() -> None:
    (problem,) = load_documents(with_app(autoscaling={"minReplicas": 3, "maxReplicas": 2})).problems
    assert problem.path == "spec.autoscaling"
    assert "minReplicas" in problem.message


# --- unknown fields ------------------------------------------------------------------------------------


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = doc
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value


@pytest.mark.parametrize(
    ("index", "path", "where"),
    [
        (APP, ("spec", "bogus"), "spec.bogus"),
        (APP, ("bogus",), "bogus"),
        (APP, ("spec", "instanceSpec", "bogus"), "spec.instanceSpec.bogus"),
        (APP, ("spec", "model", "namespace"), "spec.model.namespace"),
        (APP, ("spec", "autoscaling", "maxReplica"), "spec.autoscaling.maxReplica"),
        (APP, ("spec", "podGroupPolicy", "kubeScheduling", "timeout"), "spec.podGroupPolicy.kubeScheduling.timeout"),
        (MODEL, ("spec", "source", "huggingface", "token"), "spec.source.huggingface.token"),
        (MODEL, ("spec", "storage", "pvc", "size"), "spec.storage.pvc.size"),
        (MODEL, ("spec", "source", "gcs"), "spec.source.gcs"),
        (ENDPOINT, ("spec", "gatewayRef", "bogus"), "spec.gatewayRef.bogus"),
        (ENDPOINT, ("spec", "routeConfigs"), None),
        (QUOTA, ("spec", "quotas", 0, "name"), "spec.quotas[0].name"),
        (TOKEN, ("spec", "qos", 0, "rateLimits", 1, "limit"), "spec.qos[0].rateLimits[1].limit"),
        (TOKEN, ("spec", "qos", 0, "arksEndpoint", "namespace"), "spec.qos[0].arksEndpoint.namespace"),
        (TOKEN, ("spec", "qos", 0, "quota", "kind"), "spec.qos[0].quota.kind"),
    ],
)
def test_unknown_field_anywhere(index: int, path: tuple[Any, ...], where: str | None) -> None:
    docs = quickstart()
    if where is None:  # a list item: routeConfigs[0] with a typo
        docs[index]["spec"]["routeConfigs"] = [{"name": "svc", "weigth": 3}]
        where = "spec.routeConfigs[0].weigth"
    else:
        _set(docs[index], path, "x")
    loaded = load_documents(docs)
    (problem,) = loaded.problems
    assert (problem.severity, problem.path) == ("error", where)
    assert "Extra inputs are not permitted" in problem.message
    assert docs[index]["kind"] not in {o.kind for o in loaded.objects}


@pytest.mark.parametrize("section", ["router", "prefill", "decode"])
def test_unknown_field_in_a_disaggregated_role(section: str) -> None:
    loaded = load_documents([disaggregated(**{section: {"bogus": 1}})])
    assert [(p.path, p.severity) for p in loaded.problems] == [(f"spec.{section}.bogus", "error")]


def test_metadata_keeps_unknown_kubernetes_fields() -> None:
    # metadata is Kubernetes', not ours: managedFields, resourceVersion and the like pass through.
    docs = quickstart()
    docs[APP]["metadata"]["resourceVersion"] = "42"
    assert check(docs)[2] == []


# --- engine arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--max-model-len 8192; rm -rf /"],
        ["--dtype half && echo pwned"],
        ["--x $(whoami)"],
        ["--x `id`"],
        ["--x ${HOME}"],
        ["--log-file", ">/tmp/log"],
        ["--chat-template 'unterminated"],
        ["positional"],
        ["--dtype", "half", "extra"],
        ["--tensor-parallel-size 4"],
        ["--served-model-name", "other"],
        ["--json", "{broken"],
    ],
)
def test_unparseable_runtime_common_args(args: list[str]) -> None:
    _, (rendered,), problems = check(with_app(runtimeCommonArgs=args))
    assert [(p.kind, p.name, p.path, p.severity) for p in problems] == [
        ("ArksApplication", "app-qwen", "spec.runtimeCommonArgs", "error"),
        # With its only app refused, the endpoint has nothing to route to.
        ("ArksEndpoint", "qwen-7b", "metadata.name", "warning"),
    ]
    # A bad app leaves nothing behind: no Serve app, no worker group.
    assert rendered.serve_apps == {}
    assert rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] == []


def test_bad_args_in_a_disaggregated_side_name_that_side() -> None:
    docs = [*quickstart(), disaggregated(runtime="vllm",
                                         decode={"runtimeCommonArgs": ["--mem-fraction-static 0.8 | tee"]})]
    assert errors_at(docs) == [("ArksDisaggregatedApplication", "pd", "spec.decode.runtimeCommonArgs")]


@pytest.mark.parametrize("runtime", ["sglang", "", None])
def test_sglang_pd_is_refused_naming_spec_runtime(runtime: str | None) -> None:
    """Arks' default PD runtime: validate and the precheck refuse it, instead of Serve failing later."""
    spec = {} if runtime is None else {"runtime": runtime}
    _, _, problems = check([*quickstart(), disaggregated(**spec)])
    (refused,) = [p for p in problems if p.severity == "error"]
    assert (refused.kind, refused.name, refused.path) == ("ArksDisaggregatedApplication", "pd", "spec.runtime")
    assert "'sglang'" in refused.message
    assert "vllm, dynamo" in refused.message


# --- tokens and quotas ---------------------------------------------------------------------------------


def test_token_without_qos() -> None:
    docs = quickstart()
    del docs[TOKEN]["spec"]["qos"]
    assert errors_at(docs) == [("ArksToken", "example-token", "spec.qos")]


def test_token_with_empty_qos() -> None:
    docs = quickstart()
    docs[TOKEN]["spec"]["qos"] = []
    assert errors_at(docs) == [("ArksToken", "example-token", "spec.qos")]


@pytest.mark.parametrize("bad_type", ["tokens", "name", "Prompt", ""])
def test_quota_with_an_unknown_type(bad_type: str) -> None:
    docs = quickstart()
    docs[QUOTA]["spec"]["quotas"][0]["type"] = bad_type
    loaded = load_documents(docs)
    assert [(p.path, p.severity) for p in loaded.problems] == [("spec.quotas[0].type", "error")]


def test_quota_lists_a_type_twice() -> None:
    docs = quickstart()
    docs[QUOTA]["spec"]["quotas"].append({"type": "prompt", "value": 1})
    loaded = load_documents(docs)
    assert [p.path for p in loaded.problems] == ["spec.quotas[3].type"]


def test_arks_doc_bug_quota_items_with_name_instead_of_type() -> None:
    # docs/gateway-usage.md "Case 2" writes `- name: prompt`; the CRD (and we) need `type:`.
    docs = quickstart()
    docs[QUOTA]["spec"]["quotas"] = [{"name": "prompt", "value": 1000}]
    assert sorted(p.path for p in load_documents(docs).problems) == ["spec.quotas[0].name", "spec.quotas[0].type"]


def test_arks_doc_bug_hf_token_secret_ref_as_a_string() -> None:
    docs = quickstart()
    docs[MODEL]["spec"]["source"] = {"huggingface": {"tokenSecretRef": "hf-token"}}
    (problem,) = load_documents(docs).problems
    assert problem.path == "spec.source.huggingface.tokenSecretRef"


def test_duplicate_rate_limit_types() -> None:
    docs = quickstart()
    docs[TOKEN]["spec"]["qos"][0]["rateLimits"] = [{"type": "tpm", "value": 1}, {"type": "tpm", "value": 2}]
    loaded = load_documents(docs)
    (problem,) = loaded.problems
    assert (problem.path, problem.severity) == ("spec.qos[0].rateLimits[1].type", "error")
    assert "tpm" in problem.message


def test_duplicate_qos_endpoint() -> None:
    docs = quickstart()
    docs[TOKEN]["spec"]["qos"].append({"arksEndpoint": {"name": "qwen-7b"}})
    assert [p.path for p in load_documents(docs).problems] == ["spec.qos[1].arksEndpoint.name"]


def test_rate_limit_type_and_value_are_checked() -> None:
    docs = quickstart()
    docs[TOKEN]["spec"]["qos"][0]["rateLimits"] = [{"type": "rps", "value": 1}, {"type": "rpm", "value": -1}]
    assert sorted(p.path for p in load_documents(docs).problems) == [
        "spec.qos[0].rateLimits[0].type", "spec.qos[0].rateLimits[1].value"]


def _token(name: str, value: str | None = None, secret: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"qos": [{"arksEndpoint": {"name": "qwen-7b"}}]}
    if value is not None:
        spec["token"] = value
    if secret is not None:
        spec["tokenSecretRef"] = {"name": secret}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksToken", "metadata": {"name": name}, "spec": spec}


def _secret(name: str, **data: str) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"}, "data": encoded}


def test_two_tokens_with_the_same_value_are_both_refused() -> None:
    docs = [*quickstart(), _token("copycat", "sk-test123456"), _token("bystander", "sk-other")]
    _, (rendered,), problems = check(docs)
    errors = sorted((p.name, p.path) for p in problems if p.severity == "error")
    assert errors == [("copycat", "spec.token"), ("example-token", "spec.token")]
    assert [t.name for t in rendered.gateway.tokens] == ["bystander"]
    assert keyed_digest("sk-test123456") not in {t.digest for t in rendered.gateway.tokens}


def test_same_value_through_a_secret_is_a_clash_too() -> None:
    docs = [*quickstart(), _secret("key", token="sk-test123456"), _token("from-secret", secret="key")]
    _, (rendered,), problems = check(docs)
    assert sorted(p.name for p in problems if p.severity == "error") == ["example-token", "from-secret"]
    assert rendered.gateway.tokens == ()


def test_token_secret_ref_to_a_missing_secret() -> None:
    docs = [*quickstart(), _token("alice", secret="nowhere")]
    _, (rendered,), problems = check(docs)
    assert [(p.name, p.path, p.severity) for p in problems] == [("alice", "spec.tokenSecretRef.name", "error")]
    assert "nowhere" in problems[0].message
    assert [t.name for t in rendered.gateway.tokens] == ["example-token"]


def test_token_secret_ref_to_a_missing_key() -> None:
    docs = [*quickstart(), _secret("key", other="x"), _token("alice", secret="key")]
    assert errors_at(docs) == [("ArksToken", "alice", "spec.tokenSecretRef.key")]


def test_token_secret_in_another_namespace_is_not_found() -> None:
    secret = _secret("key", token="sk-elsewhere")
    secret["metadata"]["namespace"] = "other"
    assert errors_at([*quickstart(), secret, _token("alice", secret="key")]) == [
        ("ArksToken", "alice", "spec.tokenSecretRef.name")]


def test_token_secret_from_string_data() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "key"}, "stringData": {"token": "sk-s"}}
    _, (rendered,), problems = check([*quickstart(), secret, _token("alice", secret="key")])
    assert problems == []
    assert {t.name: t.digest for t in rendered.gateway.tokens}["alice"] == keyed_digest("sk-s")


def test_secret_with_bad_base64() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "key"}, "data": {"token": "!!!"}}
    (problem,) = load_documents([secret]).problems
    assert (problem.kind, problem.path, problem.severity) == ("Secret", "data.token", "error")


@pytest.mark.parametrize(("value", "secret"), [(None, None), ("sk-a", "key")])
def test_token_needs_exactly_one_of_token_and_secret_ref(value: str | None, secret: str | None) -> None:
    (problem,) = load_documents([_token("alice", value, secret)]).problems
    assert (problem.path, problem.severity) == ("spec", "error")
    assert "tokenSecretRef" in problem.message


def test_token_for_a_missing_quota_is_an_error_and_for_a_missing_endpoint_a_warning() -> None:
    docs = quickstart()
    docs[TOKEN]["spec"]["qos"][0]["quota"]["name"] = "nope"
    docs[TOKEN]["spec"]["qos"][0]["arksEndpoint"]["name"] = "nope"
    _, (rendered,), problems = check(docs)
    by_path = {p.path: p.severity for p in problems if p.kind == "ArksToken"}
    assert by_path == {"spec.qos[0].arksEndpoint.name": "warning", "spec.qos[0].quota.name": "error"}
    assert rendered.gateway.tokens == ()


# --- loader-level problems ------------------------------------------------------------------------------


def test_wrong_api_version() -> None:
    docs = quickstart()
    docs[APP]["apiVersion"] = "arks.ai/v1beta1"
    (problem,) = load_documents(docs).problems
    assert (problem.path, problem.severity) == ("apiVersion", "error")


def test_other_kinds_are_ignored_with_a_warning() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    (problem,) = load_documents([*quickstart(), cm]).problems
    assert (problem.kind, problem.severity) == ("ConfigMap", "warning")


def test_an_object_defined_twice() -> None:
    docs = quickstart()
    (problem,) = load_documents([*docs, docs[APP]]).problems
    assert (problem.kind, problem.path, problem.severity) == ("ArksApplication", "metadata.name", "error")


def test_problem_line_names_object_and_field() -> None:
    (problem,) = load_documents(with_app(replicas=-1)).problems
    assert str(problem).startswith("error: ArksApplication/app-qwen: spec.replicas: ")


def test_invalid_object_name() -> None:
    docs = quickstart()
    docs[APP]["metadata"]["name"] = "App_Qwen"
    (problem,) = load_documents(docs).problems
    assert problem.path == "metadata.name"


# --- Arks defaults ---------------------------------------------------------------------------------------


def _app(spec: dict[str, Any]) -> ArksApplication:
    doc = {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": "a"},
           "spec": {"model": {"name": "m"}, "instanceSpec": {}, **spec}}
    obj, problems = parse_object(doc)
    assert problems == []
    assert isinstance(obj, ArksApplication)
    return obj


@pytest.mark.parametrize(("given", "expected"), [({}, "vllm"), ({"runtime": ""}, "vllm"),
                                                  ({"runtime": None}, "vllm"), ({"runtime": "sglang"}, "sglang")])
def test_runtime_default(given: dict[str, Any], expected: str) -> None:
    assert _app(given).spec.runtime == expected


@pytest.mark.parametrize(("size", "expected"), [(0, 1), (-3, 1), (1, 1), (4, 4)])
def test_size_below_one_becomes_one(size: int, expected: int) -> None:
    assert _app({"size": size}).spec.size == expected


def test_size_zero_renders_one_pod_per_group() -> None:
    _, (rendered,), problems = check(with_app(size=0, tensorParallelSize=1))
    assert problems == []
    (group,) = rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["minReplicas"] == 1


def test_served_model_name_defaults_to_model_name() -> None:
    assert _app({}).spec.model_name == "m"
    assert _app({"servedModelName": ""}).spec.model_name == "m"
    assert _app({"servedModelName": "chat"}).spec.model_name == "chat"
    _, (rendered,), _ = check(quickstart())
    app = next(a for a in rendered.serve_config["applications"] if a["name"] == "app-qwen")
    assert app["args"]["llm_config"]["model_loading_config"]["model_id"] == "qwen-7b"


def test_tensor_parallel_size_zero_means_one() -> None:
    assert _app({"tensorParallelSize": 0}).spec.tp == 1


@pytest.mark.parametrize("spec", [None, {}, {"gatewayRef": {"name": "arks-eg"}}])
def test_default_weight_defaults_to_one(spec: dict[str, Any] | None) -> None:
    doc: dict[str, Any] = {"apiVersion": "arks.ai/v1", "kind": "ArksEndpoint", "metadata": {"name": "qwen-7b"}}
    if spec is not None:
        doc["spec"] = spec
    obj, problems = parse_object(doc)
    assert problems == []
    assert isinstance(obj, ArksEndpoint)
    assert obj.spec.default_weight == 1
    docs = quickstart()
    docs[ENDPOINT] = doc
    _, (rendered,), _ = check(docs)
    assert [(b.name, b.weight) for b in rendered.gateway.endpoints[0].backends] == [("app-qwen", 1)]


def test_negative_default_weight() -> None:
    docs = quickstart()
    docs[ENDPOINT]["spec"]["defaultWeight"] = -1
    assert [p.path for p in load_documents(docs).problems] == ["spec.defaultWeight"]


def test_disaggregated_router_int32_is_the_port_with_a_warning() -> None:
    obj, problems = parse_object(disaggregated(router={"int32": 8123}))
    assert isinstance(obj, ArksDisaggregatedApplication)
    assert obj.spec.router.port == 8123
    assert [(p.path, p.severity) for p in problems] == [("spec.router.int32", "warning")]


def test_disaggregated_router_port_spelt_right_has_no_warning() -> None:
    obj, problems = parse_object(disaggregated(router={"port": 9000}))
    assert isinstance(obj, ArksDisaggregatedApplication)
    assert (obj.spec.router.port, problems) == (9000, [])


def test_disaggregated_defaults() -> None:
    obj, _ = parse_object(disaggregated(runtime="", prefill={"replicas": -2, "size": 0}, decode={"replicas": None}))
    assert isinstance(obj, ArksDisaggregatedApplication)
    spec = obj.spec
    assert spec.runtime == "sglang"
    assert (spec.prefill.group_replicas, spec.prefill.size, spec.decode.group_replicas) == (1, 1, 1)
    assert (spec.router.port, spec.router.metric_port, spec.router.replicas) == (8080, 9090, 1)
    assert spec.model_name == "qwen-7b"


def test_model_needs_storage_unless_local() -> None:
    doc = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "m"}, "spec": {"model": "x/y"}}
    (problem,) = parse_object(doc)[1]
    assert problem.path == "spec.storage.pvc"
    doc["spec"]["source"] = {"local": {"path": "/opt/models/y"}}
    obj, problems = parse_object(doc)
    assert problems == []
    assert isinstance(obj, ArksModel)
    assert obj.model_path("default") == "/opt/models/y"


def test_model_path_follows_arks_convention() -> None:
    docs = quickstart()
    obj, _ = parse_object(docs[MODEL])
    assert isinstance(obj, ArksModel)
    assert obj.model_path("default") == "/models/models/default/qwen-7b"
    docs[MODEL]["spec"]["storage"]["subPath"] = "/qwen/7b/"
    obj, _ = parse_object(docs[MODEL])
    assert isinstance(obj, ArksModel)
    assert obj.model_path("default") == "/models/qwen/7b"


def test_pvc_name_defaults_to_the_model_name_for_job_and_apps() -> None:
    # Arks bug: the PVC was created as <model> but apps mounted spec.storage.pvc.name (empty).
    docs = quickstart()
    del docs[MODEL]["spec"]["storage"]["pvc"]["name"]
    _, (rendered,), problems = check(docs)
    assert problems == []
    pvc, job = rendered.children
    assert pvc["metadata"]["name"] == "qwen-7b"
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "qwen-7b"
    (group,) = rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]]
    assert claims == ["qwen-7b"]
