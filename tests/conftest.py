"""Shared test fixtures: OpenAPI v3.0 (CRD) schemas as JSON Schema.

Used by the unit tests of the renderer and the CRDs. Kept small on purpose; test modules hold their own
paths and helpers, because ``conftest`` is not importable as a module under pytest's default import mode.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest


def openapi_to_jsonschema(schema: Any) -> Any:
    """Turn an OpenAPI v3.0 (Kubernetes) schema into JSON Schema that ``jsonschema`` understands.

    ``nullable: true`` becomes ``type: [X, "null"]``; boolean ``exclusiveMinimum``/``exclusiveMaximum``
    become the numeric draft-6+ form. ``x-kubernetes-*`` keys are left alone (validators ignore them),
    except ``x-kubernetes-int-or-string``, which becomes a type list.
    """
    if isinstance(schema, list):
        return [openapi_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: openapi_to_jsonschema(v) for k, v in schema.items()}
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(key), bool):
            flag = out.pop(key)
            if flag and bound in out:
                out[key] = out.pop(bound)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


@pytest.fixture(scope="session")
def crd_json_schema() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """CRD -> the JSON Schema of its first version, ready for ``jsonschema.Draft7Validator``."""

    def convert(crd: dict[str, Any]) -> dict[str, Any]:
        schema: dict[str, Any] = openapi_to_jsonschema(
            copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
        return schema

    return convert


@pytest.fixture(autouse=True)
def _gateway_token_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs as a gateway replica of namespace ``default`` does: its token key in the environment
    (``tests/support/keys.py``). Tests of a keyless gateway delete it."""
    from arks_ray.api.digests import TOKEN_KEY_ENV
    from tests.support.keys import namespace_keys

    monkeypatch.setenv(TOKEN_KEY_ENV, namespace_keys().current.decode())


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves an asyncio task running (kopf's own suite does the same)."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0.01)  # let tasks that are finishing finish
    remains = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()}
    if remains:
        pytest.fail(f"Unattended asyncio tasks detected: {remains!r}")
