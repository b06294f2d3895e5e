"""Multi-node placement and heterogeneous worker groups on a local multi-node Ray cluster, end to end.

One cluster for the module (``tests/support/ray_cluster.py``): a head (the gateway's ``arks-head``) and
three worker raylets, each offering one worker group's ``arks-wg-…`` resource, as KubeRay pods do. Two
apps of different pod shapes render into two worker groups:

- ``spread``: TP=2, size 2, ``placement.strategy: STRICT_SPREAD``; its one placement group must span the
  two raylets of its group. vLLM on CPU runs both TP ranks as processes of the replica's node (Ray's LLM
  server forces vLLM's multiprocessing executor on CPU, and vLLM's Ray executor refuses CPUs), so the
  second bundle is reserved but computes nothing; on GPUs each bundle holds a rank.
- ``solo``: TP=1 on one GPU, on the third raylet, which claims one GPU (a Ray resource; vLLM computes on
  the CPU). Its engine runs in process (``arks_ray.engines.executor``): the replica actor holds the GPU
  (Ray sets its ``CUDA_VISIBLE_DEVICES``), and it starts no Ray task for the model or the engine config.

Requests go through the gateway with the openai client. Then a third app that needs three nodes of a
two-node group shows the gang property: its placement group stays pending with nothing reserved.

This module needs a Ray of its own (several raylets), so it does not use the shared e2e stack: it asks for
``no_shared_stack``, and ``tests/e2e/conftest.py`` runs it before the modules that share one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from arks_ray.local import runner
from tests.support.ray_cluster import LocalCluster, NodeSpec, placement_groups
from tests.support.redis_server import free_port
from tests.support.stack import demo_without, make_plan

pytestmark = pytest.mark.e2e

TOKEN = "sk-placement-e2e"
ENGINE_ARGS = ["--dtype bfloat16", "--max-model-len 512", "--gpu-memory-utilization 0.1", "--enforce-eager"]
ENV = """      - {name: VLLM_CPU_KVCACHE_SPACE, value: "1"}
      - {name: HF_HUB_OFFLINE, value: "1"}"""


def app(name: str, pool: str, tp: int, size: int, strategy: str | None, extra_env: str = "", gpus: int = 0) -> str:
    placement = f"\n  placement: {{strategy: {strategy}}}" if strategy else ""
    resources = f'\n    resources: {{limits: {{nvidia.com/gpu: "{gpus}"}}}}' if gpus else ""
    return f"""apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: {name}, namespace: default}}
spec:
  replicas: 1
  size: {size}
  tensorParallelSize: {tp}
  servedModelName: {name}
  model: {{name: tiny-qwen2}}{placement}
  runtimeCommonArgs: {ENGINE_ARGS}
  instanceSpec:
    nodeSelector: {{arks.ai/pool: {pool}}}{resources}
    env:
{ENV}{extra_env}
"""


# Two TP ranks on a 2-core machine: vLLM's automatic OpenMP binding wants a NUMA node per rank.
BIND = '\n      - {name: VLLM_CPU_OMP_THREADS_BIND, value: "0|1"}'
SPREAD = app("spread", "a", 2, 2, "STRICT_SPREAD", BIND)
# One GPU: node b1 claims one (a Ray resource; vLLM still computes on the CPU), so the app's engine runs in
# process, its replica actor holding the GPU (arks_ray.engines.executor).
SOLO = app("solo", "b", 1, 1, None, gpus=1)
# Three bundles, one per node, on a worker group of its own (groups are per app) that has two nodes.
GANG = app("gang", "a", 3, 3, "STRICT_SPREAD", BIND)
REST = """apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: spread, namespace: default}
spec: {defaultWeight: 1}
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: solo, namespace: default}
spec: {defaultWeight: 1}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: placement, namespace: default}
spec:
  token: sk-placement-e2e
  qos: [{arksEndpoint: {name: spread}}, {arksEndpoint: {name: solo}}]
"""
BASE = demo_without("ArksApplication", "ArksEndpoint", "ArksToken")


def plan(port: int, *apps: str) -> runner.LocalPlan:
    return make_plan("\n---\n".join([*apps, REST]), port, base=BASE)


def group_resource(llm_config: dict[str, Any]) -> str:
    (resource,) = {k for b in llm_config["placement_group_config"]["bundles"] for k in b if k.startswith("arks-wg-")}
    return resource


@pytest.fixture(scope="module")
def stack(no_shared_stack: None) -> Iterator[dict[str, Any]]:
    port = free_port()
    first = plan(port, SPREAD, SOLO)
    every = plan(port, SPREAD, SOLO, GANG)
    llm = {a["name"]: a["args"]["llm_config"] for a in every.serve_config["applications"] if a["name"] != "gateway"}
    groups = {name: group_resource(cfg) for name, cfg in llm.items()}
    assert groups["spread"] != groups["solo"], "two pod shapes, two worker groups"
    # Nodes a1 and a2 are the pods of two groups: spread's, and the gang app's (two nodes for three bundles).
    two = {groups["spread"]: 1000, groups["gang"]: 1000}
    cluster = LocalCluster(
        NodeSpec("head", 3, {"arks-head": 1000}),
        [NodeSpec("a1", 3, two), NodeSpec("a2", 3, dict(two)), NodeSpec("b1", 3, {groups["solo"]: 1000}, num_gpus=1)])
    try:
        # vLLM's CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn in a process that has built an engine config
        # (an earlier test in this one): nodes started with it would keep the solo engine's EngineCore on spawn.
        with pytest.MonkeyPatch.context() as env:
            env.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
            cluster.start()
        runner.deploy(first.serve_config)
        runner.wait_ready(["gateway", "spread", "solo"], timeout_s=420, progress=print)
        yield {"port": port, "base": f"http://127.0.0.1:{port}", "cluster": cluster, "groups": groups,
               "nodes": cluster.node_ids()}
    finally:
        cluster.stop()


def client(stack: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def show(label: str, pg: dict[str, Any], nodes: dict[str, str]) -> None:
    names = {v: k for k, v in nodes.items()}
    where = {i: names.get(n, n or "-") for i, n in pg["bundles_to_node_id"].items()}
    print(f"{label}: {pg['strategy']} {pg['state']} bundles={pg['bundles']} on={where}")


def pg_of(resource: str) -> list[dict[str, Any]]:
    return [pg for pg in placement_groups() if any(resource in b for b in pg["bundles"].values())]


def replicas(app_name: str) -> list[Any]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
    return [a for a in actors if a.class_name.startswith(f"ServeReplica:{app_name}:")]


def replica_nodes(app_name: str) -> set[str]:
    return {a.node_id for a in replicas(app_name)}


def tp_ranks_of(app_name: str) -> list[str]:
    """vLLM's worker processes under the app's replica actor, by the titles vLLM gives them."""
    import psutil

    (replica,) = replicas(app_name)
    titles = [" ".join(p.cmdline()) for p in psutil.Process(replica.pid).children(recursive=True)]
    return sorted(rank for rank in ("Worker_TP0", "Worker_TP1") for t in titles if rank in t)


def test_strict_spread_placement_group_spans_two_nodes_and_serves(stack: dict[str, Any]) -> None:
    nodes = stack["nodes"]
    (pg,) = pg_of(stack["groups"]["spread"])
    show("spread placement group", pg, nodes)
    assert (pg["strategy"], pg["state"]) == ("STRICT_SPREAD", "CREATED")
    placed = pg["bundles_to_node_id"]
    assert len(placed) == 2
    assert set(placed.values()) == {nodes["a1"], nodes["a2"]}, "one bundle on each node of the app's group"
    # Bundle 0 holds the replica actor too (Ray's LLMServer adds its CPU there); bundle 1 is the second rank's.
    assert pg["bundles"][0]["CPU"] == 2.0
    assert pg["bundles"][1]["CPU"] == 1.0
    assert replica_nodes("spread") == {placed[0]}
    # Both TP ranks are processes of that replica, so they run on bundle 0's node (vLLM's mp executor on CPU).
    assert tp_ranks_of("spread") == ["Worker_TP0", "Worker_TP1"]

    resp = client(stack).chat.completions.create(model="spread", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6)
    assert resp.model == "spread"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 6


def test_each_app_lands_only_on_its_own_worker_group(stack: dict[str, Any]) -> None:
    nodes = stack["nodes"]
    (solo,) = pg_of(stack["groups"]["solo"])
    show("solo placement group", solo, nodes)
    assert solo["strategy"] == "STRICT_PACK"
    assert set(solo["bundles_to_node_id"].values()) == {nodes["b1"]}
    assert replica_nodes("solo") == {nodes["b1"]}
    assert replica_nodes("spread") <= {nodes["a1"], nodes["a2"]}
    assert replica_nodes("gateway") == {nodes["head"]}


def test_the_solo_app_streams_from_its_own_group(stack: dict[str, Any]) -> None:
    chunks = list(client(stack).completions.create(model="solo", prompt="Once upon", max_tokens=5, stream=True,
                                                   stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_a_one_gpu_engine_holds_its_gpu_in_the_replica_and_starts_no_ray_task(stack: dict[str, Any]) -> None:
    import psutil
    from ray.util.state import list_tasks

    (solo,) = pg_of(stack["groups"]["solo"])
    assert list(solo["bundles"].values()) == [{"CPU": 1.0, "GPU": 1.0, stack["groups"]["solo"]: 1.0}]
    (replica,) = replicas("solo")
    # In a placement group Ray names the resource per group (GPU_group_<id>, GPU_group_0_<id>)
    gpus = {v for k, v in replica.required_resources.items() if k.split("_group_")[0] == "GPU"}
    assert gpus == {1.0}, replica.required_resources
    # Ray sets CUDA_VISIBLE_DEVICES in the actor's process when it runs; its children (vLLM's EngineCore, and
    # on CPU the executor's worker) start with it, as the GPU's EngineCore does.
    children = psutil.Process(replica.pid).children(recursive=True)
    assert children
    assert {c.environ().get("CUDA_VISIBLE_DEVICES") for c in children} == {"0"}
    # The replica holds a GPU, so its EngineCore is forked from the fork server it started as its class loaded
    # (deployments.engine_start), not spawned: the server is its child, and the EngineCore the server's.
    servers = [c for c in psutil.Process(replica.pid).children()
               if any("multiprocessing.forkserver" in part for part in c.cmdline())]
    assert len(servers) == 1, [c.cmdline()[:3] for c in children]
    assert servers[0].children()
    assert not [c for c in psutil.Process(replica.pid).children()
                if any("multiprocessing.spawn" in part for part in c.cmdline())]
    # Ray's own path starts a model-download task on each node of the placement group, and on a GPU an
    # engine-config task; the in-process engine does both in the replica. The TP=2 app shows the tasks exist.
    by_node: dict[str, set[str]] = {}
    for task in list_tasks(filters=[("type", "=", "NORMAL_TASK")], limit=10000, raise_on_missing_output=False):
        by_node.setdefault(task.node_id or "", set()).add(task.name)
    b1, a_nodes = stack["nodes"]["b1"], {stack["nodes"]["a1"], stack["nodes"]["a2"]}
    assert not {"initialize_remote_node", "_get_vllm_engine_config"} & by_node.get(b1, set()), by_node.get(b1)
    assert any("initialize_remote_node" in by_node.get(n, set()) for n in a_nodes), by_node


def test_a_replica_that_cannot_be_placed_whole_reserves_nothing(stack: dict[str, Any]) -> None:
    port = stack["port"]
    runner.deploy(plan(port, SPREAD, SOLO, GANG).serve_config)
    try:
        pending = _eventually(lambda: [pg for pg in pg_of(stack["groups"]["gang"]) if len(pg["bundles"]) == 3])
        (pg,) = pending
        show("gang placement group", pg, stack["nodes"])
        assert pg["state"] == "PENDING"
        # Ray lists the bundles with no node: none is reserved while the whole group does not fit.
        assert not any(pg["bundles_to_node_id"].values()), pg["bundles_to_node_id"]
        status = runner.serve_status()
        assert status["gang"]["status"] == "DEPLOYING"
        assert status["spread"]["status"] == "RUNNING"
    finally:
        runner.deploy(plan(port, SPREAD, SOLO).serve_config)
        _eventually(lambda: "gang" not in runner.serve_status() or None)
    resp = client(stack).chat.completions.create(model="spread", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2)
    assert resp.usage is not None


def _eventually(check: Any, timeout: float = 60.0) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(1.0)
