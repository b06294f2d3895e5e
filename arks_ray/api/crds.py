"""Generate the CustomResourceDefinitions of the six Arks kinds from the pydantic models.

Called by ``arks-ray crds``; the output is checked in under ``configs/crds/`` and ``charts/*/crds/`` and a
test fails when they drift. Kubernetes wants structural OpenAPI v3.0 schemas, so pydantic's JSON
Schema is flattened: ``$ref`` inlined, ``anyOf [X, null]`` turned into ``nullable``, free-form maps marked
``x-kubernetes-preserve-unknown-fields``, numeric exclusive bounds turned into v3.0 booleans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from arks_ray.api.application import ArksApplicationSpec, ArksApplicationStatus
from arks_ray.api.common import GROUP, VERSION
from arks_ray.api.disaggregated import ArksDisaggregatedApplicationSpec, ArksDisaggregatedApplicationStatus
from arks_ray.api.endpoint import ArksEndpointSpec, ArksEndpointStatus
from arks_ray.api.model import ArksModelSpec, ArksModelStatus
from arks_ray.api.quota import ArksQuotaSpec, ArksQuotaStatus
from arks_ray.api.token import ArksTokenSpec, ArksTokenStatus

_DROP = {"title", "deprecated", "discriminator"}

# Admission-time checks (CEL, x-kubernetes-validations) for what one object's schema can express, so
# `kubectl apply` refuses the mistakes that would only fail later. The same checks run in the pydantic
# models or at render time (arks_ray.render.validation), which name the same fields. Keyed by the path
# of the schema node (in spec) they attach to.
_RULES: dict[str, dict[tuple[str, ...], list[dict[str, str]]]] = {
    "ArksApplication": {
        ("autoscaling",): [{"rule": "self.minReplicas <= self.maxReplicas",
                            "message": "minReplicas must not be greater than maxReplicas",
                            "fieldPath": ".minReplicas"}],
    },
    "ArksDisaggregatedApplication": {
        (): [{"rule": "has(self.runtime) && self.runtime in ['vllm', 'dynamo']",
              "message": "arks-ray serves disaggregated (PD) applications with runtime vllm or dynamo; sglang "
                         "(Arks' default when runtime is empty) is not available yet",
              "fieldPath": ".runtime", "reason": "FieldValueNotSupported"}],
    },
    "ArksToken": {
        (): [{"rule": "has(self.token) != has(self.tokenSecretRef)",
              "message": "set exactly one of token and tokenSecretRef"}],
    },
}


def _add_rules(kind: str, spec_schema: dict[str, Any]) -> None:
    for path, rules in _RULES.get(kind, {}).items():
        node = spec_schema
        for key in path:
            node = node["properties"][key]
        node["x-kubernetes-validations"] = [dict(r) for r in rules]
# Arks accepts an empty runtime (meaning its default); the enum must too, or the API server refuses it.
_EMPTY_OK_ENUMS = {"runtime"}


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _col(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        col["priority"] = priority
    return col


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    spec: type[BaseModel]
    status: type[BaseModel]
    short_names: tuple[str, ...] = ()
    columns: tuple[dict[str, Any], ...] = ()
    scale: bool = False
    required: tuple[str, ...] = ("spec",)
    extra: dict[str, Any] = field(default_factory=dict)


KINDS: tuple[Kind, ...] = (
    Kind("ArksApplication", "arksapplications", ArksApplicationSpec, ArksApplicationStatus, ("arkapp",), (
        _col("Phase", ".status.phase"), _age(), _col("Replicas", ".status.replicas", "integer"),
        _col("Ready", ".status.readyReplicas", "integer"), _col("Model", ".spec.model.name", priority=1),
        _col("Runtime", ".spec.runtime", priority=1),
        # Arks' Driver column pointed at a removed field; pods per group is what it used to convey.
        _col("Size", ".spec.size", "integer", priority=1),
    ), scale=True),
    Kind("ArksDisaggregatedApplication", "arksdisaggregatedapplications", ArksDisaggregatedApplicationSpec,
         ArksDisaggregatedApplicationStatus, ("arkdapp",), (
             _col("Phase", ".status.phase"), _age(), _col("Router Ready", ".status.router.readyReplicas", "integer"),
             _col("Prefill Ready", ".status.prefill.readyReplicas", "integer"),
             _col("Decode Ready", ".status.decode.readyReplicas", "integer"),
             _col("Model", ".spec.model.name", priority=1),
         )),
    Kind("ArksModel", "arksmodels", ArksModelSpec, ArksModelStatus, ("am",), (
        _age(), _col("Model", ".spec.model"), _col("Phase", ".status.phase"),
        _col("Progress", ".status.progress"))),
    Kind("ArksEndpoint", "arksendpoints", ArksEndpointSpec, ArksEndpointStatus, ("aep",), (
        _age(), _col("Default Weight", ".spec.defaultWeight", "integer"))),
    Kind("ArksToken", "arkstokens", ArksTokenSpec, ArksTokenStatus),
    Kind("ArksQuota", "arksquotas", ArksQuotaSpec, ArksQuotaStatus, ("aq",), (_age(),)),
)


def _structural(node: Any, defs: dict[str, Any], name: str = "") -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, name)
    variants = node.get("anyOf")
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(non_null) == 1:
            single: dict[str, Any] = _structural({**non_null[0], **rest}, defs, name)
            if len(non_null) != len(variants):
                single["nullable"] = True
            return single
        return {**_structural(rest, defs, name), "x-kubernetes-preserve-unknown-fields": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, k) for k, v in value.items()}
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = _structural(value, defs, key)
    if "properties" in out:
        # Structural schemas forbid properties together with additionalProperties; unknown fields are
        # pruned (or refused by kubectl's strict field validation) anyway.
        out.pop("additionalProperties", None)
    elif out.get("type") == "object":
        extra = out.get("additionalProperties")
        if extra is True or extra == {} or extra is None:
            out.pop("additionalProperties", None)
            out["x-kubernetes-preserve-unknown-fields"] = True
    if not out.get("type") and "enum" in out:
        out["type"] = "string"
    if not out.get("type") and not any(k in out for k in ("properties", "items", "enum")):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if name in _EMPTY_OK_ENUMS and "enum" in out and "" not in out["enum"]:
        out["enum"] = ["", *out["enum"]]
    if "default" in out and "enum" in out and out["default"] not in out["enum"]:
        out.pop("default")
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3.0 schema of a pydantic model, as Kubernetes accepts it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _structural(raw, defs)
    return schema


def crd(kind: Kind) -> dict[str, Any]:
    spec_schema = openapi_schema(kind.spec)
    _add_rules(kind.kind, spec_schema)
    status_schema = openapi_schema(kind.status)
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    root = {
        "type": "object",
        "description": f"{kind.kind} (arks.ai/v1). {spec_schema.pop('description', '')}".strip(),
        "required": list(kind.required),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    subresources: dict[str, Any] = {"status": {}}
    if kind.scale:
        subresources["scale"] = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}
    names: dict[str, Any] = {
        "kind": kind.kind,
        "listKind": f"{kind.kind}List",
        "plural": kind.plural,
        "singular": kind.kind.lower(),
    }
    if kind.short_names:
        names["shortNames"] = list(kind.short_names)
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": root},
        "subresources": subresources,
    }
    if kind.columns:
        version["additionalPrinterColumns"] = list(kind.columns)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{GROUP}"},
        "spec": {"group": GROUP, "names": names, "scope": "Namespaced", "versions": [version]},
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD, for every Arks kind."""
    return {f"{GROUP}_{k.plural}.yaml": crd(k) for k in KINDS}
