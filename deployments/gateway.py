"""The gateway ingress: OpenAI-compatible HTTP API with token auth, in front of every engine app.

``deployments.gateway:build_app`` is the import path of the rendered ``gateway`` application. The
``Gateway`` class is plain: Serve wraps it in ``build_app``; tests may construct it directly with fake
backends. Its per-tenant data arrives as the Serve ``user_config`` (``reconfigure``), so token and
endpoint edits apply to live replicas without a restart.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from arks_ray.api.gateway import GATEWAY_APP, Backend, GatewayConfig
from arks_ray.engines import protocol
from arks_ray.errors import BackendUnavailable, InvalidRequest, RequestError, RequestTooLarge, to_openai_error
from arks_ray.gateway.index import GatewayIndex
from arks_ray.gateway.routing import choose_backend
from arks_ray.gateway.settings import GatewaySettings

logger = logging.getLogger("ray.serve.arks.gateway")

DEPLOYMENT_NAME = "ArksGateway"


class EngineStream(Protocol):
    def __aiter__(self) -> AsyncIterator[Any]: ...


class Backends(Protocol):
    """How the gateway reaches a backend: returns the protocol stream of one request."""

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool) -> Any: ...


class ServeBackends:
    """Backends reached through Serve deployment handles, one cached handle per application."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool) -> Any:
        if backend.kind != "app":
            raise BackendUnavailable(f"backend {backend.name!r} of kind {backend.kind} is not supported yet")
        handle = self._handles.get(backend.name)
        if handle is None:
            from ray import serve

            try:
                handle = serve.get_app_handle(backend.name).options(stream=True)
            except Exception as exc:  # the app is missing or not deployed yet
                raise BackendUnavailable(f"backend {backend.name!r} is not available: {exc}") from None
            self._handles[backend.name] = handle
        return handle.generate.remote(kind, body, client_usage)


def error_response(err: RequestError) -> JSONResponse:
    status, body, headers = to_openai_error(err)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; 413 past ``limit`` bytes, 400 if not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    return body


class Gateway:
    """The ingress logic, independent of Serve."""

    def __init__(self, settings: GatewaySettings, backends: Backends,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.backends = backends
        self.clock = clock
        self.index = GatewayIndex(GatewayConfig())
        self.rng = random.Random(settings.seed)  # noqa: S311 - load spreading, not security

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Swap in a new ``GatewayConfig``; an invalid one is refused and the previous one kept."""
        try:
            config = GatewayConfig.model_validate(user_config)
        except ValidationError as exc:
            logger.error("gateway config refused, keeping the previous one: %s", exc)
            raise
        self.index = GatewayIndex(config)
        logger.info("gateway config applied: %d endpoints, %d tokens, %d quotas",
                    len(config.endpoints), len(config.tokens), len(config.quotas))

    async def models(self, authorization: str | None) -> dict[str, Any]:
        token = self.index.authenticate(authorization, self.clock())
        owner = self.index.config.namespace
        return {"object": "list", "data": [
            {"id": e.name, "object": "model", "created": 0, "owned_by": owner} for e in self.index.models_for(token)
        ]}

    async def openai(self, kind: str, request: Request) -> Response:
        index = self.index  # one config for the whole request, even if a reconfigure lands meanwhile
        token = index.authenticate(request.headers.get("authorization"), self.clock())
        body = await read_json(request, self.settings.max_body_bytes)
        endpoint, _grant = index.authorize(token, body["model"])
        backend = choose_backend(endpoint, self.rng)
        stream = body.get("stream") is True and kind != "embeddings"
        client_usage = protocol.wants_usage(body)
        gen = self.backends.open(backend, kind, body, client_usage)
        iterator = gen.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise BackendUnavailable(f"backend {backend.name!r} returned nothing") from None
        except RequestError:
            raise
        except Exception as exc:
            logger.warning("backend %s failed before its first byte: %s", backend.name, exc)
            raise BackendUnavailable(f"backend {backend.name!r} failed: {type(exc).__name__}") from None
        if isinstance(first, dict):
            _cancel(gen)
            return JSONResponse(first.get("body", {}), status_code=int(first.get("status", 502)))
        if not stream:
            _cancel(gen)
            raise BackendUnavailable(f"backend {backend.name!r} answered a non-streaming request with a stream")
        return StreamingResponse(self._relay(first, iterator, gen), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _relay(self, first: str, iterator: AsyncIterator[Any], gen: Any) -> AsyncIterator[str]:
        try:
            yield first
            async for item in iterator:
                if isinstance(item, str):
                    yield item
                elif item.get("arks") == "error":
                    # Headers are gone: report in-band, as vLLM does, then end the stream properly.
                    yield f"data: {json.dumps(item.get('body', {}))}\n\n" + protocol.DONE
                    return
        finally:
            _cancel(gen)


def _cancel(gen: Any) -> None:
    cancel = getattr(gen, "cancel", None)
    if cancel is not None:
        cancel()


def make_api(gateway: Gateway) -> FastAPI:
    """The HTTP surface of one ``Gateway``: used by the Serve replica and, directly, by tests."""
    api = FastAPI(title="arks-ray gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse(await gateway.models(request.headers.get("authorization")))

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await gateway.openai("chat", request)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.openai("completions", request)

    @api.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gateway.openai("embeddings", request)

    return api


class GatewayDeployment:
    """The Serve deployment: one ``Gateway`` per replica, its HTTP app built inside the replica."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.gateway = Gateway(settings, ServeBackends())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.gateway.reconfigure(user_config)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.gateway)


def build_app(args: dict[str, Any]) -> Any:
    """Serve's entry point for the ``gateway`` application."""
    from ray import serve

    settings = GatewaySettings.model_validate(args.get("settings") or {})
    deployment = serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=1000)(serve.ingress()(GatewayDeployment))
    return deployment.bind(settings)


__all__ = ["GATEWAY_APP", "Gateway", "GatewayDeployment", "build_app", "make_api"]
