"""ArksModel: model weights, and where they come from and live.

Read by the renderer (which emits the PVC and the download Job) and the controller. Arks' only source
is ``huggingface``; arks-ray adds ``local`` (a path already present on the nodes or in the image).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from arks_ray.api.common import (
    Condition,
    InstanceSpec,
    KubeObject,
    LocalObjectReference,
    ObjectMeta,
    Spec,
    Status,
    warn,
    warn_instance_replicas,
)

ModelPhase = Literal["Pending", "StorageCreating", "ModelLoading", "Ready", "Failed"]
MODELS_MOUNT = "/models"


class HuggingFaceSource(Spec):
    """Download from the Hugging Face hub."""

    token_secret_ref: LocalObjectReference | None = Field(
        None, description="Secret holding the hub token (key HF_TOKEN, as in Arks).")
    revision: str | None = Field(None, description="Branch, tag or commit to download (extension).")


class LocalSource(Spec):
    """Weights already on every node (a hostPath or baked into the image), used in place (extension)."""

    path: str = Field(description="Absolute path of the model directory.", pattern=r"^/")


class ModelSource(Spec):
    """Where the weights come from. Empty means: already in the storage below, no download."""

    huggingface: HuggingFaceSource | None = Field(None, description="Download from the Hugging Face hub.")
    local: LocalSource | None = Field(None, description="Use a path already present (extension).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if self.huggingface is not None and self.local is not None:
            raise ValueError("set at most one of huggingface and local")
        return self


class PVCStorage(Spec):
    """A PersistentVolumeClaim to create (if absent) and mount at /models."""

    name: str | None = Field(None, description="PVC name. Default: the ArksModel name (used consistently).")
    spec: KubeObject = Field(description="PersistentVolumeClaimSpec used when the PVC does not exist.")


class ModelStorage(Spec):
    """Where the weights live."""

    pvc: PVCStorage | None = Field(None, description="PVC holding the weights.")
    sub_path: str | None = Field(None, description="Path under /models; default models/<namespace>/<name>.")


class ArksModelSpec(Spec):
    """Desired state of an ArksModel."""

    model: str = Field(min_length=1, description="Model id on the hub, e.g. Qwen/Qwen2.5-7B-Instruct.")
    source: ModelSource | None = Field(None, description="Where the weights come from.")
    storage: ModelStorage | None = Field(None, description="Where the weights live.")
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="imagePullSecrets for the download Job.")
    instance_spec: InstanceSpec | None = Field(None, description="Pod template pieces for the download Job.")

    @model_validator(mode="after")
    def _storage(self, info: ValidationInfo) -> ArksModelSpec:
        local = self.source is not None and self.source.local is not None
        if not local and (self.storage is None or self.storage.pvc is None):
            raise ValueError("storage.pvc: required unless source.local is set")
        if local and self.storage is not None:
            warn(info, "spec.storage", "ignored because spec.source.local is set")
        warn_instance_replicas(info, "spec.instanceSpec", self.instance_spec)
        return self

    @property
    def is_local(self) -> bool:
        return self.source is not None and self.source.local is not None

    @property
    def downloads(self) -> bool:
        return self.source is not None and self.source.huggingface is not None


class ArksModelStatus(Status):
    """Observed state of an ArksModel."""

    phase: ModelPhase | None = Field(None, description="Pending, StorageCreating, ModelLoading, Ready, Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="StorageCreated, ModelLoaded, Ready.")
    observed_generation: int | None = Field(None, description="The spec generation this status reflects.")


class ArksModel(Spec):
    """Model weights and their storage (ArksModel, arks.ai/v1)."""

    api_version: Literal["arks.ai/v1"] = Field("arks.ai/v1", description="arks.ai/v1")
    kind: Literal["ArksModel"] = Field("ArksModel", description="ArksModel")
    metadata: ObjectMeta
    spec: ArksModelSpec
    status: ArksModelStatus | None = None

    def pvc_name(self) -> str | None:
        """The PVC to mount; defaults to the model name both here and for apps (fixes Arks' mismatch)."""
        if self.spec.is_local or self.spec.storage is None or self.spec.storage.pvc is None:
            return None
        return self.spec.storage.pvc.name or self.metadata.name

    def model_path(self, namespace: str) -> str:
        """Where engines find the weights: Arks' /models path convention, or the local path."""
        if self.spec.source is not None and self.spec.source.local is not None:
            return self.spec.source.local.path
        sub = self.spec.storage.sub_path if self.spec.storage else None
        if sub:
            return f"{MODELS_MOUNT}/{sub.strip('/')}"
        return f"{MODELS_MOUNT}/models/{namespace}/{self.metadata.name}"
