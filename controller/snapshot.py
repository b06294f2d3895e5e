"""One namespace's Arks objects as read from the API: raw dicts, typed objects and their problems. Pure.

Built by the reconciler from its first round of reads; the planner (``controller.plans``) works on it.
It also says what to read next: the Secrets tokens reference, the PVCs models use, whether any model
downloads, and which quotas to mirror.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from arks_ray.api import ArksModel, ArksQuota, ArksToken, load_documents
from arks_ray.api.gateway import GatewayConfig
from arks_ray.api.loading import ArksObject, Loaded
from arks_ray.api.quota import period_id
from arks_ray.errors import Problem
from arks_ray.gateway.quotas import Floor
from arks_ray.render.gateway_config import compile_quota
from controller.meta import is_deleting, key_of

APP_KINDS = ("ArksApplication", "ArksDisaggregatedApplication")
Key = tuple[str, str]


@dataclass
class Snapshot:
    """The Arks objects of one namespace."""

    namespace: str
    raw: dict[Key, dict[str, Any]]
    """Every object read, by (kind, name), including those being deleted or failing validation."""
    loaded: Loaded
    """Objects that validated, excluding those being deleted (they are rendered out)."""
    problems: dict[Key, list[Problem]] = field(default_factory=dict)
    _index: dict[Key, ArksObject] = field(default_factory=dict, repr=False)

    @property
    def objects(self) -> list[ArksObject]:
        return self.loaded.objects

    def typed(self, kind: str, name: str) -> ArksObject | None:
        """The validated object, or None if it failed validation (or is being deleted)."""
        if len(self._index) != len(self.loaded.objects):
            self._index = {(o.kind, o.metadata.name): o for o in self.loaded.objects}
        return self._index.get((kind, name))

    def live(self) -> list[dict[str, Any]]:
        """Raw objects not being deleted."""
        return [o for o in self.raw.values() if not is_deleting(o)]

    def deleting(self) -> list[dict[str, Any]]:
        return [o for o in self.raw.values() if is_deleting(o)]

    def models(self) -> list[ArksModel]:
        return [o for o in self.loaded.objects if isinstance(o, ArksModel)]

    def secret_names(self) -> set[str]:
        """Secrets that tokens read their value from."""
        return {t.spec.token_secret_ref.name for t in self.loaded.objects
                if isinstance(t, ArksToken) and t.spec.token_secret_ref is not None}

    def pvc_names(self) -> set[str]:
        return {name for m in self.models() if (name := m.pvc_name()) is not None}

    def downloads(self) -> bool:
        return any(m.spec.downloads for m in self.models())

    def quota_config(self) -> GatewayConfig | None:
        """The quotas alone, as the gateway enforces them (enough to read their usage); None if none."""
        quotas = sorted((q for q in self.loaded.objects if isinstance(q, ArksQuota)), key=lambda q: q.metadata.name)
        if not quotas:
            return None
        return GatewayConfig(namespace=self.namespace, quotas=tuple(compile_quota(q) for q in quotas))

    def quota_floors(self) -> list[Floor]:
        """The usage each ArksQuota's status recorded, per budget type, in the period it recorded it."""
        out = []
        for quota in (q for q in self.loaded.objects if isinstance(q, ArksQuota)):
            status = quota.status
            if status is None:
                continue
            start = status.period_start.timestamp() if status.period_start else None
            period = "lifetime" if quota.spec.period == "lifetime" else (
                period_id(quota.spec.period, start) if start is not None else None)
            known = {b.type for b in quota.spec.quotas}
            if period is not None:
                out += [Floor(quota.metadata.name, u.type, u.used, period)
                        for u in status.quota_status if u.type in known and u.used > 0]
        return out


def _for_loading(obj: Mapping[str, Any]) -> dict[str, Any]:
    # Status is ours and irrelevant to rendering, except ArksQuota's: its usage is the floor the
    # operator restores into the counter store after the store lost data.
    doc = dict(obj)
    if doc.get("kind") != "ArksQuota":
        doc.pop("status", None)
    return doc


def take(namespace: str, objects: Iterable[Mapping[str, Any]], secrets: Sequence[Mapping[str, Any]] = ()
         ) -> Snapshot:
    """Load raw objects (and the Secrets read for tokens) into a snapshot."""
    raw = {key_of(o): dict(o) for o in objects}
    live = [_for_loading(o) for o in raw.values() if not is_deleting(o)]
    loaded = load_documents([*live, *(dict(s) for s in secrets)], namespace)
    problems: dict[Key, list[Problem]] = defaultdict(list)
    for p in loaded.problems:
        problems[(p.kind, p.name)].append(p)
    return Snapshot(namespace, raw, loaded, dict(problems))


def add_problems(snapshot: Snapshot, found: Iterable[Problem], kinds: Iterable[str] | None = None) -> None:
    """File render problems under their objects (only for ``kinds``, when given), without duplicates."""
    allowed = set(kinds) if kinds is not None else None
    for p in found:
        if allowed is not None and p.kind not in allowed:
            continue
        bucket = snapshot.problems.setdefault((p.kind, p.name), [])
        if p not in bucket:
            bucket.append(p)
