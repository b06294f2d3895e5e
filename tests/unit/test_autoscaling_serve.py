"""The autoscaling policy and request routers as Ray Serve 2.60 itself loads and calls them.

No cluster: the rendered ``deployment_config`` goes through Ray's own models (``DeploymentConfig``,
``AutoscalingPolicy``, ``RequestRouterConfig``), the policy is resolved the way the Serve controller does
it (``_resolve_policy_callable``, wrapped by ``_apply_autoscaling_config``) and called with real
``AutoscalingContext`` objects holding replica reports in Serve's own types.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve._private.config import DeploymentConfig
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy, RequestRouterConfig

from arks_ray.api.application import ArksApplication
from arks_ray.autoscaling import replica as keys
from arks_ray.render.serve_config import ROUTERS, deployment_config
from deployments.autoscaling import LOG_PREFIX, STATE_KEY, SloAutoscalingPolicy
from deployments.vllm_engine import attach_engine_stats

DEP = DeploymentID(name="arks-engine:tiny", app_name="tiny")


def app(**spec: Any) -> ArksApplication:
    return ArksApplication.model_validate({"metadata": {"name": "tiny"}, "spec": {
        "model": {"name": "tiny-qwen2"}, "instanceSpec": {}, **spec}})


AUTOSCALED = app(autoscaling={"minReplicas": 1, "maxReplicas": 2, "targetOngoingRequests": 4,
                              "upscaleDelaySeconds": 30, "downscaleDelaySeconds": 60,
                              "slo": {"ttftMs": 500, "percentile": 90}})


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_rendered_deployment_configs_are_valid_for_serve(router: str) -> None:
    raw = deployment_config(app(routing={"router": router}, autoscaling={"maxReplicas": 3}))
    config = DeploymentConfig(**raw)  # what LLMConfig's validator and Serve build from it
    assert config.request_router_config.request_router_class == ROUTERS[router]
    router_cls = config.request_router_config.get_request_router_class()
    assert router_cls.__name__ == ROUTERS[router].rsplit(":", 1)[1]
    assert config.autoscaling_config is not None
    assert config.autoscaling_config.policy.policy_function == "deployments.autoscaling:SloAutoscalingPolicy"
    assert not config.autoscaling_config.policy.is_default_policy_function()


def test_every_router_class_path_imports() -> None:
    for path in ROUTERS.values():
        assert RequestRouterConfig(request_router_class=path).get_request_router_class() is not None


@pytest.fixture
def policy_log() -> Iterator[list[dict[str, Any]]]:
    """The policy's log lines, parsed (Ray's serve logger does not propagate to pytest's caplog)."""
    records: list[dict[str, Any]] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(LOG_PREFIX):
                records.append(json.loads(message[len(LOG_PREFIX):]))

    handler = Grab()
    logging.getLogger("ray.serve").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)


def controller_policy(config: AutoscalingConfig) -> Any:
    """The policy exactly as the Serve controller builds it from the config."""
    return _apply_autoscaling_config(_resolve_policy_callable(config.policy))


def context(config: AutoscalingConfig, now: float, reports: dict[str, list[tuple[float, dict[str, float]]]],
            state: dict[str, Any], target: int = 1) -> AutoscalingContext:
    replicas = [ReplicaID(unique_id=r, deployment_id=DEP) for r in reports]
    raw: dict[str, dict[ReplicaID, list[TimeStampedValue]]] = {}
    for rid, points in zip(replicas, reports.values(), strict=True):
        for at, values in points:
            for name, value in values.items():
                raw.setdefault(name, {}).setdefault(rid, []).append(TimeStampedValue(at, value))
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=len(replicas),
        target_num_replicas=target, running_replicas=replicas, total_num_requests=lambda: 3.0,
        total_queued_requests=lambda: 0.0, aggregated_metrics=None, raw_metrics=lambda: raw,
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state, last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


def report(ttft: float) -> dict[str, float]:
    return {keys.IN_FLIGHT: 3.0, keys.TTFT_MS: ttft, keys.TTFT_SAMPLES: 40.0}


def test_the_controller_scales_up_on_an_slo_breach_and_logs_why(policy_log: list[dict[str, Any]]) -> None:
    config = AutoscalingConfig(**deployment_config(AUTOSCALED)["autoscaling_config"])
    policy = controller_policy(config)
    state: dict[str, Any] = {}
    decisions = []
    for now in range(1000, 1030):  # one tick per second; TTFT p90 goes over 500 ms at 1015
        ttft = 200.0 if now < 1015 else 1500.0
        replicas, state = policy(context(config, now, {"r1": [(now - 0.5, report(ttft))]}, state))
        decisions.append((now, replicas))
    first_up = next(now for now, replicas in decisions if replicas == 2)
    assert first_up == 1015 + 3  # the panic window: a tenth of upscaleDelaySeconds
    up = next(r for r in policy_log if r.get("action") == "up")
    assert (up["app"], up["deployment"], up["from"], up["to"], up["signal"]) == ("tiny", DEP.name, 1, 2, "ttft")
    assert "TTFT p90 1500 ms is over its SLO of 500 ms" in up["reason"]
    assert policy_log[0]["action"] == "configured"
    # The decision log stays in policy_state next to Serve's own delay bookkeeping.
    assert state[STATE_KEY]["log"][-1]["action"] == "up"
    assert any(k != STATE_KEY for k in state)


def test_the_controller_holds_without_metrics(policy_log: list[dict[str, Any]]) -> None:
    config = AutoscalingConfig(**deployment_config(AUTOSCALED)["autoscaling_config"])
    policy = controller_policy(config)
    state: dict[str, Any] = {}
    for now in range(1000, 1100):
        stale_at = 900.0  # the only report is 100 s old
        replicas, state = policy(context(config, now, {"r1": [(stale_at, report(5000.0))]}, state, target=2))
        assert replicas == 2
    (hold,) = [r for r in policy_log if r.get("action") == "hold" and not r["repeat"]]
    assert hold["signal"] == "missing"
    assert "for 100s" in hold["reason"]


def test_a_policy_error_holds_and_is_logged(policy_log: list[dict[str, Any]]) -> None:
    config = AutoscalingConfig(**deployment_config(AUTOSCALED)["autoscaling_config"])
    policy = SloAutoscalingPolicy(**config.policy.policy_kwargs)
    broken = context(config, 1000, {"r1": [(999.0, {keys.IN_FLIGHT: float("nan"), keys.TTFT_SAMPLES: 1e12})]}, {})
    broken.__dict__["raw_metrics"] = {"x": "not a series"}  # the lazy property, already evaluated
    replicas, state = policy(broken)
    assert replicas == 1
    assert policy_log[-1]["signal"] == "error"
    assert STATE_KEY in state


def test_the_policy_kwargs_survive_serve_serialization() -> None:
    raw = deployment_config(AUTOSCALED)["autoscaling_config"]["policy"]
    policy = AutoscalingPolicy(**raw)
    clone = AutoscalingPolicy.from_serialized_policy_def(policy.model_dump(), policy.get_serialized_policy_def())
    instance = _resolve_policy_callable(clone)
    assert type(instance).__name__ == "SloAutoscalingPolicy"  # pickled by value: a copy of the class
    assert instance.settings.ttft_ms == 500
    assert instance.settings.percentile == 90


def test_engine_stats_are_optional() -> None:
    from arks_ray.autoscaling.replica import ReplicaStats

    class NoStats:
        _engine_client = object()  # an engine client without vLLM's logger manager

    assert attach_engine_stats(NoStats(), ReplicaStats()) is False
