"""Object metadata helpers: identity, owner references, finalizers, and drift comparison. Pure.

Used by the planners (``controller.plans``, ``controller.downloads``, ``controller.status``). Objects
are the plain dicts the API returns.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from arks_ray.render.names import MANAGED_BY as MANAGED_BY  # re-exported for the planners

Obj = Mapping[str, Any]


def meta(obj: Obj) -> Mapping[str, Any]:
    value = obj.get("metadata")
    return value if isinstance(value, Mapping) else {}


def name_of(obj: Obj) -> str:
    return str(meta(obj).get("name", ""))


def key_of(obj: Obj) -> tuple[str, str]:
    """(kind, name): unique inside one namespace."""
    return str(obj.get("kind", "")), name_of(obj)


def is_deleting(obj: Obj) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def finalizers(obj: Obj) -> list[str]:
    return [str(f) for f in meta(obj).get("finalizers") or []]


def has_labels(obj: Obj, labels: Mapping[str, str] | None) -> bool:
    """Whether ``obj`` carries every one of ``labels`` (all objects match None)."""
    have = meta(obj).get("labels") or {}
    return all(have.get(k) == v for k, v in (labels or {}).items())


def annotation(obj: Obj, key: str) -> str | None:
    value = (meta(obj).get("annotations") or {}).get(key)
    return None if value is None else str(value)


def owner_ref(owner: Obj, *, controller: bool) -> dict[str, Any] | None:
    """An ownerReference to ``owner``; None when it has no uid yet (nothing can point at it)."""
    uid = meta(owner).get("uid")
    if not uid:
        return None
    return {
        "apiVersion": str(owner.get("apiVersion", "")),
        "kind": str(owner.get("kind", "")),
        "name": name_of(owner),
        "uid": str(uid),
        "controller": controller,
        # Blocking the owner's foreground deletion needs update on its finalizers subresource; only
        # the model's own children (PVC, Job) ask for it.
        "blockOwnerDeletion": controller,
    }


def contains(live: Any, desired: Any) -> bool:
    """Whether ``live`` holds everything ``desired`` sets, with the same values.

    Keys the server added (defaults, fields of other managers, status) are ignored; lists must have the
    same length and match item by item. This is the drift check: the spec hash says what was applied
    last, this says whether the live object still holds it."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(k in live and contains(live[k], v) for k, v in desired.items() if v is not None)
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(
            contains(a, b) for a, b in zip(live, desired, strict=True))
    if isinstance(desired, bool) or isinstance(live, bool):
        return desired is live
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return float(desired) == float(live)
    return bool(desired == live)


def timestamp(now: float) -> str:
    """RFC 3339 UTC with second precision, as Kubernetes writes times."""
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
