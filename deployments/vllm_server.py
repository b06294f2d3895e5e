"""vLLM engine applications with vLLM's own OpenAI server as the frontend (``spec.engineFrontend: vllmServer``).

Built by ``deployments.vllm_engine.build_vllm`` when the app asks for it. Each Serve replica runs
``python -m vllm.entrypoints.openai.api_server`` as a supervised child process on a loopback port (the
command line is ``arks_ray.engines.vllm_server.server_spec``'s), holding its bundle's GPU, and speaks the
gateway protocol (``arks_ray.engines.protocol``) by relaying each request to it over HTTP
(``deployments.upstream.Upstream``). vLLM's OpenAI layer, output handling and stat loggers then run in their
own process, as under ``vllm serve``, instead of on the replica's event loop (Ray's ``LLMServer``).

What the replica still does: streams leave it coalesced as with Ray's frontend (the first output at once,
then a read per interval that grows with the streams it serves, ``arks_ray.engines.cadence``;
``user_config.stream_interval_ms`` and ``stream_interval_max_ms`` change it live); it times every request and
reads the scheduler's gauges off the server's ``/metrics`` when the SLO autoscaling policy asks
(``record_autoscaling_stats``); a server that exits is restarted with backoff, one that stops answering is
killed and restarted, and one that keeps failing fails Serve's health check, so Serve replaces the replica.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from arks_ray.autoscaling.config import replica_stats
from arks_ray.engines import cadence
from arks_ray.engines.protocol import Chunk, EngineItem, EngineRequest, Final
from arks_ray.engines.sidecars import Liveness, RestartPolicy
from arks_ray.engines.vllm_server import KEEP_ALIVE_ENV, keep_alive_s, scheduler_gauges, server_spec
from deployments.dynamo_sidecars import Sidecar, loopback_session, wait_ready
from deployments.upstream import Upstream

logger = logging.getLogger("ray.serve.arks.engines")

LIVENESS_MISSES = 3
"""Health checks in a row that the server may miss before it is killed (and restarted)."""
GAUGE_TIMEOUT_S = 2.0
"""How long a look at the server's /metrics may take (Serve's own limit for the stats hook is longer)."""


class ServerConfig(BaseModel):
    """What one replica runs, from the app's Ray LLMConfig."""

    model_config = ConfigDict(extra="forbid")

    app: str = Field(description="The Arks application, named in every error.")
    model: str = Field(description="What vLLM loads: a local folder or a hub id.")
    served_name: str
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    deployment_config: dict[str, Any] = Field(default_factory=dict, description="For the autoscaling stats.")
    startup_timeout_s: float = Field(1800.0, gt=0)
    max_restarts: int = Field(5, ge=0, description="Server restarts allowed within 5 minutes before the replica fails.")

    @classmethod
    def of(cls, app: str, llm_config: Any) -> ServerConfig:
        loading = llm_config.model_loading_config
        return cls(app=app, model=loading.model_source or loading.model_id, served_name=loading.model_id,
                   engine_kwargs=dict(llm_config.engine_kwargs),
                   deployment_config=dict(llm_config.deployment_config or {}))


class VLLMServerReplica:
    """One engine replica: vLLM's OpenAI server in a child process, relayed. ``deployments.vllm_engine.build_vllm``
    gives it the deployment options of Ray's ``LLMServer``, so both frontends get the same placement group,
    replicas, autoscaling, request router and health checks."""

    async def __init__(self, config: ServerConfig) -> None:  # type: ignore[misc]  # Serve awaits it

        from deployments.dynamo_engine import free_port

        self.config = config
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        # The child is this interpreter, with the replica's environment (its GPU, its Python path: vLLM may
        # live on PYTHONPATH, as on the GPU kit), which the sidecar launcher otherwise leaves out.
        keep = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
        # The server keeps an idle connection longer than this replica's pool does, so that the pool never sends
        # on one the server is closing (vLLM's default is 5 s, aiohttp's 15 s; deployments.upstream also sends a
        # request again on a connection found stale).
        keep_alive = keep_alive_s(os.environ)
        keep[KEEP_ALIVE_ENV] = str(keep_alive)
        spec = server_spec(sys.executable, port, self.config.model, self.config.served_name,
                           self.config.engine_kwargs, env=keep)
        logs = Path(tempfile.gettempdir()) / "arks-ray-vllm-server" / f"{self.config.app}-{os.getpid()}-" \
            f"{uuid.uuid4().hex[:6]}"
        self.server = Sidecar(spec, logs, policy=RestartPolicy(max_restarts=self.config.max_restarts))
        self.session = loopback_session(keep_alive_s=max(1.0, keep_alive / 2))  # half the server's
        self.stats = replica_stats(self.config.deployment_config)
        self.interval_ms, self.interval_max_ms = cadence.BASE_MS, cadence.MAX_MS
        self._liveness = Liveness(misses=LIVENESS_MISSES, startup_s=self.config.startup_timeout_s)
        self.server.start()
        try:
            await self._wait_ready()
        except BaseException:
            await self.close()
            raise

    async def _ready(self) -> bool:
        import aiohttp

        try:
            async with self.session.get(self.base + "/v1/models", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status != 200:
                    return False
                return self.config.served_name in {m.get("id") for m in (await r.json()).get("data", [])}
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return False

    def _failure(self) -> str | None:
        if not self.server.failed:
            return None
        return (f"application {self.config.app}: {self.server.tracker.last_reason}\n"
                f"--- last lines of {self.server.log_path}:\n{self.server.log_tail()}")

    async def _wait_ready(self) -> None:
        took = await wait_ready(self._ready, self._failure, self.config.startup_timeout_s,
                                f"application {self.config.app}: vLLM's server did not serve "
                                f"{self.config.served_name!r} within {self.config.startup_timeout_s:.0f}s; "
                                f"its log: {self.server.log_path}")
        logger.info("application %s: vLLM's server ready in %.1fs (log: %s)", self.config.app, took,
                    self.server.log_path)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]:
        """The gateway's port: the request relayed to the server, timed for the autoscaling policy."""
        stats = self.stats
        interval = cadence.interval_ms(self.interval_ms, self.interval_max_ms, stats.in_flight + 1) / 1000
        upstream = Upstream(f"application {self.config.app}", self.base, lambda: self.session,
                            model=self.config.served_name, interval_s=interval)
        timer = stats.start(time.monotonic())
        tokens, first = 0, True
        try:
            async for item in upstream.generate(request):
                if first and isinstance(item, Chunk):
                    stats.first_output(timer, time.monotonic())
                    first = False
                if isinstance(item, Final):
                    tokens = int((item.usage or {}).get("completion_tokens", item.completion_tokens))
                yield item
        finally:
            # However the request ends (done, server error, client gone), it leaves the queue.
            stats.finish(timer, tokens, time.monotonic())

    async def _read_gauges(self) -> None:
        """The scheduler's queue and KV-cache use, off the server's Prometheus page. Read when Serve asks
        for the stats, so a deployment without autoscaling never scrapes it."""
        import aiohttp

        try:
            async with self.session.get(self.base + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=GAUGE_TIMEOUT_S)) as r:
                gauges = scheduler_gauges(await r.text()) if r.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return  # the stats go without them; they count as stale after ReplicaStats.engine_stale_s
        if "running" in gauges:
            self.stats.scheduler(int(gauges["running"]), int(gauges.get("waiting", 0)),
                                 gauges.get("kv_cache_usage", 0.0), time.monotonic())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook (called only for an autoscaling deployment): this replica's TTFT/TPOT percentiles,
        and the server's queue depth and KV-cache use as of now."""
        await self._read_gauges()
        return self.stats.report(time.monotonic())

    def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Serve's ``user_config``, for the streams that start after it: ``stream_interval_ms`` and
        ``stream_interval_max_ms``, as with Ray's frontend (``deployments.vllm_engine``)."""
        interval, ceiling = cadence.user_intervals(config)
        if interval is not None:
            self.interval_ms = interval
        if ceiling is not None:
            self.interval_max_ms = ceiling

    async def check_health(self) -> None:
        """Serve's health check: fails once the server has failed for good (Serve then replaces the replica).
        A server that stops answering is killed here, and so restarted; one that is still starting is given
        ``startup_timeout_s`` (``Liveness``: killing it for not answering yet restarted it forever)."""
        import aiohttp

        failure = self._failure()
        if failure:
            raise RuntimeError(failure)
        if self.server.pid is None:  # between a crash and its restart: the restart loop decides
            return
        try:
            async with self.session.get(self.base + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                await r.read()
                healthy = r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        why = self._liveness.check(self.server.tracker.starts, time.monotonic(), healthy)
        if why:
            logger.warning("application %s: vLLM's server %s; restarting it", self.config.app, why)
            await self.server.kill()

    async def status(self) -> dict[str, Any]:
        return {"app": self.config.app, "server": self.server.status()}

    async def close(self) -> None:
        await self.server.stop()
        await self.session.close()

    def __del__(self) -> Any:
        # Serve awaits what this returns at graceful shutdown; by garbage collection nothing is left to do
        # (the server has the parent-death signal set: it does not outlive the replica's process).
        if getattr(self, "_closing", False):
            return None
        self._closing = True
        return self.close()
