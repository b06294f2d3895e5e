"""The generated CRDs: checked in without drift, structural, Arks-compatible in names and columns, and
accepting every example and Arks fixture (and refusing what the models refuse)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from arks_ray.api.crds import all_crds
from arks_ray.api.loading import KINDS, load_documents
from arks_ray.cli import crd_text

ROOT = Path(__file__).resolve().parents[2]
CRD_DIRS = (ROOT / "configs" / "crds", ROOT / "charts" / "arks-ray" / "crds")
MANIFESTS = sorted([*(ROOT / "configs" / "examples").glob("*.yaml"), *(ROOT / "tests" / "fixtures" / "arks").rglob(
    "*.yaml")])
CRDS = all_crds()
BY_KIND = {c["spec"]["names"]["kind"]: c for c in CRDS.values()}
ToSchema = Callable[[dict[str, Any]], dict[str, Any]]

AGE = ("Age", ".metadata.creationTimestamp", 0)
# Arks' columns (reference §1): (name, jsonPath, priority). The Driver column pointed at a removed field.
ARKS_COLUMNS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "ArksApplication": (("Phase", ".status.phase", 0), AGE, ("Replicas", ".status.replicas", 0),
                        ("Ready", ".status.readyReplicas", 0), ("Model", ".spec.model.name", 1),
                        ("Runtime", ".spec.runtime", 1)),
    "ArksDisaggregatedApplication": (("Phase", ".status.phase", 0), AGE,
                                     ("Router Ready", ".status.router.readyReplicas", 0),
                                     ("Prefill Ready", ".status.prefill.readyReplicas", 0),
                                     ("Decode Ready", ".status.decode.readyReplicas", 0),
                                     ("Model", ".spec.model.name", 1)),
    "ArksModel": (AGE, ("Model", ".spec.model", 0), ("Phase", ".status.phase", 0), ("Progress", ".status.progress", 0)),
    "ArksEndpoint": (AGE, ("Default Weight", ".spec.defaultWeight", 0)),
    "ArksToken": (),
    "ArksQuota": (AGE,),
}
ARKS_NAMES = {
    "ArksApplication": ("arksapplications", ["arkapp"]),
    "ArksDisaggregatedApplication": ("arksdisaggregatedapplications", ["arkdapp"]),
    "ArksModel": ("arksmodels", ["am"]),
    "ArksEndpoint": ("arksendpoints", ["aep"]),
    "ArksToken": ("arkstokens", None),
    "ArksQuota": ("arksquotas", ["aq"]),
}


def root_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node, with a readable path."""
    yield path or "<root>", schema
    for key, child in (schema.get("properties") or {}).items():
        yield from nodes(child, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")


def resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in json_path.strip(".").split("."):
        node = ((node or {}).get("properties") or {}).get(part)
    return node


# --- drift ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", CRD_DIRS, ids=lambda d: str(d.relative_to(ROOT)))
def test_checked_in_crds_match_the_models(directory: Path) -> None:
    on_disk = {p.name for p in directory.glob("*.yaml")}
    assert on_disk == set(CRDS), f"{directory} holds other files than the CRDs; run `arks-ray crds --write`"
    for name, doc in CRDS.items():
        assert (directory / name).read_text() == crd_text(doc), (
            f"{directory.relative_to(ROOT)}/{name} is out of date with arks_ray/api: run `arks-ray crds --write`")


def test_crd_text_round_trips_through_yaml() -> None:
    for doc in CRDS.values():
        assert yaml.safe_load(crd_text(doc)) == doc


def test_six_kinds() -> None:
    assert set(BY_KIND) == set(ARKS_NAMES) == set(KINDS)


# --- structural schemas ---------------------------------------------------------------------------------

FORBIDDEN = ("$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "const", "title")


@pytest.mark.parametrize("kind", sorted(BY_KIND))
def test_schema_is_structural(kind: str) -> None:
    problems = []
    for path, node in nodes(root_schema(BY_KIND[kind])):
        problems += [f"{path}: has {key}" for key in FORBIDDEN if key in node]
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: additionalProperties beside properties")
        if not node.get("type") and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: neither type nor x-kubernetes-preserve-unknown-fields")
        if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields") and path != ".metadata":
            problems.append(f"{path}: an object that would be pruned to nothing")
        if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(node["exclusiveMinimum"], bool):
            problems.append(f"{path}: numeric exclusiveMinimum (OpenAPI v3.0 wants a boolean)")
        for req in node.get("required") or []:
            if req not in (node.get("properties") or {}):
                problems.append(f"{path}: requires unknown property {req}")
    assert problems == []


@pytest.mark.parametrize("kind", sorted(BY_KIND))
def test_defaults_and_enums_are_valid_for_their_node(kind: str, crd_json_schema: ToSchema) -> None:
    for path, node in nodes(crd_json_schema(BY_KIND[kind])):
        sub = {k: v for k, v in node.items() if k != "default"}
        if "default" in node:
            assert jsonschema.Draft7Validator(sub).is_valid(node["default"]), f"{path}: default {node['default']!r}"
        for value in node.get("enum") or []:
            assert jsonschema.Draft7Validator({k: v for k, v in sub.items() if k != "enum"}).is_valid(value), path


def test_structural_check_can_fail() -> None:
    bad = copy.deepcopy(BY_KIND["ArksQuota"])
    spec = root_schema(bad)["properties"]["spec"]
    spec["properties"]["quotas"]["items"] = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    found = [path for path, node in nodes(root_schema(bad)) if "anyOf" in node or not node.get("type")]
    assert found == [".spec.quotas[]"]


# --- Arks names, columns, subresources -------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ARKS_NAMES))
def test_names_scope_and_version_match_arks(kind: str) -> None:
    crd = BY_KIND[kind]
    plural, short = ARKS_NAMES[kind]
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == f"{plural}.arks.ai"
    assert (crd["spec"]["group"], crd["spec"]["scope"]) == ("arks.ai", "Namespaced")
    assert (names["kind"], names["plural"], names["singular"]) == (kind, plural, kind.lower())
    assert names.get("shortNames") == short
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    assert "status" in version["subresources"]


@pytest.mark.parametrize("kind", sorted(ARKS_COLUMNS))
def test_printer_columns_match_arks_except_driver(kind: str) -> None:
    columns = BY_KIND[kind]["spec"]["versions"][0].get("additionalPrinterColumns", [])
    got = [(c["name"], c["jsonPath"], c.get("priority", 0)) for c in columns]
    if kind == "ArksApplication":
        # Arks' Driver column read .spec.driver, a field that no longer exists; a Size column replaces it.
        assert got[-1] == ("Size", ".spec.size", 1)
        got = got[:-1]
        assert all(".spec.driver" not in c["jsonPath"] for c in columns)
    assert tuple(got) == ARKS_COLUMNS[kind]
    integer = {"Replicas", "Ready", "Router Ready", "Prefill Ready", "Decode Ready", "Default Weight", "Size"}
    for column in columns:
        assert column["type"] == ("integer" if column["name"] in integer else
                                  "date" if column["name"] == "Age" else "string"), column


@pytest.mark.parametrize("kind", sorted(ARKS_COLUMNS))
def test_printer_columns_point_at_real_fields(kind: str) -> None:
    schema = root_schema(BY_KIND[kind])
    for column in BY_KIND[kind]["spec"]["versions"][0].get("additionalPrinterColumns", []):
        if column["jsonPath"].startswith((".spec.", ".status.")):
            assert resolve(schema, column["jsonPath"]) is not None, column


def test_application_has_a_scale_subresource_on_real_integer_fields() -> None:
    crd = BY_KIND["ArksApplication"]
    scale = crd["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}
    schema = root_schema(crd)
    for path in scale.values():
        node = resolve(schema, path)
        assert node is not None, path
        assert node["type"] == "integer", path
    others = [k for k, c in BY_KIND.items() if "scale" in c["spec"]["versions"][0]["subresources"]]
    assert others == ["ArksApplication"]


# --- examples and fixtures validate against the CRDs -------------------------------------------------------


def strict(schema: Any) -> Any:
    """The schema as ``kubectl apply --validate=strict`` applies it: unknown fields are refused."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k not in ("enum", "default", "required") else v for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def arks_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in MANIFESTS:
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            if doc.get("kind") in BY_KIND:
                docs.append((f"{path.relative_to(ROOT)}#{i}", doc))
    return docs


DOCS = arks_documents()


def test_every_kind_has_an_example() -> None:
    assert {doc["kind"] for _, doc in DOCS} == set(BY_KIND)


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_example_validates_against_its_crd(where: str, doc: dict[str, Any], crd_json_schema: ToSchema) -> None:
    schema = crd_json_schema(BY_KIND[doc["kind"]])
    errors = [f"{e.json_path}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert errors == [], where
    strict_errors = [e.message for e in jsonschema.Draft7Validator(strict(schema)).iter_errors(doc)]
    assert strict_errors == [], where


@pytest.mark.parametrize(
    ("kind", "edit", "field"),
    [
        ("ArksApplication", lambda s: s.update(runtime="trtllm"), "runtime"),
        ("ArksApplication", lambda s: s.update(replicas=-1), "replicas"),
        ("ArksApplication", lambda s: s.pop("model"), "model"),
        ("ArksApplication", lambda s: s.update(bogus=1), "bogus"),
        ("ArksToken", lambda s: s.update(qos=[]), "qos"),
        ("ArksToken", lambda s: s["qos"][0]["rateLimits"][0].update(type="rps"), "type"),
        ("ArksQuota", lambda s: s["quotas"][0].update(type="tokens"), "type"),
        ("ArksQuota", lambda s: s["quotas"][0].update(value=-5), "value"),
        ("ArksEndpoint", lambda s: s.update(defaultWeight=-1), "defaultWeight"),
        ("ArksModel", lambda s: s.pop("model"), "model"),
    ],
)
def test_crd_and_models_refuse_the_same_mistakes(
    kind: str, edit: Callable[[dict[str, Any]], Any], field: str, crd_json_schema: ToSchema
) -> None:
    doc = copy.deepcopy(next(d for _, d in DOCS if d["kind"] == kind))
    edit(doc["spec"])
    validator = jsonschema.Draft7Validator(strict(crd_json_schema(BY_KIND[kind])))
    assert any(field in e.message or field in e.json_path for e in validator.iter_errors(doc))
    assert load_documents([doc]).errors != []


def test_empty_runtime_is_accepted_by_the_crd_as_by_arks(crd_json_schema: ToSchema) -> None:
    doc = copy.deepcopy(next(d for _, d in DOCS if d["kind"] == "ArksApplication"))
    doc["spec"]["runtime"] = ""
    assert jsonschema.Draft7Validator(crd_json_schema(BY_KIND["ArksApplication"])).is_valid(doc)
    assert load_documents([doc]).errors == []
