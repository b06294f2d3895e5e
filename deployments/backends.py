"""How the gateway reaches backends, and how it checks they are alive.

Used by the gateway deployment (``deployments.gateway``). Two kinds of backend, both speaking the
gateway protocol of ``arks_ray.engines.protocol`` to the gateway:

- ``ServeBackends``: a Serve application (an ArksApplication's engine), through one cached
  deployment handle per app; a consistent-hash app gets the request's session id on the handle;
- ``HttpBackends``: any OpenAI-compatible HTTP service (an ArksEndpoint ``routeConfigs`` entry),
  streamed through with aiohttp. The client's Authorization header is never forwarded.

``probe`` is the active health check of either kind, run by the gateway deployment's health loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from arks_ray.api.gateway import Backend
from arks_ray.engines import protocol
from arks_ray.errors import BackendUnavailable
from arks_ray.gateway.settings import GatewaySettings


class Backends(Protocol):
    """How the gateway reaches a backend: returns the protocol stream of one request."""

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool,
             session: str | None = None) -> Any: ...


class ServeBackends:
    """Backends reached through Serve deployment handles, one cached handle per application."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def _handle(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            from ray import serve

            try:
                # One configured handle per app, reused: options() builds a new handle each call.
                handle = serve.get_app_handle(name).options(stream=True, method_name="generate")
            except Exception as exc:  # the app is missing or not deployed yet
                raise BackendUnavailable(f"backend {name!r} is not available: {exc}") from None
            self._handles[name] = handle
        return handle

    def forget(self, name: str) -> None:
        """Drop a cached handle (after a failure: the app may have been redeployed)."""
        self._handles.pop(name, None)

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool,
             session: str | None = None) -> Any:
        handle = self._handle(backend.name)
        if session is not None:
            handle = handle.options(session_id=session)
        return handle.remote(kind, protocol.RequestBody(body), client_usage)


def _error_body(status: int, raw: bytes, name: str) -> dict[str, Any]:
    """An upstream HTTP error as a protocol error: its OpenAI message kept, 5xx reported as 502."""
    message = raw.decode("utf-8", errors="replace")[:500] or f"HTTP {status}"
    param = None
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            message, param = str(err.get("message") or message), err.get("param")
        elif isinstance(err, str):
            message = err
    except (ValueError, AttributeError):
        pass
    if status >= 500:
        return protocol.error(502, f"backend {name!r} failed with HTTP {status}: {message}", "server_error")
    return protocol.error(status, message, protocol.error_type(status), param)


class HttpBackends:
    """OpenAI-compatible HTTP services, streamed through. One aiohttp session per gateway replica."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._session: Any = None

    def _client(self) -> Any:
        if self._session is None or self._session.closed:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.http_connect_timeout_s,
                                            sock_read=self.settings.http_read_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=True)
        return self._session

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool,
             session: str | None = None) -> AsyncIterator[Any]:
        return self._exchange(backend, kind, body, client_usage)

    async def _exchange(self, backend: Backend, kind: str, body: dict[str, Any],
                        client_usage: bool) -> AsyncIterator[Any]:
        if kind not in protocol.PATHS or backend.url is None:
            yield protocol.error(404, f"unknown endpoint {kind!r}")
            return
        payload = protocol.with_usage(body) if kind != "embeddings" else body
        streaming = payload.get("stream") is True and kind != "embeddings"
        async with self._client().post(backend.url + protocol.PATHS[kind], json=payload) as resp:
            if resp.status >= 400:
                yield _error_body(resp.status, await resp.read(), backend.name)
                return
            if not streaming:
                raw = await resp.read()
                try:
                    yield protocol.response(json.loads(raw), resp.status)
                except ValueError:
                    yield protocol.error(502, f"backend {backend.name!r} answered with invalid JSON", "server_error")
                return
            cut_short = f"backend {backend.name!r} ended its stream before [DONE]"
            async for item in protocol.relay_sse(resp.content.iter_any(), protocol.StreamMeter(client_usage),
                                                 cut_short):
                yield item

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class RoutedBackends:
    """Serve apps and HTTP services behind one ``Backends``, chosen by the backend's kind."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.serve = ServeBackends()
        self.http = HttpBackends(settings)
        self.settings = settings

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool,
             session: str | None = None) -> Any:
        target: Backends = self.http if backend.kind == "http" else self.serve
        return target.open(backend, kind, body, client_usage, session)

    def forget(self, backend: Backend) -> None:
        if backend.kind == "app":
            self.serve.forget(backend.name)

    async def probe_apps(self) -> dict[str, tuple[bool, str]]:
        """Every Serve application: can it serve (at least one running replica), and if not, why."""
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        out: dict[str, tuple[bool, str]] = {}
        for name, app in status.applications.items():
            running = sum(int(d.replica_states.get("RUNNING", 0)) for d in app.deployments.values())
            out[name] = (True, "") if running else (False, f"Serve app {app.status}: no running replica")
        return out

    async def probe_http(self, backend: Backend) -> tuple[bool, str]:
        """GET the service's health path; any answer below 500 within the timeout is alive."""
        import aiohttp

        assert backend.url is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.health_check_timeout_s)
            async with self.http._client().get(backend.url + self.settings.http_health_path,
                                               timeout=timeout) as resp:
                await resp.read()
                return (resp.status < 500), f"health check answered HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, f"health check failed: {type(exc).__name__}: {exc}"

    async def close(self) -> None:
        await self.http.close()
