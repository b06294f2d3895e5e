"""``render``: the Arks objects of one namespace in, the RayService and model objects out. Pure.

Called by the CLI (``arks-ray render``), the local runner and the controller. Problems are reported per
object, and an object with an error is left out of the output rather than failing the namespace: one
tenant's typo must not take down everyone else's gateway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from arks_ray.api.application import ArksApplication
from arks_ray.api.digests import TOKEN_KEY_ENV, TOKEN_KEY_NEXT_ENV
from arks_ray.api.disaggregated import ArksDisaggregatedApplication, DisaggregatedWorkload
from arks_ray.api.endpoint import ArksEndpoint
from arks_ray.api.gateway import GATEWAY_APP, GatewayConfig
from arks_ray.api.loading import ArksObject, Loaded, Secret
from arks_ray.api.model import ArksModel
from arks_ray.api.quota import ArksQuota
from arks_ray.api.token import ArksToken
from arks_ray.errors import Problem
from arks_ray.render import accelerators, placement
from arks_ray.render.cluster import (
    PodShape,
    WorkerGroup,
    gpus_per_pod,
    needs_new_cluster,
    order_groups,
    previous_groups,
    ray_resources,
)
from arks_ray.render.engine_args import ArgsError
from arks_ray.render.gang import gang_labels
from arks_ray.render.gateway_config import compile_gateway
from arks_ray.render.lora import apply_lora
from arks_ray.render.models import render_download_job, render_pvc
from arks_ray.render.names import MANAGED_BY, RAYSERVICE_NAME, digest
from arks_ray.render.network_policy import network_policy
from arks_ray.render.node_cache import node_cache_of, preload_daemonset
from arks_ray.render.options import RenderOptions
from arks_ray.render.serve_config import (
    disaggregated_app,
    engine_app,
    gateway_app,
    pd_engine_kwargs,
    pd_world,
    serve_config,
)
from arks_ray.render.validation import app_warnings, disaggregated_errors

SPEC_HASH_ANNOTATION = "arks.ai/spec-hash"
AnyApp = ArksApplication | ArksDisaggregatedApplication


@dataclass
class Rendered:
    """Everything rendered for one namespace."""

    namespace: str
    rayservice: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)
    serve_config: dict[str, Any] = field(default_factory=dict)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    problems: list[Problem] = field(default_factory=list)
    serve_apps: dict[str, str] = field(default_factory=dict)
    """Serve application name -> the Arks object (``Kind/name``) it was rendered from."""
    network_policy: dict[str, Any] | None = None
    """Who may connect to the namespace's Ray pods (``arks_ray.render.network_policy``); None: not rendered."""

    @property
    def manifests(self) -> list[dict[str, Any]]:
        policy = [self.network_policy] if self.network_policy is not None else []
        return [self.rayservice, *policy, *self.children]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


@dataclass
class _Groups:
    wanted: dict[str, WorkerGroup] = field(default_factory=dict)

    def place(self, shape: PodShape, app: str, min_pods: int, max_pods: int) -> WorkerGroup:
        name = shape.group_name()
        group = self.wanted.get(name)
        if group is None:
            group = self.wanted[name] = WorkerGroup(name=name, template=shape.template(name),
                                                    accelerator=shape.accelerator)
        group.min_pods += min_pods
        group.max_pods += max_pods
        group.apps.append(app)
        return group


def _shape(app: AnyApp, runtime: str, inst: Any, model: ArksModel, accelerator: str | None,
           options: RenderOptions, role: str | None = None) -> PodShape:
    spec = app.spec
    return PodShape(
        image=spec.runtime_image or options.runtime_images[runtime],
        instance=inst,
        image_pull_secrets=tuple(r.name for r in spec.runtime_image_pull_secrets),
        model_pvc=model.pvc_name(),
        accelerator=accelerator,
        app=app.metadata.name,
        role=role,
        node_cache=None if options.local else node_cache_of(model, app.metadata.namespace or "default",
                                                            options.downloader_image),
    )


def _instances(app: AnyApp) -> list[Any]:
    """The instanceSpecs of an app's pods (both sides of a PD app)."""
    if isinstance(app, ArksApplication):
        return [app.spec.instance_spec]
    return [app.spec.prefill.instance_spec, app.spec.decode.instance_spec]


def _app_problems(app: AnyApp, models: Mapping[str, ArksModel], names: set[str]) -> list[Problem]:
    kind, name = app.kind, app.metadata.name
    out = []
    if name == GATEWAY_APP:
        out.append(Problem(kind, name, "metadata.name", f"{GATEWAY_APP!r} is reserved for the gateway application"))
    if name in names:
        out.append(Problem(kind, name, "metadata.name", "an application of another kind has the same name"))
    if app.spec.model.name not in models:
        out.append(Problem(kind, name, "spec.model.name", f"ArksModel {app.spec.model.name!r} not found"))
    return out


def _render_app(app: ArksApplication, model: ArksModel, groups: _Groups, namespace: str,
                options: RenderOptions) -> tuple[dict[str, Any] | None, list[Problem]]:
    spec, name = app.spec, app.metadata.name
    gpus = gpus_per_pod(spec.instance_spec)
    problems = [Problem("ArksApplication", name, path, message, severity) for path, message, severity
                in placement.problems(spec.runtime, spec.engine_workers, spec.size, gpus, placement.strategy_of(spec))]
    accelerator = accelerators.resolve(spec.accelerator, spec.instance_spec.node_selector, gpus)
    wrong = accelerators.problem(accelerator, gpus) if accelerator else None
    if wrong:
        problems.append(Problem("ArksApplication", name, "spec.accelerator", wrong))
    if any(p.severity == "error" for p in problems):
        return None, problems
    shape = _shape(app, spec.runtime, spec.instance_spec, model, accelerator, options)
    low, high = (spec.autoscaling.min_replicas, spec.autoscaling.max_replicas) if spec.autoscaling else (
        spec.replicas, spec.replicas)
    # Validate engine args before placing, so a bad app leaves no worker group behind.
    try:
        probe = WorkerGroup(name=shape.group_name(), template={}, accelerator=accelerator)
        engine_app(app, model, probe, namespace, options)
    except ArgsError as exc:
        return None, [*problems, Problem("ArksApplication", name, "spec.runtimeCommonArgs", str(exc))]
    group = groups.place(shape, name, low * spec.size, high * spec.size)
    return engine_app(app, model, group, namespace, options), problems


def _render_disaggregated(app: ArksDisaggregatedApplication, model: ArksModel, groups: _Groups, namespace: str,
                          options: RenderOptions) -> tuple[dict[str, Any] | None, list[Problem]]:
    spec, name = app.spec, app.metadata.name
    refused = disaggregated_errors(app)
    if refused:
        return None, refused
    for role in ("prefill", "decode"):
        try:
            pd_engine_kwargs(getattr(spec, role), spec.runtime)
        except ArgsError as exc:
            return None, [Problem(app.kind, name, f"spec.{role}.runtimeCommonArgs", str(exc))]
    try:
        rendered = disaggregated_app(app, model, namespace, options)
    except ArgsError as exc:
        return None, [Problem(app.kind, name, "spec", str(exc))]
    runtime = "dynamo" if spec.runtime == "dynamo" else spec.runtime
    sides: list[tuple[str, DisaggregatedWorkload]] = [("prefill", spec.prefill), ("decode", spec.decode)]
    for role, side in sides:
        shape = _shape(app, runtime, side.instance_spec, model, None, options, role)
        pods = side.group_replicas * side.size
        group = groups.place(shape, f"{name}/{role}", pods, pods)
        bundle = {group.ray_resource: 1, **({"GPU": 1} if gpus_per_pod(side.instance_spec) else
                                            {"CPU": options.bundle_cpus})}
        world = pd_world(rendered["args"][role]["engine_kwargs"], spec.runtime)
        rendered["args"][role]["placement_group_config"] = {
            "bundles": [dict(bundle) for _ in range(world)],
            "strategy": "PACK",
        }
    notes = []
    if spec.runtime == "vllm" and (spec.router.router_args or spec.router.command_override):
        notes.append(Problem(app.kind, name, "spec.router", "ignored for runtime vllm: each decode replica "
                             "sends the prefill to a prefill replica itself, through Serve", "warning"))
    return rendered, notes


def _secret_env(options: RenderOptions) -> list[dict[str, Any]]:
    """The gateway's secrets, from the namespace's Secret (written by the operator, never rendered)."""
    entries = ((TOKEN_KEY_ENV, "token-key", False), (TOKEN_KEY_NEXT_ENV, "token-key-next", True),
               ("ARKS_REDIS_PASSWORD", "redis-password", True))
    out = []
    for env, key, optional in entries:
        ref: dict[str, Any] = {"name": options.gateway_secret, "key": key}
        if optional:
            ref["optional"] = True
        out.append({"name": env, "valueFrom": {"secretKeyRef": ref}})
    return out


def _env_list(env: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in env.items()]


def _add_env(template: dict[str, Any], env: Mapping[str, str]) -> None:
    """``env`` into each container of a pod template, after what the app set itself (which wins)."""
    for container in (template.get("spec") or {}).get("containers") or []:
        own = list(container.get("env") or [])
        names = {e.get("name") for e in own}
        added = [e for e in _env_list(env) if e["name"] not in names]
        if added:
            container["env"] = added + own


def _head(options: RenderOptions) -> dict[str, Any]:
    ports = [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000), ("metrics", 8080)]
    return {
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",  # noqa: S104
            "num-gpus": "0",
            "resources": ray_resources({options.head_resource: options.group_resource_units}),
        },
        "template": {
            "metadata": {"labels": dict(MANAGED_BY)},
            "spec": {"containers": [{
                "name": "ray-head",
                "image": options.head_image,
                "imagePullPolicy": "IfNotPresent",
                "resources": options.head_resources,
                "env": [*_env_list(options.ray_env), *_secret_env(options)],
                "ports": [{"name": n, "containerPort": p} for n, p in ports],
            }]},
        },
    }


def render_namespace(
    objects: Iterable[ArksObject],
    namespace: str,
    *,
    secrets: Iterable[Secret] = (),
    previous: dict[str, Any] | None = None,
    options: RenderOptions | None = None,
) -> Rendered:
    """Render one namespace. ``previous`` is the last applied RayService, whose worker-group order is kept."""
    options = options or RenderOptions()
    objs = [o for o in objects if (o.metadata.namespace or "default") == namespace]
    models = {o.metadata.name: o for o in objs if isinstance(o, ArksModel)}
    apps = sorted((o for o in objs if isinstance(o, ArksApplication | ArksDisaggregatedApplication)),
                  key=lambda a: (a.kind, a.metadata.name))
    problems: list[Problem] = []
    groups = _Groups()
    serve_apps: list[dict[str, Any]] = []
    origins: dict[str, str] = {}
    good_apps: list[AnyApp] = []
    for app in apps:
        found = _app_problems(app, models, set(origins))
        problems += found
        if found:
            continue
        problems += app_warnings(app)
        model = models[app.spec.model.name]
        if isinstance(app, ArksApplication):
            rendered, found = _render_app(app, model, groups, namespace, options)
            if rendered is not None:
                found += apply_lora(rendered, app, models, namespace, options)
        else:
            rendered, found = _render_disaggregated(app, model, groups, namespace, options)
        problems += found
        if rendered is not None:
            serve_apps.append(rendered)
            origins[app.metadata.name] = f"{app.kind}/{app.metadata.name}"
            good_apps.append(app)

    gateway, found = compile_gateway(
        namespace, good_apps,
        [o for o in objs if isinstance(o, ArksEndpoint)],
        [o for o in objs if isinstance(o, ArksToken)],
        [o for o in objs if isinstance(o, ArksQuota)],
        {(s.namespace, s.name): s for s in secrets},
        options.token_keys,
    )
    problems += found
    config = serve_config(serve_apps, gateway_app(gateway, options))

    children: list[dict[str, Any]] = []
    for model in sorted(models.values(), key=lambda m: m.metadata.name):
        users = [inst for app in apps if app.spec.model.name == model.metadata.name for inst in _instances(app)]
        preload = None if options.local else preload_daemonset(model, namespace, options.downloader_image, users)
        for child in (render_pvc(model, namespace),
                      render_download_job(model, namespace, options.downloader_image), preload):
            if child is not None:
                children.append(child)

    cluster: dict[str, Any] = {
        "rayVersion": options.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "headGroupSpec": _head(options),
    }
    for group in groups.wanted.values():
        _add_env(group.template, options.ray_env)
    before = previous_groups(previous)
    cluster["workerGroupSpecs"] = order_groups(groups.wanted, before, options.group_resource_units)
    if before and needs_new_cluster(((previous or {}).get("spec") or {}).get("rayClusterConfig"), cluster):
        # KubeRay builds a new RayCluster for this spec anyway: the moment to drop retired groups.
        cluster["workerGroupSpecs"] = order_groups(groups.wanted, before, options.group_resource_units, compact=True)
    spec: dict[str, Any] = {
        "upgradeStrategy": {"type": options.upgrade_strategy},
        "serveConfigV2": yaml.safe_dump(config, sort_keys=False, width=1 << 16),
        "rayClusterConfig": cluster,
    }
    labels, found = gang_labels(good_apps, options.gang_scheduler, namespace, previous)
    problems += found
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": RAYSERVICE_NAME,
            "namespace": namespace,
            "labels": {**labels, **MANAGED_BY},
            "annotations": {"ray.io/initializing-timeout": "30m", SPEC_HASH_ANNOTATION: digest([spec, labels], 16)},
        },
        "spec": spec,
    }
    access = None if options.local else options.network_access
    if access is not None and (host := _host_network_apps(groups, good_apps)):
        # NetworkPolicies do not hold hostNetwork pods (most CNIs see their traffic as the node's): a policy
        # would cut them off from the other Ray pods, so the namespace gets none, and says why.
        problems += [Problem(app.kind, app.metadata.name,
                             "spec.instanceSpec.hostNetwork" if isinstance(app, ArksApplication) else "spec",
                             "hostNetwork pods are outside NetworkPolicies: the namespace's Ray pods get no "
                             "arks-ray-cluster policy, so any pod reaches their ports", "warning") for app in host]
        access = None
    policy = network_policy(namespace, access) if access is not None else None
    return Rendered(namespace, rayservice, children, config, gateway, problems, origins, policy)


def _host_network_apps(groups: _Groups, apps: list[AnyApp]) -> list[AnyApp]:
    names = {name for group in groups.wanted.values() if (group.template.get("spec") or {}).get("hostNetwork")
             for name in group.apps}
    return [app for app in apps if app.metadata.name in names]


def render(loaded: Loaded, *, previous: Mapping[str, dict[str, Any]] | None = None,
           options: RenderOptions | None = None) -> list[Rendered]:
    """Render every namespace found among the loaded objects."""
    out = []
    for ns in loaded.namespaces():
        out.append(render_namespace(loaded.objects, ns, secrets=loaded.secrets,
                                    previous=(previous or {}).get(ns), options=options))
    return out
