"""Load steps and what the Serve controller logged about them, for the autoscaling e2e suite and benchmark.

Used by ``tests/e2e/test_autoscaling.py`` and ``benchmarks/autoscaling_step.py``:

- ``LoadStep``: closed-loop streaming chat clients through the gateway, in a background thread;
- ``policy_decisions``: the policy's ``arks-autoscaling {json}`` lines from the controller log;
- ``serve_upscales``: Serve's own "Upscaling ... from N to M replicas" lines, logged for every policy,
  with their time;
- ``running_replicas`` and ``deployed_configs``: what Serve runs, from the dashboard;
- ``replica_log_lines``: lines of a replica's Serve log (the request routers log into the gateway's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from arks_ray.local import runner
from arks_ray.render.lora import ENGINE_PREFIX
from deployments.autoscaling import LOG_PREFIX

SESSION = Path("/tmp/ray/session_latest")
_UPSCALE = re.compile(r"Upscaling Deployment\(name='(?P<dep>[^']+)', app='(?P<app>[^']+)'\) "
                      r"from (?P<old>\d+) to (?P<new>\d+) replicas")


def _controller_messages() -> list[tuple[float | None, str]]:
    """(time, message) of every controller log line; the log is JSON or text depending on Serve's config."""
    out: list[tuple[float | None, str]] = []
    for path in sorted((SESSION / "logs/serve").glob("controller_*.log")):
        for line in path.read_text(errors="replace").splitlines():
            at: float | None = None
            message = line
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    message = str(record.get("message", ""))
                    if "timestamp_ns" in record:
                        at = int(record["timestamp_ns"]) / 1e9
            if at is None:
                stamp = re.match(r"\S+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
                if stamp:
                    at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((at, message))
    return out


def policy_decisions(app: str | None = None) -> list[dict[str, Any]]:
    """The SLO policy's decisions (and its configuration lines), oldest first."""
    out = []
    for _, message in _controller_messages():
        i = message.find(LOG_PREFIX)
        if i >= 0:
            record = json.loads(message[i + len(LOG_PREFIX):])
            if app is None or record.get("app") in (None, app):
                out.append(record)
    return out


def serve_upscales(app: str) -> list[tuple[float, int, int]]:
    """(time, from, to) of each scale-up Serve applied to ``app``, whatever the policy."""
    out = []
    for at, message in _controller_messages():
        match = _UPSCALE.search(message)
        if match and match["app"] == app and at is not None:
            out.append((at, int(match["old"]), int(match["new"])))
    return out


def running_replicas(app: str) -> int:
    """Running replicas of ``app``'s engine deployment (not of the placeholder ingress Ray's HAProxy mode puts in
    front of an app with its own router)."""
    deployments = runner.serve_status().get(app, {}).get("deployments", {})
    return int((deployments.get(ENGINE_PREFIX + app) or {}).get("replicas", {}).get("RUNNING", 0))


class LoadStep:
    """``clients`` streaming chat clients, each sending its next request as soon as one ends."""

    def __init__(self, base: str, token: str, model: str, clients: int, max_tokens: int = 64) -> None:
        self.base, self.token, self.model = base, token, model
        self.clients, self.max_tokens = clients, max_tokens
        self.ok = 0
        self.failed: list[str] = []
        self.started_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> LoadStep:
        self.started_at = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=180)

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"client {i} request {n}: tell me a long story"}]}
            try:
                # One session per client: a consistentHash app keeps each client on one replica.
                async with http.stream("POST", "/v1/chat/completions", json=body,
                                       headers={"x-session-id": f"client-{i}"}) as resp:
                    text = (await resp.aread()).decode()
                if resp.status_code == 200 and text.rstrip().endswith("data: [DONE]"):
                    self.ok += 1
                else:
                    self.failed.append(f"{resp.status_code}: {text[:200]}")
            except httpx.HTTPError as exc:
                self.failed.append(repr(exc))

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=self.base, headers=headers, timeout=120) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.clients)))


def deployed_configs(app: str) -> dict[str, dict[str, Any]]:
    """The deployment configs Serve runs for ``app``, by deployment (from the dashboard's Serve details)."""
    runner.serve_status()  # sets the dashboard's auth mode, as every runner call does
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(runner.dashboard_url()).get_serve_details()
    deployments = (details.get("applications") or {}).get(app, {}).get("deployments") or {}
    return {name: dep.get("deployment_config") or {} for name, dep in deployments.items()}


def replica_log_lines(app: str, needle: str) -> list[str]:
    """Lines containing ``needle`` in the Serve logs of ``app``'s replicas (e.g. the gateway's routers)."""
    return [line for path in sorted((SESSION / "logs/serve").glob(f"replica_{app}_*.log"))
            for line in path.read_text(errors="replace").splitlines() if needle in line]
