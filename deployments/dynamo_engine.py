"""Dynamo engine applications: Serve replicas that run NVIDIA Dynamo as sidecar processes.

Built into applications by ``deployments.dynamo_apps`` (``runtime: dynamo``, aggregated or PD).

- ``DynamoServer`` is an app's ingress replica. It runs ``python -m dynamo.frontend`` on a loopback port
  (plus the worker, for an aggregated app), waits until the frontend lists the model, and speaks the
  gateway protocol (``arks_ray.engines.protocol``): ``generate`` proxies the raw OpenAI body to the
  frontend over HTTP, streaming, with the usage chunk always requested and metered.
- ``DynamoWorker`` is a prefill or decode replica of a PD app: one worker sidecar.

Dynamo's Python lives in its own virtualenv (it pins older kubernetes and pydantic): ``ARKS_DYNAMO_PYTHON``
names its interpreter; the default is the repository's ``.venv-dynamo`` (``make dynamo-venv``). In a
cluster, the Dynamo image sets it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from arks_ray.engines import cadence, dynamo
from arks_ray.engines.protocol import EngineItem, EngineRequest
from arks_ray.engines.sidecars import Liveness, RestartPolicy
from deployments.dynamo_sidecars import Sidecar, loopback_session, wait_ready
from deployments.upstream import Upstream

logger = logging.getLogger("ray.serve.arks.dynamo")

REPO_PYTHON = Path(__file__).resolve().parents[1] / ".venv-dynamo/bin/python"
LIVENESS_MISSES = 3


class SidecarConfig(BaseModel):
    """What one Dynamo replica runs (the init args of its deployment)."""

    model_config = ConfigDict(extra="forbid")

    app: str = Field(description="The Arks application, named in every error.")
    engine: str = "vllm"
    model_path: str
    served_name: str
    namespace: str = Field(description="Dynamo namespace of the app.")
    run_id: str = Field(description="One per deployment: names the discovery directory the app's replicas share.")
    mode: str = Field("agg", description="agg, prefill or decode (the worker's role); frontend: no worker.")
    worker_args: list[str] = Field(default_factory=list)
    frontend_args: list[str] = Field(default_factory=list)
    run_frontend: bool = True
    run_worker: bool = True
    expect_prefill: bool = False
    python: str | None = Field(None, description="Dynamo's interpreter; default ARKS_DYNAMO_PYTHON, then .venv-dynamo.")
    startup_timeout_s: float = 900.0
    max_restarts: int = Field(5, description="Sidecar restarts allowed within 5 minutes before the replica fails.")
    initial_backoff_s: float = 0.5


def dynamo_python(config: SidecarConfig) -> str:
    path = config.python or os.environ.get("ARKS_DYNAMO_PYTHON") or str(REPO_PYTHON)
    if not os.access(path, os.X_OK):
        raise dynamo.LaunchError(f"application {config.app}: Dynamo's python {path} is not there; set "
                                 "ARKS_DYNAMO_PYTHON or run `make dynamo-venv`")
    return path


def state_dir(config: SidecarConfig) -> Path:
    base = Path(os.environ.get("ARKS_DYNAMO_STATE_DIR") or Path(tempfile.gettempdir()) / "arks-ray-dynamo")
    return base / f"{config.namespace}-{config.run_id}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Sidecars:
    """The sidecars of one replica, built from its config."""

    def __init__(self, config: SidecarConfig) -> None:
        python = dynamo_python(config)
        root = state_dir(config)
        cluster = dynamo.cluster_from_env(os.environ, config.namespace, str(root / "discovery"))
        if cluster.file_dir:
            Path(cluster.file_dir).mkdir(parents=True, exist_ok=True)
        specs: list[dynamo.LaunchSpec] = []
        self.port: int | None = None
        if config.run_frontend:
            self.port = free_port()
            specs.append(dynamo.frontend_spec(python, self.port, cluster, config.frontend_args))
        if config.run_worker:
            specs.append(dynamo.worker_spec(python, config.engine, config.model_path, config.served_name,
                                            cluster, mode=config.mode, args=config.worker_args))
        logs = root / "logs" / f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        policy = RestartPolicy(initial_backoff_s=config.initial_backoff_s, max_restarts=config.max_restarts)
        self.items = [Sidecar(spec, logs, policy=policy) for spec in specs]
        self.config = config
        self.stopping = False

    def start(self) -> None:
        for sidecar in self.items:
            sidecar.start()

    def failure(self) -> str | None:
        for s in self.items:
            if s.failed:
                return (f"application {self.config.app}: {s.tracker.last_reason}\n"
                        f"--- last lines of {s.log_path}:\n{s.log_tail()}")
        return None

    def role(self, role: str) -> Sidecar | None:
        return next((s for s in self.items if s.spec.role == role), None)

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*(s.stop() for s in self.items), return_exceptions=True)

    def stop_once(self) -> Any:
        """``stop()`` the first time (a coroutine to await), None after."""
        if self.stopping:
            return None
        self.stopping = True
        return self.stop()


class DynamoWorker:
    """A prefill or decode replica of a Dynamo PD app: one supervised worker process."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self.config = SidecarConfig.model_validate(config)
        self.sidecars = _Sidecars(self.config)
        self.sidecars.start()

    async def check_health(self) -> None:
        failure = self.sidecars.failure()
        if failure:
            raise RuntimeError(failure)

    async def status(self) -> dict[str, Any]:
        return {"app": self.config.app, "mode": self.config.mode,
                "sidecars": [s.status() for s in self.sidecars.items]}

    def __del__(self) -> Any:
        # Serve awaits what this returns at graceful shutdown; by garbage collection nothing is left to do.
        return self.sidecars.stop_once()


def frontend_upstream(app: str, served_name: str, base: str, session: Any, interval_s: float = 0.0) -> Upstream:
    """The Dynamo frontend sidecar as an ``Upstream`` serving ``served_name``, read at most every
    ``interval_s``."""

    def on_error(status: int, message: str) -> tuple[int, str]:
        if status == 404 and "model" in message.lower():
            # The frontend forgets a model while its worker restarts; the gateway only routes models we serve.
            return 503, f"no Dynamo worker serves {served_name!r} right now: {message}"
        return status, message

    return Upstream(f"application {app}", base, lambda: session, model=served_name, on_error=on_error,
                    interval_s=interval_s)


class DynamoServer:
    """The ingress replica of a Dynamo app: the frontend sidecar (and the worker, when aggregated)."""

    async def __init__(self, config: dict[str, Any],  # type: ignore[misc]  # Serve awaits it
                       workers: list[Any] | None = None) -> None:
        self.config = SidecarConfig.model_validate(config)
        self.workers = list(workers or [])
        self.sidecars = _Sidecars(self.config)
        self.base = f"http://127.0.0.1:{self.sidecars.port}"
        self.session = loopback_session()
        self.interval_ms, self.interval_max_ms, self.in_flight = cadence.BASE_MS, cadence.MAX_MS, 0
        self._liveness = Liveness(misses=LIVENESS_MISSES, startup_s=self.config.startup_timeout_s)
        self.sidecars.start()
        try:
            await self._wait_ready()
        except BaseException:
            await self.close()
            raise

    async def _ready(self) -> bool:
        import aiohttp

        try:
            async with self.session.get(self.base + "/v1/models", timeout=aiohttp.ClientTimeout(total=2)) as r:
                models = {m.get("id") for m in (await r.json()).get("data", [])} if r.status == 200 else set()
            if self.config.served_name not in models:
                return False
            if not self.config.expect_prefill:
                return True
            async with self.session.get(self.base + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                health = await r.json()
            return any(i.get("component") == "prefill" for i in health.get("instances", []))
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return False

    async def _wait_ready(self) -> None:
        took = await wait_ready(self._ready, self.sidecars.failure, self.config.startup_timeout_s,
                                f"application {self.config.app}: the Dynamo frontend did not list model "
                                f"{self.config.served_name!r} within {self.config.startup_timeout_s:.0f}s")
        logger.info("application %s: Dynamo ready in %.1fs at %s", self.config.app, took, self.base)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]:
        """The frontend's answer, its stream read at most once per interval as the other engine apps send
        theirs (``arks_ray.engines.cadence``: the first output at once, then per interval, growing with the
        streams in flight), so each item through Serve to the gateway carries what came meanwhile."""
        interval = cadence.interval_ms(self.interval_ms, self.interval_max_ms, self.in_flight + 1) / 1000
        proxy = frontend_upstream(self.config.app, self.config.served_name, self.base, self.session, interval)
        self.in_flight += 1
        try:
            async for item in proxy.generate(request):
                yield item
        finally:
            self.in_flight -= 1

    def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Serve's ``user_config``: ``stream_interval_ms`` and ``stream_interval_max_ms``, for the streams that
        start after it, as for the vLLM apps."""
        interval, ceiling = cadence.user_intervals(config)
        if interval is not None:
            self.interval_ms = interval
        if ceiling is not None:
            self.interval_max_ms = ceiling

    async def check_health(self) -> None:
        """Serve's health check: fails once a sidecar has failed for good (Serve then replaces the replica).

        A frontend process that lives but stops answering is killed here, and so restarted."""
        import aiohttp

        failure = self.sidecars.failure()
        if failure:
            raise RuntimeError(failure)
        frontend = self.sidecars.role("frontend")
        if frontend is None or frontend.pid is None:
            return
        try:
            async with self.session.get(self.base + "/live", timeout=aiohttp.ClientTimeout(total=2)) as r:
                await r.read()
            healthy = True
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        why = self._liveness.check(frontend.tracker.starts, time.monotonic(), healthy)
        if why:
            logger.warning("application %s: the Dynamo frontend %s; restarting it", self.config.app, why)
            await frontend.kill()

    async def status(self) -> dict[str, Any]:
        workers = [await w.status.remote() for w in self.workers]
        return {"app": self.config.app, "url": self.base, "sidecars": [s.status() for s in self.sidecars.items],
                "workers": workers}

    async def close(self) -> None:
        await self.sidecars.stop()
        await self.session.close()

    def __del__(self) -> Any:
        # Serve awaits what this returns at graceful shutdown; by garbage collection nothing is left to do.
        if self.sidecars.stopping:
            return None
        self.sidecars.stopping = True
        return self.close()
