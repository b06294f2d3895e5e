"""The gateway's HTTP surface: the OpenAI routes, token auth as a plain ASGI middleware, OpenAI-style errors.

Built by the Serve deployment (``deployments.gateway``) around its ``Pipeline``, and by tests around a
pipeline with a mock engine. Auth runs before any route (as vLLM's API-key middleware does): every
``/v1`` request needs a bearer token, and the authenticated ``Token`` travels in the ASGI scope's state.
Every error a client can get, from a bad token to an unknown path or method, is an OpenAI error body, built
in one place (``arks_ray.errors.to_openai_error``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from arks_ray.api.gateway import Token
from arks_ray.engines.protocol import PATHS
from arks_ray.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestError,
    RequestTooLarge,
    to_openai_error,
)
from arks_ray.gateway.requests import check_request, parse_json
from deployments.pipeline import Pipeline, Reply

logger = logging.getLogger("ray.serve.arks.gateway")

TOKEN_KEY = "arks_token"  # noqa: S105 - the scope key, not a token
STARTED_KEY = "arks_started"
OPEN_PATHS = ("/healthz",)
KINDS = {**{path: kind for kind, path in PATHS.items()}, "/v1/models": "models"}
"""The kind of request each path serves (for requests refused before routing)."""


def error_response(err: RequestError) -> JSONResponse:
    status, body, headers = to_openai_error(err)
    return JSONResponse(body, status_code=status, headers=headers)


class AuthMiddleware:
    """Authenticates every HTTP request but the health check, before routing; 401 in OpenAI's shape."""

    def __init__(self, app: ASGIApp, pipeline: Pipeline) -> None:
        self.app, self.pipeline = app, pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        started = self.pipeline.clock()
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            token = self.pipeline.index.authenticate(header, started)
        except RequestError as err:
            self.pipeline.refused(KINDS.get(scope.get("path", ""), "other"), None, err, started,
                                  Headers(scope=scope))
            await error_response(err)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state[TOKEN_KEY], state[STARTED_KEY] = token, started
        await self.app(scope, receive, send)


async def read_body(request: Request, kind: str, pipeline: Pipeline) -> dict[str, Any]:
    """The request body as a checked JSON object: 413 past the size limit, 400 for anything else wrong."""
    settings = pipeline.settings
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return check_request(kind, parse_json(b"".join(chunks)), max_n=settings.max_n, max_prompts=settings.max_prompts)


def to_response(reply: Reply) -> Response:
    if reply.stream is None:
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
    return LifecycleStream(reply)


class LifecycleStream(StreamingResponse):
    """A streamed answer that ends its request however the response ends: read to the end, or not at all
    (the client left before the first chunk was sent, and the relay never ran)."""

    def __init__(self, reply: Reply) -> None:
        assert reply.stream is not None
        super().__init__(reply.stream, status_code=reply.status, headers=reply.headers,
                         media_type="text/event-stream")
        self.reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.close()


def _token(request: Request) -> Token:
    token: Token = request.state.arks_token
    return token


def _model(pipeline: Pipeline, entry: Any) -> dict[str, Any]:
    return {"id": entry.name, "object": "model", "created": 0, "owned_by": pipeline.index.config.namespace}


def _route(serve: Callable[[str, Request], Awaitable[Response]], kind: str) -> Callable[[Request],
                                                                                     Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await serve(kind, request)

    return endpoint


def make_api(pipeline: Pipeline) -> FastAPI:
    """The HTTP surface of one ``Pipeline``: used by the Serve replica and, directly, by tests."""
    api = FastAPI(title="arks-ray gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"))
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.url.path!r}", param=None))
        return error_response(InvalidRequest(str(exc.detail)))

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        entries = pipeline.index.models_for(_token(request))
        return JSONResponse({"object": "list", "data": [_model(pipeline, e) for e in entries]})

    @api.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        for entry in pipeline.index.models_for(_token(request)):
            if entry.name == model_id:
                return JSONResponse(_model(pipeline, entry))
        raise NotFound(f"the model {model_id!r} does not exist", param="model")

    async def serve(kind: str, request: Request) -> Response:
        started = getattr(request.state, STARTED_KEY, None) or time.time()
        try:
            body = await read_body(request, kind, pipeline)
        except RequestError as err:
            pipeline.refused(kind, _token(request), err, started, request.headers)
            raise
        return to_response(await pipeline.serve(kind, _token(request), body, request.headers, started))

    for kind, path in PATHS.items():  # each kind in the engine port's path table is a POST route
        api.add_api_route(path, _route(serve, kind), methods=["POST"], name=kind)

    api.add_middleware(AuthMiddleware, pipeline=pipeline)
    return api
