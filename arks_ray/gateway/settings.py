"""Gateway process settings: limits, timeouts and the counter store, which are not per-tenant data.

Rendered into the gateway application's ``args`` (from ``RenderOptions.gateway_settings``) and read by the
ingress deployment's constructor. Per-tenant data (tokens, endpoints, quotas) is ``GatewayConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GatewaySettings(BaseModel):
    """Settings of the gateway ingress."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(4 << 20, gt=0, description="Largest request body accepted (413 beyond).")
    seed: int | None = Field(None, description="Seed of the backend-choice RNG (tests); None is random.")
    redis_url: str | None = Field(
        None, description="Counter store shared by all replicas; without it, in memory (one replica only).")
    failure_policy: Literal["failOpen", "failClosed"] = Field(
        "failOpen", description="When the store is down: admit uncounted, or refuse with 503.")
    rate_limit_algorithm: Literal["slidingWindow", "fixedWindow"] = Field(
        "slidingWindow", description="slidingWindow (no edge bursts) or fixedWindow (Arks parity).")
    default_max_tokens: int = Field(
        256, gt=0, description="Completion tokens reserved when a request sets no max_tokens.")
    store_timeout_s: float = Field(0.5, gt=0, description="Bound on one store round trip.")
    lease_seconds: int = Field(900, gt=0, description="Concurrency lease; frees a slot if a replica dies.")
