"""Parse Kubernetes-style documents into typed Arks objects, collecting every problem with its path.

Called by the CLI (``render``, ``validate``, ``up``) and by the controller. Pure: it takes parsed
documents (or YAML text) and returns objects plus problems; it never raises for a user's mistake.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from arks_ray.api.application import ArksApplication
from arks_ray.api.common import API_VERSION
from arks_ray.api.disaggregated import ArksDisaggregatedApplication
from arks_ray.api.endpoint import ArksEndpoint
from arks_ray.api.model import ArksModel
from arks_ray.api.quota import ArksQuota
from arks_ray.api.token import ArksToken
from arks_ray.errors import Problem

ArksObject = ArksApplication | ArksDisaggregatedApplication | ArksModel | ArksEndpoint | ArksToken | ArksQuota

KINDS: dict[str, type[ArksObject]] = {
    "ArksApplication": ArksApplication,
    "ArksDisaggregatedApplication": ArksDisaggregatedApplication,
    "ArksModel": ArksModel,
    "ArksEndpoint": ArksEndpoint,
    "ArksToken": ArksToken,
    "ArksQuota": ArksQuota,
}


@dataclass(frozen=True)
class Secret:
    """The data of a Kubernetes Secret, decoded (needed for tokenSecretRef and hub tokens)."""

    namespace: str
    name: str
    data: Mapping[str, str]


@dataclass
class Loaded:
    """The result of loading: valid objects, the Secrets among the input, and every problem found."""

    objects: list[ArksObject] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def namespaces(self) -> list[str]:
        return sorted({o.metadata.namespace or "default" for o in self.objects})


def format_loc(loc: Iterable[int | str]) -> str:
    """('spec', 'qos', 0, 'rateLimits') -> 'spec.qos[0].rateLimits'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _error_message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def parse_object(doc: Mapping[str, Any], default_namespace: str = "default") -> tuple[ArksObject | None, list[Problem]]:
    """Validate one document of a known Arks kind; on failure return every problem it has."""
    kind = str(doc.get("kind", ""))
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = str(meta.get("name", "")) if meta else ""
    if doc.get("apiVersion") != API_VERSION:
        return None, [Problem(kind, name, "apiVersion", f"must be {API_VERSION}, got {doc.get('apiVersion')!r}")]
    warnings: list[tuple[str, str]] = []
    data = dict(doc)
    data["metadata"] = {**(meta or {}), "namespace": (meta or {}).get("namespace") or default_namespace}
    try:
        obj = KINDS[kind].model_validate(data, context={"warnings": warnings})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = format_loc(err["loc"])
            message = _error_message(err)
            # A validator that locates the problem itself prefixes its message with the sub-path.
            head, sep, tail = message.partition(": ")
            if sep and head and " " not in head and ("." in head or "[" in head or head.isidentifier()):
                path, message = f"{path}.{head}" if path else head, tail
            problems.append(Problem(kind, name, path, message))
        return None, problems
    return obj, [Problem(kind, name, path, msg, "warning") for path, msg in warnings]


def _decode_secret(doc: Mapping[str, Any], default_namespace: str) -> tuple[Secret | None, list[Problem]]:
    meta = doc.get("metadata") or {}
    name = str(meta.get("name", ""))
    out: dict[str, str] = {}
    for key, value in (doc.get("data") or {}).items():
        try:
            out[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, [Problem("Secret", name, f"data.{key}", "is not valid base64 UTF-8")]
    out.update({str(k): str(v) for k, v in (doc.get("stringData") or {}).items()})
    return Secret(meta.get("namespace") or default_namespace, name, out), []


def load_documents(docs: Iterable[Any], default_namespace: str = "default") -> Loaded:
    """Load documents (already parsed), keeping Arks kinds and Secrets, reporting everything else."""
    loaded = Loaded()
    seen: set[tuple[str, str, str]] = set()
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            loaded.problems.append(Problem("?", "", "", f"a document must be a mapping, got {type(doc).__name__}"))
            continue
        kind = str(doc.get("kind", ""))
        if kind == "List" and isinstance(doc.get("items"), list):
            inner = load_documents(doc["items"], default_namespace)
            loaded.objects += inner.objects
            loaded.secrets += inner.secrets
            loaded.problems += inner.problems
            continue
        if kind == "Secret":
            secret, problems = _decode_secret(doc, default_namespace)
            loaded.problems += problems
            if secret:
                loaded.secrets.append(secret)
            continue
        if kind not in KINDS:
            name = str((doc.get("metadata") or {}).get("name", ""))
            loaded.problems.append(Problem(kind or "?", name, "kind", "not an Arks kind; ignored", "warning"))
            continue
        obj, problems = parse_object(doc, default_namespace)
        loaded.problems += problems
        if obj is None:
            continue
        key = (obj.kind, obj.metadata.namespace or default_namespace, obj.metadata.name)
        if key in seen:
            loaded.problems.append(Problem(obj.kind, obj.metadata.name, "metadata.name", "defined more than once"))
            continue
        seen.add(key)
        loaded.objects.append(obj)
    return loaded


def load_yaml(text: str, default_namespace: str = "default", source: str = "") -> Loaded:
    """Load a multi-document YAML string."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        where = f"{source}: " if source else ""
        return Loaded(problems=[Problem("YAML", "", "", f"{where}cannot parse: {exc}")])
    return load_documents(docs, default_namespace)
