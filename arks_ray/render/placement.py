"""Placement groups of engine replicas: the SGLang bundle layout, default strategies, and placement checks.

Called by ``arks_ray.render.serve_config.placement`` (bundles and strategy) and by
``arks_ray.render.rayservice`` (problems). One Arks inference group (``size`` pods) is one Serve replica,
and one Serve replica is one Ray placement group. Ray reserves a placement group's bundles atomically
across nodes (all or none), so a replica never starts on part of its pods: that is the gang guarantee.

Serve's ``gang_scheduling_config`` (Ray 2.60) is a different thing: it gangs several *replicas* into one
placement group, allows only PACK or SPREAD, and forbids a per-replica ``placement_group_strategy``; Ray's
LLM builders use it only for data-parallel attention (``DPServer``). An Arks group is one replica, so it
is not used here.

The two engines read their placement differently:

- vLLM (``LLMServer``): ``{"bundles": [...], "strategy": ...}``, one bundle per engine worker (TP x PP);
  its Ray executor puts one worker in each GPU bundle, and Ray adds the replica actor's CPU to bundle 0.
- SGLang (Ray's ``SGLangServer``): ``{"placement_group_bundles": [...], "placement_group_strategy": ...}``,
  one bundle per *node* holding that node's share of the GPUs (its ``RayEngine`` starts every rank of a
  node in that node's bundle, and sets no CPU for the replica actor, so bundle 0 carries it).
"""

from __future__ import annotations

from typing import Any

from arks_ray.api.application import ArksApplicationSpec

REPLICA_ACTOR_CPUS = 1.0
"""CPUs of a Serve replica actor (Serve's default ``num_cpus``); it runs in bundle 0."""

Finding = tuple[str, str, str]
"""(field path, message, severity) of one placement problem."""


def default_strategy(runtime: str, size: int) -> str:
    """One pod: all bundles on it. Several: vLLM packs GPUs onto as few pods as it can; SGLang wants
    one bundle on each node."""
    if size == 1:
        return "STRICT_PACK"
    return "STRICT_SPREAD" if runtime == "sglang" else "PACK"


def strategy_of(spec: ArksApplicationSpec) -> str:
    """The app's ``placement.strategy``, or the default for its runtime and size."""
    if spec.placement is not None and spec.placement.strategy:
        return spec.placement.strategy
    return default_strategy(spec.runtime, spec.size)


def sglang_placement(world: int, size: int, gpus: int, resource: str, bundle_cpus: float,
                     strategy: str) -> dict[str, Any]:
    """SGLang's placement group: ``size`` bundles of ``world / size`` GPUs (or CPU bundles without GPUs)."""
    bundles: list[dict[str, float]] = []
    for index in range(size):
        bundle: dict[str, float] = {resource: 1}
        if gpus:
            bundle["GPU"] = max(world // size, 1)
        cpus = (0.0 if gpus else bundle_cpus) + (REPLICA_ACTOR_CPUS if index == 0 else 0.0)
        if cpus:
            bundle["CPU"] = cpus
        bundles.append(bundle)
    return {"placement_group_bundles": bundles, "placement_group_strategy": strategy}


def problems(runtime: str, world: int, size: int, gpus: int, strategy: str) -> list[Finding]:
    """What stops (or wastes) the placement of one replica: ``world`` workers on ``size`` pods of ``gpus``."""
    if runtime == "dynamo":
        return []  # one bundle with the pod's GPUs; Dynamo's own processes place the ranks
    out: list[Finding] = []
    if gpus and size * gpus < world:
        out.append(("spec.tensorParallelSize",
                    f"TP x PP = {world} GPUs per replica, but size x GPUs per pod = {size * gpus}; "
                    "the replica cannot be placed", "warning"))
    if runtime == "sglang":
        if world % size:
            out.append(("spec.size", f"SGLang spreads TP x PP = {world} ranks evenly over size = {size} "
                                     f"nodes, and {world} is not a multiple of {size}", "error"))
        if size > 1 and strategy != "STRICT_SPREAD":
            out.append(("spec.placement.strategy", f"SGLang's Ray engine expects each of the {size} bundles "
                                                   "on its own node; use STRICT_SPREAD", "warning"))
        return out
    if gpus and size > 1 and world <= (size - 1) * gpus:
        out.append(("spec.size", f"TP x PP = {world} GPUs fit on fewer than size = {size} pods of {gpus} "
                                 "GPUs; the extra pods stay idle", "warning"))
    if strategy == "STRICT_SPREAD" and world > size:
        out.append(("spec.placement.strategy", f"STRICT_SPREAD puts each of the {world} bundles of a replica "
                                               f"on its own node, but a replica has size = {size} pods",
                    "warning"))
    if strategy == "STRICT_PACK" and size > 1:
        out.append(("spec.placement.strategy", f"STRICT_PACK puts every bundle of a replica on one node, "
                                               f"so {size - 1} of its {size} pods stay idle", "warning"))
    return out
