"""Status of every Arks kind, computed from what was observed. Pure: no I/O, no clock.

Called by ``controller.plans`` once per reconcile; the reconciler writes a status only when it differs
from the live one, so a quiet namespace costs no writes. Conditions keep their ``lastTransitionTime``
while their status stays the same.

ArksApplication phases follow Serve, not mere creation (Arks set Running before any pod was ready):

    precheck problem              -> Failed    Precheck=False (the problem is the message)
    model not ready yet           -> Loading   Loaded=False   (the app waits outside the RayService)
    in the RayService, no status  -> Creating  Ready=False Deploying
    NOT_STARTED / DEPLOYING       -> Creating  Ready=False Deploying
    RUNNING, deployments healthy  -> Running   Ready=True
    DEPLOY_FAILED / UNHEALTHY     -> Failed    Ready=False, never terminal: the next change re-evaluates
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arks_ray.api.gateway import Endpoint, Token
from arks_ray.errors import Problem
from controller.meta import timestamp

SERVING = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})
Status = dict[str, Any]


@dataclass(frozen=True)
class Cond:
    """A wanted condition; ``status`` None means Unknown."""

    type: str
    status: bool | None
    reason: str
    message: str = ""


def conditions(wanted: Sequence[Cond], previous: Sequence[Mapping[str, Any]] | None, now: float,
               generation: int | None) -> list[dict[str, Any]]:
    """Conditions as written, keeping the transition time of those whose status did not change."""
    before = {str(c.get("type")): c for c in previous or [] if isinstance(c, Mapping)}
    out = []
    for c in wanted:
        status = "Unknown" if c.status is None else str(c.status)
        old = before.get(c.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        cond: dict[str, Any] = {"type": c.type, "status": status, "reason": c.reason, "message": c.message,
                                "lastTransitionTime": since or timestamp(now)}
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out


def describe(problems: Sequence[Problem]) -> str:
    return "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)


def errors_in(problems: Sequence[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def status_changed(live: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change the live status (keys not in ``new`` are not ours)."""
    live = live or {}
    return any(live.get(k) != v for k, v in new.items())


@dataclass(frozen=True)
class ModelState:
    """What an application needs to know about its model."""

    phase: str
    ready: bool
    reason: str
    message: str


@dataclass(frozen=True)
class ServeHealth:
    """One Serve application's state, as the RayService reports it."""

    phase: str
    ready: bool
    reason: str
    message: str
    scaling_up: bool = False


def serve_health(entry: Mapping[str, Any] | None) -> ServeHealth:
    """Map ``status.activeServiceStatus.applicationStatuses[app]`` to a phase."""
    if not entry:
        return ServeHealth("Creating", False, "Deploying", "waiting for KubeRay to deploy the Serve application")
    status = str(entry.get("status") or "")
    message = str(entry.get("message") or "")
    deployments = entry.get("serveDeploymentStatuses") or {}
    not_serving = [f"{name} is {d.get('status')}" + (f": {d['message']}" if d.get("message") else "")
                   for name, d in sorted(deployments.items()) if d.get("status") not in SERVING]
    if status == "RUNNING" and not not_serving:
        up = any(d.get("status") == "UPSCALING" for d in deployments.values())
        return ServeHealth("Running", True, "Running", "serving", scaling_up=up)
    if status == "RUNNING":
        return ServeHealth("Creating", False, "Updating", "; ".join(not_serving))
    if status == "DEPLOY_FAILED":
        return ServeHealth("Failed", False, "DeployFailed", message or "; ".join(not_serving))
    if status == "UNHEALTHY":
        return ServeHealth("Failed", False, "Unhealthy", message or "; ".join(not_serving))
    if status == "DELETING":
        return ServeHealth("Creating", False, "Deleting", message)
    return ServeHealth("Creating", False, "Deploying", message or f"Serve application is {status or 'pending'}")


@dataclass(frozen=True)
class AppView:
    """Inputs of one application's status."""

    problems: Sequence[Problem]
    model: ModelState | None
    deployed: bool
    """Whether the app is in the RayService being applied (it waits outside until its model is ready)."""
    serve: Mapping[str, Any] | None
    generation: int | None
    previous: Mapping[str, Any] | None


def _app_phase(view: AppView) -> tuple[str, list[Cond], ServeHealth | None]:
    errors = errors_in(view.problems)
    warnings = [p for p in view.problems if p.severity != "error"]
    if errors:
        why = describe(errors)
        return "Failed", [Cond("Precheck", False, "PrecheckFailed", why),
                          Cond("Loaded", None, "PrecheckFailed", ""),
                          Cond("Ready", False, "PrecheckFailed", why)], None
    precheck = Cond("Precheck", True, "PrecheckPass",
                    "passed" + (f" with warnings: {describe(warnings)}" if warnings else ""))
    model = view.model
    if not view.deployed:
        reason = model.reason if model else "ModelNotReady"
        message = model.message if model else "waiting for the model"
        return "Loading", [precheck, Cond("Loaded", False, reason, message),
                           Cond("Ready", False, "WaitingForModel", "the model is not ready yet")], None
    loaded = (Cond("Loaded", True, "ModelLoaded", "the referenced model is loaded") if model is None or model.ready
              else Cond("Loaded", False, model.reason, model.message))
    health = serve_health(view.serve)
    return health.phase, [precheck, loaded, Cond("Ready", health.ready, health.reason, health.message)], health


def _ready_count(health: ServeHealth | None, wanted: int, previous: Mapping[str, Any] | None) -> int:
    # The RayService reports no replica counts: HEALTHY means Serve runs its target, so all are ready;
    # while scaling up, the count last seen healthy is kept (never above the new target).
    if health is None or not health.ready:
        return 0
    if health.scaling_up:
        return min(int((previous or {}).get("readyReplicas") or 0), wanted)
    return wanted


def application_status(view: AppView, wanted: int, now: float) -> Status:
    """``ArksApplication.status``. ``wanted`` is the Serve target (for autoscaling apps, the initial count)."""
    phase, conds, health = _app_phase(view)
    ready = _ready_count(health, wanted, view.previous)
    out: Status = {
        "phase": phase,
        "replicas": wanted if view.deployed and not errors_in(view.problems) else 0,
        "readyReplicas": ready,
        "updatedReplicas": ready,
        "conditions": conditions(conds, (view.previous or {}).get("conditions"), now, view.generation),
    }
    if view.generation is not None:
        out["observedGeneration"] = view.generation
    return out


def disaggregated_status(view: AppView, roles: Mapping[str, int], now: float) -> Status:
    """``ArksDisaggregatedApplication.status``: the same phases, with per-role counts."""
    phase, conds, health = _app_phase(view)
    out: Status = {"phase": phase,
                   "conditions": conditions(conds, (view.previous or {}).get("conditions"), now, view.generation)}
    for role, wanted in roles.items():
        prev = (view.previous or {}).get(role)
        ready = _ready_count(health, wanted, prev if isinstance(prev, Mapping) else None)
        out[role] = {"replicas": wanted, "readyReplicas": ready, "updatedReplicas": ready}
    if view.generation is not None:
        out["observedGeneration"] = view.generation
    return out


def endpoint_status(endpoint: Endpoint | None, problems: Sequence[Problem], serving: set[str],
                    previous: Mapping[str, Any] | None, generation: int | None, now: float,
                    reported: Mapping[tuple[str, str], float] | None = None) -> Status:
    """``ArksEndpoint.status``: the backends the gateway routes to, each with its effective weight.

    The effective weight is what the gateway replicas reported (configured weight x health x SLO
    factor, averaged over replicas, rounded to 2 decimals so noise does not rewrite the status) when
    they report through a shared store. Otherwise it is what the operator can see itself: an app
    counts with its weight only while its Serve application is Running; static URL or Service
    backends always count."""
    routes: list[dict[str, Any]] = []
    for b in endpoint.backends if endpoint else ():
        seen = (reported or {}).get((endpoint.name, b.name)) if endpoint else None
        if seen is not None:
            effective: float = round(seen, 2)
        else:
            effective = b.weight if b.kind == "http" or b.name in serving else 0
        routes.append({"name": b.name, "kind": "ArksApplication" if b.kind == "app" else "Service",
                       "weight": b.weight, "effectiveWeight": float(effective)})
    errors = errors_in(problems)
    if errors or endpoint is None:
        cond = Cond("Ready", False, "InvalidSpec", describe(errors) or "the endpoint was not compiled")
    elif any(r["effectiveWeight"] > 0 for r in routes):
        cond = Cond("Ready", True, "Routable", describe(problems))
    else:
        cond = Cond("Ready", False, "NoReadyBackends", describe(problems) or "no backend is serving yet")
    return {"routes": routes, "conditions": conditions([cond], (previous or {}).get("conditions"), now, generation)}


def _token_reason(problem: Problem) -> str:
    path = problem.path
    if path.startswith("spec.tokenSecretRef.name"):
        return "SecretNotFound"
    if path.startswith("spec.tokenSecretRef.key"):
        return "SecretKeyMissing"
    if path == "spec.token" and "same value" in problem.message:
        return "DuplicateValue"
    if path.startswith("spec.qos") and path.endswith("quota.name"):
        return "QuotaNotFound"
    return "InvalidSpec"


def token_status(token: Token | None, problems: Sequence[Problem], *, disabled: bool, expired: bool,
                 previous: Mapping[str, Any] | None, generation: int | None, now: float) -> Status:
    """``ArksToken.status``: Ready, with the problem as the reason, and the digest's first 8 hex digits."""
    errors = errors_in(problems)
    if errors:
        cond = Cond("Ready", False, _token_reason(errors[0]), describe(errors))
    elif token is None:
        cond = Cond("Ready", False, "InvalidSpec", "the token was not compiled")
    elif disabled:
        cond = Cond("Ready", False, "Disabled", "spec.disabled is true")
    elif expired:
        cond = Cond("Ready", False, "Expired", "spec.expiresAt has passed")
    else:
        cond = Cond("Ready", True, "Accepted", describe(problems) or "the gateway accepts this token")
    return {"conditions": conditions([cond], (previous or {}).get("conditions"), now, generation),
            "digestPrefix": token.digest[:8] if token is not None else None}


def quota_status(budgets: Sequence[str], used: Mapping[str, int] | None, period_start: float | None,
                 problems: Sequence[Problem], previous: Mapping[str, Any] | None, generation: int | None,
                 now: float) -> Status:
    """``ArksQuota.status``: usage per budget type, mirrored from the counter store when ``used`` is given.

    Within one period the recorded usage never goes down: after the store lost its data, the operator
    restores it from this status, and mirroring a zero first would erase it. ``lastUpdateTime`` moves
    only when the value does, so an idle quota costs no writes. Without a store (``used`` None) only
    the condition is written."""
    prev = previous or {}
    errors = errors_in(problems)
    cond = (Cond("Ready", False, "InvalidSpec", describe(errors)) if errors else
            Cond("Ready", True, "Mirrored" if used is not None else "Accepted",
                 "usage mirrored from the counter store" if used is not None else "no counter store to mirror"))
    out: Status = {"conditions": conditions([cond], prev.get("conditions"), now, generation)}
    if used is None:
        return out
    start = timestamp(period_start) if period_start is not None else None
    before: dict[str, Mapping[str, Any]] = {}
    if prev.get("periodStart") == start:
        before = {str(u.get("type")): u for u in prev.get("quotaStatus") or [] if isinstance(u, Mapping)}
    rows = []
    for kind in budgets:
        old = before.get(kind, {})
        old_used = int(old.get("used") or 0)
        value = max(int(used.get(kind, 0)), old_used)
        keep = bool(old) and value == old_used and old.get("lastUpdateTime")
        rows.append({"type": kind, "used": value, "lastUpdateTime": old["lastUpdateTime"] if keep else timestamp(now)})
    out["quotaStatus"] = rows
    out["periodStart"] = start
    return out
