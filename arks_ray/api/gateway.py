"""The gateway configuration: what the renderer pushes to the ingress as its Serve ``user_config``.

Written by ``arks_ray.render`` (and so by the controller), read by the ingress deployment's
``reconfigure()``. It is the only channel between the two, so it is versioned data, not code. It holds
token digests only, never a plaintext token.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from arks_ray.api.endpoint import Pricing
from arks_ray.api.quota import QuotaPeriod, QuotaType
from arks_ray.api.token import RateLimitType

GATEWAY_APP = "gateway"
SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backend(_Frozen):
    """One weighted backend of an endpoint."""

    kind: Literal["app", "http"] = Field(description="app: a Serve application; http: an OpenAI-compatible URL.")
    name: str = Field(description="Serve application name, or a label for an http backend.")
    weight: int = Field(ge=0, description="Relative weight; 0 drains.")
    url: str | None = Field(None, description="Base URL (without /v1) of an http backend.")
    slo_ttft_ms: float | None = Field(None, gt=0, description="The app's TTFT target; breaching it lowers the weight.")
    slo_tpot_ms: float | None = Field(None, gt=0, description="The app's TPOT target; breaching it lowers the weight.")
    session_header: str | None = Field(
        None, description="Request header whose value keys the app's consistent-hash replica routing.")
    adapter: str | None = Field(
        None, exclude_if=lambda v: v is None,  # absent unless set: configs without LoRA render as before
        description="LoRA adapter id ('<base>:<adapter>') the app serves this endpoint with: sent as the "
                          "Serve multiplexed model id, so replicas that have it loaded are preferred.")


class Endpoint(_Frozen):
    """A model name clients may send, and its backends."""

    name: str
    backends: tuple[Backend, ...] = ()
    pricing: Pricing | None = None


class Limit(_Frozen):
    """A rate limit of a token on one endpoint."""

    type: RateLimitType
    value: int = Field(ge=0)


class Grant(_Frozen):
    """A token's access to one endpoint."""

    endpoint: str
    rate_limits: tuple[Limit, ...] = ()
    quota: str | None = None


class Token(_Frozen):
    """A token as the gateway knows it: its digest, never its value."""

    name: str = Field(description="ArksToken name: the user identity in logs, metrics and headers.")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the bearer token, hex.")
    disabled: bool = False
    expires_at: float | None = Field(None, description="Unix time after which the token is refused.")
    grants: tuple[Grant, ...] = ()


class QuotaBudget(_Frozen):
    """One budget of a quota."""

    type: QuotaType
    value: int = Field(ge=0)


class Quota(_Frozen):
    """An ArksQuota as the gateway enforces it."""

    name: str
    period: QuotaPeriod = "lifetime"
    budgets: tuple[QuotaBudget, ...] = ()


class GatewayConfig(_Frozen):
    """Everything the ingress needs to authenticate, authorise, limit and route, for one namespace."""

    schema_version: int = SCHEMA_VERSION
    namespace: str = "default"
    endpoints: tuple[Endpoint, ...] = ()
    tokens: tuple[Token, ...] = ()
    quotas: tuple[Quota, ...] = ()

    @property
    def counts(self) -> bool:
        """Whether the gateway counts anything per token: a rate limit or a quota. Without a shared counter store
        each replica would count them on its own, so the renderer then runs one replica."""
        return bool(self.quotas) or any(g.rate_limits or g.quota for t in self.tokens for g in t.grants)
