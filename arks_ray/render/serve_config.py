"""The Ray Serve multi-application config (``serveConfigV2``): the gateway plus one app per Arks app.

Called by ``arks_ray.render.rayservice``. The same config runs under KubeRay and locally
(``arks-ray up`` / ``serve run``). Engine apps are not exposed over HTTP (``route_prefix: null``); only
the gateway is, and it reaches engines through deployment handles.
"""

from __future__ import annotations

from typing import Any

from arks_ray.api.application import ArksApplication, Dynamo
from arks_ray.api.disaggregated import ArksDisaggregatedApplication, DisaggregatedWorkload
from arks_ray.api.gateway import GATEWAY_APP, GatewayConfig
from arks_ray.api.model import ArksModel
from arks_ray.autoscaling.config import serve_autoscaling_config
from arks_ray.engines.dynamo import LaunchError, check_frontend_args, check_worker_args, dynamo_namespace
from arks_ray.engines.executor import choose_executor, engine_workers
from arks_ray.engines.vllm_server import FRONTEND_KEY, VLLM_SERVER, check_server_frontend
from arks_ray.render.cluster import WorkerGroup, gpus_per_pod
from arks_ray.render.engine_args import (
    OWNED_FLAGS,
    ArgsError,
    kv_transfer_config,
    parse_engine_args,
    sglang_server_args,
)
from arks_ray.render.models import loader_engine_kwargs
from arks_ray.render.node_cache import cached_path
from arks_ray.render.options import RenderOptions
from arks_ray.render.placement import sglang_placement, strategy_of

GATEWAY_IMPORT = "deployments.gateway:build_app"
ENGINE_IMPORT = "deployments.engines:build_app"
DISAGG_IMPORT = "deployments.disaggregated:build_app"
GATEWAY_DEPLOYMENT = "ArksGateway"

# ray.serve.llm.request_router's PrefixCacheAffinityRouter is a bare subclass of this one, and importing ray.serve.llm
# imports vLLM: seconds in Serve's build task and in every process that routes to the engine (the gateway's).
_PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
ROUTERS = {
    "powerOfTwo": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "prefixCache": _PREFIX_ROUTER,
    "consistentHash": "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
}
_TP_KEY = {"vllm": "tensor_parallel_size", "sglang": "tp_size", "dynamo": "tensor_parallel_size"}
_PP_KEY = {"vllm": "pipeline_parallel_size", "sglang": "pp_size", "dynamo": "pipeline_parallel_size"}
# Arks' disaggregated workloads have no tensorParallelSize: TP (and PP) come through runtimeCommonArgs.
_TP_ALIASES = ("tp", "tp_size", "tensor_parallel_size")
_PP_ALIASES = ("pp_size", "pipeline_parallel_size")
PD_OWNED = {k: v for k, v in OWNED_FLAGS.items() if k not in (*_TP_ALIASES, *_PP_ALIASES)}


def literal_env(env: list[dict[str, Any]] | None) -> dict[str, str]:
    """Plain ``value`` env entries, for the Serve runtime_env (so they apply locally too)."""
    return {str(e["name"]): str(e["value"]) for e in env or [] if "name" in e and "value" in e}


def model_source(model: ArksModel, namespace: str, options: RenderOptions) -> str:
    """Where the engine loads weights: the PVC path in a cluster (the node-local copy when the model has that
    tier); the hub id locally, for hub models."""
    if options.local and model.spec.downloads:
        return model.spec.model
    if not options.local and (node_copy := cached_path(model, namespace)) is not None:
        return node_copy
    return model.model_path(namespace)


def placement(app: ArksApplication, group: WorkerGroup, options: RenderOptions) -> dict[str, Any]:
    """One replica's placement group: TP x PP workers, each bundle pinned to the app's worker group.

    SGLang takes one bundle per pod instead, in its own keys (``arks_ray.render.placement``). A Dynamo
    replica is one bundle holding the whole pod's GPUs: its sidecar processes, not Ray, place the engine
    ranks."""
    spec = app.spec
    gpus = gpus_per_pod(spec.instance_spec)
    strategy = strategy_of(spec)
    if spec.runtime == "sglang":
        return sglang_placement(spec.engine_workers, spec.size, gpus, group.ray_resource, options.bundle_cpus,
                                strategy)
    bundle: dict[str, float] = {group.ray_resource: 1}
    if gpus:
        bundle["GPU"] = gpus if spec.runtime == "dynamo" else 1
    else:
        bundle["CPU"] = options.bundle_cpus
    return {"bundles": [dict(bundle) for _ in range(spec.engine_workers)], "strategy": strategy}


def deployment_config(app: ArksApplication) -> dict[str, Any]:
    spec = app.spec
    out: dict[str, Any] = {}
    if spec.autoscaling is not None:
        # The arks-ray SLO policy (deployments.autoscaling), its windows from the spec.
        out["autoscaling_config"] = serve_autoscaling_config(spec.autoscaling, spec.replicas)
    else:
        out["num_replicas"] = spec.replicas
    if spec.routing is not None:
        out["request_router_config"] = {"request_router_class": ROUTERS[spec.routing.router]}
    return out


def engine_app(
    app: ArksApplication, model: ArksModel, group: WorkerGroup, namespace: str, options: RenderOptions
) -> dict[str, Any]:
    """The Serve application of one ArksApplication. Raises ArgsError on unparseable engine args."""
    spec = app.spec
    source = model_source(model, namespace, options)
    if spec.runtime == "sglang":
        engine_kwargs = sglang_engine_kwargs(app, source)
    else:
        engine_kwargs = parse_engine_args(spec.runtime_common_args)
    if spec.runtime == "vllm":
        engine_kwargs[_TP_KEY[spec.runtime]] = spec.tp
        if spec.pp > 1:
            engine_kwargs[_PP_KEY[spec.runtime]] = spec.pp
        engine_kwargs.update(loader_engine_kwargs(model, engine_kwargs))
    llm_config: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.model_name, "model_source": source},
        "engine_kwargs": engine_kwargs,
        "placement_group_config": placement(app, group, options),
        "deployment_config": deployment_config(app),
    }
    # The group's accelerator: spec.accelerator, or the one its node selector names.
    if group.accelerator:
        llm_config["accelerator_type"] = group.accelerator
    if spec.engine_frontend == VLLM_SERVER:
        if spec.runtime != "vllm":
            raise ArgsError(f"spec.engineFrontend {VLLM_SERVER} is for runtime vllm, not {spec.runtime}")
        try:
            check_server_frontend(engine_kwargs, lora=spec.lora is not None)
        except ValueError as exc:
            raise ArgsError(str(exc)) from None
        llm_config["experimental_configs"] = {FRONTEND_KEY: VLLM_SERVER}
    if spec.runtime == "vllm":
        try:
            choose_executor(llm_config)  # the engine deployment decides again; here an impossible one is refused
        except ValueError as exc:
            raise ArgsError(str(exc)) from None
    if spec.runtime == "sglang" and gpus_per_pod(spec.instance_spec):
        # LLMConfig infers the hardware from vLLM-style "bundles", which SGLang's placement lacks; without
        # this it would take the app for CPU-only and refuse its accelerator_type.
        llm_config["accelerator_config"] = {"kind": "gpu"}
    args: dict[str, Any] = {"name": app.metadata.name, "runtime": spec.runtime, "llm_config": llm_config}
    if spec.runtime == "dynamo":
        args["dynamo"] = dynamo_args(spec.dynamo, spec.runtime_common_args, app.metadata.name, namespace, ("agg",))
    out: dict[str, Any] = {
        "name": app.metadata.name,
        "route_prefix": None,
        "import_path": ENGINE_IMPORT,
        "args": args,
    }
    env = literal_env(spec.instance_spec.env)
    if env:
        out["runtime_env"] = {"env_vars": env}
    return out


def dynamo_args(dyn: Dynamo | None, common_args: list[str], name: str, namespace: str, modes: tuple[str, ...],
                where: str = "spec.runtimeCommonArgs + spec.dynamo.args") -> dict[str, Any]:
    """A Dynamo app's worker engine, its worker args (``runtimeCommonArgs`` then ``dynamo.args``) and
    Dynamo namespace. Raises ArgsError if the args cannot make a worker command line."""
    dyn = dyn or Dynamo()
    worker_args = [*common_args, *dyn.args]
    try:
        check_worker_args(dyn.engine, worker_args, where, modes)
    except LaunchError as exc:
        raise ArgsError(str(exc)) from None
    return {"engine": dyn.engine, "args": worker_args, "namespace": dynamo_namespace(namespace, name)}


def sglang_engine_kwargs(app: ArksApplication, source: str) -> dict[str, Any]:
    """SGLang ``ServerArgs`` of one app: runtimeCommonArgs (CLI aliases resolved) plus what the spec sets.

    ``nnodes`` is the pod count: SGLang's Ray engine lays its ranks out over that many bundles."""
    spec = app.spec
    kwargs = sglang_server_args(spec.runtime_common_args)
    kwargs.update(model_path=source, served_model_name=spec.model_name, tp_size=spec.tp)
    if spec.pp > 1:
        kwargs["pp_size"] = spec.pp
    if spec.size > 1:
        kwargs["nnodes"] = spec.size
    return kwargs


def pd_engine_kwargs(side: DisaggregatedWorkload, runtime: str) -> dict[str, Any]:
    """A PD side's engine kwargs; its --tp/--tp-size/... flags become the runtime's TP/PP keys."""
    kwargs = parse_engine_args(side.runtime_common_args, owned=PD_OWNED)
    for aliases, key in ((_TP_ALIASES, _TP_KEY[runtime]), (_PP_ALIASES, _PP_KEY[runtime])):
        given = [a for a in aliases if a in kwargs]
        if len(given) > 1:
            raise ArgsError(" and ".join(f"--{a.replace('_', '-')}" for a in given) + " set the same thing")
        if given:
            value = kwargs.pop(given[0])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgsError(f"--{given[0].replace('_', '-')} needs a positive integer, got {value!r}")
            kwargs[key] = value
    return kwargs


def pd_world(kwargs: dict[str, Any], runtime: str) -> int:
    """Engine workers (bundles) of one PD replica: TP x PP."""
    return engine_workers(kwargs, _TP_KEY[runtime], _PP_KEY[runtime])


def _pd_side(side: DisaggregatedWorkload, model_id: str, source: str, runtime: str) -> dict[str, Any]:
    return {
        "model_loading_config": {"model_id": model_id, "model_source": source},
        "engine_kwargs": pd_engine_kwargs(side, runtime),
        "deployment_config": {"num_replicas": side.group_replicas},
    }


def disaggregated_app(app: ArksDisaggregatedApplication, model: ArksModel, namespace: str,
                      options: RenderOptions) -> dict[str, Any]:
    """A PD application: prefill and decode engines behind a router. Raises ArgsError on bad args."""
    spec = app.spec
    source = model_source(model, namespace, options)
    args: dict[str, Any] = {
        "name": app.metadata.name,
        "runtime": spec.runtime,
        "prefill": _pd_side(spec.prefill, spec.model_name, source, spec.runtime),
        "decode": _pd_side(spec.decode, spec.model_name, source, spec.runtime),
        "router": {"replicas": spec.router.replicas, "args": list(spec.router.router_args)},
    }
    if spec.runtime == "vllm":
        # Ray's PD needs a KV connector on both sides: the one given (--kv-transfer-config), else NIXL.
        for role in ("prefill", "decode"):
            kwargs = args[role]["engine_kwargs"]
            kwargs["kv_transfer_config"] = kv_transfer_config(kwargs.get("kv_transfer_config"), f"spec.{role}")
    if spec.runtime == "dynamo":
        # Worker args per side, as given (TP/PP flags in any spelling become the engine's own).
        for role in ("prefill", "decode"):
            side_args = getattr(spec, role).runtime_common_args
            args[role]["args"] = list(side_args)
            dynamo_args(spec.dynamo, side_args, app.metadata.name, namespace, (role,),
                        f"spec.{role}.runtimeCommonArgs + spec.dynamo.args")
        args["dynamo"] = dynamo_args(spec.dynamo, [], app.metadata.name, namespace, ("prefill", "decode"))
        try:
            check_frontend_args(spec.router.router_args, "spec.router.routerArgs")
        except LaunchError as exc:
            raise ArgsError(str(exc)) from None
    return {"name": app.metadata.name, "route_prefix": None, "import_path": DISAGG_IMPORT, "args": args}


def gateway_may_scale(config: GatewayConfig, gateway_settings: dict[str, Any]) -> bool:
    """Whether the gateway may run several replicas: its counters are shared (a ``redis_url``), or it counts
    nothing. Otherwise each replica would count rate limits and quotas on its own."""
    return bool(gateway_settings.get("redis_url")) or not config.counts


def gateway_app(config: GatewayConfig, options: RenderOptions) -> dict[str, Any]:
    low, high = options.gateway_replicas if gateway_may_scale(config, options.gateway_settings) else (1, 1)
    return {
        "name": GATEWAY_APP,
        "route_prefix": "/",
        "import_path": GATEWAY_IMPORT,
        "args": {"settings": dict(options.gateway_settings)},
        "deployments": [{
            "name": GATEWAY_DEPLOYMENT,
            # Pinned to the head pod: GPU workers are for engines, and the head is where the proxy is.
            "ray_actor_options": {"num_cpus": options.gateway_cpus, "resources": {options.head_resource: 1}},
            "user_config": config.model_dump(mode="json"),
            "autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 64},
        }],
    }


def serve_config(apps: list[dict[str, Any]], gateway: dict[str, Any]) -> dict[str, Any]:
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},  # noqa: S104 - the pod serves its port
        "applications": [gateway, *sorted(apps, key=lambda a: str(a["name"]))],
    }
