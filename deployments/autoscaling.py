"""The arks-ray SLO autoscaling policy, as a Ray Serve custom ``AutoscalingPolicy``.

Rendered for every ArksApplication with ``spec.autoscaling`` (``arks_ray.autoscaling.config``) as
``autoscaling_config.policy = {policy_function: "deployments.autoscaling:SloAutoscalingPolicy",
policy_kwargs: {...}}``. The Serve controller instantiates the class once per deployment with the
kwargs and calls it on every control-loop tick with an ``AutoscalingContext``; Serve then applies its
scaling factors, delays (rendered as 0: the policy has its own windows) and bounds.

The adapter only translates: it reads the engine replicas' reports (``record_autoscaling_stats`` in
``deployments.vllm_engine``) from ``ctx.raw_metrics``, calls the pure decision
(``arks_ray.autoscaling.decision.decide``) and keeps its memory in ``policy_state["arks"]``. Each new
decision is logged to the controller's log (``logs/serve/controller_*.log``) as one line,
``arks-autoscaling {json}``, with the app, the deployment, the action, the replica counts, the deciding
signal and the reason; the last ``log_size`` of them stay in ``policy_state["arks"]["log"]``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from arks_ray.autoscaling.decision import Decision, Memory, PolicySettings, decide
from arks_ray.autoscaling.reports import observe

logger = logging.getLogger("ray.serve")
LOG_PREFIX = "arks-autoscaling "
STATE_KEY = "arks"


def _series(raw: dict[Any, dict[Any, Any]] | None) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Serve's ``{metric: {ReplicaID: [TimeStampedValue]}}`` as plain data keyed by replica id."""
    return {str(name): {rid.unique_id: [(p.timestamp, p.value) for p in points] for rid, points in by.items()}
            for name, by in (raw or {}).items()}


class SloAutoscalingPolicy:
    """Called by the Serve controller: ``policy(ctx) -> (replicas, policy_state)``."""

    def __init__(self, **kwargs: Any) -> None:
        self.settings = PolicySettings(**kwargs)
        logger.info("%s%s", LOG_PREFIX, json.dumps({"action": "configured", "settings": kwargs}))

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        memory = Memory.from_state(ctx.policy_state.get(STATE_KEY))
        try:
            obs = observe(_series(ctx.raw_metrics), [r.unique_id for r in ctx.running_replicas], now=now,
                          target=ctx.target_num_replicas, low=ctx.capacity_adjusted_min_replicas,
                          high=ctx.capacity_adjusted_max_replicas, queued=float(ctx.total_queued_requests or 0),
                          max_age_s=self.settings.max_metric_age_s)
            step = decide(self.settings, obs, memory)
        except Exception as exc:  # a policy bug must not take the controller's loop down: hold, and say why
            logger.exception("arks autoscaling policy failed for %s/%s", ctx.app_name, ctx.deployment_name)
            decision = Decision(ctx.target_num_replicas, "hold", "error", f"policy error: {exc!r}")
            self._log(ctx, decision.record(now, ctx.target_num_replicas))
            return ctx.target_num_replicas, {STATE_KEY: memory.to_state()}
        if step.fresh:
            self._log(ctx, step.memory.log[-1])
        return step.decision.replicas, {STATE_KEY: step.memory.to_state()}

    @staticmethod
    def _log(ctx: Any, record: dict[str, Any]) -> None:
        line = {"app": ctx.app_name, "deployment": ctx.deployment_name, **record}
        logger.info("%s%s", LOG_PREFIX, json.dumps(line))
