"""Smoke test of the built operator image: ``python -m controller`` inside it, against the Kubernetes emulator.

Runs only when ``ARKS_OPERATOR_IMAGE`` names an image in buildah's local storage (``make images`` builds
``ghcr.io/arks-ray/arks-ray:<version>``); ``make test`` skips it, as image builds are not part of the test
run. The container runs with buildah (chroot isolation, host network) and reaches the emulator over HTTP
with a kubeconfig, as it would reach an API server: the quickstart goes in, and the operator's RayService
and gateway Secret must come out, with nothing secret in the RayService.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from arks_ray.api.digests import TokenKeys
from tests.integration.harness import Kubectl, eventually, url_of
from tests.support.paths import FIXTURES

IMAGE = os.environ.get("ARKS_OPERATOR_IMAGE", "")
BUILDAH = ["buildah", "--storage-driver", "vfs"]
KEY = "5a" * 32

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not IMAGE or shutil.which("buildah") is None,
                       reason="set ARKS_OPERATOR_IMAGE to an image built by `make images` (needs buildah)"),
]


async def _run(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def _kubeconfig(url: str, path: Path) -> None:
    path.parent.chmod(0o755)  # the image runs as uid 1000; pytest's directory is root's, 0700
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "u"}}],
    }))


async def test_the_operator_image_reconciles_the_quickstart(emulator: Any, kubectl: Kubectl, tmp_path: Path) -> None:
    _kubeconfig(url_of(emulator), tmp_path / "kubeconfig")
    container = await _run(*BUILDAH, "from", IMAGE)
    log = (tmp_path / "operator.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *BUILDAH, "run", "--isolation", "chroot", "--network", "host",
        "-v", f"{tmp_path}:/config:ro", "--env", f"ARKS_TOKEN_KEY={KEY}", "--env", "ARKS_GANG_SCHEDULER=volcano",
        container, "--", "python", "-m", "controller", "--kubeconfig", "/config/kubeconfig",
        "--metrics-port=0", "--health-port=0",
        stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        for doc in yaml.safe_load_all((FIXTURES / "arks/quickstart.yaml").read_text()):
            if doc:
                await kubectl.apply(doc)

        async def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
            rs = await kubectl.get("RayService", "arks")
            secret = await kubectl.get("Secret", "arks-gateway")
            return (rs, secret) if rs and secret else None

        rayservice, secret = await eventually(both, within=120, interval=1.0)
    finally:
        await _stop(proc)
        log.close()
        await _run(*BUILDAH, "rm", container)
        print((tmp_path / "operator.log").read_text(errors="replace")[-3000:])  # shown when the test fails
    text = json.dumps(rayservice)
    assert KEY not in text
    assert "sk-test123456" not in text
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in head["env"]} >= {"ARKS_TOKEN_KEY", "ARKS_REDIS_PASSWORD"}
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    # The app waits for its model's download (no Job runs here): the gateway is deployed first.
    assert rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] == []
    expected = TokenKeys.from_text(KEY).for_namespace("default").current.decode()
    assert (secret.get("stringData") or {}).get("token-key") == expected
