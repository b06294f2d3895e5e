"""ArksDisaggregatedApplication: prefill/decode (PD) disaggregated serving with a router in front.

Read by the renderer and the controller. Arks supports SGLang only; arks-ray also accepts vllm
(Ray's PD app with a KV connector) and dynamo (Dynamo prefill/decode workers).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from arks_ray.api.application import ApplicationPhase, Dynamo, runtime_or_default
from arks_ray.api.common import (
    Condition,
    InstanceSpec,
    LocalObjectReference,
    ObjectMeta,
    PodGroupPolicy,
    Spec,
    Status,
    warn,
    warn_instance_replicas,
)


def _int32_key(schema: dict[str, Any]) -> None:
    schema["properties"]["int32"] = {
        "type": "integer", "minimum": 1, "maximum": 65535,
        "description": "Deprecated: Arks' misnamed router port key. Use port.",
    }


class DisaggregatedRouter(Spec):
    """The PD router in front of the prefill and decode workers."""

    model_config = ConfigDict(json_schema_extra=_int32_key)

    replicas: int = Field(1, ge=0, description="Router replicas.")
    command_override: list[str] = Field(default_factory=list, description="Replace the router command.")
    port: int = Field(
        8080, ge=1, le=65535,
        validation_alias=AliasChoices("port", "int32"),
        description="Router port. Arks serialised this field as 'int32' (a bug); that key is also accepted.",
    )
    metric_port: int = Field(9090, ge=1, le=65535, description="Router metrics port.")
    router_args: list[str] = Field(default_factory=list, description="Extra router arguments.")
    instance_spec: InstanceSpec = Field(default_factory=InstanceSpec, description="Router pod template pieces.")


class DisaggregatedWorkload(Spec):
    """The prefill or the decode side."""

    replicas: int | None = Field(None, description="Groups; missing or negative becomes 1.")
    size: int = Field(1, description="Pods per group; values below 1 become 1.")
    leader_command_override: list[str] = Field(default_factory=list, description="Replace the leader command.")
    worker_command_override: list[str] = Field(default_factory=list, description="Replace the worker command.")
    runtime_common_args: list[str] = Field(default_factory=list, description="Extra engine arguments.")
    instance_spec: InstanceSpec = Field(default_factory=InstanceSpec, description="Pod template pieces.")

    @field_validator("size", mode="before")
    @classmethod
    def _clamp_size(cls, v: Any) -> Any:
        return 1 if isinstance(v, int) and v < 1 else v

    @field_validator("replicas", mode="before")
    @classmethod
    def _clamp_replicas(cls, v: Any) -> Any:
        return 1 if v is None or (isinstance(v, int) and v < 0) else v

    @property
    def group_replicas(self) -> int:
        return self.replicas if self.replicas is not None else 1


class ArksDisaggregatedApplicationSpec(Spec):
    """Desired state of an ArksDisaggregatedApplication."""

    runtime: Literal["sglang", "vllm", "dynamo"] = Field("sglang", description="sglang (default), vllm or dynamo.")
    router_image: str | None = Field(None, description="Router image override.")
    runtime_image: str | None = Field(None, description="Engine image override.")
    runtime_image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list,
                                                                   description="imagePullSecrets.")
    model: LocalObjectReference = Field(description="The ArksModel to serve.")
    served_model_name: str | None = Field(None, description="Model name clients send. Default: model.name.")
    router: DisaggregatedRouter = Field(description="The PD router.")
    prefill: DisaggregatedWorkload = Field(description="Prefill workers.")
    decode: DisaggregatedWorkload = Field(description="Decode workers.")
    pod_group_policy: PodGroupPolicy | None = Field(None, description="Gang scheduling policy.")
    dynamo: Dynamo | None = Field(
        None, description="Dynamo worker engine and extra worker arguments, when runtime is dynamo (extension).")

    @field_validator("runtime", mode="before")
    @classmethod
    def _default_runtime(cls, v: Any) -> Any:
        return runtime_or_default(v, "sglang")

    @model_validator(mode="before")
    @classmethod
    def _int32_port(cls, data: Any, info: ValidationInfo) -> Any:
        router = data.get("router") if isinstance(data, dict) else None
        if isinstance(router, dict) and "int32" in router:
            warn(info, "spec.router.int32", "Arks' misnamed router port key; use spec.router.port")
        return data

    @model_validator(mode="after")
    def _deprecations(self, info: ValidationInfo) -> ArksDisaggregatedApplicationSpec:
        for role in ("router", "prefill", "decode"):
            warn_instance_replicas(info, f"spec.{role}.instanceSpec", getattr(self, role).instance_spec)
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name


class RoleStatus(Status):
    """Replica counts of one role."""

    replicas: int = Field(0, description="Replicas wanted.")
    ready_replicas: int = Field(0, description="Replicas ready.")
    updated_replicas: int = Field(0, description="Replicas on the current spec.")


class ArksDisaggregatedApplicationStatus(Status):
    """Observed state of an ArksDisaggregatedApplication."""

    phase: ApplicationPhase | None = Field(None, description="As for ArksApplication.")
    router: RoleStatus = Field(default_factory=RoleStatus, description="Router replicas.")
    prefill: RoleStatus = Field(default_factory=RoleStatus, description="Prefill replicas.")
    decode: RoleStatus = Field(default_factory=RoleStatus, description="Decode replicas.")
    conditions: list[Condition] = Field(default_factory=list, description="Precheck, Loaded and Ready.")
    observed_generation: int | None = Field(None, description="The spec generation this status reflects.")


class ArksDisaggregatedApplication(Spec):
    """PD-disaggregated LLM serving (ArksDisaggregatedApplication, arks.ai/v1)."""

    api_version: Literal["arks.ai/v1"] = Field("arks.ai/v1", description="arks.ai/v1")
    kind: Literal["ArksDisaggregatedApplication"] = Field("ArksDisaggregatedApplication",
                                                          description="ArksDisaggregatedApplication")
    metadata: ObjectMeta
    spec: ArksDisaggregatedApplicationSpec
    status: ArksDisaggregatedApplicationStatus | None = None
