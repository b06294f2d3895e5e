"""``MemoryKube``: an in-memory ``KubeClient`` for unit tests of the reconciler.

It keeps objects as dicts and records every write, so a test can assert what a reconcile wrote (and
that a no-op reconcile wrote nothing) without an API server. Semantics follow the API server where the
reconciler depends on them: merge patches delete keys set to None, deletion waits for finalizers,
create conflicts on an existing name, and server-side apply replaces the fields it sets.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controller import errors
from controller.kube import Manifest
from controller.meta import has_labels
from controller.writes import Write

Key = tuple[str, str, str]


def merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


@dataclass
class MemoryKube:
    """A ``KubeClient`` over a dict; ``writes`` lists every write in order."""

    objects: dict[Key, Manifest] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    reads: int = 0
    fail: dict[tuple[str, str], errors.ControllerError] = field(default_factory=dict)
    """(verb, kind) -> error to raise instead of doing it (to test retries)."""
    _uids: itertools.count[int] = field(default_factory=itertools.count)
    logs: dict[tuple[str, str], str] = field(default_factory=dict)
    """(namespace, pod) -> its log, for ``log_tail``."""

    def put(self, obj: Manifest) -> Manifest:
        """Store an object as a user (or another controller) would, without recording a write."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("generation", 1)
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return obj

    def _check(self, verb: str, kind: str) -> None:
        exc = self.fail.get((verb, kind))
        if exc is not None:
            raise exc

    async def list(self, kind: str, namespace: str, labels: Mapping[str, str] | None = None) -> list[Manifest]:
        self.reads += 1
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and ns == namespace and has_labels(o, labels)]

    async def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        self._check("get", kind)
        self.reads += 1
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def apply(self, manifest: Manifest) -> Manifest:
        self._check("apply", manifest["kind"])
        meta = manifest["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"])
        self.writes.append(Write("apply", *key, copy.deepcopy(manifest)))
        live = self.objects.get(key)
        if live is None:
            return self.put(manifest)
        # Server-side apply with one manager: the fields it sets replace the live ones.
        merge(live["metadata"], {k: v for k, v in meta.items() if k not in ("name", "namespace")})
        for top, value in manifest.items():
            if top not in ("metadata", "status"):
                live[top] = copy.deepcopy(value)
        return copy.deepcopy(live)

    async def create(self, manifest: Manifest) -> Manifest:
        self._check("create", manifest["kind"])
        meta = manifest["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"])
        if key in self.objects:
            raise errors.Conflict(409, "AlreadyExists", f"{key} exists")
        self.writes.append(Write("create", *key, copy.deepcopy(manifest)))
        return self.put(manifest)

    async def patch(self, kind: str, namespace: str, name: str, body: Manifest, *, status: bool = False) -> Manifest:
        self._check("status" if status else "patch", kind)
        key = (kind, namespace, name)
        live = self.objects.get(key)
        if live is None:
            raise errors.NotFound(404, "NotFound", f"{key}")
        self.writes.append(Write("status" if status else "patch", *key, copy.deepcopy(body)))
        merge(live, {"status": body.get("status")} if status else body)
        meta = live["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[key]
        return copy.deepcopy(live)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self._check("delete", kind)
        key = (kind, namespace, name)
        live = self.objects.get(key)
        if live is None:
            return False
        self.writes.append(Write("delete", *key))
        self.remove(key)
        return True

    def remove(self, key: Key) -> None:
        """Delete as a user would: finalizers hold the object with a deletionTimestamp."""
        live = self.objects[key]
        if live["metadata"].get("finalizers"):
            live["metadata"].setdefault("deletionTimestamp", dt.datetime.now(dt.UTC).isoformat())
        else:
            del self.objects[key]

    async def log_tail(self, namespace: str, pod: str, lines: int) -> str:
        self.reads += 1
        if (namespace, pod) not in self.logs:
            raise errors.NotFound(404, "NotFound", f"pod {namespace}/{pod} has no log")
        return "\n".join(self.logs[namespace, pod].splitlines()[-lines:])

    async def close(self) -> None:
        return None
