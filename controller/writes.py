"""``Write``: one API write, as planned by the pure planners and carried out by the reconciler.

Planners (``controller.plans``, ``controller.downloads``) return lists of ``Write``; the reconciler
executes them in phases, and ``controller.memkube`` records the same type, so a unit test compares
what was planned with what was written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arks_ray.render.names import CONTENT_ANNOTATION
from controller.meta import annotation


@dataclass(frozen=True)
class Write:
    """One request that changes the cluster."""

    verb: str
    """apply (server-side), create, delete, patch (merge patch of the object) or status (of /status)."""
    kind: str
    namespace: str
    name: str
    body: dict[str, Any] | None = None
    """The manifest (apply, create) or the merge patch (patch, status)."""
    why: str = ""
    """A short reason, for logs."""

    def __str__(self) -> str:
        why = f" ({self.why})" if self.why else ""
        return f"{self.verb} {self.kind} {self.namespace}/{self.name}{why}"


def apply_changed(desired: dict[str, Any], live: Mapping[str, Any] | None, namespace: str, name: str) -> Write | None:
    """Apply ``desired`` when the live object is missing or holds another content id (``CONTENT_ANNOTATION``)."""
    if live is not None and annotation(live, CONTENT_ANNOTATION) == annotation(desired, CONTENT_ANNOTATION):
        return None
    return Write("apply", desired["kind"], namespace, name, desired, "create" if live is None else "content changed")
