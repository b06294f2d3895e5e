"""Types shared by every Arks kind: the strict spec base, object metadata, references, conditions.

Used by the per-kind modules in ``arks_ray.api``; nothing here does I/O.

Field names are snake_case in Python and camelCase on the wire (the Arks CRDs' spelling). Specs are
strict (``extra="forbid"``): an unknown field is an error naming its path, never silently dropped.
Deprecated Arks fields are declared, accepted, and reported as warnings through the validation
context (see :func:`warn`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel

GROUP = "arks.ai"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Kubernetes objects we pass through untouched (pod template pieces, PVC specs, Gateway API matches).
KubeObject = dict[str, Any]


class Spec(BaseModel):
    """Base of every spec model: strict, camelCase on the wire, populated by either name."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=False,
    )


class Status(BaseModel):
    """Base of status models: tolerant, because other writers (kubectl, older versions) share them."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


def warn(info: ValidationInfo, path: str, message: str) -> None:
    """Record a non-fatal problem for the loader to report; a no-op without a validation context."""
    ctx = info.context
    if isinstance(ctx, dict) and isinstance(ctx.get("warnings"), list):
        ctx["warnings"].append((path, message))


class ObjectMeta(BaseModel):
    """The parts of Kubernetes ``metadata`` arks-ray reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    name: str = Field(description="Object name, a DNS-1123 subdomain.", pattern=DNS1123_SUBDOMAIN.pattern,
                      max_length=253)
    namespace: str | None = Field(None, description="Namespace; the renderer's default applies if empty.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
    uid: str | None = Field(None, description="UID assigned by the API server.")
    generation: int | None = Field(None, description="Spec generation assigned by the API server.")
    creation_timestamp: datetime | None = Field(None, description="Creation time.")


class LocalObjectReference(Spec):
    """A reference to an object in the same namespace."""

    name: str = Field(description="Name of the referenced object.", min_length=1)


class SecretKeyReference(Spec):
    """A key of a Secret in the same namespace."""

    name: str = Field(description="Name of the Secret.", min_length=1)
    key: str = Field("token", description="Key inside the Secret's data.")


class Condition(Status):
    """A status condition, as in ``metav1.Condition``."""

    type: str = Field(description="Condition type, e.g. Precheck, Loaded, Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    last_transition_time: datetime | None = Field(None, description="When the status last changed.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable details.")
    observed_generation: int | None = Field(None, description="The spec generation this reflects.")


class KubeScheduling(Spec):
    """Gang scheduling through kubernetes-sigs/scheduler-plugins coscheduling."""

    schedule_timeout_seconds: int = Field(60, ge=1, description="PodGroup schedule timeout.")


class VolcanoScheduling(Spec):
    """Gang scheduling through Volcano."""

    priority_class_name: str = Field("", description="Volcano PodGroup priority class.")
    queue: str = Field("", description="Volcano queue.")


class PodGroupPolicy(Spec):
    """Gang scheduling for all pods of one inference group (Arks passes it to its workload)."""

    kube_scheduling: KubeScheduling | None = Field(None, description="Use scheduler-plugins coscheduling.")
    volcano_scheduling: VolcanoScheduling | None = Field(None, description="Use Volcano.")


RESERVED_VOLUME = "models"
RESERVED_MOUNT_PATH = "/models"


def _k(description: str) -> Any:
    """A pass-through Kubernetes field: kept verbatim, validated by the API server's own types."""
    return Field(None, description=description)


class InstanceSpec(Spec):
    """Pod template pieces for engine pods (Arks' ArksInstanceSpec). Kept verbatim and applied to the
    Ray worker pods that host the application."""

    termination_grace_period_seconds: int | None = _k("Pod terminationGracePeriodSeconds.")
    active_deadline_seconds: int | None = _k("Pod activeDeadlineSeconds.")
    dns_policy: str | None = _k("Pod dnsPolicy.")
    dns_config: KubeObject | None = _k("Pod dnsConfig.")
    automount_service_account_token: bool | None = _k("Pod automountServiceAccountToken.")
    node_name: str | None = _k("Pod nodeName.")
    host_network: bool | None = _k("Pod hostNetwork.")
    host_pid: bool | None = Field(None, alias="hostPID", description="Pod hostPID.")
    host_ipc: bool | None = Field(None, alias="hostIPC", description="Pod hostIPC.")
    share_process_namespace: bool | None = _k("Pod shareProcessNamespace.")
    pod_security_context: KubeObject | None = _k("Pod securityContext.")
    subdomain: str | None = _k("Pod subdomain.")
    host_aliases: list[KubeObject] | None = _k("Pod hostAliases.")
    priority_class_name: str | None = _k("Pod priorityClassName.")
    priority: int | None = _k("Pod priority.")
    runtime_class_name: str | None = _k("Pod runtimeClassName.")
    enable_service_links: bool | None = _k("Pod enableServiceLinks.")
    preemption_policy: str | None = _k("Pod preemptionPolicy.")
    overhead: KubeObject | None = _k("Pod overhead.")
    topology_spread_constraints: list[KubeObject] | None = _k("Pod topologySpreadConstraints.")
    set_hostname_as_fqdn: bool | None = Field(None, alias="setHostnameAsFQDN",
                                              description="Pod setHostnameAsFQDN.")
    os: KubeObject | None = _k("Pod os.")
    host_users: bool | None = _k("Pod hostUsers.")
    scheduling_gates: list[KubeObject] | None = _k("Pod schedulingGates.")
    resource_claims: list[KubeObject] | None = _k("Pod resourceClaims.")
    security_context: KubeObject | None = _k("Engine container securityContext.")
    resources: KubeObject | None = _k("Engine container resources (requests/limits), per pod.")
    labels: dict[str, str] | None = _k("Pod template labels.")
    annotations: dict[str, str] | None = _k("Pod template annotations.")
    env: list[KubeObject] | None = _k("Engine container env.")
    volume_mounts: list[KubeObject] | None = _k("Engine container volumeMounts.")
    volumes: list[KubeObject] | None = _k("Pod volumes.")
    node_selector: dict[str, str] | None = _k("Pod nodeSelector.")
    affinity: KubeObject | None = _k("Pod affinity.")
    scheduler_name: str | None = _k("Pod schedulerName.")
    tolerations: list[KubeObject] | None = _k("Pod tolerations.")
    liveness_probe: KubeObject | None = _k("Engine container livenessProbe.")
    readiness_probe: KubeObject | None = _k("Engine container readinessProbe.")
    startup_probe: KubeObject | None = _k("Engine container startupProbe.")
    lifecycle: KubeObject | None = _k("Engine container lifecycle hooks (Arks accepted and ignored "
                                      "this; arks-ray applies it).")
    service_account_name: str | None = _k("Pod serviceAccountName.")
    init_containers: list[KubeObject] | None = _k("Pod initContainers.")
    replicas: int | None = Field(
        None,
        description="Deprecated (Arks v0.1 nodes per group); accepted and ignored. Use spec.size.",
        json_schema_extra={"deprecated": True},
    )

    @model_validator(mode="after")
    def _reserved_names(self) -> InstanceSpec:
        # Arks' precheck: the model volume and its mount path belong to ArksModel.
        for i, vol in enumerate(self.volumes or []):
            if vol.get("name") == RESERVED_VOLUME:
                raise ValueError(f"volumes[{i}].name: volume name {RESERVED_VOLUME!r} is reserved for ArksModel")
        for i, mount in enumerate(self.volume_mounts or []):
            if mount.get("name") == RESERVED_VOLUME:
                raise ValueError(
                    f"volumeMounts[{i}].name: volume name {RESERVED_VOLUME!r} is reserved for ArksModel")
            if str(mount.get("mountPath", "")).rstrip("/") == RESERVED_MOUNT_PATH:
                raise ValueError(
                    f"volumeMounts[{i}].mountPath: {RESERVED_MOUNT_PATH!r} is reserved for ArksModel")
        return self


def warn_instance_replicas(info: ValidationInfo, path: str, inst: InstanceSpec | None) -> None:
    """Report Arks v0.1's ``instanceSpec.replicas`` at ``path`` (the owner knows where its instanceSpec is)."""
    if inst is not None and inst.replicas is not None:
        warn(info, f"{path}.replicas", "deprecated Arks v0.1 field, ignored; use spec.size")


NonNegInt = Annotated[int, Field(ge=0)]


def require_unique(values: list[str], path: str) -> None:
    """Refuse a list with a repeated value, naming the first repeat's path (e.g. ``quotas[2].type``)."""
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ValueError(f"{path.format(i=i)}: {value} is listed twice")
        seen.add(value)

__all__ = [
    "API_VERSION",
    "GROUP",
    "RESERVED_MOUNT_PATH",
    "RESERVED_VOLUME",
    "VERSION",
    "Condition",
    "InstanceSpec",
    "KubeObject",
    "LocalObjectReference",
    "NonNegInt",
    "ObjectMeta",
    "PodGroupPolicy",
    "SecretKeyReference",
    "Spec",
    "Status",
    "require_unique",
    "warn",
    "warn_instance_replicas",
]
