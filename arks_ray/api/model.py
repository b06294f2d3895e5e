"""ArksModel: model weights, and where they come from and live.

Read by the renderer (which emits the PVC and the download Job), the controller, the downloader
(``arks_ray.models``) and ``arks-ray model pull``. Arks' only source is ``huggingface``; arks-ray adds
``modelscope``, ``s3``, ``http``, ``pvc`` (weights already on a claim) and ``local`` (a path already
present on the nodes or in the image), allow/ignore patterns and a loader choice.
All of it is additive: an Arks manifest means what it meant.
"""

from __future__ import annotations

from typing import Any, Literal

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


def _patterns(description: str) -> Any:
    return Field(default_factory=list, description=description)


class HuggingFaceSource(Spec):
    """Download from the Hugging Face hub."""

    token_secret_ref: LocalObjectReference | None = Field(
        None, description="Secret holding the hub token (key HF_TOKEN, as in Arks).")
    revision: str | None = Field(None, description="Branch, tag or commit to download (extension).")
    allow_patterns: list[str] = _patterns("Download only files matching one of these globs (extension).")
    ignore_patterns: list[str] = _patterns("Skip files matching one of these globs (extension).")
    endpoint: str | None = Field(None, description="Hub endpoint, e.g. a mirror (extension; default HF's).",
                                 pattern=r"^https?://")


class ModelScopeSource(Spec):
    """Download from ModelScope (extension)."""

    token_secret_ref: LocalObjectReference | None = Field(
        None, description="Secret holding the ModelScope token (key MODELSCOPE_API_TOKEN).")
    revision: str | None = Field(None, description="Branch, tag or commit; default master.")
    allow_patterns: list[str] = _patterns("Download only files matching one of these globs.")
    ignore_patterns: list[str] = _patterns("Skip files matching one of these globs.")
    endpoint: str | None = Field(None, description="ModelScope endpoint; default https://modelscope.cn.",
                                 pattern=r"^https?://")


class S3Source(Spec):
    """Download every object under a prefix of any S3-compatible store (extension)."""

    uri: str = Field(description="s3://bucket/prefix of the model directory.", pattern=r"^s3://[^/]+(/.*)?$")
    endpoint: str | None = Field(None, description="Endpoint URL of an S3-compatible store; default AWS.",
                                 pattern=r"^https?://")
    region: str | None = Field(None, description="Region, e.g. us-east-1.")
    credentials_secret_ref: LocalObjectReference | None = Field(
        None, description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optional "
                          "AWS_SESSION_TOKEN); none means anonymous access.")
    allow_patterns: list[str] = _patterns("Download only keys (relative to the prefix) matching these globs.")
    ignore_patterns: list[str] = _patterns("Skip keys (relative to the prefix) matching these globs.")

    @property
    def bucket(self) -> str:
        return self.uri[len("s3://"):].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.uri[len("s3://"):].split("/", 1)
        return rest[1].strip("/") if len(rest) > 1 else ""


class HttpFile(Spec):
    """One file to fetch over HTTP(S)."""

    url: str = Field(description="The file's URL.", pattern=r"^https?://")
    path: str | None = Field(None, description="Path in the model directory; default the URL's last segment.")
    sha256: str | None = Field(None, description="Expected SHA-256 (hex); the file is refused if it differs.",
                               pattern=r"^[0-9a-fA-F]{64}$")


class HttpSource(Spec):
    """Fetch files (or one archive, unpacked) over HTTP(S) (extension)."""

    urls: list[str] = Field(default_factory=list, description="URLs of files, or of a .tar/.tar.gz/.tgz/.zip "
                            "archive that is unpacked into the model directory.")
    files: list[HttpFile] = Field(default_factory=list, description="Files with a path and checksum each.")

    @model_validator(mode="after")
    def _some(self) -> HttpSource:
        if not self.urls and not self.files:
            raise ValueError("set urls or files")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"urls: {url!r} is not an http(s) URL")
        return self


class PVCSource(Spec):
    """Weights already on an existing PersistentVolumeClaim, used in place, never downloaded (extension)."""

    claim_name: str = Field(description="Name of the existing PVC.", min_length=1)
    sub_path: str | None = Field(None, description="Directory of the model on the claim; default its root.")


class LocalSource(Spec):
    """Weights already on every node (a hostPath or baked into the image), used in place (extension)."""

    path: str = Field(description="Absolute path of the model directory.", pattern=r"^/")


SOURCE_KINDS = ("huggingface", "modelscope", "s3", "http", "pvc", "local")
DOWNLOAD_KINDS = ("huggingface", "modelscope", "s3", "http")


class ModelSource(Spec):
    """Where the weights come from. Empty means: already in the storage below, no download."""

    huggingface: HuggingFaceSource | None = Field(None, description="Download from the Hugging Face hub.")
    modelscope: ModelScopeSource | None = Field(None, description="Download from ModelScope (extension).")
    s3: S3Source | None = Field(None, description="Download from an S3-compatible store (extension).")
    http: HttpSource | None = Field(None, description="Fetch files or an archive over HTTP(S) (extension).")
    pvc: PVCSource | None = Field(None, description="Weights already on an existing claim (extension).")
    local: LocalSource | None = Field(None, description="Use a path already present (extension).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one of {', '.join(SOURCE_KINDS)} (got {', '.join(given)})")
        return self

    @property
    def kind(self) -> str | None:
        return next((k for k in SOURCE_KINDS if getattr(self, k) is not None), None)


class PVCStorage(Spec):
    """A PersistentVolumeClaim to create (if absent) and mount at /models."""

    name: str | None = Field(None, description="PVC name. Default: the ArksModel name (used consistently).")
    spec: KubeObject = Field(description="PersistentVolumeClaimSpec used when the PVC does not exist.")


class ModelStorage(Spec):
    """Where the weights live."""

    pvc: PVCStorage | None = Field(None, description="PVC holding the weights.")
    sub_path: str | None = Field(None, description="Path under /models; default models/<namespace>/<name>.")


LoadFormat = Literal["auto", "safetensors", "runai_streamer", "fastsafetensors"]


class ModelLoader(Spec):
    """How engines read the weights (vLLM's ``load_format``), passed through Ray Serve LLM (extension)."""

    format: LoadFormat = Field("auto", description="auto (vLLM's default), safetensors, runai_streamer "
                               "(Run:ai model streamer: local files, or S3 directly) or fastsafetensors.")
    concurrency: int | None = Field(None, ge=1, le=256,
                                    description="runai_streamer: parallel readers (its 'concurrency').")
    memory_limit_bytes: int | None = Field(None, ge=0,
                                           description="runai_streamer: CPU buffer limit ('memory_limit').")

    @model_validator(mode="after")
    def _streamer_only(self) -> ModelLoader:
        if self.format != "runai_streamer" and (self.concurrency or self.memory_limit_bytes is not None):
            raise ValueError("concurrency and memoryLimitBytes apply to format runai_streamer only")
        return self


NODE_CACHE_PATH = "/var/lib/arks-ray/models"


class NodeLocalCache(Spec):
    """A copy of the weights on each serving node's own disk (a hostPath), made from the shared claim once
    per node; engines then load from local disk (extension)."""

    path: str = Field(NODE_CACHE_PATH, description="hostPath directory on the nodes holding the copies.",
                      pattern=r"^/.+")
    node_selector: dict[str, str] | None = Field(
        None, description="Nodes to preload; default the instanceSpec.nodeSelector of the apps using the model "
                          "when they all agree, else every node.")
    preload: bool = Field(True, description="Copy onto the selected nodes ahead of any replica (a DaemonSet); "
                                            "false: each node copies when its first replica starts.")


class ModelCache(Spec):
    """Cache tiers below the shared copy (extension)."""

    node_local: NodeLocalCache | None = Field(None, description="Node-local copy (hostPath) of the weights.")


class ArksModelSpec(Spec):
    """Desired state of an ArksModel."""

    model: str = Field(min_length=1, description="Model id on the hub, e.g. Qwen/Qwen2.5-7B-Instruct.")
    source: ModelSource | None = Field(None, description="Where the weights come from.")
    storage: ModelStorage | None = Field(None, description="Where the weights live.")
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="imagePullSecrets for the download Job.")
    instance_spec: InstanceSpec | None = Field(None, description="Pod template pieces for the download Job.")
    loader: ModelLoader | None = Field(None, description="How engines load the weights (extension).")
    cache: ModelCache | None = Field(None, description="Cache tiers: a node-local copy (extension).")

    @model_validator(mode="after")
    def _storage(self, info: ValidationInfo) -> ArksModelSpec:
        kind = self.source.kind if self.source is not None else None
        in_place = kind in ("local", "pvc")
        if not in_place and (self.storage is None or self.storage.pvc is None):
            raise ValueError("storage.pvc: required unless source.local or source.pvc is set")
        if self.node_cache is not None and not self.downloads:
            raise ValueError("cache.nodeLocal: needs a downloaded model (source huggingface, modelscope, s3 or "
                             "http): only a download leaves the completion marker a node copy is checked against")
        if in_place and self.storage is not None:
            warn(info, "spec.storage", f"ignored because spec.source.{kind} is set")
        warn_instance_replicas(info, "spec.instanceSpec", self.instance_spec)
        return self

    @property
    def is_local(self) -> bool:
        return self.source is not None and self.source.local is not None

    @property
    def downloads(self) -> bool:
        return self.source is not None and self.source.kind in DOWNLOAD_KINDS

    @property
    def node_cache(self) -> NodeLocalCache | None:
        return self.cache.node_local if self.cache is not None else None


class DownloadStatus(Status):
    """The download's progress as numbers, from the Job's last progress report."""

    bytes_done: int = Field(0, description="Bytes on disk and verified or in flight.")
    bytes_total: int | None = Field(None, description="Bytes in all files, when the source says.")
    files_done: int = Field(0, description="Files complete and verified.")
    files_total: int | None = Field(None, description="Files to download.")
    rate_bytes_per_second: float | None = Field(None, description="Recent throughput.")
    eta_seconds: float | None = Field(None, description="Estimated seconds left.")


class ArksModelStatus(Status):
    """Observed state of an ArksModel."""

    phase: ModelPhase | None = Field(None, description="Pending, StorageCreating, ModelLoading, Ready, Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="StorageCreated, ModelLoaded, Ready.")
    observed_generation: int | None = Field(None, description="The spec generation this status reflects.")
    progress: str | None = Field(None, description="Download progress, e.g. '1.2 GiB / 4.0 GiB (30%), "
                                 "3/9 files, 85 MiB/s, ETA 33s' (extension).")
    download: DownloadStatus | None = Field(None, description="Download progress in numbers (extension).")


class ArksModel(Spec):
    """Model weights and their storage (ArksModel, arks.ai/v1)."""

    api_version: Literal["arks.ai/v1"] = Field("arks.ai/v1", description="arks.ai/v1")
    kind: Literal["ArksModel"] = Field("ArksModel", description="ArksModel")
    metadata: ObjectMeta
    spec: ArksModelSpec
    status: ArksModelStatus | None = None

    def pvc_name(self) -> str | None:
        """The PVC to mount; defaults to the model name both here and for apps (fixes Arks' mismatch)."""
        source = self.spec.source
        if source is not None and source.pvc is not None:
            return source.pvc.claim_name
        if self.spec.is_local or self.spec.storage is None or self.spec.storage.pvc is None:
            return None
        return self.spec.storage.pvc.name or self.metadata.name

    def creates_pvc(self) -> bool:
        """Whether arks-ray creates the claim (a ``pvc`` source names one that exists already)."""
        return self.pvc_name() is not None and (self.spec.source is None or self.spec.source.pvc is None)

    def model_path(self, namespace: str) -> str:
        """Where engines find the weights: Arks' /models path convention, or the local path."""
        source = self.spec.source
        if source is not None and source.local is not None:
            return source.local.path
        if source is not None and source.pvc is not None:
            sub_path = (source.pvc.sub_path or "").strip("/")
            return f"{MODELS_MOUNT}/{sub_path}" if sub_path else MODELS_MOUNT
        sub = self.spec.storage.sub_path if self.spec.storage else None
        if sub:
            return f"{MODELS_MOUNT}/{sub.strip('/')}"
        return f"{MODELS_MOUNT}/models/{namespace}/{self.metadata.name}"
