"""The plan of one reconcile: which writes bring a namespace to its desired state. Pure.

Called by ``controller.reconcile`` with everything it read; returns ``Write``s in phases whose order
matters (finalizers first, then children, then the RayService, then released finalizers, then
statuses). A namespace that already matches yields no writes at all.

Decisions made here:

- **Gating.** An application enters the RayService once its model is Ready (weights downloaded), or if
  it is in the live RayService already (a re-download must not take a serving app down). Serve marks
  an app whose engine cannot load DEPLOY_FAILED and stops retrying, so deploying before the weights
  exist would strand it.
- **RayService.** Applied when the spec hash, the owner references or the live spec (drift) differ;
  deleted when the namespace has no Arks objects left. Owners are the namespace's applications, as
  non-controller references: the RayService is garbage-collected only when all of them are gone, and
  an app's finalizer keeps it until the RayService no longer serves it.
- **Finalizers.** Added to every application; released only after the RayService without it applied.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from arks_ray.api import ArksApplication, ArksDisaggregatedApplication, ArksEndpoint, ArksModel, ArksQuota, ArksToken
from arks_ray.render import SPEC_HASH_ANNOTATION, Rendered, RenderOptions, render_namespace
from arks_ray.render.names import RAYSERVICE_NAME, label_value
from arks_ray.render.network_policy import NETWORK_POLICY_NAME
from controller import status as st
from controller.downloads import ModelInputs, plan_model
from controller.gateway_secret import gateway_secret, secret_write
from controller.meta import MANAGED_BY, annotation, contains, finalizers, has_labels, meta, name_of, owner_ref
from controller.node_caches import plan_node_caches
from controller.snapshot import APP_KINDS, Snapshot, add_problems
from controller.writes import Write, apply_changed


@dataclass(frozen=True)
class Observed:
    """What the reconciler read, besides the Arks objects themselves."""

    rayservice: dict[str, Any] | None = None
    pvcs: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)
    jobs: Sequence[dict[str, Any]] = ()
    usage: Mapping[str, Mapping[str, int]] | None = None
    """Quota usage by quota name and type; None when no counter store is configured."""
    routes: Mapping[tuple[str, str], float] | None = None
    """Effective weights the gateway replicas reported, by (endpoint, backend); None without a store."""
    gateway_secret: Mapping[str, Any] | None = None
    """The live gateway Secret (only its metadata is used: its content id)."""
    download_logs: Mapping[str, str] = field(default_factory=dict)
    """Log tails of running download Jobs, by Job name (their progress reports)."""
    daemonsets: Sequence[dict[str, Any]] = ()
    """The namespace's managed DaemonSets (node-cache preloads)."""
    network_policy: Mapping[str, Any] | None = None
    """The live NetworkPolicy ``arks-ray-cluster`` of the namespace's Ray pods."""


@dataclass
class Plan:
    """Writes in execution order (each phase may run concurrently), and what else the scheduler needs."""

    phases: list[list[Write]]
    requeue_after: float | None = None
    rendered: Rendered | None = None
    empty: bool = False
    """No Arks object and no RayService left: the scheduler may forget the namespace."""
    warnings: list[str] = field(default_factory=list)
    """What the reconciler logs about this namespace (something it would not overwrite)."""

    @property
    def writes(self) -> list[Write]:
        return [w for phase in self.phases for w in phase]


_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def live_apps(rayservice: Mapping[str, Any] | None) -> set[str]:
    """Serve application names in a live RayService's ``serveConfigV2``."""
    text = ((rayservice or {}).get("spec") or {}).get("serveConfigV2")
    try:
        # libyaml when present: the config of a namespace of 100 apps takes pure-Python PyYAML ~0.4 s.
        config = yaml.load(text, Loader=_LOADER) if isinstance(text, str) else None  # noqa: S506 - a safe loader
    except yaml.YAMLError:
        return set()
    apps = (config or {}).get("applications") if isinstance(config, dict) else None
    return {str(a.get("name")) for a in apps or [] if isinstance(a, dict)}


def app_statuses(rayservice: Mapping[str, Any] | None) -> Mapping[str, Any]:
    active = ((rayservice or {}).get("status") or {}).get("activeServiceStatus") or {}
    return active.get("applicationStatuses") or {}


def rayservice_change(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> str:
    """Why the RayService must be applied, or "" when the live one already holds what we set."""
    if live is None:
        # None yet.
        return "create"
    if annotation(live, SPEC_HASH_ANNOTATION) != annotation(desired, SPEC_HASH_ANNOTATION):
        # The rendered spec changed since the last apply: the fast path, no deep comparison needed.
        return "spec changed"
    if _owners(live) != _owners(desired):
        # An application appeared or went away (or was recreated with a new uid).
        return "owners changed"
    wanted_meta = {k: v for k, v in desired["metadata"].items() if k != "ownerReferences"}
    if not contains(live.get("spec"), desired["spec"]) or not contains(meta(live), wanted_meta):
        # Someone edited a field we own. Server defaults and other managers' fields do not count.
        return "drift"
    return ""


def rayservice_write(desired: dict[str, Any], live: Mapping[str, Any] | None, ns: str) -> Write | None:
    why = rayservice_change(desired, live)
    return Write("apply", "RayService", ns, RAYSERVICE_NAME, desired, why) if why else None


def _managed(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None and has_labels(obj, MANAGED_BY)


POLICY_RECHECK_S = 10.0
"""After deleting a namespace's RayService, when to look again for it to be gone (then its policy goes)."""
POLICY_NOT_OURS = (f"a NetworkPolicy {NETWORK_POLICY_NAME!r} that arks-ray did not write is in the way (no "
                   f"{next(iter(MANAGED_BY))} label): it is left as it is, and the Ray pods' access is what it says")


def policy_write(desired: dict[str, Any] | None, live: Mapping[str, Any] | None, ns: str,
                 warnings: list[str]) -> Write | None:
    """Apply the NetworkPolicy of the Ray pods when it changed or was edited (an edit that opens or narrows it
    is undone: the live spec must be exactly ours); delete ours when none is wanted any more. A same-named
    policy someone else made is never taken over."""
    if desired is not None:
        if live is not None and not _managed(live):
            warnings.append(POLICY_NOT_OURS)
            return None
        write = apply_changed(desired, live, ns, NETWORK_POLICY_NAME)
        if write is None and (live or {}).get("spec") != desired["spec"]:
            write = Write("apply", "NetworkPolicy", ns, NETWORK_POLICY_NAME, desired, "drift")
        return write
    if _managed(live):
        return Write("delete", "NetworkPolicy", ns, NETWORK_POLICY_NAME, why="network policy turned off")
    return None


def _finalizers(obj: Mapping[str, Any], wanted: list[str]) -> dict[str, Any]:
    """A merge patch setting the finalizer list. A merge patch replaces lists whole, so it carries the
    resourceVersion read: if another controller changed the finalizers meanwhile, the server answers
    409 and the next reconcile starts from the new list instead of dropping theirs."""
    patch: dict[str, Any] = {"finalizers": wanted}
    if meta(obj).get("resourceVersion"):
        patch["resourceVersion"] = meta(obj)["resourceVersion"]
    return {"metadata": patch}


def _owners(obj: Mapping[str, Any]) -> list[str]:
    return sorted(str(r.get("uid")) for r in meta(obj).get("ownerReferences") or [])


def _wanted_replicas(app: ArksApplication) -> int:
    spec = app.spec
    if spec.autoscaling is None:
        return spec.replicas
    # With autoscaling, spec.replicas (and so `kubectl scale`) is Serve's initial_replicas, within bounds.
    return max(spec.autoscaling.min_replicas, min(spec.replicas, spec.autoscaling.max_replicas))


def _period_start(period: str, now: float) -> float | None:
    if period == "lifetime":
        return None
    day = dt.datetime.fromtimestamp(now, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day if period == "daily" else day.replace(day=1)).timestamp()


@dataclass
class _Models:
    states: dict[str, st.ModelState] = field(default_factory=dict)
    statuses: dict[str, st.Status] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    requeue: list[float] = field(default_factory=list)


def _plan_models(snap: Snapshot, rendered: Rendered, seen: Observed, now: float,
                 backoff: tuple[float, float]) -> _Models:
    out = _Models()
    children = {(c["kind"], name_of(c)): c for c in rendered.children}
    jobs_by_model: dict[str, list[dict[str, Any]]] = {}
    for live_job in seen.jobs:
        jobs_by_model.setdefault(str((meta(live_job).get("labels") or {}).get("arks.ai/model")), []).append(live_job)
    creating: set[str] = set()
    for raw in snap.live():
        if raw.get("kind") != "ArksModel":
            continue
        name = name_of(raw)
        model = snap.typed("ArksModel", name)
        assert model is None or isinstance(model, ArksModel)
        pvc_name = model.pvc_name() if model else None
        pvc = children.get(("PersistentVolumeClaim", pvc_name or ""))
        job: dict[str, Any] | None = next(
            (c for c in rendered.children
             if c["kind"] == "Job" and (meta(c).get("labels") or {}).get("arks.ai/model") == label_value(name)), None)
        live_pvc = seen.pvcs.get(pvc_name) if pvc_name else None
        if pvc_name in creating:
            live_pvc = pvc  # another model sharing this claim creates it in this same pass
        inputs = ModelInputs(raw, model, snap.problems.get(("ArksModel", name), []), pvc, live_pvc, job,
                             jobs_by_model.get(label_value(name), []), seen.download_logs)
        plan = plan_model(inputs, snap.namespace, now, backoff)
        creating |= {w.name for w in plan.writes if w.kind == "PersistentVolumeClaim"}
        out.states[name], out.statuses[name] = plan.state, plan.status
        out.writes += plan.writes
        if plan.requeue_after is not None:
            out.requeue.append(plan.requeue_after)
    return out


def _gate(snap: Snapshot, states: Mapping[str, st.ModelState], deployed_before: set[str]) -> list[Any]:
    """The objects to render into the RayService: every app whose model is ready or that is live."""
    out = []
    for obj in snap.objects:
        if isinstance(obj, ArksApplication | ArksDisaggregatedApplication):
            state = states.get(obj.spec.model.name)
            if not (state is None or state.ready or obj.metadata.name in deployed_before):
                continue
        out.append(obj)
    return out


def _app_statuses(snap: Snapshot, applied: Rendered, models: _Models, seen: Observed, now: float
                  ) -> dict[tuple[str, str], st.Status]:
    serve = app_statuses(seen.rayservice)
    out: dict[tuple[str, str], st.Status] = {}
    for raw in snap.live():
        kind, name = raw["kind"], name_of(raw)
        if kind not in APP_KINDS:
            continue
        obj = snap.typed(kind, name)
        app = obj if isinstance(obj, ArksApplication | ArksDisaggregatedApplication) else None
        view = st.AppView(snap.problems.get((kind, name), []),
                          models.states.get(app.spec.model.name) if app else None,
                          applied.serve_apps.get(name) == f"{kind}/{name}", serve.get(name),
                          meta(raw).get("generation"), raw.get("status"))
        if isinstance(app, ArksApplication):
            out[kind, name] = st.application_status(view, _wanted_replicas(app), now)
        elif isinstance(app, ArksDisaggregatedApplication):
            spec = app.spec
            roles = {"router": spec.router.replicas, "prefill": spec.prefill.group_replicas,
                     "decode": spec.decode.group_replicas}
            out[kind, name] = st.disaggregated_status(view, roles, now)
        elif kind == "ArksApplication":
            out[kind, name] = st.application_status(view, 0, now)  # failed validation
        else:
            out[kind, name] = st.disaggregated_status(view, {}, now)
    return out


def _other_statuses(snap: Snapshot, applied: Rendered, serving: set[str], seen: Observed, now: float
                    ) -> tuple[dict[tuple[str, str], st.Status], list[float]]:
    endpoints = {e.name: e for e in applied.gateway.endpoints}
    tokens = {t.name: t for t in applied.gateway.tokens}
    out: dict[tuple[str, str], st.Status] = {}
    requeue: list[float] = []
    for raw in snap.live():
        kind, name = raw["kind"], name_of(raw)
        problems = snap.problems.get((kind, name), [])
        prev, gen = raw.get("status"), meta(raw).get("generation")
        obj = snap.typed(kind, name)
        if kind == "ArksEndpoint":
            endpoint = endpoints.get(name) if isinstance(obj, ArksEndpoint) else None
            out[kind, name] = st.endpoint_status(endpoint, problems, serving, prev, gen, now, seen.routes)
        elif kind == "ArksToken":
            token = tokens.get(name) if isinstance(obj, ArksToken) else None
            expires = token.expires_at if token else None
            if expires is not None and expires > now:
                requeue.append(expires - now)  # to turn Ready off when it expires
            out[kind, name] = st.token_status(
                token, problems, disabled=bool(token and token.disabled),
                expired=expires is not None and expires <= now, previous=prev, generation=gen, now=now)
        elif kind == "ArksQuota":
            quota = obj if isinstance(obj, ArksQuota) else None
            budgets = [q.type for q in quota.spec.quotas] if quota else []
            used = None if seen.usage is None or quota is None else seen.usage.get(name, {})
            start = _period_start(quota.spec.period, now) if quota else None
            out[kind, name] = st.quota_status(budgets, used, start, problems, prev, gen, now)
    return out, requeue


def _status_writes(snap: Snapshot, applied: Rendered, models: _Models, seen: Observed, now: float
                   ) -> tuple[list[Write], list[float]]:
    """Status writes for every object whose status would change (objects being deleted get none)."""
    statuses = _app_statuses(snap, applied, models, seen, now)
    serving = {name for (_, name), s in statuses.items() if s["phase"] == "Running"}
    others, requeue = _other_statuses(snap, applied, serving, seen, now)
    statuses.update(others)
    statuses.update({("ArksModel", name): s for name, s in models.statuses.items()})
    writes = [Write("status", kind, snap.namespace, name, {"status": new}, "status")
              for (kind, name), new in sorted(statuses.items())
              if st.status_changed(snap.raw[kind, name].get("status"), new)]
    return writes, requeue


def plan_namespace(snap: Snapshot, seen: Observed, *, options: RenderOptions, now: float,
                   finalizer: str, download_backoff: tuple[float, float] = (60.0, 3600.0),
                   redis_password: str | None = None) -> Plan:
    """Everything one reconcile of ``snap.namespace`` should write; ``redis_password`` goes into the
    gateway's Secret (``controller.gateway_secret``), never into the RayService."""
    ns = snap.namespace
    live_rs = seen.rayservice
    secrets = snap.loaded.secrets
    full = render_namespace(snap.objects, ns, secrets=secrets, previous=live_rs, options=options)
    add_problems(snap, full.problems, kinds=(*APP_KINDS, "ArksModel"))
    models = _plan_models(snap, full, seen, now, download_backoff)
    live_models = {name_of(o): o for o in snap.live() if o.get("kind") == "ArksModel"}
    models.writes += plan_node_caches(ns, live_models, models.states, full.children, seen.daemonsets)
    gated = _gate(snap, models.states, live_apps(live_rs))
    applied = full if len(gated) == len(snap.objects) else render_namespace(
        gated, ns, secrets=secrets, previous=live_rs, options=options)
    add_problems(snap, applied.problems, kinds=("ArksEndpoint", "ArksToken", "ArksQuota"))

    apps = [o for o in snap.live() if o.get("kind") in APP_KINDS]
    adds = [Write("patch", o["kind"], ns, name_of(o), _finalizers(o, [*finalizers(o), finalizer]), "add finalizer")
            for o in apps if finalizer not in finalizers(o)]
    releases = [Write("patch", o["kind"], ns, name_of(o), _finalizers(o, [f for f in finalizers(o) if f != finalizer]),
                      "Serve application removed") for o in snap.deleting() if finalizer in finalizers(o)]
    rs_writes: list[Write] = []
    warnings: list[str] = []
    policy_pending = False
    if snap.live():
        desired = applied.rayservice
        owners = [ref for o in sorted(apps, key=lambda o: (o["kind"], name_of(o)))
                  if (ref := owner_ref(o, controller=False)) is not None]
        # Always set, even empty: applying no owners is how the last one is removed (by SSA and by merge).
        desired["metadata"]["ownerReferences"] = owners
        # The Secret first, in an earlier phase: the head pod cannot start without it.
        secret = gateway_secret(ns, options.gateway_secret, options.token_keys, redis_password)
        if (write := secret_write(secret, seen.gateway_secret, ns, options.gateway_secret)) is not None:
            models.writes.append(write)
        if (write := policy_write(applied.network_policy, seen.network_policy, ns, warnings)) is not None:
            # Before the RayService too: its pods are never reachable without it.
            models.writes.append(write)
        if (write := rayservice_write(desired, live_rs, ns)) is not None:
            rs_writes.append(write)
    elif _managed(live_rs):
        rs_writes.append(Write("delete", "RayService", ns, RAYSERVICE_NAME, why="no Arks objects left"))
        # The policy goes once the RayService is gone (its pods keep their ports while they stop): look again soon.
        policy_pending = _managed(seen.network_policy)
    elif _managed(seen.network_policy):
        rs_writes.append(Write("delete", "NetworkPolicy", ns, NETWORK_POLICY_NAME, why="no Arks objects left"))
    statuses, requeue = _status_writes(snap, applied, models, seen, now)
    delays = [*models.requeue, *requeue, *([POLICY_RECHECK_S] if policy_pending else [])]
    phases = [p for p in (adds, models.writes, rs_writes, releases, statuses) if p]
    return Plan(phases, min(delays) if delays else None, applied,
                empty=not snap.raw and not policy_pending and (live_rs is None or bool(rs_writes)),
                warnings=warnings)


