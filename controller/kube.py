"""The Kubernetes port: a small ``KubeClient`` Protocol and its implementation on the official client.

The reconciler (``controller.reconcile``) talks to the API only through ``KubeClient``; unit tests pass
``controller.memkube.MemoryKube`` instead. ``OfficialKubeClient`` uses the synchronous official
``kubernetes`` client in worker threads (``asyncio.to_thread``), one generic request path for every
resource (objects stay plain dicts: the renderer produces dicts and the reconciler compares dicts, so
typed models would only be converted back and forth). Every write is server-side apply with a fixed
field manager, or a plain create/merge-patch where apply does not fit (create-only children, status,
finalizers). Errors leave this module as ``controller.errors`` types only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kubernetes.client
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from controller import errors
from controller.meta import has_labels

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


def _arks(kind: str) -> Resource:
    return Resource("arks.ai", "v1", kind.lower() + "s", kind)


ARKS_KINDS = ("ArksApplication", "ArksDisaggregatedApplication", "ArksModel", "ArksEndpoint", "ArksToken",
              "ArksQuota")
RESOURCES: dict[str, Resource] = {
    **{kind: _arks(kind) for kind in ARKS_KINDS},
    "RayService": Resource("ray.io", "v1", "rayservices", "RayService"),
    "PersistentVolumeClaim": Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    "Job": Resource("batch", "v1", "jobs", "Job"),
    "DaemonSet": Resource("apps", "v1", "daemonsets", "DaemonSet"),
    "Secret": Resource("", "v1", "secrets", "Secret"),
    "Pod": Resource("", "v1", "pods", "Pod"),
    "NetworkPolicy": Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
}


class KubeClient(Protocol):
    """What the reconciler needs from the API server; every method is one request."""

    async def list(self, kind: str, namespace: str, labels: Mapping[str, str] | None = None) -> list[Manifest]:
        """Objects of one kind in one namespace (optionally only those with these labels)."""

    async def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        """One object, or None if it does not exist."""

    async def apply(self, manifest: Manifest) -> Manifest:
        """Server-side apply (the operator's field manager, ``force=True``); creates if absent."""

    async def create(self, manifest: Manifest) -> Manifest:
        """Create; raises ``Conflict`` if the object exists."""

    async def patch(self, kind: str, namespace: str, name: str, body: Manifest, *, status: bool = False) -> Manifest:
        """JSON merge patch of the object (or of its ``/status`` subresource)."""

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation; False if it was already gone."""

    async def log_tail(self, namespace: str, pod: str, lines: int) -> str:
        """The last ``lines`` lines of a pod's log (download progress, ``controller.progress``)."""

    async def close(self) -> None:
        """Release connections."""


def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> kubernetes.client.Configuration:
    """The in-cluster config inside a pod, else the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
    cfg = kubernetes.client.Configuration()
    if kubeconfig is None and context is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return cfg
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=cfg)
    return cfg


def _with_type(item: Manifest, resource: Resource) -> Manifest:
    # List responses may omit apiVersion/kind on items (built-in types do); the loader needs them.
    item.setdefault("apiVersion", resource.api_version)
    item.setdefault("kind", resource.kind)
    return item


class OfficialKubeClient:
    """``KubeClient`` on the official synchronous client, run in worker threads."""

    def __init__(self, configuration: kubernetes.client.Configuration, *, field_manager: str,
                 timeout: tuple[float, float] = (10.0, 30.0)) -> None:
        self.api = kubernetes.client.ApiClient(configuration)
        self.field_manager = field_manager
        self.timeout = timeout

    def _call(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
              body: Any = None, content_type: str | None = None, text: bool = False) -> Any:
        headers = {"Accept": "text/plain" if text else "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            method, url, headers, body, _ = self.api.param_serialize(
                method, path, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"])
            response = self.api.call_api(method, url, header_params=headers, body=body,
                                         _request_timeout=self.timeout)
            response.read()  # type: ignore[no-untyped-call]
        except ApiException as exc:
            raise errors.from_status(exc.status or 0, str(exc.reason or ""), str(exc.body or "")) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise errors.ApiUnavailable(0, type(exc).__name__, str(exc)) from exc
        data = response.data or b""
        if response.status >= 400:
            detail = _status_message(data)
            retry = response.getheader("Retry-After")  # type: ignore[no-untyped-call]
            raise errors.from_status(response.status, str(response.reason or ""), detail,
                                     float(retry) if retry and retry.isdigit() else None)
        if text:
            return data.decode(errors="replace")
        return json.loads(data) if data else None

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._call, method, path, **kwargs)

    async def list(self, kind: str, namespace: str, labels: Mapping[str, str] | None = None) -> list[Manifest]:
        res = RESOURCES[kind]
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items()))] if labels else None
        data = await self._request("GET", res.path(namespace), query=query)
        items = [_with_type(i, res) for i in (data or {}).get("items") or []]
        # Filtered here too: the selector is an optimisation, not a guarantee every server honours.
        return [i for i in items if has_labels(i, labels)]

    async def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        res = RESOURCES[kind]
        try:
            data = await self._request("GET", res.path(namespace, name))
        except errors.NotFound:
            return None
        return _with_type(data, res) if isinstance(data, dict) else None

    async def apply(self, manifest: Manifest) -> Manifest:
        res = RESOURCES[manifest["kind"]]
        meta = manifest["metadata"]
        query = [("fieldManager", self.field_manager), ("force", "true")]
        try:
            data = await self._request("PATCH", res.path(meta["namespace"], meta["name"]), query=query,
                                       body=manifest, content_type="application/apply-patch+yaml")
        except errors.NotFound:
            # A real API server creates the object on server-side apply. A server (or emulator) that
            # answers 404 to applying a missing object gets a create instead, with the same manager.
            return await self.create(manifest)
        return dict(data or {})

    async def create(self, manifest: Manifest) -> Manifest:
        res = RESOURCES[manifest["kind"]]
        data = await self._request("POST", res.path(manifest["metadata"]["namespace"]),
                                   query=[("fieldManager", self.field_manager)], body=manifest)
        return dict(data or {})

    async def patch(self, kind: str, namespace: str, name: str, body: Manifest, *, status: bool = False) -> Manifest:
        res = RESOURCES[kind]
        data = await self._request("PATCH", res.path(namespace, name, "status" if status else None),
                                   query=[("fieldManager", self.field_manager)], body=body,
                                   content_type="application/merge-patch+json")
        return dict(data or {})

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        res = RESOURCES[kind]
        try:
            await self._request("DELETE", res.path(namespace, name),
                                body={"apiVersion": "v1", "kind": "DeleteOptions",
                                      "propagationPolicy": "Background"})
        except errors.NotFound:
            return False
        return True

    async def log_tail(self, namespace: str, pod: str, lines: int) -> str:
        path = RESOURCES["Pod"].path(namespace, pod, "log")
        return str(await self._request("GET", path, query=[("tailLines", str(lines))], text=True))

    async def close(self) -> None:
        # Closing the pool also ends the server side of keep-alive connections, so a test's emulator
        # (and kopf's hung-task sweep) is not left waiting on them.
        await asyncio.to_thread(self.api.close)


def _status_message(data: bytes) -> str:
    try:
        status = json.loads(data)
    except ValueError:
        return data[:200].decode(errors="replace")
    return str(status.get("message", "")) if isinstance(status, dict) else ""
