"""``arks-ray up``'s gateway replica count: one per 8 cores with a shared counter store, 1 without one, and the
warning when a user asks for more than one without Redis (each replica would count limits on its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from arks_ray.api.loading import load_yaml
from arks_ray.cli import app
from arks_ray.local import runner
from tests.unit.test_local_gpus import app_yaml


@pytest.mark.parametrize(("cores", "replicas"), [(1, 1), (2, 1), (7, 1), (8, 1), (16, 2), (24, 3), (128, 4)])
def test_one_gateway_replica_per_8_cores_with_redis(cores: int, replicas: int) -> None:
    assert runner.default_gateway_replicas(True, cores) == replicas


def test_one_gateway_replica_without_a_shared_store() -> None:
    assert runner.default_gateway_replicas(False, 128) == 1


def test_the_plan_counts_the_cores_only_with_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_yaml(app_yaml(tmp_path, replicas=1, gpus=0), source="t")
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert runner.plan(loaded, "default", 8000).gateway_replicas == 1
    redis = {"redis_url": "redis://127.0.0.1:6379/0"}
    assert runner.plan(loaded, "default", 8000, gateway_settings=redis).gateway_replicas == 2
    assert runner.plan(loaded, "default", 8000, gateway_settings=redis, gateway_replicas=3).gateway_replicas == 3
    with pytest.raises(runner.LocalError, match="at least 1"):
        runner.plan(loaded, "default", 8000, gateway_replicas=0)


def _up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    """``up`` stopped at ``start_ray``, which raises: what it printed before."""
    def stop(*a: Any, **k: Any) -> None:
        raise runner.LocalError("stopped before Ray")
    monkeypatch.setattr(runner, "start_ray", stop)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(16)))
    manifest = tmp_path / "app.yaml"
    manifest.write_text(app_yaml(tmp_path, replicas=1, gpus=0))
    return CliRunner().invoke(app, ["up", "-f", str(manifest), "--num-gpus", "0", *args])


def test_up_says_how_many_gateway_replicas_and_warns_without_redis(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    result = _up(tmp_path, monkeypatch, "--gateway-replicas", "2")
    assert "without --redis-url: each replica counts rate limits and quotas in its own memory" in result.output
    assert "gateway (2 replicas)" in result.output
    plain = _up(tmp_path, monkeypatch)
    assert "gateway (1 replica)" in plain.output
    assert "warning" not in plain.output
    assert "gateway (2 replicas)" in _up(tmp_path, monkeypatch, "--redis-url", "redis://127.0.0.1:1/0").output


def test_up_refuses_zero_gateway_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _up(tmp_path, monkeypatch, "--gateway-replicas", "0")
    assert result.exit_code == 2, result.output
