"""Kubernetes objects an ArksModel needs: the PVC holding its weights and the Job that downloads them.

Called by ``arks_ray.render.rayservice`` for every ArksModel with a download source. Fixes two Arks
bugs: the PVC name defaults to the model name for the Job *and* the apps, and the downloader has
resources.
"""

from __future__ import annotations

from typing import Any

from arks_ray.api.common import RESERVED_MOUNT_PATH, RESERVED_VOLUME
from arks_ray.api.model import ArksModel
from arks_ray.render.cluster import POD_FIELDS
from arks_ray.render.names import label_value, model_job_name

DOWNLOADER_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
CREATE_ONLY = "arks.ai/create-only"
HF_TOKEN_KEY = "HF_TOKEN"  # noqa: S105 - a Secret key name, not a secret


def _labels(model: ArksModel) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "arks-ray", "arks.ai/model": label_value(model.metadata.name)}


def render_pvc(model: ArksModel, namespace: str) -> dict[str, Any] | None:
    name = model.pvc_name()
    if name is None or model.spec.storage is None or model.spec.storage.pvc is None:
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


def render_download_job(model: ArksModel, namespace: str, image: str) -> dict[str, Any] | None:
    """A Job that downloads the weights into the PVC, idempotently (it skips a completed download)."""
    hf = model.spec.source.huggingface if model.spec.source else None
    pvc = model.pvc_name()
    if hf is None or pvc is None:
        return None
    command = ["python", "-m", "arks_ray.weights", "--repo", model.spec.model, "--dest",
               model.model_path(namespace)]
    if hf.revision:
        command += ["--revision", hf.revision]
    container: dict[str, Any] = {
        "name": "download",
        "image": image,
        "command": command,
        "resources": DOWNLOADER_RESOURCES,
        "volumeMounts": [{"name": RESERVED_VOLUME, "mountPath": RESERVED_MOUNT_PATH}],
    }
    if hf.token_secret_ref is not None:
        container["env"] = [{"name": HF_TOKEN_KEY, "valueFrom": {"secretKeyRef": {
            "name": hf.token_secret_ref.name, "key": HF_TOKEN_KEY}}}]
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
