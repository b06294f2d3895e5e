"""The token keys tests render and authenticate with: one fixed installation key, derived per namespace.

``tests/conftest.py`` puts the ``default`` namespace's key into every test's environment, where a gateway
replica finds it (as a Ray pod does, from its Secret); renders pass ``TEST_OPTIONS``.
"""

from __future__ import annotations

from arks_ray.api.digests import TokenKeys
from arks_ray.render import RenderOptions

TEST_KEYS = TokenKeys.from_text("arks-ray-tests-installation-key-0123456789abcdef")
TEST_OPTIONS = RenderOptions(token_keys=TEST_KEYS)


def namespace_keys(namespace: str = "default") -> TokenKeys:
    return TEST_KEYS.for_namespace(namespace)


def keyed_digest(value: str, namespace: str = "default") -> str:
    """The digest a render with ``TEST_OPTIONS`` writes for a token of ``namespace``."""
    return namespace_keys(namespace).digest(value)
