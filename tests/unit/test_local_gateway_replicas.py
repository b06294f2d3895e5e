"""``arks-ray up``'s gateway replica count: one per 8 cores (1 or 2) where replicas may scale (a shared counter
store, or nothing to count), 1 where they may not, and the warning when a user asks for more than one while limits
would be counted per replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from arks_ray.api.loading import load_yaml
from arks_ray.cli import app
from arks_ray.local import runner
from tests.unit.test_local_gpus import app_yaml

LIMITED = """
---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: big, namespace: default}
spec: {defaultWeight: 5}
---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: t, namespace: default}
spec:
  token: sk-test-only
  qos:
  - arksEndpoint: {name: big}
    rateLimits: [{type: rpm, value: 10}]
"""


@pytest.mark.parametrize(("cores", "replicas"), [(1, 1), (2, 1), (7, 1), (8, 1), (16, 2), (24, 2), (128, 2)])
def test_one_gateway_replica_per_8_cores_at_most_2_where_replicas_may_scale(cores: int, replicas: int) -> None:
    assert runner.default_gateway_replicas(True, cores) == replicas


def test_one_gateway_replica_where_limits_would_be_counted_per_replica() -> None:
    assert runner.default_gateway_replicas(False, 128) == 1


def test_the_machines_cores_are_rays_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.utils

    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda: 3)  # e.g. a cgroup's quota of 3 CPUs
    assert runner.machine_cores() == 3


def _sixteen_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "machine_cores", lambda: 16)


def test_the_plan_scales_the_gateway_unless_limits_would_be_counted_per_replica(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sixteen_cores(monkeypatch)
    plain = load_yaml(app_yaml(tmp_path, replicas=1, gpus=0), source="t")
    limited = load_yaml(app_yaml(tmp_path, replicas=1, gpus=0) + LIMITED, source="t")
    redis = {"redis_url": "redis://127.0.0.1:6379/0"}
    assert runner.plan(plain, "default", 8000).gateway_replicas == 2  # nothing to count
    assert not runner.plan(plain, "default", 8000).gateway_counts
    assert runner.plan(limited, "default", 8000).gateway_counts
    assert runner.plan(limited, "default", 8000).gateway_replicas == 1
    assert runner.plan(limited, "default", 8000, gateway_settings=redis).gateway_replicas == 2
    assert runner.plan(limited, "default", 8000, gateway_settings=redis, gateway_replicas=3).gateway_replicas == 3
    with pytest.raises(runner.LocalError, match="at least 1"):
        runner.plan(plain, "default", 8000, gateway_replicas=0)


def _up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str, extra: str = LIMITED) -> Any:
    """``up`` stopped at ``start_ray``, which raises: what it printed before."""
    def stop(*a: Any, **k: Any) -> None:
        raise runner.LocalError("stopped before Ray")
    monkeypatch.setattr(runner, "start_ray", stop)
    _sixteen_cores(monkeypatch)
    manifest = tmp_path / "app.yaml"
    manifest.write_text(app_yaml(tmp_path, replicas=1, gpus=0) + extra)
    return CliRunner().invoke(app, ["up", "-f", str(manifest), "--num-gpus", "0", *args])


def test_up_says_how_many_gateway_replicas_and_warns_when_limits_would_multiply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _up(tmp_path, monkeypatch, "--gateway-replicas", "2")
    assert "2 gateway replicas without --redis-url: each counts rate limits and quotas in its own memory" in (
        result.output)
    assert "gateway (2 replicas)" in result.output
    plain = _up(tmp_path, monkeypatch)
    assert "gateway (1 replica)" in plain.output
    assert "warning" not in plain.output
    assert "gateway (2 replicas)" in _up(tmp_path, monkeypatch, "--redis-url", "redis://127.0.0.1:1/0").output
    nothing_counted = _up(tmp_path, monkeypatch, extra="")
    assert "gateway (2 replicas)" in nothing_counted.output
    assert "warning" not in nothing_counted.output


def test_up_refuses_zero_gateway_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _up(tmp_path, monkeypatch, "--gateway-replicas", "0")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--gateway-replicas'" in result.output
