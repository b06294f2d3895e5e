"""Fixtures for running the real operator (kopf + the official client) against kmock's Kubernetes emulator.

- ``emulator``: kmock's ``KubernetesEmulator`` with the resources the operator uses declared for API
  discovery (a real cluster always serves Namespaces; kopf waits for them before it watches anything).
- ``operators``: starts ``controller.runtime.run`` (what ``python -m controller`` runs) with a client
  configuration pointing at the emulator, and stops every operator at teardown.
- ``kubectl``: what a user does, over plain HTTP (not through the operator's client).
- An autouse guard fails a test that leaves an asyncio task behind (kopf's own hygiene rule).

The helpers live in ``tests/integration/harness.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controller.kube import RESOURCES
from tests.integration.harness import Kubectl, Operators, url_of


@pytest.fixture(autouse=True)
def _leak_check(no_leaked_tasks: None) -> None:
    """Every integration test fails if it leaves an asyncio task behind (as kopf's own tests do)."""


@pytest.fixture
def emulator(kmock: Any) -> Any:
    for kind, res in RESOURCES.items():
        prefix = f"{res.group}/{res.version}" if res.group else res.version
        subresources = ["status", "scale"] if kind == "ArksApplication" else ["status"]
        kmock.resources[f"{prefix}/{res.plural}"] = {
            "kind": kind, "singular": kind.lower(), "namespaced": True, "subresources": subresources,
            "verbs": ["get", "list", "watch", "create", "patch", "delete"]}
    kmock.resources["v1/namespaces"] = {"kind": "Namespace", "singular": "namespace", "namespaced": False,
                                        "verbs": ["get", "list", "watch"]}
    kmock.resources["v1/events"] = {"kind": "Event", "singular": "event", "namespaced": True,
                                    "verbs": ["create", "patch"]}
    return kmock


@pytest.fixture
async def kubectl(emulator: Any) -> AsyncIterator[Kubectl]:
    # No keep-alive: an idle connection is a server task left in this loop (the leak guard would see it).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield Kubectl(url_of(emulator), session)


@pytest.fixture
async def operators(emulator: Any) -> AsyncIterator[Operators]:
    ops = Operators(emulator)
    try:
        yield ops
    finally:
        await ops.stop_all()
