"""``OfficialKubeClient`` (the official client in worker threads) against kmock's emulator, over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kubernetes.client
import pytest

from controller import errors
from controller.kube import OfficialKubeClient

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(emulator: Any) -> AsyncIterator[OfficialKubeClient]:
    cfg = kubernetes.client.Configuration(host=str(emulator.url).rstrip("/"))
    kube = OfficialKubeClient(cfg, field_manager="arks-ray", timeout=(2, 5))
    yield kube
    await kube.close()


def job(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "ns", "labels": labels or {}}, "spec": {"x": 1}}


async def test_create_get_list_patch_delete(client: OfficialKubeClient, emulator: Any) -> None:
    assert await client.get("Job", "ns", "a") is None
    await client.create(job("a", {"app.kubernetes.io/managed-by": "arks-ray"}))
    await client.create(job("b"))
    with pytest.raises(errors.Conflict):
        await client.create(job("a"))
    got = await client.get("Job", "ns", "a")
    assert got is not None
    assert got["spec"] == {"x": 1}
    managed = await client.list("Job", "ns", {"app.kubernetes.io/managed-by": "arks-ray"})
    assert [(j["kind"], j["metadata"]["name"]) for j in managed] == [("Job", "a")]
    await client.patch("Job", "ns", "a", {"status": {"succeeded": 1}}, status=True)
    assert (await client.get("Job", "ns", "a") or {})["status"] == {"succeeded": 1}
    assert await client.delete("Job", "ns", "a") is True
    assert await client.delete("Job", "ns", "a") is False
    assert [r.params.get("fieldManager") for r in list(emulator) if r.method.value == "POST"] == ["arks-ray"] * 3


async def test_apply_is_server_side_and_creates_when_absent(client: OfficialKubeClient, emulator: Any) -> None:
    rs = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "arks", "namespace": "ns"},
          "spec": {"serveConfigV2": "a"}}
    await client.apply(rs)  # the emulator answers 404 to applying a missing object: created instead
    await client.apply({**rs, "spec": {"serveConfigV2": "b"}})
    assert (await client.get("RayService", "ns", "arks") or {})["spec"] == {"serveConfigV2": "b"}
    applies = [r for r in list(emulator) if r.method.value == "PATCH"]
    assert applies[-1].headers["Content-Type"] == "application/apply-patch+yaml"
    assert applies[-1].params == {"fieldManager": "arks-ray", "force": "true"}


async def test_no_server_is_a_temporary_error() -> None:
    cfg = kubernetes.client.Configuration(host="http://127.0.0.1:9")  # discard port: refused
    cfg.retries = 0
    kube = OfficialKubeClient(cfg, field_manager="arks-ray", timeout=(1, 1))
    try:
        with pytest.raises(errors.ApiUnavailable):
            await kube.get("Job", "ns", "a")
    finally:
        await kube.close()
