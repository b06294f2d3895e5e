"""Worker groups: engine pods keyed by application and pod shape, in append-only stable order.

Called by ``arks_ray.render.rayservice``. Each app (each role of a PD app) has its own group per pod
shape, and its pods carry ``arks.ai/application`` (and ``arks.ai/role``), so ``kubectl get pods -l
arks.ai/application=<app>`` lists exactly the pods serving it: the group's custom Ray resource, which only
its pods advertise and every bundle of the app asks for, keeps other apps' replicas off them.

KubeRay v1.7 updates a RayCluster in place only when new groups are appended after the existing ones
(replica counts aside), so a group's position never changes, a changed app gets a new group at the end,
and a group no app uses any more stays, scaled to zero, until KubeRay builds a new RayCluster anyway
(``needs_new_cluster``): then retired groups are dropped (README, "Per-app pods").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from arks_ray.api.common import RESERVED_MOUNT_PATH, RESERVED_VOLUME, InstanceSpec
from arks_ray.render.names import MANAGED_BY, MAX_LABEL, digest, dns_label, label_value
from arks_ray.render.node_cache import NodeCache

GPU_RESOURCE = "nvidia.com/gpu"
APP_LABEL = "arks.ai/application"
ROLE_LABEL = "arks.ai/role"
GROUP_RESOURCE_PREFIX = "arks-wg-"

# InstanceSpec fields that land on the pod spec, with their pod-spec names where they differ.
POD_FIELDS: dict[str, str] = {
    "termination_grace_period_seconds": "terminationGracePeriodSeconds",
    "active_deadline_seconds": "activeDeadlineSeconds",
    "dns_policy": "dnsPolicy",
    "dns_config": "dnsConfig",
    "automount_service_account_token": "automountServiceAccountToken",
    "node_name": "nodeName",
    "host_network": "hostNetwork",
    "host_pid": "hostPID",
    "host_ipc": "hostIPC",
    "share_process_namespace": "shareProcessNamespace",
    "pod_security_context": "securityContext",
    "subdomain": "subdomain",
    "host_aliases": "hostAliases",
    "priority_class_name": "priorityClassName",
    "priority": "priority",
    "runtime_class_name": "runtimeClassName",
    "enable_service_links": "enableServiceLinks",
    "preemption_policy": "preemptionPolicy",
    "overhead": "overhead",
    "topology_spread_constraints": "topologySpreadConstraints",
    "set_hostname_as_fqdn": "setHostnameAsFQDN",
    "os": "os",
    "host_users": "hostUsers",
    "scheduling_gates": "schedulingGates",
    "resource_claims": "resourceClaims",
    "node_selector": "nodeSelector",
    "affinity": "affinity",
    "scheduler_name": "schedulerName",
    "tolerations": "tolerations",
    "service_account_name": "serviceAccountName",
    "init_containers": "initContainers",
}
CONTAINER_FIELDS: dict[str, str] = {
    "security_context": "securityContext",
    "resources": "resources",
    "liveness_probe": "livenessProbe",
    "readiness_probe": "readinessProbe",
    "startup_probe": "startupProbe",
    "lifecycle": "lifecycle",
}


def gpus_per_pod(spec: InstanceSpec) -> int:
    """GPUs one pod asks for (limits win over requests, as Kubernetes requires them equal)."""
    res = spec.resources or {}
    for section in ("limits", "requests"):
        value = (res.get(section) or {}).get(GPU_RESOURCE)
        if value is not None:
            try:
                return int(str(value))
            except ValueError:
                return 0
    return 0


@dataclass(frozen=True)
class PodShape:
    """Everything that makes a worker pod what it is, and the app (and PD role) it serves."""

    image: str
    instance: InstanceSpec
    image_pull_secrets: tuple[str, ...] = ()
    model_pvc: str | None = None
    accelerator: str | None = None
    app: str = ""
    role: str | None = None
    node_cache: NodeCache | None = None
    """The model's node-local tier: a hostPath, and an init container copying the model onto it."""

    def template(self, group: str) -> dict[str, Any]:
        inst = self.instance
        container: dict[str, Any] = {"name": "ray-worker", "image": self.image, "imagePullPolicy": "IfNotPresent"}
        for attr, key in CONTAINER_FIELDS.items():
            value = getattr(inst, attr)
            if value is not None:
                container[key] = value
        if inst.env:
            container["env"] = list(inst.env)
        mounts = list(inst.volume_mounts or [])
        volumes = list(inst.volumes or [])
        if self.model_pvc:
            mounts.insert(0, {"name": RESERVED_VOLUME, "mountPath": RESERVED_MOUNT_PATH, "readOnly": True})
            volumes.insert(0, {"name": RESERVED_VOLUME,
                               "persistentVolumeClaim": {"claimName": self.model_pvc, "readOnly": True}})
        if self.node_cache:
            mounts.insert(1, self.node_cache.mount(read_only=True))
            volumes.insert(1, self.node_cache.volume())
        if mounts:
            container["volumeMounts"] = mounts
        pod: dict[str, Any] = {"containers": [container]}
        if volumes:
            pod["volumes"] = volumes
        for attr, key in POD_FIELDS.items():
            value = getattr(inst, attr)
            if value is not None:
                pod[key] = value
        if self.node_cache:
            pod["initContainers"] = [self.node_cache.init_container(), *pod.get("initContainers", [])]
        if self.image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": n} for n in self.image_pull_secrets]
        labels = {**(inst.labels or {}), **MANAGED_BY, "arks.ai/worker-group": group,
                  APP_LABEL: label_value(self.app)}
        if self.role:
            labels[ROLE_LABEL] = self.role
        meta: dict[str, Any] = {"labels": labels}
        if inst.annotations:
            meta["annotations"] = dict(inst.annotations)
        return {"metadata": meta, "spec": pod}

    def key(self) -> str:
        """A digest of the pod as it would run (group name aside)."""
        return digest(self.template(""), 10)

    def group_name(self) -> str:
        gpus = gpus_per_pod(self.instance)
        kind = (self.accelerator or "gpu").lower() + str(gpus) if gpus else "cpu"
        app = dns_label(self.app, max_len=24) if self.app else ""
        return dns_label(app, self.role or "", kind[:12], self.key(), max_len=MAX_LABEL - len(GROUP_RESOURCE_PREFIX))


@dataclass
class WorkerGroup:
    """One rendered worker group and the apps placed on it."""

    name: str
    template: dict[str, Any]
    accelerator: str | None = None
    min_pods: int = 0
    max_pods: int = 0
    apps: list[str] = field(default_factory=list)

    @property
    def ray_resource(self) -> str:
        """The custom Ray resource only this group's pods advertise; engine bundles ask for it."""
        return GROUP_RESOURCE_PREFIX + self.name

    def spec(self, units: int) -> dict[str, Any]:
        resources: dict[str, int] = {self.ray_resource: units}
        if self.accelerator:
            resources[f"accelerator_type:{self.accelerator}"] = units
        params = {"resources": ray_resources(resources)}
        return {
            "groupName": self.name,
            "replicas": self.min_pods,
            "minReplicas": self.min_pods,
            "maxReplicas": self.max_pods,
            "rayStartParams": params,
            "template": self.template,
        }


def ray_resources(resources: dict[str, int]) -> str:
    """A ``rayStartParams.resources`` value: JSON, quoted the way KubeRay passes it to ``ray start``."""
    return '"' + json.dumps(resources, sort_keys=True).replace('"', '\\"') + '"'


def parse_ray_resources(value: str) -> dict[str, float]:
    """The inverse of ``ray_resources``."""
    parsed: dict[str, float] = json.loads(value.strip('"').replace('\\"', '"'))
    return parsed


def previous_groups(rayservice: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The worker groups of a previously rendered (or live) RayService, in order."""
    if not rayservice:
        return []
    cluster = (rayservice.get("spec") or {}).get("rayClusterConfig") or {}
    return list(cluster.get("workerGroupSpecs") or [])


def order_groups(
    wanted: dict[str, WorkerGroup], previous: list[dict[str, Any]], units: int, *, compact: bool = False
) -> list[dict[str, Any]]:
    """Previous groups keep their place (retired ones drop to zero pods, or go when ``compact``); new
    groups are appended."""
    wanted = dict(wanted)
    out: list[dict[str, Any]] = []
    for old in previous:
        name = old.get("groupName", "")
        if name in wanted:
            out.append(wanted.pop(name).spec(units))
        elif not compact:
            out.append({**old, "replicas": 0, "minReplicas": 0, "maxReplicas": 0})
    out.extend(group.spec(units) for _, group in sorted(wanted.items()))
    return out


# Fields KubeRay v1.7 leaves out of its cluster hash (GenerateHashWithoutReplicasAndWorkersToDelete).
_UNHASHED_GROUP = ("replicas", "minReplicas", "maxReplicas")
_UNHASHED_POD = ("tolerations", "schedulingGates")


def _hashed(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(config))
    out.pop("upgradeStrategy", None)
    out.pop("suspend", None)
    for spec in [out.get("headGroupSpec") or {}, *(out.get("workerGroupSpecs") or [])]:
        for key in _UNHASHED_GROUP:
            spec.pop(key, None)
        (spec.get("scaleStrategy") or {}).pop("workersToDelete", None)
        for key in _UNHASHED_POD:
            ((spec.get("template") or {}).get("spec") or {}).pop(key, None)
    return out


def _within(new: Any, old: Any) -> bool:
    """Every value ``new`` sets is the same in ``old`` (which may hold defaults the API server added)."""
    if isinstance(new, dict):
        return isinstance(old, dict) and all(k in old and _within(v, old[k]) for k, v in new.items())
    if isinstance(new, list):
        return isinstance(old, list) and len(new) == len(old) and all(map(_within, new, old))
    return bool(new == old)


def needs_new_cluster(previous: dict[str, Any] | None, config: dict[str, Any]) -> bool:
    """Whether KubeRay v1.7 would build a new RayCluster for ``config`` (a ``rayClusterConfig``) over the
    previous one: anything but replica counts changed in the head or in the groups that exist already,
    or a group went away (KubeRay's ``isClusterSpecHashEqual`` with ``partial``)."""
    if not previous:
        return False
    old, new = _hashed(previous), _hashed(config)
    kept = len(old.get("workerGroupSpecs") or [])
    groups = new.get("workerGroupSpecs") or []
    if len(groups) < kept:
        return True
    new["workerGroupSpecs"] = groups[:kept]
    return not _within(new, old)
