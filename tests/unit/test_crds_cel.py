"""The CRDs' admission rules (CEL ``x-kubernetes-validations``), evaluated as the API server would.

Each rule runs through a real CEL implementation (``common-expression-language``) on the object after
structural defaulting, and must agree with what ``arks-ray validate`` says of the same object: the
shipped examples pass both; each broken case fails both, naming the same field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import cel
import pytest
import yaml

from arks_ray.api import load_documents
from arks_ray.render import render
from controller.plans import Observed, plan_namespace
from controller.snapshot import take
from tests.support.keys import TEST_OPTIONS
from tests.support.paths import ROOT

CRDS = {d["spec"]["names"]["kind"]: d for p in sorted((ROOT / "configs/crds").glob("*.yaml"))
        for d in [yaml.safe_load(p.read_text())]}
EXAMPLES = sorted((ROOT / "configs/examples").glob("*.yaml"))


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: absent properties with a ``default`` get it, recursively."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for key, sub in schema["properties"].items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = defaulted(sub, out[key])
    return out


def violations(doc: dict[str, Any]) -> list[str]:
    """The ``fieldPath`` (or node) of every rule the object breaks."""
    schema = CRDS[doc["kind"]]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    found: list[str] = []

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        if value is None:
            return
        for rule in node.get("x-kubernetes-validations", []):
            if cel.evaluate(rule["rule"], {"self": value}) is not True:
                found.append(path + rule.get("fieldPath", ""))
        if isinstance(value, dict):
            for key, sub in node.get("properties", {}).items():
                if key in value:
                    walk(sub, value[key], f"{path}.{key}")

    walk(schema, defaulted(schema, doc["spec"]), "spec")
    return found


def validate_errors(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    loaded = load_documents(copy.deepcopy(docs))
    problems = loaded.problems + [p for r in render(loaded, options=TEST_OPTIONS) for p in r.problems]
    return {(p.kind, p.path) for p in problems if p.severity == "error"}


def test_every_crd_with_rules_has_them_where_meant() -> None:
    with_rules = {kind for kind, crd in CRDS.items() if "x-kubernetes-validations" in yaml.safe_dump(crd)}
    assert with_rules == {"ArksApplication", "ArksDisaggregatedApplication", "ArksToken"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_shipped_examples_pass_admission(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in CRDS]
    assert [(d["kind"], violations(d)) for d in docs] == [(d["kind"], []) for d in docs]


MODEL = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "m"},
         "spec": {"model": "Qwen/Qwen2.5-0.5B", "storage": {"pvc": {"spec": {}}}}}
ENDPOINT = {"apiVersion": "arks.ai/v1", "kind": "ArksEndpoint", "metadata": {"name": "m"}, "spec": {}}


def pd(**spec: Any) -> dict[str, Any]:
    base = {"model": {"name": "m"}, "router": {}, "prefill": {}, "decode": {}}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksDisaggregatedApplication", "metadata": {"name": "pd"},
            "spec": {**base, **spec}}


def application(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": "a"},
            "spec": {"model": {"name": "m"}, "instanceSpec": {}, **spec}}


def token(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "arks.ai/v1", "kind": "ArksToken", "metadata": {"name": "t"},
            "spec": {"qos": [{"arksEndpoint": {"name": "m"}}], **spec}}


@pytest.mark.parametrize(("doc", "field"), [
    (pd(), "spec.runtime"),  # Arks' default runtime: sglang
    (pd(runtime=""), "spec.runtime"),
    (pd(runtime="sglang"), "spec.runtime"),
    (pd(runtime="vllm"), None),
    (pd(runtime="dynamo"), None),
    (application(autoscaling={"minReplicas": 3, "maxReplicas": 2}), "spec.autoscaling.minReplicas"),
    (application(autoscaling={"minReplicas": 2}), "spec.autoscaling.minReplicas"),  # maxReplicas defaults to 1
    (application(autoscaling={"minReplicas": 1, "maxReplicas": 4}), None),
    (token(token="sk-1", tokenSecretRef={"name": "s", "key": "k"}), "spec"),
    (token(), "spec"),
    (token(token="sk-1"), None),
])
def test_admission_and_validate_agree(doc: dict[str, Any], field: str | None) -> None:
    assert violations(doc) == ([] if field is None else [field])
    errors = validate_errors([MODEL, ENDPOINT, doc])
    if field is None:
        assert errors == set()
    else:
        assert {kind for kind, _ in errors} == {doc["kind"]}
        assert any(path.startswith(field) or field.startswith(path) for _, path in errors), errors


def test_the_operators_precheck_refuses_sglang_pd_naming_the_field() -> None:
    """What kubectl would have been refused (admission) the operator's precheck refuses too, for objects
    created before the rule existed: Failed, Precheck=False, with the field in the message."""
    docs = [copy.deepcopy(d) for d in (MODEL, ENDPOINT, pd(runtime="sglang"))]
    for i, d in enumerate(docs):
        d["metadata"].update(namespace="default", uid=f"u{i}", generation=1)
    plan = plan_namespace(take("default", docs), Observed(), options=TEST_OPTIONS, now=1.8e9, finalizer="f")
    (status,) = [w.body["status"] for w in plan.writes
                 if w.verb == "status" and w.kind == "ArksDisaggregatedApplication" and w.body]
    assert status["phase"] == "Failed"
    precheck = next(c for c in status["conditions"] if c["type"] == "Precheck")
    assert precheck["status"] == "False"
    assert "spec.runtime" in precheck["message"]
    assert "sglang" in precheck["message"]
    assert plan.rendered is not None
    assert "pd" not in plan.rendered.serve_apps
