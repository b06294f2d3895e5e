"""ArksEndpoint: the model name clients send, and the weighted backends behind it.

Read by the renderer, which compiles endpoints into the gateway configuration. The endpoint's
``metadata.name`` is the OpenAI ``model``; its discovered backends are the ArksApplications whose
served model name matches, each at ``defaultWeight``. ``routeConfigs`` adds static backends, or (with
``kind: ArksApplication``) overrides one app's weight. ``pricing`` is an arks-ray extension.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from arks_ray.api.common import KubeObject, ObjectMeta, Spec, Status


class ParentReference(Spec):
    """Gateway API ParentReference. Accepted for compatibility; arks-ray's gateway is its own ingress."""

    name: str = Field(description="Gateway name.")
    group: str | None = Field(None, description="Gateway API group.")
    kind: str | None = Field(None, description="Parent kind.")
    namespace: str | None = Field(None, description="Parent namespace.")
    section_name: str | None = Field(None, description="Listener name.")
    port: int | None = Field(None, ge=1, le=65535, description="Listener port.")


class BackendRef(Spec):
    """A static backend (Gateway API HTTPBackendRef), or a weight override for one ArksApplication."""

    name: str = Field(
        min_length=1,
        description="Service name, an http(s):// URL, or (with kind ArksApplication) the app's name.")
    namespace: str | None = Field(None, description="Service namespace; default the endpoint's.")
    port: int | None = Field(None, ge=1, le=65535, description="Service port.")
    weight: int = Field(1, ge=0, le=1_000_000, description="Relative weight; 0 drains the backend.")
    group: str | None = Field(None, description="Backend group ('' for core Services).")
    kind: str | None = Field(None, description="Service (default) or ArksApplication.")
    filters: list[KubeObject] | None = Field(None, max_length=16, description="Gateway API filters (ignored).")


class Pricing(Spec):
    """Prices for cost quotas, in integer micro-units of currency per million tokens (extension)."""

    prompt_per_million: int = Field(0, ge=0, description="Micro-units per 1M prompt tokens.")
    completion_per_million: int = Field(0, ge=0, description="Micro-units per 1M completion tokens.")


class ArksEndpointSpec(Spec):
    """Desired state of an ArksEndpoint."""

    default_weight: int = Field(1, ge=0, description="Weight of every discovered ArksApplication backend.")
    gateway_ref: ParentReference | None = Field(None, description="Accepted for Arks compatibility; unused.")
    match_configs: list[KubeObject] = Field(
        default_factory=list, max_length=16,
        description="Gateway API HTTPRouteMatch list; accepted for compatibility, the ingress serves /v1/*.")
    route_configs: list[BackendRef] = Field(default_factory=list, max_length=16,
                                            description="Static backends and per-app weights.")
    pricing: Pricing | None = Field(None, description="Token prices for cost quotas (extension).")


class RouteStatus(Status):
    """One effective backend."""

    name: str = Field(description="Backend name.")
    kind: str = Field("ArksApplication", description="ArksApplication or Service.")
    weight: int = Field(0, description="Configured weight.")
    effective_weight: float | None = Field(None, description="Weight after health and SLO factors.")


class ArksEndpointStatus(Status):
    """Observed state of an ArksEndpoint."""

    routes: list[RouteStatus] = Field(default_factory=list, description="Effective backends and weights.")


class ArksEndpoint(Spec):
    """A served model name and its backends (ArksEndpoint, arks.ai/v1)."""

    api_version: Literal["arks.ai/v1"] = Field("arks.ai/v1", description="arks.ai/v1")
    kind: Literal["ArksEndpoint"] = Field("ArksEndpoint", description="ArksEndpoint")
    metadata: ObjectMeta
    spec: ArksEndpointSpec = Field(default_factory=ArksEndpointSpec)
    status: ArksEndpointStatus | None = None
