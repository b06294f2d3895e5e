"""The preload DaemonSet through ``OfficialKubeClient`` (apps/v1) against kmock's emulator, over HTTP:
applied (created when absent), listed by the managed-by label as the reconciler lists it, deleted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from arks_ray.api import load_yaml
from arks_ray.render import render
from controller.kube import OfficialKubeClient
from controller.meta import MANAGED_BY

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "node-cache.yaml"


@pytest.fixture
async def client(emulator: Any) -> AsyncIterator[OfficialKubeClient]:
    cfg = kubernetes.client.Configuration(host=str(emulator.url).rstrip("/"))
    kube = OfficialKubeClient(cfg, field_manager="arks-ray", timeout=(2, 5))
    yield kube
    await kube.close()


async def test_the_rendered_daemonset_round_trips(client: OfficialKubeClient) -> None:
    (result,) = render(load_yaml(EXAMPLE.read_text()))
    (ds,) = [m for m in result.manifests if m["kind"] == "DaemonSet"]
    await client.apply(ds)
    (listed,) = await client.list("DaemonSet", "llm", MANAGED_BY)
    assert listed["metadata"]["name"] == "arks-cache-qwen-7b"
    assert listed["spec"]["template"]["spec"]["initContainers"][0]["name"] == "arks-node-cache"
    assert await client.delete("DaemonSet", "llm", "arks-cache-qwen-7b")
    assert await client.list("DaemonSet", "llm", MANAGED_BY) == []
