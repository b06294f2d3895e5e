"""Compile endpoints, tokens and quotas of one namespace into the gateway's ``GatewayConfig``.

Called by ``arks_ray.render.rayservice``. Token values become keyed digests here (HMAC-SHA256 under the
namespace's key, ``arks_ray.api.digests``) and go no further; without a key, no token is rendered.
Cross-object problems (a token for a missing endpoint, two tokens with the same value, a Secret that
is absent) are reported per object; the offending token is left out, never half-included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from arks_ray.api.application import ArksApplication
from arks_ray.api.digests import TokenKeys
from arks_ray.api.disaggregated import ArksDisaggregatedApplication
from arks_ray.api.endpoint import ArksEndpoint
from arks_ray.api.gateway import (
    Backend,
    Endpoint,
    GatewayConfig,
    Grant,
    Limit,
    Quota,
    QuotaBudget,
    Token,
)
from arks_ray.api.loading import Secret
from arks_ray.api.quota import ArksQuota
from arks_ray.api.token import ArksToken
from arks_ray.errors import Problem

NO_KEY = ("no token key is configured, so no token can be rendered (the operator reads it from the Secret "
          "named in the chart, `arks-ray up` keeps one under ~/.cache/arks-ray)")


def _backend_for(ref_name: str, port: int | None, namespace: str) -> Backend:
    if ref_name.startswith(("http://", "https://")):
        return Backend(kind="http", name=ref_name, weight=0, url=ref_name.rstrip("/"))
    host = ref_name if "." in ref_name else f"{ref_name}.{namespace}.svc"
    return Backend(kind="http", name=ref_name, weight=0, url=f"http://{host}:{port or 80}")


def app_backend(app: ArksApplication | ArksDisaggregatedApplication, weight: int) -> Backend:
    """An app backend, with the app's SLO (it lowers the weight when breached) and session header."""
    fields: dict[str, object] = {}
    if isinstance(app, ArksApplication):
        spec = app.spec
        slo = spec.autoscaling.slo if spec.autoscaling else None
        if slo is not None:
            fields.update(slo_ttft_ms=slo.ttft_ms, slo_tpot_ms=slo.tpot_ms)
        if spec.routing is not None and spec.routing.router == "consistentHash":
            fields["session_header"] = spec.routing.session_header.lower()
    return Backend(kind="app", name=app.metadata.name, weight=weight, **fields)


def compile_endpoint(
    endpoint: ArksEndpoint, apps: Iterable[ArksApplication | ArksDisaggregatedApplication], namespace: str
) -> tuple[Endpoint, list[Problem]]:
    """Discovered apps at defaultWeight, per-app overrides, then static backends, in a stable order."""
    name = endpoint.metadata.name
    spec = endpoint.spec
    problems: list[Problem] = []
    serving = {a.metadata.name: a for a in apps if a.spec.model_name == name}
    matching = sorted(serving)
    weights = {app: spec.default_weight for app in matching}
    backends: list[Backend] = []
    for i, ref in enumerate(spec.route_configs):
        if ref.kind == "ArksApplication":
            if ref.name not in weights:
                problems.append(Problem("ArksEndpoint", name, f"spec.routeConfigs[{i}].name",
                                        f"no ArksApplication {ref.name!r} serves model {name!r}", "warning"))
                continue
            weights[ref.name] = ref.weight
        else:
            ns = ref.namespace or namespace
            backends.append(_backend_for(ref.name, ref.port, ns).model_copy(update={"weight": ref.weight}))
    discovered = [app_backend(serving[app], w) for app, w in weights.items()]
    if not discovered and not backends:
        problems.append(Problem("ArksEndpoint", name, "metadata.name",
                                "no ArksApplication serves this model name and no routeConfigs are set", "warning"))
    return Endpoint(name=name, backends=(*discovered, *backends), pricing=spec.pricing), problems


def adapter_endpoints(endpoint: Endpoint,
                      apps: Iterable[ArksApplication | ArksDisaggregatedApplication]) -> list[Endpoint]:
    """One endpoint per LoRA adapter of the apps behind ``endpoint``, named ``<endpoint>:<adapter>``.

    Its backends are the endpoint's app backends that list the adapter, at the same weights, each told
    the adapter id; tokens are granted it, and limited and charged on it, as on any endpoint."""
    listed: dict[str, set[str]] = {}
    for app in apps:
        if isinstance(app, ArksApplication) and app.spec.lora is not None:
            listed[app.metadata.name] = {a.name for a in app.spec.lora.adapters}
    names = sorted({a for b in endpoint.backends if b.kind == "app" for a in listed.get(b.name, ())})
    out = []
    for adapter in names:
        ident = f"{endpoint.name}:{adapter}"
        backends = tuple(b.model_copy(update={"adapter": ident}) for b in endpoint.backends
                         if b.kind == "app" and adapter in listed.get(b.name, ()))
        out.append(Endpoint(name=ident, backends=backends, pricing=endpoint.pricing))
    return out


def compile_token(
    token: ArksToken, secrets: Mapping[tuple[str, str], Secret], endpoints: set[str], quotas: set[str], namespace: str,
    keys: TokenKeys | None = None,
) -> tuple[Token | None, list[Problem]]:
    """One token, its value digested under ``keys`` (the namespace's, already derived)."""
    name = token.metadata.name
    spec = token.spec
    problems: list[Problem] = []
    if keys is None:
        return None, [Problem("ArksToken", name, "spec.token", NO_KEY)]
    value = spec.token
    if spec.token_secret_ref is not None:
        ref = spec.token_secret_ref
        secret = secrets.get((namespace, ref.name))
        if secret is None:
            return None, [Problem("ArksToken", name, "spec.tokenSecretRef.name", f"Secret {ref.name!r} not found")]
        value = secret.data.get(ref.key)
        if not value:
            return None, [Problem("ArksToken", name, "spec.tokenSecretRef.key",
                                  f"Secret {ref.name!r} has no non-empty key {ref.key!r}")]
    assert value is not None  # the model guarantees token or tokenSecretRef
    grants = []
    for i, qos in enumerate(spec.qos):
        if qos.arks_endpoint.name not in endpoints:
            problems.append(Problem("ArksToken", name, f"spec.qos[{i}].arksEndpoint.name",
                                    f"ArksEndpoint {qos.arks_endpoint.name!r} not found", "warning"))
        if qos.quota is not None and qos.quota.name not in quotas:
            problems.append(Problem("ArksToken", name, f"spec.qos[{i}].quota.name",
                                    f"ArksQuota {qos.quota.name!r} not found"))
            return None, problems
        grants.append(Grant(
            endpoint=qos.arks_endpoint.name,
            rate_limits=tuple(Limit(type=r.type, value=r.value) for r in qos.rate_limits),
            quota=qos.quota.name if qos.quota else None,
        ))
    expires = spec.expires_at.timestamp() if spec.expires_at else None
    return Token(name=name, digest=keys.digest(value), disabled=spec.disabled, expires_at=expires,
                 grants=tuple(grants)), problems


def compile_quota(quota: ArksQuota) -> Quota:
    """Budgets only: usage lives in the counter store (the operator restores it from the status there,
    so a usage change never touches the RayService)."""
    return Quota(name=quota.metadata.name, period=quota.spec.period,
                 budgets=tuple(QuotaBudget(type=q.type, value=q.value) for q in quota.spec.quotas))


def compile_gateway(
    namespace: str,
    apps: list[ArksApplication | ArksDisaggregatedApplication],
    endpoints: list[ArksEndpoint],
    tokens: list[ArksToken],
    quotas: list[ArksQuota],
    secrets: Mapping[tuple[str, str], Secret],
    keys: TokenKeys | None = None,
) -> tuple[GatewayConfig, list[Problem]]:
    """The namespace's gateway config; ``keys`` are the installation's (derived per namespace here)."""
    ns_keys = keys.for_namespace(namespace) if keys is not None else None
    problems: list[Problem] = []
    compiled_endpoints = []
    for ep in sorted(endpoints, key=lambda e: e.metadata.name):
        endpoint, found = compile_endpoint(ep, apps, namespace)
        compiled_endpoints.append(endpoint)
        compiled_endpoints += adapter_endpoints(endpoint, apps)
        problems += found
    endpoint_names = {e.name for e in compiled_endpoints}
    quota_names = {q.metadata.name for q in quotas}
    compiled_tokens: list[Token] = []
    owners: dict[str, str] = {}
    for tok in sorted(tokens, key=lambda t: t.metadata.name):
        compiled, found = compile_token(tok, secrets, endpoint_names, quota_names, namespace, ns_keys)
        problems += found
        if compiled is None:
            continue
        if compiled.digest in owners:
            # Arks let the first match win silently; a shared value is ambiguous, so refuse both sides.
            other = owners[compiled.digest]
            problems.append(Problem("ArksToken", tok.metadata.name, "spec.token",
                                    f"has the same value as ArksToken {other!r}; both are refused until fixed"))
            problems.append(Problem("ArksToken", other, "spec.token",
                                    f"has the same value as ArksToken {tok.metadata.name!r}; both are refused"))
            compiled_tokens = [t for t in compiled_tokens if t.digest != compiled.digest]
            continue
        owners[compiled.digest] = tok.metadata.name
        compiled_tokens.append(compiled)
    config = GatewayConfig(
        namespace=namespace,
        endpoints=tuple(compiled_endpoints),
        tokens=tuple(compiled_tokens),
        quotas=tuple(compile_quota(q) for q in sorted(quotas, key=lambda q: q.metadata.name)),
    )
    return config, problems
