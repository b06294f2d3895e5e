"""A local multi-node Ray cluster: one head and several worker raylets on this machine, for e2e tests.

Used by ``tests/e2e/test_multinode_placement.py``. Each node is a real raylet started by ``ray start`` with its own
logical CPUs and custom resources, the way a KubeRay pod advertises its worker group's ``arks-wg-…``
resource, plus a marker resource (``arks-test-node-<name>``) that tells the nodes apart. The head serves
the dashboard on the port the local runner talks to, so ``runner.deploy`` and ``runner.wait_ready`` work
unchanged. ``stop`` runs ``ray stop --force``, which stops every raylet of this machine: start and stop it
inside the machine's Ray lock.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from arks_ray.local import runner
from tests.support.redis_server import free_port

MARKER = "arks-test-node-"


@dataclass(frozen=True)
class NodeSpec:
    """One raylet: a name (for the marker resource), its logical CPUs and its custom resources, and GPUs it
    claims to have (Ray's ``GPU`` resource only: Ray sets ``CUDA_VISIBLE_DEVICES`` for what takes one)."""

    name: str
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    num_gpus: int = 0

    def start_args(self) -> list[str]:
        resources = {**self.resources, MARKER + self.name: 1}
        return [f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}", f"--resources={json.dumps(resources)}",
                "--disable-usage-stats"]


class LocalCluster:
    """A head plus worker raylets; ``start`` waits until every node has joined."""

    def __init__(self, head: NodeSpec, workers: list[NodeSpec]) -> None:
        self.head = head
        self.workers = workers
        self.port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray(self, *args: str) -> None:
        from arks_ray.local.keys import local_token_keys
        from tests.support.stack import installation_key

        with installation_key():  # the gateway's namespace key, as runner.start_ray gives it
            env = runner.ray_env(local_token_keys().for_namespace("default").environ())
        proc = subprocess.run([runner._ray_bin(), *args], capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def start(self, timeout_s: float = 120) -> LocalCluster:
        runner._auth_env()
        runner._ensure_auth_token()
        self._ray("start", "--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={runner.DASHBOARD_PORT}", *self.head.start_args())
        for node in self.workers:
            self._ray("start", f"--address={self.address}", *node.start_args())
        deadline = time.monotonic() + timeout_s
        while not runner.ray_running() or len(self.node_ids()) < 1 + len(self.workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local cluster did not come up within {timeout_s:.0f}s")
            time.sleep(1.0)
        return self

    def node_ids(self) -> dict[str, str]:
        """Node name -> Ray node id, for the live nodes (needs ``ray.init`` in this process)."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
        out: dict[str, str] = {}
        for node in ray.nodes():
            names = [k.removeprefix(MARKER) for k in node.get("Resources", {}) if k.startswith(MARKER)]
            if node.get("Alive") and names:
                out[names[0]] = node["NodeID"]
        return out

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        runner.down()  # deletes the Serve apps, then `ray stop --force`


def placement_groups() -> list[dict[str, Any]]:
    """Ray's placement group table: one dict per group (bundles, strategy, state, bundles_to_node_id)."""
    from ray.util import placement_group_table

    table: dict[str, dict[str, Any]] = placement_group_table()
    return list(table.values())
