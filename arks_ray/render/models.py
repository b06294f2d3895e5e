"""Kubernetes objects an ArksModel needs: the PVC holding its weights and the Job that downloads them.

Called by ``arks_ray.render.rayservice`` for every ArksModel with a download source. Fixes two Arks
bugs: the PVC name defaults to the model name for the Job *and* the apps, and the downloader has
resources.

The Job runs ``python -m arks_ray.models`` (``arks_ray.models.job``), the same downloader as
``arks-ray model pull``, for every source kind: huggingface, modelscope, s3 and http. Credentials reach
it as environment variables from the source's Secret (``secretKeyRef``), never as values in the Job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from arks_ray.api.common import RESERVED_MOUNT_PATH, RESERVED_VOLUME
from arks_ray.api.model import ArksModel
from arks_ray.render.cluster import POD_FIELDS
from arks_ray.render.engine_args import ArgsError
from arks_ray.render.names import label_value, model_job_name

DOWNLOADER_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
CREATE_ONLY = "arks.ai/create-only"
HF_TOKEN_KEY = "HF_TOKEN"  # noqa: S105 - a Secret key name, not a secret
# Secret keys each source reads; the optional ones may be absent from the Secret.
SECRET_KEYS: dict[str, tuple[tuple[str, bool], ...]] = {
    "huggingface": ((HF_TOKEN_KEY, False),),
    "modelscope": (("MODELSCOPE_API_TOKEN", False),),
    "s3": (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True)),
}


def loader_engine_kwargs(model: ArksModel, given: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM keyword arguments for ``spec.loader``: ``load_format`` and, for the Run:ai model streamer, its
    ``model_loader_extra_config`` (``concurrency``, ``memory_limit``). Called by the serve-config renderer
    for vLLM apps; they reach vLLM through Ray Serve LLM's ``engine_kwargs``. Raises ArgsError when
    runtimeCommonArgs also sets the load format (two places would say different things)."""
    loader = model.spec.loader
    if loader is None or loader.format == "auto":
        return {}
    if "load_format" in given:
        raise ArgsError("--load-format is set by ArksModel spec.loader.format, not runtimeCommonArgs")
    out: dict[str, Any] = {"load_format": loader.format}
    extra = {k: v for k, v in (("concurrency", loader.concurrency), ("memory_limit", loader.memory_limit_bytes))
             if v is not None}
    if extra:
        out["model_loader_extra_config"] = extra
    return out


def _labels(model: ArksModel) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "arks-ray", "arks.ai/model": label_value(model.metadata.name)}


def render_pvc(model: ArksModel, namespace: str) -> dict[str, Any] | None:
    name = model.pvc_name()
    if name is None or not model.creates_pvc() or model.spec.storage is None or model.spec.storage.pvc is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        # Arks creates the claim only if it is absent and never updates it (a bound claim's spec is
        # mostly immutable); the annotation tells the controller to do the same.
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(model),
                     "annotations": {CREATE_ONLY: "true"}},
        "spec": model.spec.storage.pvc.spec,
    }


def source_secret(model: ArksModel) -> str | None:
    """The Secret holding the source's credentials, if it names one."""
    source = model.spec.source
    ref = None
    if source is not None and source.huggingface is not None:
        ref = source.huggingface.token_secret_ref
    elif source is not None and source.modelscope is not None:
        ref = source.modelscope.token_secret_ref
    elif source is not None and source.s3 is not None:
        ref = source.s3.credentials_secret_ref
    return ref.name if ref is not None else None


def render_download_job(model: ArksModel, namespace: str, image: str) -> dict[str, Any] | None:
    """A Job that downloads the weights into the PVC, idempotently (it skips a completed download)."""
    source = model.spec.source
    pvc = model.pvc_name()
    if source is None or not model.spec.downloads or pvc is None:
        return None
    spec_json = json.dumps(source.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True,
                                             mode="json"), sort_keys=True, separators=(",", ":"))
    command = ["python", "-m", "arks_ray.models", "--model-id", model.spec.model, "--source", spec_json,
               "--dest", model.model_path(namespace)]
    container: dict[str, Any] = {
        "name": "download",
        "image": image,
        "command": command,
        "resources": DOWNLOADER_RESOURCES,
        "volumeMounts": [{"name": RESERVED_VOLUME, "mountPath": RESERVED_MOUNT_PATH}],
    }
    secret = source_secret(model)
    if secret is not None:
        container["env"] = [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, **(
                {"optional": True} if optional else {})}}}
            for key, optional in SECRET_KEYS.get(source.kind or "", ())]
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "containers": [container],
        "volumes": [{"name": RESERVED_VOLUME, "persistentVolumeClaim": {"claimName": pvc}}],
    }
    inst = model.spec.instance_spec
    if inst is not None:
        for attr, key in POD_FIELDS.items():
            value = getattr(inst, attr)
            if value is not None and key != "initContainers":
                pod[key] = value
        if inst.resources:
            container["resources"] = inst.resources
    if model.spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": r.name} for r in model.spec.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": model_job_name(model.metadata.name), "namespace": namespace, "labels": _labels(model)},
        "spec": {
            "backoffLimit": 6,
            "template": {"metadata": {"labels": _labels(model)}, "spec": pod},
        },
    }
