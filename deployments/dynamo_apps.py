"""Dynamo application builders: the Serve apps of ``runtime: dynamo`` ArksApplications and
ArksDisaggregatedApplications, from the ``args`` the renderer wrote.

Called by ``deployments.engines.build_app`` (``build_dynamo``) and ``deployments.disaggregated.build_app``
(``build_dynamo_pd``). The replicas themselves are ``deployments.dynamo_engine``'s.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from arks_ray.engines import dynamo
from deployments.dynamo_engine import DynamoServer, DynamoWorker, SidecarConfig

if TYPE_CHECKING:
    from ray.serve import Application

    from deployments.engines import EngineAppArgs

DEFAULT_MAX_ONGOING = 256


def actor_options(bundles: list[dict[str, float]], accelerator: str | None = None) -> dict[str, Any]:
    """A replica's Ray resources: its placement bundles in one, since its sidecars, not Ray, place the ranks."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0) + value
    out: dict[str, Any] = {"num_cpus": total.pop("CPU", 0), "num_gpus": total.pop("GPU", 0)}
    if total:
        out["resources"] = total
    if accelerator:
        out["accelerator_type"] = accelerator
    return out


def _deployment_options(deployment_config: dict[str, Any]) -> dict[str, Any]:
    return {"max_ongoing_requests": DEFAULT_MAX_ONGOING, **deployment_config}


def build_dynamo(args: EngineAppArgs) -> Application:
    """The app of one ArksApplication with ``runtime: dynamo``: replicas running frontend + worker."""

    llm, dyn = args.llm_config, args.dynamo or {}
    try:
        model = llm["model_loading_config"]
        config = SidecarConfig(app=args.name, engine=dyn.get("engine", "vllm"), model_path=model["model_source"],
                               served_name=model["model_id"], namespace=dyn.get("namespace") or args.name,
                               run_id=uuid.uuid4().hex[:8], worker_args=list(dyn.get("args", [])))
        options = actor_options(llm["placement_group_config"]["bundles"], llm.get("accelerator_type"))
    except (KeyError, TypeError, AttributeError, ValidationError) as exc:
        raise ValueError(f"application {args.name}: invalid Dynamo args ({type(exc).__name__}: {exc})") from None
    _check(config)
    deployment = _deployment(DynamoServer).options(
        name="DynamoServer", ray_actor_options=options, **_deployment_options(llm.get("deployment_config", {})))
    app: Application = deployment.bind(config.model_dump())
    return app


def _check(config: SidecarConfig) -> None:
    """Fail the deploy early, naming the app, if the sidecars' command lines cannot be built."""
    try:
        cluster = dynamo.Cluster(file_dir="/")
        if config.run_worker:
            dynamo.worker_spec("python", config.engine, config.model_path, config.served_name, cluster,
                               mode=config.mode, args=config.worker_args)
        if config.run_frontend:
            dynamo.frontend_spec("python", 1, cluster, config.frontend_args)
    except dynamo.LaunchError as exc:
        raise ValueError(f"application {config.app}: {exc}") from None


def build_dynamo_pd(raw: dict[str, Any]) -> Application:
    """A Dynamo PD app: prefill and decode worker deployments behind frontend replicas (the ingress)."""
    try:
        return _build_pd(raw)
    except (KeyError, TypeError, AttributeError, ValidationError) as exc:
        raise ValueError(f"application {raw.get('name', '?')}: invalid Dynamo PD args "
                         f"({type(exc).__name__}: {exc})") from None


def _build_pd(raw: dict[str, Any]) -> Application:

    name, dyn = raw["name"], raw.get("dynamo") or {}
    common = {"app": name, "engine": dyn.get("engine", "vllm"), "namespace": dyn.get("namespace") or name,
              "run_id": uuid.uuid4().hex[:8]}
    handles = []
    for role, deployment_name in (("prefill", "DynamoPrefill"), ("decode", "DynamoDecode")):
        side = raw[role]
        model = side["model_loading_config"]
        config = SidecarConfig(**common, model_path=model["model_source"], served_name=model["model_id"], mode=role,
                               worker_args=[*side.get("args", []), *dyn.get("args", [])], run_frontend=False)
        _check(config)
        options = actor_options(side["placement_group_config"]["bundles"])
        handles.append(_deployment(DynamoWorker).options(
            name=deployment_name, ray_actor_options=options, **side.get("deployment_config", {})
        ).bind(config.model_dump()))
    decode = raw["decode"]
    frontend = SidecarConfig(**common, model_path=decode["model_loading_config"]["model_source"],
                             served_name=decode["model_loading_config"]["model_id"], run_worker=False,
                             expect_prefill=True, frontend_args=list(raw.get("router", {}).get("args", [])))
    _check(frontend)
    # The frontend needs Dynamo's image: it rides on the decode group (a share of the group's resource only).
    group = {k: 1 for b in decode["placement_group_config"]["bundles"] for k in b if k not in ("CPU", "GPU")}
    replicas = max(1, int(raw.get("router", {}).get("replicas", 1)))
    ingress = _deployment(DynamoServer).options(
        name="DynamoFrontend", num_replicas=replicas, max_ongoing_requests=DEFAULT_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0.5, **({"resources": group} if group else {})})
    app: Application = ingress.bind(frontend.model_dump(), handles)
    return app


def _deployment(cls: type) -> Any:
    """``serve.deployment`` on a class (typed loosely: Serve's overloads do not cover async constructors)."""
    from ray import serve

    return serve.deployment(cls)
