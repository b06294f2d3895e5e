"""``ArksApplication.spec.autoscaling`` as Ray Serve's ``autoscaling_config`` with the arks-ray policy.

Called by ``arks_ray.render.serve_config.deployment_config``; ``replica_stats`` by the engine replicas,
so they measure what their policy reads. The spec's delays become the policy's
windows (``policy_kwargs``) and Serve's own delays are set to 0: Serve applies its delays *after* a
custom policy, so keeping them would delay every decision twice. Replicas push their stats every
``METRICS_INTERVAL_S`` instead of Serve's default 10 s, so a breach reaches the policy in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from arks_ray.autoscaling.decision import PolicySettings
from arks_ray.autoscaling.replica import ReplicaStats

if TYPE_CHECKING:
    from arks_ray.api.application import Autoscaling

POLICY = "deployments.autoscaling:SloAutoscalingPolicy"
METRICS_INTERVAL_S = 2.0
"""How often replicas and handles push autoscaling metrics to the Serve controller."""
LOOK_BACK_PERIOD_S = 10.0
"""Window of the replicas' metric store; replicas record a point every fifth of it."""


def policy_kwargs(a: Autoscaling) -> dict[str, Any]:
    """The ``PolicySettings`` fields the spec sets (``arks_ray.autoscaling.decision``)."""
    out: dict[str, Any] = {
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_seconds,
        "downscale_delay_s": a.downscale_delay_seconds,
    }
    if a.slo is not None:
        out["percentile"] = a.slo.percentile
        if a.slo.ttft_ms is not None:
            out["ttft_ms"] = a.slo.ttft_ms
        if a.slo.tpot_ms is not None:
            out["tpot_ms"] = a.slo.tpot_ms
    return out


def serve_autoscaling_config(a: Autoscaling, replicas: int) -> dict[str, Any]:
    """Serve's ``autoscaling_config``; ``replicas`` (``spec.replicas``) is where it starts, within bounds."""
    return {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "initial_replicas": max(a.min_replicas, min(replicas, a.max_replicas)),
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "metrics_interval_s": METRICS_INTERVAL_S,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
        "policy": {"policy_function": POLICY, "policy_kwargs": policy_kwargs(a)},
    }


def replica_stats(deployment_config: Mapping[str, Any]) -> ReplicaStats:
    """An engine replica's stats, measuring the percentile and window its deployment's policy reads.

    Called by ``deployments.vllm_engine`` with the LLMConfig's ``deployment_config``; without the
    arks-ray policy there, the defaults (p95 over 10 s)."""
    auto = deployment_config.get("autoscaling_config") or {}
    policy = auto.get("policy") if isinstance(auto, Mapping) else None
    kwargs: Mapping[str, Any] = {}
    if isinstance(policy, Mapping) and policy.get("policy_function") == POLICY:
        kwargs = policy.get("policy_kwargs") or {}
    settings = PolicySettings(**kwargs)
    return ReplicaStats(percentile=settings.percentile, window_s=settings.latency_window_s)
