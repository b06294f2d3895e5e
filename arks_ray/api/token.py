"""ArksToken: an API key as a Kubernetes object, with per-endpoint rate limits and quota.

Read by the renderer, which turns tokens into SHA-256 digests for the gateway; the plaintext never
leaves the renderer's input. ``tokenSecretRef``, ``expiresAt`` and ``disabled`` are extensions, as are the
rph, tph and concurrency limit types.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from arks_ray.api.common import (
    Condition,
    LocalObjectReference,
    ObjectMeta,
    SecretKeyReference,
    Spec,
    Status,
    require_unique,
)

RateLimitType = Literal["rpm", "rph", "rpd", "tpm", "tph", "tpd", "concurrency"]


class RateLimit(Spec):
    """One limit: requests or tokens per minute/hour/day, or requests in flight."""

    type: RateLimitType = Field(description="rpm, rph, rpd, tpm, tph, tpd or concurrency.")
    value: int = Field(ge=0, description="The limit; 0 blocks everything, as in Arks.")


class QoS(Spec):
    """What a token may do with one endpoint."""

    arks_endpoint: LocalObjectReference = Field(description="The ArksEndpoint (model name) allowed.")
    rate_limits: list[RateLimit] = Field(default_factory=list, description="Limits per token per endpoint.")
    quota: LocalObjectReference | None = Field(None, description="ArksQuota shared with other tokens.")

    @model_validator(mode="after")
    def _unique_types(self) -> QoS:
        require_unique([limit.type for limit in self.rate_limits], "rateLimits[{i}].type")
        return self


class ArksTokenSpec(Spec):
    """Desired state of an ArksToken."""

    token: str | None = Field(None, min_length=1, description="The bearer secret. Prefer tokenSecretRef.")
    token_secret_ref: SecretKeyReference | None = Field(
        None, description="Secret key holding the bearer secret (extension).")
    expires_at: datetime | None = Field(None, description="After this instant the token is refused (extension).")
    disabled: bool = Field(False, description="Refuse the token without deleting it (extension).")
    qos: list[QoS] = Field(min_length=1, description="Endpoints this token may use, each with its limits.")

    @model_validator(mode="after")
    def _one_secret(self) -> ArksTokenSpec:
        if (self.token is None) == (self.token_secret_ref is None):
            raise ValueError("set exactly one of token and tokenSecretRef")
        require_unique([q.arks_endpoint.name for q in self.qos], "qos[{i}].arksEndpoint.name")
        return self


class ArksTokenStatus(Status):
    """Observed state of an ArksToken."""

    conditions: list[Condition] = Field(default_factory=list, description="Ready, with problems as reasons.")
    digest_prefix: str | None = Field(None, description="First 8 hex digits of the token's keyed digest "
                                                                    "(HMAC-SHA256 under the namespace's key).")


class ArksToken(Spec):
    """An API key (ArksToken, arks.ai/v1)."""

    api_version: Literal["arks.ai/v1"] = Field("arks.ai/v1", description="arks.ai/v1")
    kind: Literal["ArksToken"] = Field("ArksToken", description="ArksToken")
    metadata: ObjectMeta
    spec: ArksTokenSpec
    status: ArksTokenStatus | None = None


__all__ = ["ArksToken", "ArksTokenSpec", "ArksTokenStatus", "LocalObjectReference", "QoS", "RateLimit"]
