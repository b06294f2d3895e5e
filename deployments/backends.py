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
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from arks_ray.api.gateway import Backend
from arks_ray.engines.protocol import EngineItem, EngineRequest, EngineStream, Failure
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

    Apps found with no running replica while deploying, restarting or unhealthy are *down*: a request to
    one is answered 503 at once instead of queueing on the handle until a replica is back (a minute or more
    for an engine), and a request still waiting for its first item when its app goes down gets the same.
    A request to a down app re-reads Serve's status first if the last read is older than ``recheck_s``,
    so an app that just came up is served at once, not after the next health check."""

    def __init__(self, recheck_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._handles: dict[str, Any] = {}
        self.down: dict[str, str] = {}
        self.recheck_s = recheck_s
        self._clock = clock
        self._checked_at = -1e9
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def _handle(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            from ray import serve

            # One configured handle per app, reused: options() builds a new handle each call.
            handle = serve.get_app_handle(name).options(stream=True, method_name="generate")
            self._handles[name] = handle
        return handle

    def forget(self, name: str) -> None:
        self._handles.pop(name, None)

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        return _ServeStream(self, backend, request)

    async def probe(self) -> dict[str, tuple[bool, str]]:
        """Serve's status of every app: can it serve (a running replica), and if not, why; marks apps down."""
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        self._checked_at = self._clock()
        out: dict[str, tuple[bool, str]] = {}
        down: dict[str, str] = {}
        for name, app in status.applications.items():
            states = [(getattr(state, "value", state), int(n)) for d in app.deployments.values()
                      for state, n in d.replica_states.items()]
            running = sum(n for state, n in states if state == "RUNNING")
            out[name] = (True, "") if running else (False, f"Serve app {app.status}: no running replica")
            # Down only when Serve itself says the app is not serving (deploying, unhealthy after a replica
            # died, deleting) and no replica runs: a RUNNING app is never refused here (one scaled to zero
            # takes the request that scales it up).
            if not running and app.status != "RUNNING":
                down[name] = str(getattr(app.status, "value", app.status))
        self.mark_down(down)
        return out

    def mark_down(self, down: dict[str, str]) -> None:
        for name in set(down) - set(self.down):
            for waiter in self._waiters.pop(name, set()):
                if not waiter.done():
                    waiter.set_result(None)
        self.down = down

    async def still_down(self, name: str) -> bool:
        if name in self.down and self._clock() - self._checked_at >= self.recheck_s:
            try:
                await self.probe()
            except Exception as exc:  # Serve's controller unreachable: keep what the last check said
                logger.warning("Serve status unavailable: %s", type(exc).__name__)
        return name in self.down

    def watch(self, name: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, set()).add(waiter)
        return waiter

    def unwatch(self, name: str, waiter: asyncio.Future[None]) -> None:
        self._waiters.get(name, set()).discard(waiter)


class _ServeStream:
    """One request to a Serve app: refused at once while the app is down, or while it waits for its first
    item and the app goes down; Ray's exceptions as failures."""

    def __init__(self, owner: ServeBackends, backend: Backend, request: EngineRequest) -> None:
        self.owner, self.backend, self.request = owner, backend, request
        self.name = backend.name
        self._gen: Any = None

    def cancel(self) -> None:
        if self._gen is not None:
            self._gen.cancel()

    def __aiter__(self) -> AsyncIterator[EngineItem]:
        return self._items()

    def _down(self) -> Failure:
        return Failure("unavailable", 503, f"backend {self.name!r} has no replica ready right now")

    async def _items(self) -> AsyncIterator[EngineItem]:
        if await self.owner.still_down(self.name):
            yield self._down()
            return
        try:
            handle = self.owner._handle(self.name)
            if self.request.session is not None:
                handle = handle.options(session_id=self.request.session)
            if self.backend.adapter is not None:  # a LoRA adapter: Serve routes to replicas that have it loaded
                handle = handle.options(multiplexed_model_id=self.backend.adapter)
            self._gen = handle.remote(self.request)
        except Exception as exc:  # the app is missing or not deployed yet
            yield describe_failure(self.name, exc)
            return
        items = self._gen.__aiter__()
        first = asyncio.ensure_future(items.__anext__())
        waiter = self.owner.watch(self.name)
        try:
            await asyncio.wait({first, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            first.cancel()
            raise
        finally:
            self.owner.unwatch(self.name, waiter)
        if not first.done():  # the app went down while this request waited for a replica
            first.cancel()
            self._gen.cancel()
            yield self._down()
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
    """OpenAI-compatible HTTP services, streamed through. One aiohttp session per gateway replica."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._session: Any = None

    def client(self) -> Any:
        if self._session is None or self._session.closed:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.http_connect_timeout_s,
                                            sock_read=self.settings.http_read_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=True)
        return self._session

    def open(self, backend: Backend, request: EngineRequest) -> EngineStream:
        assert backend.url is not None
        upstream = Upstream(f"backend {backend.name!r}", backend.url, self.client)
        return ItemStream(upstream.generate(request), backend.name)

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
        await self.http.close()
