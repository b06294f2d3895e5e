"""Invariants of ``render`` over random valid namespaces: Kubernetes-safe names, no plaintext tokens,
append-only worker groups, consistent resource totals, determinism and an honest spec hash."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arks_ray.api.loading import load_documents
from arks_ray.render import SPEC_HASH_ANNOTATION, Rendered, render_namespace
from arks_ray.render.cluster import GROUP_RESOURCE_PREFIX
from tests.support.keys import TEST_OPTIONS, keyed_digest

NAMESPACE = "tenant"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def dns_label(max_size: int) -> st.SearchStrategy[str]:
    """A DNS-1123 label of 1..max_size characters."""
    edge = st.sampled_from(_ALNUM)
    middle = st.text(alphabet=_ALNUM + "-", max_size=max_size - 2)
    return st.one_of(edge, st.builds(lambda a, m, b: a + m + b, edge, middle, edge))


# Up to 60 characters, and often exactly 60: short names alone would hide length bugs.
APP_NAMES = st.one_of(dns_label(60), dns_label(60).map(lambda s: s.rjust(60, "a"))).filter(lambda n: n != "gateway")


@st.composite
def model_names(draw: st.DrawFn) -> str:
    """DNS-1123 subdomains, often longer than the 63 characters a label value may have (Kubernetes allows 253)."""
    parts = draw(st.lists(dns_label(40), min_size=1, max_size=3))
    if draw(st.booleans()):
        parts.append(draw(dns_label(63)).rjust(63, "m"))
    return ".".join(parts)


MODEL_NAMES = model_names()
SERVED_NAMES = st.sampled_from(["chat", "chat-large", "embed.v2", "qwen2.5-7b-instruct"])
# "sk-" + any text: Hypothesis also draws strings from the code's own literals (it once drew
# "rayClusterConfig", which every RayService names), and a token that is rendered text anyway proves nothing.
TOKENS = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn", "Zl", "Zp")),
                 min_size=13, max_size=45).map(lambda s: "sk-" + s)
RATE_TYPES = ("rpm", "rph", "rpd", "tpm", "tph", "tpd", "concurrency")


def doc(kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "arks.ai/v1", "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE, **meta}, "spec": spec}


@st.composite
def models(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(MODEL_NAMES, min_size=1, max_size=3, unique=True))
    out = []
    for name in names:
        pvc: dict[str, Any] = {
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}}
        if draw(st.booleans()):
            pvc["name"] = draw(dns_label(40))
        spec: dict[str, Any] = {"model": draw(st.sampled_from(["Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B"])),
                                "storage": {"pvc": pvc}}
        if draw(st.booleans()):
            spec["source"] = {"huggingface": {}}
        out.append(doc("ArksModel", name, spec))
    return out


@st.composite
def application(draw: st.DrawFn, name: str, model_names: list[str]) -> dict[str, Any]:
    gpus = draw(st.integers(0, 8))
    resources: dict[str, Any] = (
        {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}} if gpus
        else {"limits": {"cpu": "4", "memory": "16Gi"}})
    spec: dict[str, Any] = {
        "size": draw(st.integers(1, 4)),
        "tensorParallelSize": draw(st.integers(1, 4)),
        "runtime": draw(st.sampled_from(["vllm", "sglang", "dynamo", ""])),
        "model": {"name": draw(st.sampled_from(model_names))},
        "instanceSpec": {"resources": resources},
    }
    if draw(st.booleans()):
        spec["replicas"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        low = draw(st.integers(0, 3))
        spec["autoscaling"] = {"minReplicas": low, "maxReplicas": draw(st.integers(max(low, 1), 6))}
    if draw(st.booleans()):
        spec["pipelineParallelSize"] = draw(st.integers(1, 2))
    world = spec["tensorParallelSize"] * spec.get("pipelineParallelSize", 1)
    if spec["runtime"] == "sglang" and world % spec["size"]:
        spec["size"] = 1  # SGLang spreads its ranks evenly over the pods; other sizes are refused
    accelerator = draw(st.sampled_from([None, "A100", "H100", "L4"]))
    if accelerator and gpus:  # an accelerator type on CPU-only pods is refused (Ray would refuse it too)
        spec["accelerator"] = accelerator
    served = draw(st.one_of(st.none(), SERVED_NAMES))
    if served:
        spec["servedModelName"] = served
    return doc("ArksApplication", name, spec)


@st.composite
def namespaces(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A valid namespace: models, 1-6 apps, endpoints for (most of) their names, a quota, tokens."""
    model_docs = draw(models())
    model_names = [m["metadata"]["name"] for m in model_docs]
    app_names = draw(st.lists(APP_NAMES, min_size=1, max_size=6, unique=True))
    apps = [draw(application(n, model_names)) for n in app_names]
    served = sorted({a["spec"].get("servedModelName") or a["spec"]["model"]["name"] for a in apps})
    endpoint_names = draw(st.lists(st.sampled_from(served), min_size=1, unique=True))
    endpoints = [doc("ArksEndpoint", n, {"defaultWeight": draw(st.integers(0, 10))}) for n in endpoint_names]
    quota = doc("ArksQuota", "budget", {"quotas": [{"type": "total", "value": 10**9}],
                                        "period": draw(st.sampled_from(["lifetime", "daily", "monthly"]))})
    values = draw(st.lists(TOKENS, max_size=3, unique=True))
    tokens = []
    for i, value in enumerate(values):
        limits = draw(st.lists(st.sampled_from(RATE_TYPES), unique=True, max_size=3))
        qos: dict[str, Any] = {"arksEndpoint": {"name": draw(st.sampled_from(endpoint_names))},
                               "rateLimits": [{"type": t, "value": 100} for t in limits]}
        if draw(st.booleans()):
            qos["quota"] = {"name": "budget"}
        tokens.append(doc("ArksToken", f"user-{i}", {"token": value, "qos": [qos]}))
    return [*model_docs, *apps, *endpoints, quota, *tokens]


# --- helpers -------------------------------------------------------------------------------------------------


def render_docs(docs: list[dict[str, Any]], previous: dict[str, Any] | None = None) -> Rendered:
    loaded = load_documents(copy.deepcopy(docs))
    assert loaded.errors == [], loaded.errors
    rendered = render_namespace(loaded.objects, NAMESPACE, secrets=loaded.secrets, previous=previous,
                                options=TEST_OPTIONS)
    assert rendered.errors == [], rendered.errors
    return rendered


def groups(rendered: Rendered) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return specs


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def engine_apps(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in rendered.serve_config["applications"] if a["name"] != "gateway"}


def bundles_of(app: dict[str, Any]) -> list[dict[str, Any]]:
    pg = app["args"]["llm_config"]["placement_group_config"]
    key = "placement_group_bundles" if app["args"]["runtime"] == "sglang" else "bundles"
    bundles: list[dict[str, Any]] = pg[key]
    return bundles


def group_of(app: dict[str, Any]) -> str:
    bundles = bundles_of(app)
    (resource,) = {k for b in bundles for k in b if k.startswith(GROUP_RESOURCE_PREFIX)}
    return resource.removeprefix(GROUP_RESOURCE_PREFIX)


# --- (a) names and labels --------------------------------------------------------------------------------------


@PROPERTY
@given(namespaces())
def test_names_and_labels_are_kubernetes_safe(docs: list[dict[str, Any]]) -> None:
    rendered = render_docs(docs)
    for manifest in rendered.manifests:
        name = manifest["metadata"]["name"]
        if manifest["kind"] == "PersistentVolumeClaim":
            # PVC names are the user's own (spec.storage.pvc.name or the model name): a DNS-1123 subdomain.
            assert len(name) <= 253, name
            assert DNS1123_SUBDOMAIN.match(name), name
        else:
            # RayService and Job names become label values and pod-name prefixes: DNS-1123 labels.
            assert len(name) <= 63, (manifest["kind"], name)
            assert DNS1123_LABEL.match(name), (manifest["kind"], name)
        for path, node in walk(manifest):
            if path.endswith((".labels", ".metadata.labels")) and isinstance(node, dict):
                for key, value in node.items():
                    prefix, _, local = key.rpartition("/")
                    assert len(local) <= 63, (path, key)
                    assert LABEL_NAME.match(local), (path, key)
                    assert not prefix or DNS1123_SUBDOMAIN.match(prefix), (path, key)
                    assert len(value) <= 63, (path, key, value)
                    assert LABEL_VALUE.match(value), (path, key, value)
    for group in groups(rendered):
        name = group["groupName"]
        assert len(name) <= 63, name
        assert DNS1123_LABEL.match(name), name
        # The group's custom Ray resource carries a prefix; the whole must still be a valid label value.
        assert len(GROUP_RESOURCE_PREFIX + name) <= 63


# --- (b) tokens -------------------------------------------------------------------------------------------------


@PROPERTY
@given(namespaces())
def test_no_plaintext_token_anywhere(docs: list[dict[str, Any]]) -> None:
    values = [d["spec"]["token"] for d in docs if d["kind"] == "ArksToken"]
    rendered = render_docs(docs)
    texts = [
        yaml.safe_dump_all(rendered.manifests, allow_unicode=True),
        yaml.safe_dump_all(rendered.manifests),
        yaml.safe_dump(rendered.serve_config, allow_unicode=True),
        json.dumps(rendered.serve_config, ensure_ascii=False),
        rendered.rayservice["spec"]["serveConfigV2"],
        *(str(p) for p in rendered.problems),
    ]
    strings = [v for m in [*rendered.manifests, rendered.serve_config]
               for _, v in walk(m) if isinstance(v, str)]
    for value in values:
        assert not any(value in text for text in texts)
        assert not any(value in s for s in strings)
    digests = {t.digest for t in rendered.gateway.tokens}
    assert digests == {keyed_digest(v, NAMESPACE) for v in values}
    # Keyed: no unkeyed SHA-256 of a value is anywhere.
    for value in values:
        assert not any(hashlib.sha256(value.encode()).hexdigest() in text for text in texts)
    for digest in digests:
        assert digest in rendered.rayservice["spec"]["serveConfigV2"]


# --- (c) append-only worker groups ------------------------------------------------------------------------------


def _key(group: dict[str, Any]) -> tuple[str, str]:
    return group["groupName"], json.dumps(group["template"], sort_keys=True)


@st.composite
def namespace_and_new_app(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    docs = draw(namespaces())
    taken = {d["metadata"]["name"] for d in docs if d["kind"] == "ArksApplication"}
    models_ = [d["metadata"]["name"] for d in docs if d["kind"] == "ArksModel"]
    name = draw(APP_NAMES.filter(lambda n: n not in taken))
    return docs, draw(application(name, models_))


@PROPERTY
@given(namespace_and_new_app())
def test_adding_an_app_only_appends_worker_groups(case: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    docs, new_app = case
    first = render_docs(docs)
    second = render_docs([*docs, new_app], previous=first.rayservice)
    before, after = [_key(g) for g in groups(first)], [_key(g) for g in groups(second)]
    assert after[: len(before)] == before
    assert len(after) - len(before) <= 1
    assert new_app["metadata"]["name"] in engine_apps(second)


@PROPERTY
@given(namespaces(), st.data())
def test_removing_an_app_keeps_its_group_in_place(docs: list[dict[str, Any]], data: st.DataObject) -> None:
    apps = [d for d in docs if d["kind"] == "ArksApplication"]
    gone = data.draw(st.sampled_from(apps))
    first = render_docs(docs)
    gone_group = group_of(engine_apps(first)[gone["metadata"]["name"]])
    second = render_docs([d for d in docs if d is not gone], previous=first.rayservice)
    assert [_key(g) for g in groups(second)] == [_key(g) for g in groups(first)]
    used = {group_of(a) for a in engine_apps(second).values()}
    for group in groups(second):
        counts = (group["replicas"], group["minReplicas"], group["maxReplicas"])
        if group["groupName"] not in used:
            assert counts == (0, 0, 0), group["groupName"]
    assert (gone_group in used) == any(group_of(a) == gone_group for a in engine_apps(second).values())
    # And when it comes back, it returns to the same group, at the same place.
    third = render_docs(docs, previous=second.rayservice)
    assert [_key(g) for g in groups(third)] == [_key(g) for g in groups(first)]
    assert groups(third) == groups(first)


# --- (d) resource totals ----------------------------------------------------------------------------------------


@PROPERTY
@given(namespaces())
def test_resource_totals_are_consistent(docs: list[dict[str, Any]]) -> None:
    rendered = render_docs(docs)
    specs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "ArksApplication"}
    apps = engine_apps(rendered)
    assert set(apps) == set(specs)
    want_min: dict[str, int] = defaultdict(int)
    want_max: dict[str, int] = defaultdict(int)
    for name, app in apps.items():
        spec = specs[name]
        replicas = spec.get("replicas", 1)
        low, high = ((spec["autoscaling"]["minReplicas"], spec["autoscaling"]["maxReplicas"])
                     if "autoscaling" in spec else (replicas, replicas))
        want_min[group_of(app)] += low * spec["size"]
        want_max[group_of(app)] += high * spec["size"]
        dynamo, sglang = spec.get("runtime") == "dynamo", spec.get("runtime") == "sglang"
        world = spec["tensorParallelSize"] * spec.get("pipelineParallelSize", 1)
        bundles = bundles_of(app)
        gpus = int(spec["instanceSpec"]["resources"]["limits"].get("nvidia.com/gpu", 0))
        if sglang:  # one bundle per pod with its share of the ranks; bundle 0 also holds the replica actor
            assert len(bundles) == spec["size"]
            assert [b.get("GPU") for b in bundles] == [world // spec["size"] if gpus else None] * spec["size"]
            assert [("CPU" in b) for b in bundles] == [True] + [not gpus] * (spec["size"] - 1)
        else:
            assert len(bundles) == (1 if dynamo else world)
            per_bundle = (gpus if dynamo else 1) if gpus else None
            for bundle in bundles:
                assert (bundle.get("GPU"), "CPU" in bundle) == (per_bundle, not gpus), bundle
        deployment = app["args"]["llm_config"]["deployment_config"]
        if "autoscaling" in spec:
            auto = deployment["autoscaling_config"]
            assert (auto["min_replicas"], auto["max_replicas"]) == (low, high)
        else:
            assert deployment["num_replicas"] == replicas
    for group in groups(rendered):
        name = group["groupName"]
        assert (group["minReplicas"], group["maxReplicas"]) == (want_min[name], want_max[name]), name
        assert group["replicas"] == group["minReplicas"] <= group["maxReplicas"]
    assert {g["groupName"] for g in groups(rendered)} == set(want_min)


# --- (e) determinism and the spec hash ---------------------------------------------------------------------------


@PROPERTY
@given(namespaces(), st.randoms(use_true_random=False))
def test_render_is_deterministic_and_order_independent(docs: list[dict[str, Any]], rnd: Any) -> None:
    first = render_docs(docs)
    again = render_docs(docs)
    shuffled = list(docs)
    rnd.shuffle(shuffled)
    third = render_docs(shuffled)
    dump = yaml.safe_dump_all(first.manifests)
    assert yaml.safe_dump_all(again.manifests) == dump
    assert yaml.safe_dump_all(third.manifests) == dump
    assert third.serve_config == first.serve_config


def _mutations(docs: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(description, function editing a copy of docs in place); some change the spec, some do not."""
    app = next(i for i, d in enumerate(docs) if d["kind"] == "ArksApplication")
    endpoint = next(i for i, d in enumerate(docs) if d["kind"] == "ArksEndpoint")
    quota = next(i for i, d in enumerate(docs) if d["kind"] == "ArksQuota")

    def app_label(d: list[dict[str, Any]]) -> None:
        d[app]["metadata"]["labels"] = {"team": "ml"}

    def app_more_replicas(d: list[dict[str, Any]]) -> None:
        spec = d[app]["spec"]
        if "autoscaling" in spec:
            spec["autoscaling"]["maxReplicas"] += 1
        else:
            spec["replicas"] = spec.get("replicas", 1) + 1

    def gateway_ref(d: list[dict[str, Any]]) -> None:
        d[endpoint]["spec"]["gatewayRef"] = {"name": "arks-eg", "namespace": "arks-operator-system"}

    def weight(d: list[dict[str, Any]]) -> None:
        d[endpoint]["spec"]["defaultWeight"] += 1

    def budget(d: list[dict[str, Any]]) -> None:
        d[quota]["spec"]["quotas"][0]["value"] += 1

    def nothing(d: list[dict[str, Any]]) -> None:
        pass

    def env(d: list[dict[str, Any]]) -> None:
        d[app]["spec"]["instanceSpec"]["env"] = [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]

    return [("app label", app_label), ("replicas", app_more_replicas), ("gatewayRef", gateway_ref),
            ("weight", weight), ("budget", budget), ("nothing", nothing), ("env", env)]


@PROPERTY
@given(namespaces(), st.data())
def test_spec_hash_changes_iff_the_spec_changes(docs: list[dict[str, Any]], data: st.DataObject) -> None:
    first = render_docs(docs)
    name, mutate = data.draw(st.sampled_from(_mutations(docs)))
    edited = copy.deepcopy(docs)
    mutate(edited)
    second = render_docs(edited)
    same_spec = first.rayservice["spec"] == second.rayservice["spec"]
    same_hash = (first.rayservice["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
                 == second.rayservice["metadata"]["annotations"][SPEC_HASH_ANNOTATION])
    assert same_spec == same_hash, name
    if name in ("replicas", "weight", "budget", "env"):
        assert not same_spec, name
    if name in ("app label", "gatewayRef", "nothing"):
        assert same_spec, name
