"""Gateway process settings: limits, timeouts and the counter store, which are not per-tenant data.

Rendered into the gateway application's ``args`` (from ``RenderOptions.gateway_settings``) and read by the
ingress deployment's constructor. Per-tenant data (tokens, endpoints, quotas) is ``GatewayConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from arks_ray.engines import cadence


class GatewaySettings(BaseModel):
    """Settings of the gateway ingress."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(4 << 20, gt=0, description="Largest request body accepted (413 beyond).")
    seed: int | None = Field(None, description="Seed of the backend-choice RNG (tests); None is random.")
    redis_url: str | None = Field(
        None, description="Counter store shared by all replicas; without it, in memory (one replica only). "
                          "Never with a password in it: that comes from redis_password_env.")
    redis_password_env: str | None = Field(
        "ARKS_REDIS_PASSWORD", description="Environment variable holding the Redis password (on a cluster, from "
                                           "a Secret through secretKeyRef); with_secrets puts it into the URL.")
    failure_policy: Literal["failOpen", "failClosed"] = Field(
        "failOpen", description="When the store is down: admit uncounted, or refuse with 503.")
    rate_limit_algorithm: Literal["slidingWindow", "fixedWindow"] = Field(
        "slidingWindow", description="slidingWindow (no edge bursts) or fixedWindow (Arks parity).")
    default_max_tokens: int = Field(
        256, gt=0, description="Completion tokens reserved when a request sets no max_tokens.")
    store_timeout_s: float = Field(0.5, gt=0, description="Bound on one store round trip.")
    lease_seconds: int = Field(
        30, ge=3, description="Concurrency lease, renewed every third of it while its request lives: how long a "
        "slot stays taken after its holder died without settling (a replica crash, a settlement lost).")
    max_pending_settlements: int = Field(
        10_000, gt=0, description="Settlements kept for retry while the store is down (the oldest dropped beyond).")
    max_n: int = Field(128, gt=0, description="Largest 'n' (choices per request) accepted, as OpenAI caps it.")
    max_prompts: int = Field(
        2048, gt=0, description="Largest number of prompts (or inputs) in one completions/embeddings request.")

    # Routing across an endpoint's backends (arks_ray.gateway.routing).
    retry_before_first_byte: bool = Field(
        True, description="Retry a request once on another backend when its backend fails before the first byte.")
    breaker_failures: int = Field(3, gt=0, description="Consecutive backend failures that take it out of rotation.")
    breaker_cooldown_s: float = Field(5.0, gt=0, description="First time out of rotation; doubles up to the max.")
    breaker_max_cooldown_s: float = Field(60.0, gt=0, description="Longest time out of rotation between probes.")
    health_check_interval_s: float = Field(5.0, ge=0, description="Active health checks of backends; 0 disables.")
    health_check_timeout_s: float = Field(2.0, gt=0, description="Bound on one HTTP backend health check.")
    http_health_path: str = Field("/v1/models", description="Path probed on HTTP backends (any status < 500 is up).")
    http_connect_timeout_s: float = Field(5.0, gt=0, description="Connect timeout to HTTP backends.")
    http_read_timeout_s: float = Field(600.0, gt=0, description="Longest silence on an HTTP backend's answer.")
    http_max_connections: int = Field(
        0, ge=0, description="Open connections to HTTP backends per gateway replica; 0 is no limit (each stream "
        "holds one for its whole length, so a limit also caps the streams in flight).")
    http_stream_interval_ms: float = Field(
        cadence.BASE_MS, ge=0, description="Read an HTTP backend's stream at most once per this interval after its "
        "first token, so that each item relayed carries what came meanwhile (as an engine app coalesces its "
        "streams); 0 relays as the bytes come.")
    http_stream_interval_max_ms: float = Field(
        cadence.MAX_MS, ge=0, description="How far that interval grows when a replica relays more than 64 streams "
        "(in proportion to them; arks_ray.engines.cadence). At or below the base: a fixed interval.")
    first_byte_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for a backend's first byte, queueing included, before it has failed.")
    slo_tolerance: float = Field(2.0, ge=1, description="Slowness against the best peer that costs no weight.")
    slo_max_change_per_s: float = Field(0.5, gt=0, description="Bound on how fast an SLO factor moves.")
    slo_queue_target: int = Field(64, gt=0, description="In-flight requests per backend above which its weight drops.")
    backend_header: bool = Field(
        False, description="Name the backend that answered in an x-arks-backend response header.")
    route_report_interval_s: float = Field(
        10.0, gt=0, description="How often effective weights are published (metrics; the store, for status).")

    # Observability (deployments.gateway_metrics).
    metrics: bool = Field(True, description="Per-tenant gateway metrics through Ray's metrics agent.")
    access_log: bool = Field(True, description="One JSON line per finished request on stdout (no token, no prompt).")
    metrics_max_token_names: int = Field(
        100, ge=0, description="Distinct token names one replica labels in metrics; later ones count as '_other'.")

    def with_secrets(self, environ: Mapping[str, str]) -> GatewaySettings:
        """These settings with the secrets the replica's environment holds: the Redis password goes into
        ``redis_url`` (unless the URL has credentials already). Called in the replica, never rendered."""
        password = environ.get(self.redis_password_env, "") if self.redis_password_env else ""
        url = self.redis_url
        if not password or not url or "://" not in url or "@" in url.split("://", 1)[1].split("/", 1)[0]:
            return self
        scheme, rest = url.split("://", 1)
        return self.model_copy(update={"redis_url": f"{scheme}://:{quote(password, safe='')}@{rest}"})
