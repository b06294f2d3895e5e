"""The node-local cache tier of an ArksModel (``spec.cache.nodeLocal``): pod pieces and the preload DaemonSet.

Called by ``arks_ray.render.cluster`` (worker pods), ``arks_ray.render.serve_config`` (the engine's model
path) and ``arks_ray.render.rayservice`` (the DaemonSet, applied by the controller). Pure.

Every pod that serves the model gets the node's cache directory (a hostPath, ``DirectoryOrCreate``) at
``/arks-node-cache`` and an init container running ``python -m arks_ray.models.node_cache``, which copies
the model from the read-only claim at ``/models`` to ``/arks-node-cache/<namespace>.<model>`` unless a
current copy is there already (``arks_ray.models.node_cache``). The engine loads from that copy. With
``preload`` a DaemonSet runs the same init container on the selected nodes ahead of any replica, then
sleeps, so a replica landing there finds the copy made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from arks_ray.api.common import RESERVED_MOUNT_PATH, RESERVED_VOLUME, InstanceSpec
from arks_ray.api.model import ArksModel
from arks_ray.render.names import digest, dns_label, label_value

VOLUME = "arks-node-cache"
MOUNT = "/arks-node-cache"
COPY_RESOURCES = {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}}
SOURCE_ANNOTATION = "arks.ai/source-digest"
HOLD_RESOURCES = {"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}}


def cache_key(model: ArksModel, namespace: str) -> str:
    """The copy's directory name under the node's cache: one per namespace and model."""
    return f"{namespace}.{model.metadata.name}"


def cached_path(model: ArksModel, namespace: str) -> str | None:
    """Where engines load a node-cached model from (None: the model has no node-local tier)."""
    return f"{MOUNT}/{cache_key(model, namespace)}" if model.spec.node_cache is not None else None


@dataclass(frozen=True)
class NodeCache:
    """What a pod needs to copy the model onto its node and read it there."""

    host_path: str
    source: str
    """The model directory in the claim's mount (``/models/...``)."""
    key: str
    image: str

    def volume(self) -> dict[str, Any]:
        return {"name": VOLUME, "hostPath": {"path": self.host_path, "type": "DirectoryOrCreate"}}

    def mount(self, read_only: bool) -> dict[str, Any]:
        return {"name": VOLUME, "mountPath": MOUNT, **({"readOnly": True} if read_only else {})}

    def init_container(self) -> dict[str, Any]:
        return {
            "name": "arks-node-cache",
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["python", "-m", "arks_ray.models.node_cache", "--source", self.source, "--cache", MOUNT,
                        "--key", self.key],
            "resources": COPY_RESOURCES,
            "volumeMounts": [{"name": RESERVED_VOLUME, "mountPath": RESERVED_MOUNT_PATH, "readOnly": True},
                             self.mount(read_only=False)],
        }


def node_cache_of(model: ArksModel, namespace: str, image: str) -> NodeCache | None:
    cache = model.spec.node_cache
    if cache is None or model.pvc_name() is None:
        return None
    return NodeCache(cache.path, model.model_path(namespace), cache_key(model, namespace), image)


def _agreed(values: list[Any]) -> Any:
    """The value every app sets alike, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


def preload_daemonset(model: ArksModel, namespace: str, image: str,
                      instances: Iterable[InstanceSpec]) -> dict[str, Any] | None:
    """The DaemonSet ``arks-cache-<model>`` that copies the model onto the selected nodes ahead of any
    replica. Nodes: ``nodeLocal.nodeSelector``, else the nodeSelector (and tolerations) all the apps using
    the model agree on, else every node. None when the model has no node-local tier or preload is off."""
    cache = model.spec.node_cache
    pvc = model.pvc_name()
    node = node_cache_of(model, namespace, image)
    if cache is None or not cache.preload or pvc is None or node is None:
        return None
    specs = list(instances)
    selector: Mapping[str, str] | None = cache.node_selector
    if selector is None:
        selector = _agreed([s.node_selector for s in specs])
    tolerations = _agreed([s.tolerations for s in specs])
    source = digest(model.spec.source.model_dump(mode="json") if model.spec.source else None, 16)
    labels = {"app.kubernetes.io/managed-by": "arks-ray", "arks.ai/model": label_value(model.metadata.name)}
    pod: dict[str, Any] = {
        "initContainers": [node.init_container()],
        "containers": [{"name": "hold", "image": image, "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "infinity"], "resources": HOLD_RESOURCES}],
        "volumes": [{"name": RESERVED_VOLUME, "persistentVolumeClaim": {"claimName": pvc, "readOnly": True}},
                    node.volume()],
        "terminationGracePeriodSeconds": 1,
    }
    if selector:
        pod["nodeSelector"] = dict(selector)
    if tolerations:
        pod["tolerations"] = list(tolerations)
    if model.spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": r.name} for r in model.spec.image_pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": dns_label("arks-cache", model.metadata.name), "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": dict(labels)},
            # A new download (changed source) rolls the DaemonSet, so every node copies it again.
            "template": {"metadata": {"labels": dict(labels), "annotations": {SOURCE_ANNOTATION: source}},
                         "spec": pod},
        },
    }
