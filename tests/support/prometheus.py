"""A real Prometheus (Debian's ``prometheus``) scraping the local Ray, for the observability e2e and benchmark.

It discovers Ray's metrics agents the way Ray documents: ``file_sd_configs`` on the service-discovery file
the head node writes (``/tmp/ray/prom_metrics_service_discovery.json``), and loads a rule file (the
chart's PrometheusRule groups). ``query`` runs one instant PromQL query over the HTTP API.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.redis_server import free_port

RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"


class PrometheusServer:
    """One prometheus process on a free loopback port, with its own data directory."""

    def __init__(self, rules: dict[str, Any] | None = None, interval_s: float = 2.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: `make sysdeps` installs it (apt-get install prometheus)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="arks-prometheus-"))
        config: dict[str, Any] = {
            "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
            "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [RAY_SD_FILE],
                                                                          "refresh_interval": "5s"}]}],
        }
        if rules is not None:
            (self.dir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
            config["rule_files"] = [str(self.dir / "rules.yaml")]
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> PrometheusServer:
        log = (self.dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"prometheus did not start: {(self.dir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (raises on a PromQL error)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets_up(self) -> int:
        return sum(float(s["value"][1]) == 1 for s in self.query('up{job="ray"}'))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
