"""ArksApplication: one served model, on one engine runtime, with N replicas of M pods each.

Read by the renderer (``arks_ray.render``) and the controller. Every Arks field keeps its meaning;
``autoscaling``, ``placement``, ``pipelineParallelSize``, ``accelerator``, ``routing``, ``dynamo`` and
``lora`` are arks-ray extensions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

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

Runtime = Literal["vllm", "sglang", "dynamo"]
ApplicationPhase = Literal["Pending", "Checking", "Loading", "Creating", "Running", "Failed"]


def runtime_or_default(value: Any, default: str) -> Any:
    """Arks treats an empty runtime as its default; anything unknown fails with the allowed list."""
    if value in (None, ""):
        return default
    return value


class SLO(Spec):
    """Latency targets the autoscaler and the router keep."""

    ttft_ms: int | None = Field(None, gt=0, description="Target time to first token, in milliseconds.")
    tpot_ms: int | None = Field(None, gt=0, description="Target time per output token, in milliseconds.")
    percentile: float = Field(95.0, gt=0, lt=100, description="Percentile the targets apply to.")


class Autoscaling(Spec):
    """SLO-driven autoscaling of the application's Serve replicas (extension)."""

    min_replicas: int = Field(1, ge=0, description="Lower bound on replicas.")
    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests in flight per replica that the policy aims for.")
    slo: SLO | None = Field(None, description="Latency targets; breaching them scales up.")
    upscale_delay_seconds: float = Field(
        30.0, ge=0, description="How long demand must stay high before scaling up (stable window).")
    downscale_delay_seconds: float = Field(
        300.0, ge=0, description="How long demand must stay low before scaling down.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) is greater than maxReplicas ({self.max_replicas})")
        return self


PlacementStrategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]


class Placement(Spec):
    """How the bundles of one replica's placement group are laid out across nodes (extension)."""

    strategy: PlacementStrategy | None = Field(
        None,
        description="Ray placement group strategy. Default: STRICT_PACK when size is 1, PACK otherwise.",
    )


class Routing(Spec):
    """How requests pick a replica inside the application (extension)."""

    router: Literal["powerOfTwo", "prefixCache", "consistentHash"] = Field(
        "powerOfTwo", description="Ray Serve request router.")
    session_header: str = Field(
        "x-session-id", description="Header hashed by the consistentHash router for session affinity.")


class Dynamo(Spec):
    """Settings of the Dynamo sidecars when runtime is dynamo (extension)."""

    engine: Literal["vllm", "sglang", "trtllm", "mocker"] = Field("vllm", description="Dynamo worker engine.")
    args: list[str] = Field(default_factory=list, description="Extra arguments for the Dynamo worker.")


class Adapter(Spec):
    """One LoRA adapter served on the application's base model (extension)."""

    name: str = Field(
        pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$",
        description="Adapter name; clients send the model '<servedModelName>:<name>', and tokens are granted it "
                    "by that name in their qos, like an ArksEndpoint.")
    model: LocalObjectReference = Field(
        description="The ArksModel holding the adapter's weights (adapter_config.json and its safetensors): "
                    "its source and storage work as for any model. In a cluster it must live in the base "
                    "model's storage (same PVC), which the engine pods already mount.")


class LoRA(Spec):
    """LoRA adapters on the base model, through Ray Serve LLM's multi-LoRA (extension).

    Setting this enables LoRA in the engine (a restart once); adding or removing adapters afterwards is a
    live change: it reaches running and new replicas without restarting the engine."""

    adapters: list[Adapter] = Field(default_factory=list, max_length=256, description="Adapters served.")
    max_rank: int = Field(16, ge=1, le=512, description="Largest LoRA rank the engine accepts (vLLM max_lora_rank).")
    max_adapters_per_replica: int = Field(
        4, ge=1, le=256, description="Adapters kept loaded on one replica (least recently used ones are evicted); "
                                     "also how many one batch may mix (vLLM max_loras).")

    @model_validator(mode="after")
    def _unique(self) -> LoRA:
        names = [a.name for a in self.adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"adapters: duplicate name(s) {', '.join(dup)}")
        return self


class ArksApplicationSpec(Spec):
    """Desired state of an ArksApplication."""

    replicas: int = Field(
        1, ge=0, description="Number of inference groups (Serve replicas). Arks' default when omitted was 0, "
                             "which serves nothing; arks-ray defaults to 1.")
    size: int = Field(1, description="Pods per inference group; values below 1 become 1.")
    runtime: Runtime = Field("vllm", description="Inference engine: vllm (default), sglang or dynamo.")
    runtime_image: str | None = Field(None, description="Engine image override for the worker pods.")
    runtime_image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="imagePullSecrets for the worker pods.")
    model: LocalObjectReference = Field(description="The ArksModel (same namespace) to serve.")
    served_model_name: str | None = Field(
        None, description="Model name clients send; it matches the ArksEndpoint name. Default: model.name.")
    tensor_parallel_size: int | None = Field(None, ge=0, description="Tensor parallel degree (used when > 0).")
    pipeline_parallel_size: int | None = Field(None, ge=1, description="Pipeline parallel degree (extension).")
    runtime_common_args: list[str] = Field(
        default_factory=list, description="Extra engine arguments, e.g. ['--max-model-len 8192'].")
    extra_options: list[str] | None = Field(
        None, description="Deprecated name of runtimeCommonArgs (Arks < 2025-09-30); still honoured.",
        json_schema_extra={"deprecated": True})
    driver: str | None = Field(
        None, description="Deprecated (Arks v0.1); accepted and ignored.", json_schema_extra={"deprecated": True})
    instance_spec: InstanceSpec = Field(description="Pod template pieces for the engine pods.")
    pod_group_policy: PodGroupPolicy | None = Field(None, description="Gang scheduling policy.")
    autoscaling: Autoscaling | None = Field(None, description="SLO-driven autoscaling (extension).")
    placement: Placement | None = Field(None, description="Placement group strategy (extension).")
    accelerator: str | None = Field(
        None, description="Ray accelerator type the replicas need, e.g. A100, H100, L4 (extension).")
    routing: Routing | None = Field(None, description="Replica routing inside the application (extension).")
    dynamo: Dynamo | None = Field(None, description="Dynamo settings, when runtime is dynamo (extension).")
    lora: LoRA | None = Field(None, description="LoRA adapters served on the base model (extension; vLLM).")
    engine_frontend: Literal["rayLLM", "vllmServer"] | None = Field(
        None, description="Where vLLM's OpenAI layer runs (extension; vLLM): rayLLM (default) in the Serve replica, "
        "through Ray's LLMServer; vllmServer as vLLM's own server in a child process of the replica (one engine "
        "worker per replica, no LoRA).")

    @field_validator("size", mode="before")
    @classmethod
    def _clamp_size(cls, v: Any) -> Any:
        return 1 if isinstance(v, int) and v < 1 else v

    @field_validator("runtime", mode="before")
    @classmethod
    def _default_runtime(cls, v: Any) -> Any:
        return runtime_or_default(v, "vllm")

    @model_validator(mode="after")
    def _deprecations(self, info: ValidationInfo) -> ArksApplicationSpec:
        if self.extra_options is not None:
            warn(info, "spec.extraOptions", "deprecated; use spec.runtimeCommonArgs (honoured this time)")
            if not self.runtime_common_args:
                self.runtime_common_args = list(self.extra_options)
        if self.driver is not None:
            warn(info, "spec.driver", "deprecated Arks v0.1 field, ignored")
        warn_instance_replicas(info, "spec.instanceSpec", self.instance_spec)
        if self.runtime == "dynamo" and self.tensor_parallel_size:
            warn(info, "spec.tensorParallelSize", "ignored for runtime dynamo; pass it in spec.dynamo.args")
        if self.dynamo is not None and self.runtime != "dynamo":
            warn(info, "spec.dynamo", f"ignored because spec.runtime is {self.runtime}")
        if self.lora is not None and self.runtime != "vllm":
            raise ValueError(f"lora: LoRA adapters are served by runtime vllm only, not {self.runtime}")
        return self

    @property
    def model_name(self) -> str:
        """The name clients use for this app's model (``servedModelName`` or ``model.name``)."""
        return self.served_model_name or self.model.name

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size if self.tensor_parallel_size and self.tensor_parallel_size > 0 else 1

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size or 1

    @property
    def engine_workers(self) -> int:
        """Placement-group bundles per replica: TP x PP engine workers; Dynamo's sidecars share one."""
        return 1 if self.runtime == "dynamo" else self.tp * self.pp


class ArksApplicationStatus(Status):
    """Observed state of an ArksApplication."""

    phase: ApplicationPhase | None = Field(None, description="Pending, Checking, Loading, Creating, Running, Failed.")
    replicas: int = Field(0, description="Serve replicas wanted.")
    ready_replicas: int = Field(0, description="Serve replicas running and healthy.")
    updated_replicas: int = Field(0, description="Replicas on the current spec.")
    conditions: list[Condition] = Field(default_factory=list, description="Precheck, Loaded and Ready.")
    observed_generation: int | None = Field(None, description="The spec generation this status reflects.")


class ArksApplication(Spec):
    """An LLM served by an engine runtime (ArksApplication, arks.ai/v1)."""

    api_version: Literal["arks.ai/v1"] = Field("arks.ai/v1", description="arks.ai/v1")
    kind: Literal["ArksApplication"] = Field("ArksApplication", description="ArksApplication")
    metadata: ObjectMeta
    spec: ArksApplicationSpec
    status: ArksApplicationStatus | None = None
