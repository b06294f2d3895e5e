"""Gateway process settings: limits and timeouts that are not per-tenant data.

Rendered into the gateway application's ``args`` (from ``RenderOptions.gateway_settings``) and read by the
ingress deployment's constructor. Per-tenant data (tokens, endpoints, quotas) is ``GatewayConfig``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GatewaySettings(BaseModel):
    """Settings of the gateway ingress."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(4 << 20, gt=0, description="Largest request body accepted (413 beyond).")
    first_chunk_timeout_s: float = Field(600.0, gt=0, description="How long to wait for a backend's first byte.")
    seed: int | None = Field(None, description="Seed of the backend-choice RNG (tests); None is random.")
