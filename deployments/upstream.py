"""One OpenAI-compatible HTTP upstream, spoken to in the gateway's typed items.

Used for both HTTP proxies: the gateway's static backends (``deployments.backends.HttpBackends``, an
ArksEndpoint ``routeConfigs`` entry) and the Dynamo frontend a Dynamo replica runs as a sidecar
(``deployments.dynamo_engine``). Streams are relayed whole-event by whole-event through the meter; errors
are classified (a 4xx is the client's, the rest the upstream's) and described without the upstream's
address: ``name`` is what a client may see.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from arks_ray.engines.protocol import (
    PATHS,
    Answer,
    EngineItem,
    EngineRequest,
    Failure,
    invalid,
    upstream_failure,
    with_usage,
)
from arks_ray.engines.sse import StreamMeter, paced, relay_sse

logger = logging.getLogger("ray.serve.arks.upstream")


def error_message(status: int, raw: bytes) -> tuple[str, str | None]:
    """Message and param of an upstream's error body: OpenAI's ``{"error": {...}}``, a bare
    ``{"message": ...}`` (Dynamo's), a string error, or the text itself."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return (text[:500] or f"HTTP {status}"), None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            return str(inner.get("message") or f"HTTP {status}")[:500], inner.get("param")
        if isinstance(inner, str):
            return inner[:500], None
        if data.get("message"):
            return str(data["message"])[:500], None
    return (text[:500] or f"HTTP {status}"), None


def without_address(exc: BaseException) -> str:
    """An HTTP client error as a log line may say it: its class and the system's reason, not its text, which
    names the upstream's host and port (and so does the system's message)."""
    code = errno.errorcode.get(getattr(getattr(exc, "os_error", None), "errno", None) or 0)
    return f"{type(exc).__name__} ({code})" if code else type(exc).__name__


def until_eof(content: Any) -> Callable[[float], Awaitable[None]]:
    """A wait between paced reads (``arks_ray.engines.sse.paced``) that ends early when the answer is complete:
    the last tokens and ``[DONE]`` are relayed as soon as the upstream ends its response, not an interval later
    (as Ray's own stream batcher does). ``content``: the response's aiohttp ``StreamReader``."""
    ended = asyncio.Event()
    content.on_eof(ended.set)

    async def wait(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), seconds)

    return wait


STALE = (errno.ECONNRESET, errno.EPIPE)


def stale_connection(exc: BaseException) -> bool:
    """The connection dropped before any answer: what a pooled keep-alive connection does when the server closed
    it as the request went out (uvicorn, under vLLM's server, closes idle ones after 5 s; aiohttp keeps them 15 s).
    The server read no request, so sending it again on a new connection is safe."""
    import aiohttp

    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError) \
        and exc.errno in STALE


class _Post:
    """``session.post(url, json=payload)``, sent once more on a new connection when the first one turns out to be
    stale before the answer's status line (``stale_connection``). Nothing is sent again once an answer began."""

    def __init__(self, session: Callable[[], Any], url: str, payload: dict[str, Any]) -> None:
        self.session, self.url, self.payload = session, url, payload
        self._cm: Any = None

    async def __aenter__(self) -> Any:
        try:
            self._cm = self.session().post(self.url, json=self.payload)
            return await self._cm.__aenter__()
        except Exception as exc:
            if not stale_connection(exc):
                raise
            logger.debug("a pooled connection was stale (%s); sending again on a new one", without_address(exc))
        self._cm = self.session().post(self.url, json=self.payload)
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._cm.__aexit__(*exc)


class Upstream:
    """An OpenAI HTTP API at ``base`` (never shown to clients), reached through one aiohttp session.

    ``model`` replaces the request's model name (a Dynamo frontend serves its own name); ``on_error``
    may rewrite an upstream's error before it is classified (Dynamo forgets a model while its worker
    restarts: a 404 that is really a 503). A stream is read at most once per ``interval_s``
    (``arks_ray.engines.sse.paced``)."""

    def __init__(self, name: str, base: str, session: Callable[[], Any], *, model: str | None = None,
                 on_error: Callable[[int, str], tuple[int, str]] | None = None, interval_s: float = 0.0) -> None:
        self.name, self.base, self._session, self.model = name, base, session, model
        self.on_error, self.interval_s = on_error, interval_s

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]:
        import aiohttp

        if request.kind not in PATHS:
            yield invalid(f"this model does not serve /v1/{request.kind}", status=404, code="unsupported_endpoint")
            return
        payload = with_usage(request.body) if request.kind != "embeddings" else request.body
        if self.model is not None:
            payload = {**payload, "model": self.model}
        try:
            async with _Post(self._session, self.base + PATHS[request.kind], payload) as resp:
                if resp.status >= 400:
                    yield self._failure(resp.status, await resp.read())
                    return
                if not request.stream:
                    raw = await resp.read()
                    try:
                        yield Answer(json.loads(raw), resp.status)
                    except ValueError:
                        yield Failure("engine", 502, f"{self.name} answered with invalid JSON")
                    return
                cut_short = Failure("engine", 502, f"{self.name} ended its stream before [DONE]")
                reads = paced(resp.content.iter_any(), self.interval_s, sleep=until_eof(resp.content))
                async for item in relay_sse(reads, StreamMeter(request.client_usage), cut_short):
                    yield item
        except aiohttp.ClientConnectorError as exc:
            logger.warning("%s is not reachable: %s", self.name, without_address(exc))
            yield Failure("unavailable", 503, f"{self.name} is not reachable")
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("%s failed mid-answer: %s", self.name, without_address(exc))
            timed_out = isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError)
            yield Failure("timeout" if timed_out else "engine", 502,
                          f"{self.name} failed mid-answer ({type(exc).__name__})")

    def _failure(self, status: int, raw: bytes) -> Failure:
        message, param = error_message(status, raw)
        if self.on_error is not None:
            status, message = self.on_error(status, message)
        failure = upstream_failure(status, message, param)
        if failure.blames_backend:  # its text is the upstream's business (5xx, 408, 429): logged, not shown
            logger.warning("%s answered HTTP %d: %s", self.name, status, message)
            return upstream_failure(status, f"{self.name} failed with HTTP {status}")
        return failure
