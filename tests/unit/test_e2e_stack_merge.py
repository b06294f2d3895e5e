"""How the shared e2e stack merges a module's objects into its base (``tests/support/stack.merge_objects``).

The e2e modules rely on it to replace a base object (the routing module's ``tiny`` endpoint, the
governance module's quota with a status) without touching the others.
"""

from __future__ import annotations

import yaml

from arks_ray.api.loading import load_yaml
from tests.support.stack import DEMO, merge_objects

EXTRA = """
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: tiny, namespace: default}
spec:
  defaultWeight: 2
---
# a comment-only document is dropped
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: extra, namespace: default}
spec:
  token: sk-extra
  qos: [{arksEndpoint: {name: tiny}}]
"""


def kinds_and_names(text: str) -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(text) if d]


def test_an_extra_object_replaces_the_base_one_in_place_and_new_ones_go_last() -> None:
    merged = merge_objects(DEMO.read_text(), EXTRA)
    base = kinds_and_names(DEMO.read_text())
    assert kinds_and_names(merged) == [*base, ("ArksToken", "extra")]
    endpoints = [d for d in yaml.safe_load_all(merged) if d and d["kind"] == "ArksEndpoint"]
    assert [e["spec"] for e in endpoints] == [{"defaultWeight": 2}]
    loaded = load_yaml(merged)
    assert not loaded.errors, loaded.errors


def test_nothing_extra_is_the_base() -> None:
    assert kinds_and_names(merge_objects(DEMO.read_text(), "")) == kinds_and_names(DEMO.read_text())
