"""How the gateway reaches backends, and how it checks they are alive: the ``Backends`` port's adapters.

Used by the gateway pipeline (``deployments.pipeline``) through the ``Backends`` Protocol. Two kinds of
backend, both answering in the typed items of ``arks_ray.engines.protocol``:

- ``ServeBackends``: a Serve application (an ArksApplication's engine), through one cached deployment
  handle per app; a consistent-hash app gets the request's session id on the handle. Ray's exceptions
  (a replica that died, back-pressure, no replica) become ``Failure`` items here, described without
  Ray's internals, which go to the log;
- ``HttpBackends``: any OpenAI-compatible HTTP service (an ArksEndpoint ``routeConfigs`` entry), through
  ``deployments.upstream.Upstream``. The client's Authorization header is never forwarded.

``probe_*`` are the active health checks, run by the gateway deployment's health loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from arks_ray.api.gateway import Backend
from arks_ray.engines import cadence
from arks_ray.engines.protocol import FRONT_DEPLOYMENT, EngineItem, EngineRequest, EngineStream, Failure
from arks_ray.gateway.settings import GatewaySettings
from deployments.upstream import Upstream

logger = logging.getLogger("ray.serve.arks.gateway")


class Backends(Protocol):
    """Every call the gateway makes on its backends."""

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        """Start one request; its items come from the returned stream (which never raises but on cancel)."""

    def forget(self, backend: Backend) -> None:
        """Drop what is cached for a backend after it failed (it may have been redeployed)."""

    async def probe_apps(self) -> dict[str, tuple[bool, str]]:
        """Every Serve application: can it serve, and if not, why."""

    async def probe_http(self, backend: Backend) -> tuple[bool, str]:
        """One HTTP backend's health check."""

    async def close(self) -> None: ...


class ItemStream:
    """An ``EngineStream`` over any async iterator of items; a failure to produce one is a ``Failure``.

    ``describe`` turns an exception of the source into the failure a client sees (the exception itself
    is logged); ``stop`` cancels the source's work."""

    def __init__(self, source: Any, name: str, stop: Any = None) -> None:
        self._source, self._name, self._stop = source, name, stop

    async def _items(self) -> AsyncIterator[EngineItem]:
        try:
            async for item in self._source:
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield describe_failure(self._name, exc)

    def __aiter__(self) -> AsyncIterator[EngineItem]:
        return self._items()

    def cancel(self) -> None:
        if self._stop is not None:
            self._stop()


def describe_failure(name: str, exc: BaseException) -> Failure:
    """A backend's exception as a client may see it: its class of failure, never its text."""
    kind = type(exc).__name__
    logger.warning("backend %s failed: %s: %s", name, kind, str(exc)[:2000])
    if kind in ("BackPressureError", "DeploymentUnavailableError"):
        return Failure("unavailable", 503, f"backend {name!r} cannot take more requests right now")
    if isinstance(exc, TimeoutError) or kind == "GetTimeoutError":
        return Failure("timeout", 504, f"backend {name!r} timed out")
    if "ActorDied" in kind or "ActorError" in kind or "ActorUnavailable" in kind:
        return Failure("unavailable", 503, f"backend {name!r} lost the replica serving this request")
    return Failure("engine", 502, f"backend {name!r} failed")


class ServeBackends:
    """Serve applications through deployment handles, one cached handle per application.

    An app with no running replica while Serve says it is deploying, restarting or unhealthy is *down*.
    A request waiting for its first item is answered 503 as soon as a read of Serve's status that began
    after the request arrived finds its app down, instead of queueing on the handle until a replica is
    back (a minute or more for an engine). A request to an app already known down asks for such a read
    at once (reads are shared, and spaced by ``spacing_s``), so it gets its 503 within one round trip to
    Serve's controller, and an app that has just come up serves it. A read that began before the request
    never refuses it: a slow or stale read cannot turn away a request to an app that runs."""

    def __init__(self, spacing_s: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self._handles: dict[str, Any] = {}
        self.down: dict[str, str] = {}
        self.spacing_s = spacing_s
        self._clock = clock
        self._down_read_at = -math.inf  # when the read that ``down`` comes from began
        self._waiters: dict[str, dict[asyncio.Future[None], float]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._read_again = False

    async def _handle(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            from ray import serve

            target = serve.get_app_handle(name)
            if target.deployment_name == FRONT_DEPLOYMENT:
                # Under Ray's HAProxy ingress an engine with its own router sits behind a placeholder ingress
                # (deployments.engines.EngineFront): ask it once for the engine's deployment, then call that.
                engine = await target.options(method_name="engine_deployment").remote()
                target = serve.get_deployment_handle(engine, app_name=name)
            # One configured handle per app, reused: options() builds a new handle each call.
            handle = target.options(stream=True, method_name="generate")
            self._handles[name] = handle
        return handle

    def forget(self, name: str) -> None:
        self._handles.pop(name, None)

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        return _ServeStream(self, backend, request)

    async def probe(self) -> dict[str, tuple[bool, str]]:
        """Serve's status of every app: can it serve (a running replica), and if not, why; marks apps down
        and answers the requests that wait on a down app and arrived before this read began."""
        from ray import serve

        began = self._clock()
        status = await asyncio.to_thread(serve.status)
        out: dict[str, tuple[bool, str]] = {}
        down: dict[str, str] = {}
        for name, app in status.applications.items():
            states = [(getattr(state, "value", state), int(n)) for name_, d in app.deployments.items()
                      if name_ != FRONT_DEPLOYMENT for state, n in d.replica_states.items()]
            running = sum(n for state, n in states if state == "RUNNING")
            out[name] = (True, "") if running else (False, f"Serve app {app.status}: no running replica")
            # Down only when Serve itself says the app is not serving (deploying, unhealthy after a replica
            # died, deleting) and no replica runs: a RUNNING app is never refused here (one scaled to zero
            # takes the request that scales it up).
            if not running and app.status != "RUNNING":
                down[name] = str(getattr(app.status, "value", app.status))
        if began >= self._down_read_at:  # a read that began earlier and ended later is not the news
            self._down_read_at, self.down = began, down
        for name in down:
            for waiter, arrived in list(self._waiters.get(name, {}).items()):
                if arrived <= began and not waiter.done():
                    waiter.set_result(None)
        return out

    def watch(self, name: str) -> asyncio.Future[None]:
        """A future set when a read begun from now on finds ``name`` down; asks for one if it is known down."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, {})[waiter] = self._clock()
        if name in self.down:
            self._read_soon()
        return waiter

    def unwatch(self, name: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(name)
        if waiters is not None:
            waiters.pop(waiter, None)
            if not waiters:
                del self._waiters[name]

    def _read_soon(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._read_again = True  # the read in flight began too early for this request
            return
        self._reader = asyncio.get_running_loop().create_task(self._read_while_asked())

    async def _read_while_asked(self) -> None:
        while True:
            self._read_again = False
            began = self._clock()
            try:
                await self.probe()
            except Exception as exc:  # Serve's controller unreachable: the requests keep waiting on Serve
                logger.warning("Serve status unavailable: %s", type(exc).__name__)
            if not self._read_again:
                return
            await asyncio.sleep(max(0.0, self.spacing_s - (self._clock() - began)))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


class _ServeStream:
    """One request to a Serve app: refused when a status read begun after it arrived finds its app down
    before its first item; Ray's exceptions as failures."""

    def __init__(self, owner: ServeBackends, backend: Backend, request: EngineRequest) -> None:
        self.owner, self.backend, self.request = owner, backend, request
        self.name = backend.name
        self._gen: Any = None

    def cancel(self) -> None:
        if self._gen is not None:
            self._gen.cancel()

    def __aiter__(self) -> AsyncIterator[EngineItem]:
        return self._items()

    async def _items(self) -> AsyncIterator[EngineItem]:
        waiter = self.owner.watch(self.name)
        try:
            try:
                handle = await self.owner._handle(self.name)
                if self.request.session is not None:
                    handle = handle.options(session_id=self.request.session)
                if self.backend.adapter is not None:  # a LoRA adapter: Serve routes to replicas that have it
                    handle = handle.options(multiplexed_model_id=self.backend.adapter)
                self._gen = handle.remote(self.request)
            except Exception as exc:  # the app is missing or not deployed yet
                yield describe_failure(self.name, exc)
                return
            items = self._gen.__aiter__()
            first = asyncio.ensure_future(items.__anext__())
            try:
                await asyncio.wait({first, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                first.cancel()
                raise
        finally:
            self.owner.unwatch(self.name, waiter)
        if not first.done():  # the app is down while this request waits for a replica
            first.cancel()
            self._gen.cancel()
            yield Failure("unavailable", 503, f"backend {self.name!r} has no replica ready right now")
            return
        async for item in ItemStream(_after(first, items), self.name):
            yield item


async def _after(first: asyncio.Future[Any], items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        yield first.result()
    except StopAsyncIteration:
        return
    async for item in items:
        yield item


class HttpBackends:
    """OpenAI-compatible HTTP services, streamed through. One aiohttp session per gateway replica, with no cap
    on its connections unless ``http_max_connections`` sets one (aiohttp's own default, 100, queued every
    stream past the 100th)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._session: Any = None
        self.streams = 0
        """Requests in flight to HTTP backends from this replica: what their streams' read interval follows."""

    def client(self) -> Any:
        if self._session is None or self._session.closed:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.http_connect_timeout_s,
                                            sock_read=self.settings.http_read_timeout_s)
            connector = aiohttp.TCPConnector(limit=self.settings.http_max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=True, connector=connector)
        return self._session

    def interval_s(self) -> float:
        """The read interval of a stream that starts now (``arks_ray.engines.cadence``, on this replica's HTTP
        streams in flight, the new one included)."""
        s = self.settings
        return cadence.interval_ms(s.http_stream_interval_ms, s.http_stream_interval_max_ms, self.streams + 1) / 1000

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        assert backend.url is not None
        upstream = Upstream(f"backend {backend.name!r}", backend.url, self.client, interval_s=self.interval_s())
        return ItemStream(self._counted(upstream.generate(request)), backend.name)

    async def _counted(self, items: AsyncIterator[EngineItem]) -> AsyncIterator[EngineItem]:
        self.streams += 1
        try:
            async for item in items:
                yield item
        finally:
            self.streams -= 1

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class RoutedBackends:
    """Serve apps and HTTP services behind one ``Backends``, chosen by the backend's kind."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.serve = ServeBackends()
        self.http = HttpBackends(settings)
        self.settings = settings

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        if backend.kind == "http":
            return self.http.open(backend, request)
        return self.serve.open(backend, request)

    def forget(self, backend: Backend) -> None:
        if backend.kind == "app":
            self.serve.forget(backend.name)

    async def probe_apps(self) -> dict[str, tuple[bool, str]]:
        """Every Serve application: can it serve (at least one running replica), and if not, why."""
        return await self.serve.probe()

    async def probe_http(self, backend: Backend) -> tuple[bool, str]:
        """GET the service's health path; any answer below 500 within the timeout is alive."""
        import aiohttp

        assert backend.url is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.health_check_timeout_s)
            async with self.http.client().get(backend.url + self.settings.http_health_path,
                                              timeout=timeout) as resp:
                await resp.read()
                return (resp.status < 500), f"health check answered HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, f"health check failed: {type(exc).__name__}"

    async def close(self) -> None:
        await self.serve.close()
        await self.http.close()
