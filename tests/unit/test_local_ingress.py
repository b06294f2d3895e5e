"""``arks-ray up --ingress``: what ``ray start`` gets, and the refusals before any Ray starts (no haproxy binary,
an unknown ingress). HAProxy itself runs in
``tests/e2e/test_haproxy_ingress.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from arks_ray.api.loading import load_yaml
from arks_ray.cli import app
from arks_ray.local import runner
from arks_ray.render.options import HAPROXY_ENV
from tests.unit.test_local_gpus import app_yaml


def test_ray_start_gets_the_ingress_settings_and_the_users_own_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    serve = runner.ray_env({"K": "v"})
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in serve
    assert serve["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert runner.ray_env({"K": "v"}, "haproxy").items() >= {**HAPROXY_ENV, "K": "v"}.items()
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert runner.ray_env({}, "haproxy")["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_haproxy_without_its_binary_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_yaml(app_yaml(tmp_path, replicas=1, gpus=0), source="t")
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    with pytest.raises(runner.LocalError, match="--ingress haproxy needs the haproxy binary on PATH"):
        runner.plan(loaded, "default", 8000, ingress="haproxy")
    assert runner.plan(loaded, "default", 8000).ingress == "serve"


def test_up_refuses_an_unknown_ingress_before_starting_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Any] = []
    monkeypatch.setattr(runner, "start_ray", lambda *a, **k: started.append(a))
    manifest = tmp_path / "app.yaml"
    manifest.write_text(app_yaml(tmp_path, replicas=1, gpus=0))
    result = CliRunner().invoke(app, ["up", "-f", str(manifest), "--num-gpus", "0", "--ingress", "nginx"])
    assert result.exit_code == 2, result.output
    assert "--ingress 'nginx': expected serve or haproxy" in result.output
    assert started == []
