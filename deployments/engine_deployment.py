"""The Serve deployment of a vLLM engine app, built without importing vLLM.

Ray's ``build_llm_deployment`` gets the placement group from vLLM's engine config, and the module holding that
config imports vLLM (``vllm.engine.arg_utils``): 22-23 s of Serve's build task on the H200, on every deploy
and every config update, before a replica is even asked for. The renderer always writes explicit placement
bundles, so the deployment's options follow from the ``LLMConfig`` alone. This module computes them
as Ray's builder does (``LLMServer.get_deployment_options``, then ``build_llm_deployment``; checked against
Ray's own builder in ``tests/unit/test_engine_deployment.py``) and names the replica class by its import path,
which the replica process imports (Serve's ``ReplicaConfig`` takes a class or an import path).

What this does not model goes Ray's way, vLLM import included (``modelled``): a config without explicit
bundles, ``bundle_per_worker``, a TPU, KV events. One check moves: an unknown engine argument, which Ray's
builder refused in the build task, is now refused as the replica starts (Ray's ``LLMServer``: the same
message; ``vllmServer``: vLLM's server exits on the flag), and the app fails to deploy after Serve's
constructor retries.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Deployment


def modelled(llm_config: Any) -> bool:
    """Whether this module builds this (Ray) ``LLMConfig``'s deployment exactly as Ray's builder
    would: explicit bundles (the renderer always writes them), a GPU or CPU engine, no KV events and no
    KV-aware router (the one router Ray's builder does something for)."""
    from ray.llm._internal.serve.routing_policies.kv_aware.kv_aware_router import is_kv_aware

    placement = llm_config.placement_group_config or {}
    if not placement.get("bundles") or placement.get("bundle_per_worker") is not None:
        return False
    if getattr(llm_config.accelerator_config, "kind", None) not in ("gpu", "cpu"):
        return False
    if "kv_events_config" in llm_config.engine_kwargs:
        return False
    return not is_kv_aware(llm_config)


def _merge_first_bundle(child: list[dict[str, Any]], replica: dict[str, Any]) -> list[dict[str, Any]]:
    # Ray's _merge_replica_actor_and_child_actor_bundles: the replica actor shares the first bundle.
    if not child:
        return [copy.copy(replica)]
    if not replica:
        return [copy.copy(b) for b in child]
    first = child[0]
    merged = {key: first.get(key, 0) + replica.get(key, 0) for key in set(first) | set(replica)}
    return [merged] + [copy.copy(b) for b in child[1:]]


def server_options(llm_config: Any) -> dict[str, Any]:
    """Ray's ``LLMServer.get_deployment_options`` for a ``modelled`` config: the placement group (the replica
    actor's resources joined to the first bundle), and the runtime env of the job with Ray's worker setup
    hook and the config's own env."""
    import ray
    from ray.llm._internal.common.placement import PlacementGroupConfig
    from ray.llm._internal.serve.constants import ENABLE_WORKER_PROCESS_SETUP_HOOK
    from ray.llm._internal.serve.core.configs.accelerators import format_ray_accelerator_resource

    options: dict[str, Any] = copy.deepcopy(llm_config.deployment_config)
    if "placement_group_bundles" in options or "placement_group_strategy" in options:
        raise ValueError("placement_group_bundles and placement_group_strategy must not be specified in "
                         "deployment_config; they come from the placement_group_config")
    actor = options.setdefault("ray_actor_options", {})
    replica = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
    if "memory" in actor:
        replica["memory"] = actor["memory"]
    # Validated and normalised (numbers of CPU and GPU as floats) as Ray's vLLM engine config does.
    placement = PlacementGroupConfig(**llm_config.placement_group_config).model_dump(exclude_unset=True)
    bundles = [dict(b) for b in placement["bundles"]]
    if llm_config.accelerator_type:
        for bundle in bundles:
            bundle.setdefault(format_ray_accelerator_resource(llm_config.accelerator_type), 0.001)
    options["placement_group_bundles"] = _merge_first_bundle(bundles, replica)
    options["placement_group_strategy"] = placement.get("strategy", "PACK")

    runtime_env = ray.get_runtime_context().runtime_env
    if ENABLE_WORKER_PROCESS_SETUP_HOOK:
        runtime_env["worker_process_setup_hook"] = "ray.llm._internal.serve._worker_process_setup_hook"
    actor["runtime_env"] = {**runtime_env, **actor.get("runtime_env", {}), **(llm_config.runtime_env or {})}
    return options


def builder_options(options: dict[str, Any], llm_config: Any) -> dict[str, Any]:
    """What Ray's ``build_llm_deployment`` does to a server's options: the name, then Ray LLM's defaults
    (health checks, ongoing requests; no autoscaling default when ``num_replicas`` is set)."""
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve import constants

    from arks_ray.render.lora import ENGINE_PREFIX, engine_deployment_name

    given = options.get("name")
    options["name"] = ENGINE_PREFIX + given if given is not None else engine_deployment_name(llm_config.model_id)
    defaults = {
        "max_ongoing_requests": constants.DEFAULT_MAX_ONGOING_REQUESTS,
        "health_check_period_s": constants.DEFAULT_HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": constants.DEFAULT_HEALTH_CHECK_TIMEOUT_S,
        "autoscaling_config": {"target_ongoing_requests": constants.DEFAULT_MAX_TARGET_ONGOING_REQUESTS},
    }
    merged: dict[str, Any] = maybe_apply_llm_deployment_config_defaults(defaults, options)
    return merged


def engine_deployment(options: dict[str, Any], replica_class: str) -> Deployment:
    """The engine deployment: the class at ``replica_class`` (``module.Class``, the form Serve parses; the
    replica imports it, this does not) with ``options``."""
    from ray import serve

    # serve.deployment's decorator builds a ReplicaConfig, which takes an import path as the code to run
    # (typed as a callable only).
    return serve.deployment(**options)(replica_class)  # type: ignore[arg-type]
